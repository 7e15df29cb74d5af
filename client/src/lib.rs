//! The update-client library: what an updater links to protect /data across an A/B update with
//! checkpointd.
//!
//! It speaks the stable AIDL `android.system.checkpoint.ICheckpoint` (crate `checkpoint-aidl`),
//! on kernel binder through the service manager or on checkpointd's binder RPC Unix socket,
//! with the same connection logic `checkpointctl` uses (it uses this crate).
//!
//! The flow (docs/update-client.md has the whole sequence and the Virtual A/B rule):
//!
//! ```no_run
//! use std::time::Duration;
//! use checkpoint_client::{BootState, CheckpointClient, Connect, StartOutcome};
//!
//! # fn main() -> Result<(), checkpoint_client::Error> {
//! // Install: after the new slot is written, before the reboot into it.
//! let client = CheckpointClient::connect(&Connect::socket("/run/checkpointd/checkpointd.sock"))?;
//! match client.start_checkpoint(2)? {
//!     StartOutcome::Started { boot_attempts } => println!("{boot_attempts} boot attempts"),
//!     StartOutcome::NotSupported => println!("no rollback protection on this device"),
//! }
//!
//! // Next boot: roll back, or wait for the commit before anything irreversible (a merge).
//! let client = CheckpointClient::connect(&Connect::binder().with_events())?;
//! match client.boot_state()? {
//!     BootState::RollbackNeeded => { /* the update failed: /data is the old one; clean up */ }
//!     _ => {
//!         client.wait_for_commit(Duration::from_secs(600))?;
//!         // now merge
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Before the reboot, version 2 of the interface (issue 11) estimates the backup space the
//! checkpoint will need and keeps it free (docs/update-client.md, docs/estimate.md):
//!
//! ```no_run
//! # use checkpoint_client::{CheckpointClient, Connect, EstimateOptions};
//! # fn main() -> Result<(), checkpoint_client::Error> {
//! let client = CheckpointClient::connect(&Connect::socket("/run/checkpointd/checkpointd.sock"))?;
//! let trace = std::fs::File::open("/data/ota/update.cptrace").ok();
//! let estimate = client.estimate(EstimateOptions { trace, ..EstimateOptions::default() })?;
//! if estimate.shortfallBytes > 0 {
//!     // ask the user to free `shortfallBytes`, then estimate again
//! }
//! client.reserve(estimate.neededBytes)?; // kept free until the checkpoint starts
//! # Ok(())
//! # }
//! ```
//!
//! A daemon of version 1 answers these with [`Error::OlderService`].

mod error;
mod events;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use checkpoint_aidl::android::system::checkpoint::{
    BackendInUse::BackendInUse, BackupEstimate::BackupEstimate, CheckpointState::CheckpointState,
    CheckpointStatus::CheckpointStatus, EstimateBasis::EstimateBasis,
    EstimateRequest::EstimateRequest, HistoryEvent::HistoryEvent,
    HistoryEventKind::HistoryEventKind, ICheckpoint::ICheckpoint, ReservationInfo::ReservationInfo,
};
pub use error::{Error, ErrorKind};
pub use events::{Event, Events};

// The module of the same name holds the AIDL's error-code constants.
use checkpoint_aidl::android::system::checkpoint::ICheckpoint as ICheckpointCodes;
use rsbinder::{Client, Strong};

/// How to reach checkpointd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Kernel binder: look the service up in the service manager, waiting up to `wait` for it
    /// to appear (vdc waits 5000 × 10 ms).
    Binder { wait: Duration },
    /// binder RPC on checkpointd's Unix socket (`[socket] path` in its configuration).
    Socket(PathBuf),
}

/// What [`CheckpointClient::connect`] opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Where the daemon is.
    pub transport: Transport,
    /// Whether listener callbacks can reach this process: on the socket an incoming
    /// (callback) connection is opened, on kernel binder a thread pool is started. Needed for
    /// [`CheckpointClient::subscribe`]; [`CheckpointClient::wait_for_commit`] uses it to wake
    /// early and polls without it.
    pub events: bool,
}

impl Connect {
    /// The seconds vdc waits for its service: 5000 tries 10 ms apart.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(50);

    /// Kernel binder, waiting [`Connect::DEFAULT_WAIT`] for the service.
    pub fn binder() -> Connect {
        Connect { transport: Transport::Binder { wait: Self::DEFAULT_WAIT }, events: false }
    }

