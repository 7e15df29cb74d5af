//! The two transports of the one ICheckpoint object: kernel binder registered with the service
//! manager (Android's servicemanager, or rsb_hub on Linux), and binder RPC on a Unix socket
//! for hosts without kernel binder. All rsbinder bootstrap code lives here (the glue that
//! differs from AOSP's libbinder_rs).
//!
//! # Sessions on the socket
//!
//! rsbinder's RPC server gives every connection a worker thread and an fd, and its own accept
//! loop admits without regard to who connects (its `set_max_connections` stops accepting at
//! the cap, so root would queue behind anyone's sessions). So the socket is served by an accept
//! loop of ours that hands each admitted connection to rsbinder (`RpcServer::serve_connection`):
//!
//! - **Admission by UID** (SO_PEERCRED, read right after `accept`, before any thread or RPC
//!   byte): at most `socket.max_sessions` connections; UIDs outside `access.change_uids`
//!   together at most `socket.max_sessions` − `socket.reserved_sessions` of them, and each at
//!   most `socket.max_sessions_per_uid`. A refused connection is closed at once; the refusals are logged at most once a
//!   minute per UID. The slot is held by the transport we hand over and freed when rsbinder
//!   drops it (the session ended).
//! - **Handshake deadline** (`socket.handshake_timeout_ms`): rsbinder's, which shuts down a
//!   connection that has not finished the RPC handshake.
//! - **First-call deadline** (`socket.first_call_timeout_ms`): a connection whose peer sends
//!   nothing after the handshake is closed. A session that has called may idle (a
//!   `checkpointctl watch` waits for events), but it keeps counting against its UID's share.
//! - **Write deadline** (`socket.write_timeout_ms`): a send to a peer that does not read (a
//!   reply, or a oneway listener event into a stopped process) fails instead of blocking its
//!   thread; rsbinder then ends that session.
//!
//! The private `RpcServer` needs a listener of its own that is never accepted from: it is
//! bound next to the socket and unlinked at once, so nothing can reach it.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rsbinder::entry::{Endpoint, KernelEndpoint, ServerGuard, Uri, WireVersion};
use rsbinder::rpc::transport::UnixTransport;
use rsbinder::rpc::{PeerIdentity, RpcError, RpcServer, RpcTransport};
use rsbinder::SIBinder;

use crate::config::{BinderConfig, SocketConfig};

/// A transport that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Kernel binder: ProcessState or the service-manager registration failed.
    #[error(
        "cannot serve {service} on kernel binder{driver}: {message} (is the binder driver \
         present and the service manager running? Without kernel binder set [binder] enabled = \
         false and [socket] path)"
    )]
    Kernel {
        /// The service name.
        service: String,
        /// " (driver /dev/...)" or "".
        driver: String,
        /// rsbinder's error.
        message: String,
    },
    /// The RPC socket could not be created.
    #[error("cannot serve on socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        message: String,
    },
}

/// Registers `binder` with the service manager and starts the binder thread pool.
pub fn serve_kernel(
    binder: SIBinder,
    config: &BinderConfig,
) -> Result<ServerGuard, TransportError> {
    let mut endpoint = KernelEndpoint::default();
    if let Some(driver) = &config.driver {
        endpoint = endpoint.with_driver(driver);
    }
    let error = |message: String| TransportError::Kernel {
        service: config.service_name.clone(),
        driver: config
            .driver
            .as_ref()
            .map_or(String::new(), |d| format!(" (driver {})", d.display())),
        message,
    };
    let guard = rsbinder::serve(Uri::from(endpoint))
        .and_then(|server| server.add(&config.service_name, binder))
        .map_err(|e| error(format!("{e:?}")))?
        .spawn()
        .map_err(|e| error(format!("{e:?}")))?;
    log::info!("serving {} on kernel binder", config.service_name);
    Ok(guard)
}

// ---- admission ----

/// The session limits of `[socket]` and who may use the reserved share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// All connections together.
    pub max: usize,
    /// Per UID outside `privileged`.
    pub max_per_uid: usize,
    /// Of `max`, kept for `privileged`.
    pub reserved: usize,
    /// `access.change_uids`: no per-UID cap, and the reserved share.
    pub privileged: Vec<u32>,
}