    /// The RPC socket at `path`.
    pub fn socket(path: impl Into<PathBuf>) -> Connect {
        Connect { transport: Transport::Socket(path.into()), events: false }
    }

    /// The socket when `socket` is given, else kernel binder waiting `wait` (checkpointctl's
    /// `--socket` / `--timeout`).
    pub fn from_options(socket: Option<&Path>, wait: Duration) -> Connect {
        match socket {
            Some(path) => Connect::socket(path),
            None => Connect { transport: Transport::Binder { wait }, events: false },
        }
    }

    /// Also receive listener callbacks.
    pub fn with_events(mut self) -> Connect {
        self.events = true;
        self
    }
}

/// What `startCheckpoint` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// The next boot runs under a checkpoint; `boot_attempts` = retry + 1, or -1 for
    /// unlimited while the new slot stays active.
    Started { boot_attempts: i32 },
    /// The device has no checkpoint backend (`ENOTSUP`): the update proceeds without /data
    /// rollback, as on a vold device without checkpoints. The caller decides whether that is
    /// acceptable.
    NotSupported,
}

/// What this boot is, for an updater that starts after a reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootState {
    /// No checkpoint: nothing requested, or the last one was committed.
    NoCheckpoint,
    /// A checkpoint is requested but this boot has not taken its checkpoint decision yet
    /// (`needsCheckpoint` is first called by the boot flow), or this is the boot that asked.
    Pending,
    /// This boot runs under the checkpoint; `attempts_left` is `None` when unlimited.
    Checkpointing { attempts_left: Option<u32> },
    /// The retry budget is spent (or the bootloader fell back to the requesting slot): /data
    /// was rolled back at mount. The update failed; do not merge, report it, clean up.
    RollbackNeeded,
}

/// How [`CheckpointClient::wait_for_commit`] ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitWait {
    /// The checkpoint was committed while waiting.
    Committed,
    /// There was no checkpoint to wait for (already committed, or none requested).
    NoCheckpoint,
}

/// What [`CheckpointClient::estimate`] estimates from; all optional.
#[derive(Debug, Default)]
pub struct EstimateOptions {
    /// The update's expected write trace (docs/estimate.md, "The trace format"), opened by the
    /// caller: the daemon reads the descriptor, never a path.
    pub trace: Option<std::fs::File>,
    /// Sizes in bytes of the files the update will rewrite.
    pub declared_bytes: Vec<u64>,
    /// The checkpointed mount point; `None`: /data (or the only device).
    pub mount_point: Option<String>,
}

/// The interface version the estimate and reservation methods need.
pub const ESTIMATE_VERSION: i32 = 2;

/// A connection to checkpointd.
pub struct CheckpointClient {
    service: Strong<dyn ICheckpoint>,
    /// The socket, when connected over one (a trace is sent on a session that passes
    /// descriptors).
    socket: Option<PathBuf>,
    /// The RPC session on the socket; closed on drop (its callback threads end with it).
    rpc: Option<Client>,
    events: bool,
}

impl std::fmt::Debug for CheckpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointClient")
            .field("transport", &if self.rpc.is_some() { "socket" } else { "binder" })
            .field("events", &self.events)
            .finish()
    }
}

impl Drop for CheckpointClient {
    fn drop(&mut self) {
        if let Some(session) = self.rpc.as_ref().and_then(Client::session) {
            session.close_session();
        }
    }
}

/// How often the service manager is asked while waiting for the service (vdc: 10 ms).
const LOOKUP_INTERVAL: Duration = Duration::from_millis(10);
/// How often `wait_for_commit` reads the status. Listener callbacks are oneway and a daemon
/// restart drops registrations, so polling is what guarantees progress; events only make the
/// wait end sooner.
const COMMIT_POLL_INTERVAL: Duration = Duration::from_millis(500);