impl SessionLimits {
    /// The limits of `config` with `change_uids` privileged.
    pub fn new(config: &SocketConfig, change_uids: &[u32]) -> Self {
        SessionLimits {
            max: config.max_sessions,
            max_per_uid: config.max_sessions_per_uid,
            reserved: config.reserved_sessions,
            privileged: change_uids.to_vec(),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The unreserved share (or, for a privileged UID, everything) is in use.
    Full,
    /// The UID holds its share.
    UidFull,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Of `total`, those of UIDs outside `privileged`.
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
    /// When each UID's refusals were last logged.
    logged: HashMap<u32, Instant>,
}

/// Counts the connections being served, by UID.
#[derive(Debug)]
pub struct Admission {
    limits: SessionLimits,
    counts: Mutex<Counts>,
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    uid: u32,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let privileged = self.admission.limits.privileged.contains(&self.uid);
        let mut counts = self.admission.counts();
        counts.total = counts.total.saturating_sub(1);
        if !privileged {
            counts.unprivileged = counts.unprivileged.saturating_sub(1);
        }
        if let Some(n) = counts.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_uid.remove(&self.uid);
            }
        }
    }
}

/// How often the refusals of one UID are logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Admission {
    /// Nothing admitted yet.
    pub fn new(limits: SessionLimits) -> Arc<Self> {
        Arc::new(Admission { limits, counts: Mutex::new(Counts::default()) })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection of `uid`, or says why not.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Ticket, Refusal> {
        let limits = &self.limits;
        let mut counts = self.counts();
        let mine = counts.per_uid.get(&uid).copied().unwrap_or(0);
        let privileged = limits.privileged.contains(&uid);
        if counts.total >= limits.max {
            return Err(Refusal::Full);
        }
        if !privileged {
            if counts.unprivileged >= limits.max - limits.reserved {
                return Err(Refusal::Full);
            }
            if mine >= limits.max_per_uid {
                return Err(Refusal::UidFull);
            }
            counts.unprivileged += 1;
        }
        counts.total += 1;
        counts.per_uid.insert(uid, mine + 1);
        Ok(Ticket { admission: Arc::clone(self), uid })
    }

    /// Connections being served, and those of `uid`.
    pub fn in_use(&self, uid: u32) -> (usize, usize) {
        let counts = self.counts();
        (counts.total, counts.per_uid.get(&uid).copied().unwrap_or(0))
    }

    /// Whether a refusal of `uid` should be logged now (at most once per interval per UID).
    fn should_log_refusal(&self, uid: u32) -> bool {
        let mut counts = self.counts();
        let now = Instant::now();
        match counts.logged.get(&uid) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                counts.logged.insert(uid, now);
                true
            }
        }
    }
}

// ---- the transport handed to rsbinder ----

/// Where a connection is in its life, as far as its deadlines go.
const PHASE_HANDSHAKE: u8 = 0;
/// Handshake done, no call yet: the first-call deadline applies.
const PHASE_WAITING_FOR_CALL: u8 = 1;
/// A call arrived: reads have no deadline.
const PHASE_CALLED: u8 = 2;

/// rsbinder's Unix transport with our deadlines and the admission slot.
///
/// rsbinder arms its handshake deadline on reads (`Some`), then, the handshake done, sets the
/// serve-phase read deadline, which is `None` (no idle timeout is configured on the server).
/// That `None` is where the first-call deadline starts; the first bytes read after it are a
/// call, and from then on reads have no deadline. A write deadline of `None` becomes
/// `socket.write_timeout_ms`.
struct AdmittedTransport {
    inner: UnixTransport,
    phase: AtomicU8,
    first_call_timeout: Duration,
    write_timeout: Duration,
    /// The admission slot, freed when rsbinder drops the transport.
    ticket: Ticket,
}

impl AdmittedTransport {
    fn called(&self, read: &RpcResult<usize>) {
        if self.phase.load(Ordering::SeqCst) != PHASE_WAITING_FOR_CALL {
            return;
        }
        if matches!(read, Ok(n) if *n > 0) {
            self.phase.store(PHASE_CALLED, Ordering::SeqCst);
            if let Err(e) = self.inner.set_read_timeout(None) {
                log::debug!("cannot lift the first-call deadline: {e}");
            }
        }
    }

    /// A read that timed out while waiting for the first call ends the connection.
    fn check_first_call(&self, read: RpcResult<usize>) -> RpcResult<usize> {
        if self.phase.load(Ordering::SeqCst) == PHASE_WAITING_FOR_CALL
            && matches!(read, Err(RpcError::Timeout))
        {
            // Logged at most once a minute per UID, with the refusals: a client can repeat it.
            if self.ticket.admission.should_log_refusal(self.ticket.uid) {
                log::info!(
                    "closing an RPC session of {:?}: no call within {} ms of its handshake \
                     (logged once a minute per UID)",
                    self.inner.peer_identity(),
                    self.first_call_timeout.as_millis()
                );
            }
            let _ = self.inner.shutdown();
            return Err(RpcError::EndOfStream);
        }
        self.called(&read);
        read
    }
}

type RpcResult<T> = Result<T, RpcError>;

impl RpcTransport for AdmittedTransport {
    fn send_frame(&self, buf: &[u8]) -> RpcResult<()> {
        self.inner.send_frame(buf)
    }

    fn recv_frame(&self) -> RpcResult<Vec<u8>> {
        self.inner.recv_frame()
    }

    fn peer_identity(&self) -> PeerIdentity {
        self.inner.peer_identity()
    }

    fn describe(&self) -> &str {
        self.inner.describe()
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> RpcResult<()> {
        match (timeout, self.phase.load(Ordering::SeqCst)) {
            (None, PHASE_HANDSHAKE) => {
                self.phase.store(PHASE_WAITING_FOR_CALL, Ordering::SeqCst);
                self.inner.set_read_timeout(Some(self.first_call_timeout))
            }
            (None, PHASE_WAITING_FOR_CALL) => {
                self.inner.set_read_timeout(Some(self.first_call_timeout))
            }
            _ => self.inner.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> RpcResult<()> {
        self.inner.set_write_timeout(Some(timeout.unwrap_or(self.write_timeout)))
    }

    fn set_liveness(&self, timeout: Option<Duration>) -> RpcResult<()> {
        self.inner.set_liveness(timeout)
    }

    fn peer_closed(&self) -> Option<bool> {
        self.inner.peer_closed()
    }

    fn shutdown_handle(&self) -> Option<Box<dyn FnOnce() + Send>> {
        self.inner.shutdown_handle()
    }

    fn shutdown(&self) -> RpcResult<()> {
        self.inner.shutdown()
    }

    fn supports_fd_passing(&self) -> bool {
        self.inner.supports_fd_passing()
    }

    fn send_frame_with_fds(
        &self,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> RpcResult<()> {
        self.inner.send_frame_with_fds(buf, fds)
    }

    fn recv_frame_with_fds(&self) -> RpcResult<(Vec<u8>, Vec<std::os::fd::OwnedFd>)> {
        self.inner.recv_frame_with_fds()
    }

    fn send_raw(&self, buf: &[u8]) -> RpcResult<()> {
        self.inner.send_raw(buf)
    }

    fn recv_raw(&self, buf: &mut [u8]) -> RpcResult<usize> {
        let read = self.inner.recv_raw(buf);
        self.check_first_call(read)
    }

    fn send_raw_with_fds(&self, buf: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> RpcResult<()> {
        self.inner.send_raw_with_fds(buf, fds)
    }

    fn recv_raw_with_fds(&self, buf: &mut [u8]) -> RpcResult<(usize, Vec<std::os::fd::OwnedFd>)> {
        match self.inner.recv_raw_with_fds(buf) {
            Ok((n, fds)) => self.check_first_call(Ok(n)).map(|n| (n, fds)),
            Err(e) => self.check_first_call(Err(e)).map(|n| (n, Vec::new())),
        }
    }

    fn send_raw_draining(
        &self,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
        drain: &mut dyn FnMut() -> RpcResult<()>,
    ) -> RpcResult<()> {
        self.inner.send_raw_draining(buf, fds, drain)
    }
}

// ---- the socket server ----

/// The RPC socket being served; dropping it stops the accept loop and ends every session.
pub struct SocketServer {
    server: Arc<RpcServer>,
    listener: Arc<UnixListener>,
    /// The socket file and its (device, inode), removed on drop if still ours.
    path: PathBuf,
    file: Option<(u64, u64)>,
    stopping: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
    admission: Arc<Admission>,
}

impl std::fmt::Debug for SocketServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketServer").field("admission", &self.admission).finish()
    }
}

impl SocketServer {
    /// The admission counts (for tests and diagnostics).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (it fails with EINVAL) so the loop sees `stopping`; the
        // listener stays open until after the join.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(accept) = self.accept.take() {
            if accept.join().is_err() {
                log::warn!("the socket accept loop panicked");
            }
        }
        self.server.terminate();
        // A daemon started since on the same path keeps its socket.
        if self.file.is_some() && socket_file_id(&self.path) == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn socket_file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The private RpcServer: bound on a path next to the socket and unlinked at once (its own
/// accept loop is never run; see the module doc).
fn private_rpc_server(path: &Path) -> Result<Arc<RpcServer>, String> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".rpc-{}", std::process::id()));
    let private: PathBuf = path.with_file_name(format!(".{}", name.to_string_lossy()));
    let server = RpcServer::setup_unix_server(private.clone())
        .map_err(|e| format!("cannot set up the RPC server: {e:?}"))?;
    std::fs::remove_file(&private)
        .map_err(|e| format!("cannot remove {}: {e}", private.display()))?;
    Ok(server)
}

/// Serves `binder` as the root object of a binder RPC server on the Unix socket of `config`,
/// with the session limits of the module doc (`change_uids` use the reserved share).
pub fn serve_socket(
    binder: SIBinder,
    path: &Path,
    config: &SocketConfig,
    change_uids: &[u32],
) -> Result<SocketServer, TransportError> {
    let error =
        |message: String| TransportError::Socket { path: path.display().to_string(), message };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| error(format!("cannot create folder: {e}")))?;
    }
    let server = private_rpc_server(path).map_err(error)?;
    server.set_android13plus(WireVersion::MAX.get());
    server.set_handshake_timeout(Some(Duration::from_millis(config.handshake_timeout_ms)));
    // Descriptors may cross (SCM_RIGHTS) for a client that asks: estimateBackupSpace takes the
    // trace as a ParcelFileDescriptor the caller opened. A client that does not ask is served
    // as before.
    server.set_supported_fd_modes(&[rsbinder::rpc::FileDescriptorTransportMode::Unix]);
    server
        .add_service(checkpoint_aidl::SERVICE_NAME, binder)
        .map_err(|e| error(format!("{e:?}")))?;

    remove_stale_socket(path).map_err(error)?;
    let listener = Arc::new(UnixListener::bind(path).map_err(|e| error(format!("bind: {e}")))?);
    let mode = config.mode.unwrap_or(0o666);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| error(format!("cannot set mode {mode:#o}: {e}")))?;

    let admission = Admission::new(SessionLimits::new(config, change_uids));
    let stopping = Arc::new(AtomicBool::new(false));
    let accept = {
        let loop_ = AcceptLoop {
            server: Arc::clone(&server),
            listener: Arc::clone(&listener),
            admission: Arc::clone(&admission),
            stopping: Arc::clone(&stopping),
            first_call_timeout: Duration::from_millis(config.first_call_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
        };
        std::thread::Builder::new()
            .name("socket-accept".to_owned())
            .spawn(move || loop_.run())
            .map_err(|e| error(format!("cannot start the accept thread: {e}")))?
    };
    log::info!(
        "serving {} on socket {} (mode {mode:#o}; at most {} sessions, {} per UID, {} reserved \
         for UIDs {:?})",
        checkpoint_aidl::SERVICE_NAME,
        path.display(),
        config.max_sessions,
        config.max_sessions_per_uid,
        config.reserved_sessions,
        change_uids
    );
    Ok(SocketServer {
        server,
        listener,
        path: path.to_owned(),
        file: socket_file_id(path),
        stopping,
        accept: Some(accept),
        admission,
    })
}