impl CheckpointClient {
    /// Connects as `how` says.
    pub fn connect(how: &Connect) -> Result<CheckpointClient, Error> {
        let name = checkpoint_aidl::SERVICE_NAME;
        match &how.transport {
            Transport::Socket(path) => {
                if !path.exists() {
                    return Err(Error::SocketMissing { path: path.clone() });
                }
                let (service, rpc) = open_socket(path, |options| {
                    if how.events {
                        options.incoming_connections = Some(1);
                    }
                })?;
                Ok(CheckpointClient {
                    service,
                    socket: Some(path.clone()),
                    rpc: Some(rpc),
                    events: how.events,
                })
            }
            Transport::Binder { wait } => {
                rsbinder::ProcessState::init_default().map_err(|e| Error::BinderDriver {
                    detail: e.to_string().trim_end().to_owned(),
                })?;
                if how.events {
                    rsbinder::ProcessState::start_thread_pool();
                }
                let deadline = Instant::now() + *wait;
                loop {
                    match rsbinder::hub::try_get_interface::<dyn ICheckpoint>(name) {
                        Ok(Some(service)) => {
                            return Ok(CheckpointClient {
                                service,
                                socket: None,
                                rpc: None,
                                events: how.events,
                            })
                        }
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(LOOKUP_INTERVAL)
                        }
                        Ok(None) => return Err(Error::ServiceNotFound { name, waited: *wait }),
                        Err(e) => return Err(Error::Lookup { name, detail: format!("{e:?}") }),
                    }
                }
            }
        }
    }

    /// The AIDL interface itself, for calls this crate does not wrap (the vdc commands).
    pub fn service(&self) -> &dyn ICheckpoint {
        &*self.service
    }

    /// Whether the device can checkpoint /data at all.
    pub fn supports_checkpoint(&self) -> Result<bool, Error> {
        self.service.supportsCheckpoint().map_err(call("supportsCheckpoint"))
    }

    /// Requests a checkpoint for the next boot with `retry + 1` boot attempts (`-1`:
    /// unlimited while the new slot stays active; the rollback then comes when the bootloader
    /// falls back). Call it after the new slot is written, before switching to it.
    pub fn start_checkpoint(&self, retry: i32) -> Result<StartOutcome, Error> {
        if retry < -1 {
            return Err(Error::InvalidRetry(retry));
        }
        match self.service.startCheckpoint(retry) {
            Ok(()) => Ok(StartOutcome::Started {
                boot_attempts: if retry == -1 { -1 } else { retry.saturating_add(1) },
            }),
            Err(status) if is_service_specific(&status, ICheckpointCodes::ENOTSUP) => {
                Ok(StartOutcome::NotSupported)
            }
            Err(status) => Err(Error::Call { method: "startCheckpoint", status }),
        }
    }

    /// The state, budget, devices and backup space.
    pub fn status(&self) -> Result<CheckpointStatus, Error> {
        self.service.getStatus().map_err(call("getStatus"))
    }

    /// The interface version the daemon speaks (1: no estimate or reservation).
    pub fn interface_version(&self) -> Result<i32, Error> {
        self.service.getInterfaceVersion().map_err(call("getInterfaceVersion"))
    }

    fn needs_version(&self, method: &'static str, needed: i32) -> Result<(), Error> {
        let found = self.interface_version()?;
        if found < needed {
            return Err(Error::OlderService { method, needed, found });
        }
        Ok(())
    }

    /// Estimates the backup space the next checkpoint will need (docs/estimate.md): what to
    /// keep free (`neededBytes`), how much more must be freed (`shortfallBytes`), and on what
    /// the prediction rests. Changes nothing; the daemon keeps the answer to compare with what
    /// the checkpoint really consumes. Call it before `reserve` and `start_checkpoint`.
    pub fn estimate(&self, options: EstimateOptions) -> Result<BackupEstimate, Error> {
        self.needs_version("estimateBackupSpace", ESTIMATE_VERSION)?;
        let declared =
            options.declared_bytes.iter().map(|&b| i64::try_from(b).unwrap_or(i64::MAX)).collect();
        let has_trace = options.trace.is_some();
        let request = EstimateRequest {
            trace: options.trace.map(rsbinder::ParcelFileDescriptor::from),
            declaredBytes: declared,
            mountPoint: options.mount_point.unwrap_or_default(),
        };
        match (&self.socket, has_trace) {
            // Descriptors cross a socket only on a session that asked for it (SCM_RIGHTS); the
            // main session does not, so that it also works with a daemon that cannot.
            (Some(path), true) => {
                let (service, rpc) = open_socket(path, |options| {
                    options.fd_mode = Some(rsbinder::rpc::FileDescriptorTransportMode::Unix);
                })?;
                let answer = service.estimateBackupSpace(&request);
                if let Some(session) = rpc.session() {
                    session.close_session();
                }
                answer.map_err(call("estimateBackupSpace"))
            }
            _ => self.service.estimateBackupSpace(&request).map_err(call("estimateBackupSpace")),
        }
    }

    /// Reserves `bytes` on /data with a preallocated file, kept free until the checkpoint
    /// starts (the backend then takes it over). Refused (nothing reserved) when it is more
    /// than is free, 0, or while a reservation is held. Needs the change permission.
    pub fn reserve(&self, bytes: i64) -> Result<ReservationInfo, Error> {
        self.needs_version("reserveSpace", ESTIMATE_VERSION)?;
        self.service.reserveSpace(bytes).map_err(call("reserveSpace"))
    }

    /// Gives the reservation back (the update was abandoned); nothing to do if none is held.
    pub fn release(&self) -> Result<(), Error> {
        self.needs_version("releaseReservation", ESTIMATE_VERSION)?;
        self.service.releaseReservation().map_err(call("releaseReservation"))
    }

    /// The newest `limit` history entries, newest first (`0`: all).
    pub fn history(&self, limit: i32) -> Result<Vec<HistoryEvent>, Error> {
        self.service.getHistory(limit).map_err(call("getHistory"))
    }

    /// Whether the retry budget is spent and /data was (or will be) rolled back.
    pub fn needs_rollback(&self) -> Result<bool, Error> {
        self.service.needsRollback().map_err(call("needsRollback"))
    }

    /// What this boot is: the question an updater asks when it starts after a reboot.
    pub fn boot_state(&self) -> Result<BootState, Error> {
        let status = self.status()?;
        Ok(boot_state_of(&status))
    }

    /// Declares the new system good: marks the slot successful (through checkpointd's boot
    /// control, if it has one), commits the backends, clears the checkpoint. On a rollback
    /// boot it acknowledges the rollback; without a checkpoint it does nothing.
    pub fn commit(&self) -> Result<(), Error> {
        self.service.commitChanges().map_err(call("commitChanges"))
    }

    /// Gives up on this boot's changes and reboots with `reason`: without `retry` the budget
    /// is spent (the next boot rolls back), with it the attempt is only counted. Does nothing
    /// when this boot is not checkpointing.
    pub fn abort(&self, reason: &str, retry: bool) -> Result<(), Error> {
        self.service.abortChanges(reason, retry).map_err(call("abortChanges"))
    }

    /// Registers a listener; its events arrive on the returned receiver. Needs a connection
    /// opened [`Connect::with_events`].
    pub fn subscribe(&self) -> Result<Events, Error> {
        if !self.events {
            return Err(Error::EventsNotEnabled);
        }
        let (events, listener) = events::channel();
        self.service.registerListener(&listener).map_err(call("registerListener"))?;
        Ok(events)
    }

    /// Waits until the checkpoint of this boot is committed, up to `timeout`.
    ///
    /// An update_engine-style updater calls this before anything that cannot be undone once
    /// the data is final — a Virtual A/B merge above all (docs/update-client.md). Ends with
    /// [`Error::RolledBack`] when the budget is spent and with [`Error::CommitTimeout`] when
    /// the time is up. A checkpoint that is only requested (state PENDING: the boot that
    /// asked, or a boot before its first `needsCheckpoint`) is waited for like an active one.
    pub fn wait_for_commit(&self, timeout: Duration) -> Result<CommitWait, Error> {
        let deadline = Instant::now() + timeout;
        // Events only shorten the wait; without them the loop polls.
        let events = if self.events { Some(self.subscribe()?) } else { None };
        let mut waited = false;
        loop {
            let status = self.status()?;
            match boot_state_of(&status) {
                BootState::NoCheckpoint => {
                    return Ok(if waited {
                        CommitWait::Committed
                    } else {
                        CommitWait::NoCheckpoint
                    })
                }
                BootState::RollbackNeeded => return Err(Error::RolledBack),
                BootState::Pending | BootState::Checkpointing { .. } => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::CommitTimeout {
                    waited: timeout,
                    state: state_name(status.state),
                });
            }
            waited = true;
            let nap = COMMIT_POLL_INTERVAL.min(deadline - now);
            match &events {
                // Any event is a reason to look again; which one does not matter.
                Some(events) => {
                    let asleep = Instant::now();
                    if events.recv_timeout(nap).is_none() {
                        // A closed channel returns at once: keep the poll interval anyway.
                        std::thread::sleep(nap.saturating_sub(asleep.elapsed()));
                    }
                }
                None => std::thread::sleep(nap),
            }
        }
    }
}