/// A socket left by a daemon that died is removed; a live one (someone answers) is refused.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect the path: {e}")),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err("the path exists and is not a socket".to_owned())
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err("another server is listening on it".to_owned()),
            Err(_) => std::fs::remove_file(path).map_err(|e| format!("cannot remove it: {e}")),
        },
    }
}

struct AcceptLoop {
    server: Arc<RpcServer>,
    listener: Arc<UnixListener>,
    admission: Arc<Admission>,
    stopping: Arc<AtomicBool>,
    first_call_timeout: Duration,
    write_timeout: Duration,
}

impl AcceptLoop {
    fn run(self) {
        let mut last_exhaustion_log: Option<Instant> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(_) if self.stopping.load(Ordering::SeqCst) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends heal as sessions end; never end the loop for them.
                    if last_exhaustion_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                        log::warn!("socket accept failed (logged once a minute): {e}");
                        last_exhaustion_log = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn admit(&self, stream: UnixStream) {
        let uid =
            match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(creds) => creds.uid(),
                Err(e) => {
                    log::warn!("closing a socket connection without peer credentials: {e}");
                    return;
                }
            };
        let ticket = match self.admission.admit(uid) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                if self.admission.should_log_refusal(uid) {
                    let (total, mine) = self.admission.in_use(uid);
                    log::warn!(
                        "refusing socket connections of UID {uid} ({refusal:?}: {total} in use, \
                         {mine} of them this UID's; logged once a minute per UID)"
                    );
                }
                return;
            }
        };
        let inner = match UnixTransport::from_stream(stream) {
            Ok(inner) => inner,
            Err(e) => {
                log::warn!("cannot wrap a socket connection of UID {uid}: {e}");
                return;
            }
        };
        let transport = AdmittedTransport {
            inner,
            phase: AtomicU8::new(PHASE_HANDSHAKE),
            first_call_timeout: self.first_call_timeout,
            write_timeout: self.write_timeout,
            ticket,
        };
        self.server.serve_connection(Box::new(transport));
    }
}

/// The client side: the URI of the service on kernel binder or on a socket.
pub fn service_uri(socket: Option<&Path>) -> Uri {
    match socket {
        Some(path) => checkpoint_aidl::socket_uri(path).with_service(checkpoint_aidl::SERVICE_NAME),
        None => Endpoint::kernel().with_service(checkpoint_aidl::SERVICE_NAME),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits { max: 6, max_per_uid: 2, reserved: 2, privileged: vec![0] }
    }

    #[test]
    fn each_uid_gets_its_share_and_the_reserve_is_kept_for_change_uids() {
        let admission = Admission::new(limits());
        let a1 = admission.admit(100).expect("first of 100");
        let _a2 = admission.admit(100).expect("second of 100");
        assert_eq!(admission.admit(100).unwrap_err(), Refusal::UidFull);
        let _b1 = admission.admit(101).expect("101");
        let _b2 = admission.admit(101).expect("101");
        // 4 of 6 in use: the last 2 are reserved.
        assert_eq!(admission.admit(102).unwrap_err(), Refusal::Full);
        let r1 = admission.admit(0).expect("root uses the reserve");
        let _r2 = admission.admit(0).expect("root has no per-UID cap");
        assert_eq!(admission.admit(0).unwrap_err(), Refusal::Full);
        assert_eq!(admission.in_use(0), (6, 2));
        drop(r1);
        drop(a1);
        assert_eq!(admission.in_use(100), (4, 1));
        // A freed unreserved slot is anyone's again, within the per-UID cap.
        let _c = admission.admit(102).expect("a slot was freed");
        assert_eq!(admission.admit(103).unwrap_err(), Refusal::Full);
        let _r3 = admission.admit(0).expect("the freed reserved slot");
        assert_eq!(admission.in_use(0), (6, 2));
    }

    #[test]
    fn refusals_are_logged_once_per_interval_per_uid() {
        let admission = Admission::new(limits());
        assert!(admission.should_log_refusal(5));
        assert!(!admission.should_log_refusal(5));
        assert!(admission.should_log_refusal(6));
    }
}