/// Opens an RPC session on the socket at `path` with `options` and looks the service up.
fn open_socket(
    path: &Path,
    options: impl FnOnce(&mut rsbinder::ClientOptions),
) -> Result<(Strong<dyn ICheckpoint>, Client), Error> {
    let name = checkpoint_aidl::SERVICE_NAME;
    let rpc = Client::open_with(checkpoint_aidl::socket_uri(path), |o, _| options(o))
        .map_err(|e| Error::SocketConnect { path: path.to_owned(), detail: format!("{e:?}") })?;
    let service = rpc
        .try_get::<dyn ICheckpoint>(name)
        .map_err(|e| Error::Lookup { name, detail: format!("{e:?}") })?
        .ok_or_else(|| Error::NotServed { path: path.to_owned(), name })?;
    Ok((service, rpc))
}

fn is_service_specific(status: &rsbinder::Status, code: i32) -> bool {
    status.exception_code() == rsbinder::ExceptionCode::ServiceSpecific
        && status.service_specific_error() == code
}

fn call(method: &'static str) -> impl Fn(rsbinder::Status) -> Error {
    move |status| Error::Call { method, status }
}

/// The boot state a status shows.
pub fn boot_state_of(status: &CheckpointStatus) -> BootState {
    if status.needsRollback || status.state == CheckpointState::ROLLBACK_NEEDED {
        return BootState::RollbackNeeded;
    }
    match status.state {
        CheckpointState::CHECKPOINTING => {
            BootState::Checkpointing { attempts_left: u32::try_from(status.attemptsLeft).ok() }
        }
        CheckpointState::PENDING => BootState::Pending,
        _ if status.isCheckpointing => {
            BootState::Checkpointing { attempts_left: u32::try_from(status.attemptsLeft).ok() }
        }
        _ => BootState::NoCheckpoint,
    }
}

/// The lower-case name of a state, as checkpointctl prints it.
pub fn state_name(state: CheckpointState) -> String {
    match state {
        CheckpointState::NONE => "none".to_owned(),
        CheckpointState::PENDING => "pending".to_owned(),
        CheckpointState::CHECKPOINTING => "checkpointing".to_owned(),
        CheckpointState::ROLLBACK_NEEDED => "rollback-needed".to_owned(),
        other => format!("unknown({})", other.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: CheckpointState, checkpointing: bool, rollback: bool) -> CheckpointStatus {
        CheckpointStatus {
            state,
            isCheckpointing: checkpointing,
            needsRollback: rollback,
            attemptsLeft: 2,
            ..Default::default()
        }
    }

    #[test]
    fn boot_state_follows_the_status() {
        assert_eq!(
            boot_state_of(&status(CheckpointState::NONE, false, false)),
            BootState::NoCheckpoint
        );
        assert_eq!(
            boot_state_of(&status(CheckpointState::PENDING, false, false)),
            BootState::Pending
        );
        assert_eq!(
            boot_state_of(&status(CheckpointState::CHECKPOINTING, true, false)),
            BootState::Checkpointing { attempts_left: Some(2) }
        );
        assert_eq!(
            boot_state_of(&status(CheckpointState::ROLLBACK_NEEDED, false, true)),
            BootState::RollbackNeeded
        );
        // needsRollback wins whatever the state says.
        assert_eq!(
            boot_state_of(&status(CheckpointState::PENDING, false, true)),
            BootState::RollbackNeeded
        );
        let mut unlimited = status(CheckpointState::CHECKPOINTING, true, false);
        unlimited.attemptsLeft = -1;
        assert_eq!(boot_state_of(&unlimited), BootState::Checkpointing { attempts_left: None });
    }

    #[test]
    fn connect_options_choose_the_transport() {
        let wait = Duration::from_secs(3);
        assert_eq!(Connect::from_options(None, wait).transport, Transport::Binder { wait });
        let socket = Connect::from_options(Some(Path::new("/run/x.sock")), wait).with_events();
        assert_eq!(socket.transport, Transport::Socket("/run/x.sock".into()));
        assert!(socket.events);
        assert_eq!(Connect::binder().transport, Transport::Binder { wait: Connect::DEFAULT_WAIT });
    }

    #[test]
    fn a_missing_socket_is_named_without_connecting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("none.sock");
        let err = CheckpointClient::connect(&Connect::socket(&path)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_a_connect_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stale.sock");
        // A stale socket file: bound once, its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let err = CheckpointClient::connect(&Connect::socket(&path)).unwrap_err();
        assert!(matches!(err, Error::SocketConnect { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
}
