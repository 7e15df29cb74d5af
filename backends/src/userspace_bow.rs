//! The `userspace-bow` backend: the userspace backup-on-write engine (`bow-engine`) served
//! as `/dev/ublkbN` by the `bow-ublk` server, on any kernel with ublk (docs/userspace-bow.md,
//! "The backend").
//!
//! ```text
//! checkpointing:      /data ── cpd-<i>-base ── linear(/dev/ublkbN) ── bow-ublk (engine) ── raw
//! after commit, and
//! not checkpointing:  /data ── cpd-<i>-base ── linear(raw)
//! ```
//!
//! * restore (daemon, before mount): the engine writes dm-bow's log, so the `bow` restore
//!   ([`crate::bow::restore_log`]) rolls it back;
//! * setup (boot flow): `ublk_drv` loaded if needed, the server started over the raw device in
//!   a session of its own (it outlives `checkpointctl boot mount`), its "serving" line awaited
//!   for a bounded time, then the linear `Base` device over `/dev/ublkbN`. Every fault before
//!   the mount (no ublk, no permission, no binary, a server that does not come up) is refused
//!   with nothing mounted and the server it started killed;
//! * prepare: a reservation released, FITRIM from the second block (recorded as free by the
//!   engine in TRIM), then the engine's CHECKPOINT;
//! * commit: the engine's COMMITTED (block 0 copied back: the commit point), `Base` suspended
//!   with a flush, its table switched to the raw device, resumed, the server stopped (the ublk
//!   device is deleted). After a commit no I/O crosses userspace and no reboot is needed;
//! * space: the engine's exact free and used bytes (`status` on its control socket).
//!
//! A server found dead while its ublk device exists (the kernel holds the device's I/O) is
//! re-attached with `bow-ublk recover` and the step goes on.
//!
//! The server and the device stack sit behind two traits ([`EngineServer`], [`LinearDevice`]),
//! so the steps are tested on the host with fakes; the process handling (start, bounded wait,
//! kill on failure) is tested with small scripts standing in for the server.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use blockdev::bowctl::BowState;
use blockdev::dm::{DevRef, DeviceMapper, SuspendMode, TableSlot, Target};
use blockdev::names::Role;
use blockdev::{DevId, Sectors};
use bow_ublk::control::{self, Command as ControlCommand, ControlError};
use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreOutcome, RestoreReport, RestoreRequest,
};
use serde::{Deserialize, Serialize};

use crate::bow::restore::RestoreOptions;
use crate::bow::{restore_log, KernelFs, MountedFs};
use crate::records::Records;
use crate::reservation::Reservations;
use crate::snapshot::{SnapshotBackend, SnapshotOptions, SnapshotStack};
use crate::stack::{self, ensure_base, linear, lookup, open_dm, raw_device, remove_roles};
use crate::{errors, BootStack, DeviceSpec, MountPlan};

const NAME: &str = "userspace-bow";
/// The server's file name, looked up next to our own executable and on `PATH`.
pub const SERVER_BINARY: &str = "bow-ublk";
/// The ublk control node.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";
/// The engine's block (the ublk device's logical block).
const BLOCK: u64 = 4096;
/// How long a stopped server's device may take to go away.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// `[[backend]] type = "userspace-bow"` (and `[backend.userspace_bow]` under `auto`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UserspaceBowOptions {
    /// The `bow-ublk` binary (absolute). Default: `bow-ublk` next to the running executable
    /// (the daemon's, or checkpointctl's), else on `PATH`.
    pub server: Option<PathBuf>,
    /// How long the boot flow waits for the server's "serving" line (and `recover`'s).
    pub start_timeout_ms: u64,
    /// The ublk device id. Default: fixed per instance ([`default_ublk_id`]), so the boot flow
    /// and the daemon find the same device.
    pub ublk_id: Option<u32>,
    /// Where the server's stderr goes (`<run_dir>/bow-ublk-<id>.log`), a folder on tmpfs.
    pub run_dir: PathBuf,
}

impl Default for UserspaceBowOptions {
    fn default() -> Self {
        UserspaceBowOptions {
            server: None,
            start_timeout_ms: 10_000,
            ublk_id: None,
            run_dir: PathBuf::from("/run/checkpointd"),
        }
    }
}

/// The highest ublk id the kernel accepts is below 2^20 (`UBLK_MAX_UBLKS`).
const UBLK_ID_LIMIT: u32 = 1 << 20;

impl UserspaceBowOptions {
    /// Checks the options; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.server {
            if !s.is_absolute() {
                return Err(format!("server = {s:?}: must be an absolute path"));
            }
        }
        if self.start_timeout_ms == 0 {
            return Err("start_timeout_ms = 0: must be at least 1".into());
        }
        if let Some(id) = self.ublk_id {
            if id >= UBLK_ID_LIMIT {
                return Err(format!("ublk_id = {id}: must be below {UBLK_ID_LIMIT}"));
            }
        }
        if !self.run_dir.is_absolute() {
            return Err(format!("run_dir = {:?}: must be an absolute path", self.run_dir));
        }
        Ok(())
    }

    /// The ublk id of `spec`'s device.
    pub fn id_for(&self, spec: &DeviceSpec) -> u32 {
        self.ublk_id.unwrap_or_else(|| default_ublk_id(&spec.instance))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }
}

/// The default ublk id of an instance: 4096 + (FNV-1a of the instance token mod 4096). Fixed,
/// so every step finds the device an earlier step made; above the low ids that tools hand out
/// first (`ublk add` takes the next free id from 0).
pub fn default_ublk_id(instance: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in instance.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    4096 + h % 4096
}

/// The server binary: the configured one, else `bow-ublk` next to the running executable,
/// else on `PATH`. `Err` says where it looked.
pub fn find_server(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(format!("the configured server {} does not exist", path.display()))
        };
    }
    let mut looked = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_owned)) {
        let candidate = dir.join(SERVER_BINARY);
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(dir.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(SERVER_BINARY);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        looked.push("PATH".to_owned());
    }
    Err(format!("no {SERVER_BINARY} binary (looked in {})", looked.join(", ")))
}

// ---------------------------------------------------------------------------------------------
// The kernel: ublk_drv and its control node

/// Makes sure ublk can be used: `/dev/ublk-control` present (else `modprobe ublk_drv` and a
/// short wait for the node) and openable read-write. Every failure is `Unsupported`, saying why.
pub fn ensure_ublk_kernel(control: &Path, modprobe: &Path) -> Result<(), BackendError> {
    let unsupported = |reason: String| BackendError::Unsupported { backend: NAME.into(), reason };
    if !control.exists() {
        let out = Command::new(modprobe).arg("ublk_drv").stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(unsupported(format!(
                    "{} is missing and `{} ublk_drv` failed ({}): {}",
                    control.display(),
                    modprobe.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )))
            }
            Err(e) => {
                return Err(unsupported(format!(
                    "{} is missing and `{} ublk_drv` could not run: {e}",
                    control.display(),
                    modprobe.display()
                )))
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !control.exists() {
            if Instant::now() > deadline {
                return Err(unsupported(format!(
                    "ublk_drv loaded but {} did not appear",
                    control.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::info!("loaded ublk_drv");
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(control) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(unsupported(format!("no permission to open {}: {e}", control.display())))
        }
        Err(e) => Err(unsupported(format!("cannot open {}: {e}", control.display()))),
    }
}

/// Whether the kernel can serve ublk without changing anything: the control node is there, or
/// `modprobe -n ublk_drv` (a dry run) finds the module. `Err` says why not.
pub fn ublk_available(control: &Path, modprobe: &Path) -> Result<String, String> {
    if control.exists() {
        return Ok(format!("{} present", control.display()));
    }
    match Command::new(modprobe).args(["-n", "ublk_drv"]).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok("ublk_drv loadable".into()),
        Ok(o) => Err(format!(
            "no {} and ublk_drv cannot be loaded: {}",
            control.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("no {} and modprobe could not run: {e}", control.display())),
    }
}

/// The block device of ublk id `id`, if it exists: `/sys/block/ublkb<id>/dev`.
fn ublk_dev(sys_block: &Path, id: u32) -> Option<DevId> {
    let text = std::fs::read_to_string(sys_block.join(format!("ublkb{id}")).join("dev")).ok()?;
    text.trim().parse().ok()
}

/// Its size in sectors (`/sys/block/ublkb<id>/size`).
fn ublk_sectors(sys_block: &Path, id: u32) -> Result<Sectors, BackendError> {
    let path = sys_block.join(format!("ublkb{id}")).join("size");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| errors::io(format!("read {}", path.display()), e))?;
    text.trim().parse::<u64>().map(Sectors::new).map_err(|e| BackendError::Corrupt {
        what: path.display().to_string(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// The server process

/// Starts `binary args...` in a session of its own (it must outlive a short-lived caller such
/// as `checkpointctl boot mount`, and no terminal's hangup may reach it), stderr appended to
/// `log`, and waits up to `timeout` for its "serving" line on stdout. On timeout the process is
/// killed; a process that exits first is reported with its status and the end of its log.
/// Returns the line.
pub fn start_server(
    binary: &Path,
    args: &[String],
    log: &Path,
    timeout: Duration,
) -> Result<String, BackendError> {
    use std::os::unix::process::CommandExt;
    let unsupported = |reason: String| BackendError::Unsupported { backend: NAME.into(), reason };
    let log_start = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let stderr = match std::fs::OpenOptions::new().create(true).append(true).open(log) {
        Ok(f) => Stdio::from(f),
        Err(e) => {
            log::warn!("cannot open {} for the server's messages ({e})", log.display());
            Stdio::null()
        }
    };
    let mut cmd = Command::new(binary);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it runs in the
    // forked child before exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let what = format!("{} {}", binary.display(), args.join(" "));
    let mut child = cmd.spawn().map_err(|e| unsupported(format!("cannot start {what}: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| unsupported(format!("{what}: no stdout")))?;
    let (tx, rx) = mpsc::channel();
    // Reads the "serving" line, then keeps draining stdout so the server never writes into a
    // closed pipe while we live.
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if !sent && line.contains("serving /dev/ublkb") => {
                    let _ = tx.send(line.trim().to_owned());
                    sent = true;
                }
                Ok(_) => {}
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(line) => {
            // Reaps the server when it exits (a long-lived caller such as the daemon would
            // otherwise keep a zombie).
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    log::info!("bow-ublk server exited: {status}");
                }
            });
            Ok(line)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(unsupported(format!(
                "{what} did not report serving within {} ms (killed){}",
                timeout.as_millis(),
                log_tail(log, log_start)
            )))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            Err(unsupported(format!(
                "{what} exited ({status}) before serving{}",
                log_tail(log, log_start)
            )))
        }
    }
}

/// `: <the log's last lines since offset>`, or nothing.
fn log_tail(log: &Path, from: u64) -> String {
    let Ok(text) = std::fs::read(log) else { return String::new() };
    let from = usize::try_from(from).unwrap_or(0).min(text.len());
    let text = String::from_utf8_lossy(&text[from..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(": {}", lines[lines.len().saturating_sub(3)..].join(" / "))
}

/// What `status` answers: `state=S free=F used=U held=H ...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    /// The engine's state.
    pub state: BowState,
    /// Free bytes for backups.
    pub free: u64,
    /// Bytes taken for backups in this checkpoint.
    pub used: u64,
}

impl EngineStatus {
    /// Parses the text after `ok`.
    pub fn parse(text: &str) -> Result<EngineStatus, BackendError> {
        let corrupt = |reason: String| BackendError::Corrupt {
            what: "the bow-ublk server's status".into(),
            reason,
        };
        let field = |key: &str| -> Result<u64, BackendError> {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .ok_or_else(|| corrupt(format!("no {key} in {text:?}")))?
                .parse()
                .map_err(|e| corrupt(format!("{key} in {text:?}: {e}")))
        };
        let state = u8::try_from(field("state")?)
            .ok()
            .and_then(BowState::from_value)
            .ok_or_else(|| corrupt(format!("unknown state in {text:?}")))?;
        Ok(EngineStatus { state, free: field("free")?, used: field("used")? })
    }
}

/// The engine server of one device, as the steps drive it.
pub trait EngineServer: Send + Sync + fmt::Debug {
    /// Sends `command` (not `stop`) and returns the `ok` text. A server found dead while its
    /// device exists is re-attached first; no server and no device: `NotSetUp`.
    fn send(&self, command: ControlCommand) -> Result<String, BackendError>;
    /// Stops the server (its device is deleted) and waits for the device to go; `Identity`
    /// when there is none.
    fn stop(&self) -> Result<Action, BackendError>;

    /// The engine's state and space.
    fn status(&self) -> Result<EngineStatus, BackendError> {
        EngineStatus::parse(&self.send(ControlCommand::Status)?)
    }

    /// The checkpoint's write trace so far, in the estimator's format (docs/estimate.md).
    fn trace(&self) -> Result<Vec<u8>, BackendError>;
}

/// The real server of ublk device `id` over `raw`.
#[derive(Debug, Clone)]
pub struct UblkServer {
    id: u32,
    raw: PathBuf,
    binary: Option<PathBuf>,
    timeout: Duration,
    log: PathBuf,
    sys_block: PathBuf,
}

impl UblkServer {
    /// The server of `spec`'s device with `opts`.
    pub fn new(spec: &DeviceSpec, opts: &UserspaceBowOptions) -> UblkServer {
        let id = opts.id_for(spec);
        UblkServer {
            id,
            raw: spec.raw.clone(),
            binary: opts.server.clone(),
            timeout: opts.timeout(),
            log: opts.run_dir.join(format!("bow-ublk-{id}.log")),
            sys_block: PathBuf::from("/sys/block"),
        }
    }

    /// The ublk id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn binary(&self) -> Result<PathBuf, BackendError> {
        find_server(self.binary.as_deref())
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })
    }

    /// Whether the ublk device exists.
    pub fn device(&self) -> Option<DevId> {
        ublk_dev(&self.sys_block, self.id)
    }

    fn run(&self, subcommand: &str) -> Result<String, BackendError> {
        let binary = self.binary()?;
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let args = [
            subcommand.to_owned(),
            "--device".to_owned(),
            self.raw.display().to_string(),
            "--id".to_owned(),
            self.id.to_string(),
        ];
        start_server(&binary, &args, &self.log, self.timeout)
    }

    /// Starts a server over the raw device (a new ublk device).
    pub fn serve(&self) -> Result<(), BackendError> {
        let line = self.run("serve")?;
        log::info!("{line} over {}", self.raw.display());
        Ok(())
    }

    /// Re-attaches a new server to the existing device (its held I/O is issued again).
    pub fn recover(&self) -> Result<(), BackendError> {
        log::warn!(
            "the bow-ublk server of /dev/ublkb{} is gone while its device exists: running \
             `bow-ublk recover`",
            self.id
        );
        let line = self.run("recover")?;
        log::info!("recovered: {line}");
        Ok(())
    }

    /// Whether a server answers on the control socket.
    pub fn answers(&self) -> bool {
        control::send(self.id, ControlCommand::Status).is_ok()
    }

    fn wait_device_gone(&self) -> Result<(), BackendError> {
        let deadline = Instant::now() + STOP_WAIT;
        while self.device().is_some() {
            if Instant::now() > deadline {
                return Err(BackendError::InvalidState {
                    backend: NAME.into(),
                    state: format!("/dev/ublkb{} still present {STOP_WAIT:?} after stop", self.id),
                    operation: "stop the server",
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn control_err(e: ControlError) -> BackendError {
    match e {
        ControlError::Refused { command, message, .. } => BackendError::InvalidState {
            backend: NAME.into(),
            state: format!("refusing `{command}` ({message})"),
            operation: "drive the engine",
        },
        ControlError::Connect { source, dev_id } | ControlError::Io { source, dev_id } => {
            errors::io(format!("the bow-ublk server of /dev/ublkb{dev_id}"), source)
        }
    }
}

impl EngineServer for UblkServer {
    fn send(&self, command: ControlCommand) -> Result<String, BackendError> {
        match control::send(self.id, command) {
            Ok(text) => Ok(text),
            Err(ControlError::Connect { .. }) if self.device().is_some() => {
                self.recover()?;
                control::send(self.id, command).map_err(control_err)
            }
            Err(ControlError::Connect { .. }) => Err(BackendError::NotSetUp {
                backend: format!("{NAME} (no server and no /dev/ublkb{})", self.id),
            }),
            Err(e) => Err(control_err(e)),
        }
    }

    fn stop(&self) -> Result<Action, BackendError> {
        match control::send(self.id, ControlCommand::Stop) {
            Ok(_) => {}
            Err(ControlError::Connect { .. }) if self.device().is_some() => {
                // A device without a server holds its I/O; a server re-attached to it can
                // delete it.
                self.recover()?;
                control::send(self.id, ControlCommand::Stop).map_err(control_err)?;
            }
            Err(ControlError::Connect { .. }) => return Ok(Action::Identity),
            Err(e) => return Err(control_err(e)),
        }
        self.wait_device_gone()?;
        log::info!("bow-ublk server of /dev/ublkb{} stopped, device deleted", self.id);
        Ok(Action::Changed)
    }

    fn trace(&self) -> Result<Vec<u8>, BackendError> {
        // No re-attach here: a trace is worth keeping, not worth a recovery of its own.
        control::fetch_trace(self.id).map_err(control_err)
    }
}

// ---------------------------------------------------------------------------------------------
// The dm-linear device /data is mounted through

/// What the `Base` device's table points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lower {
    /// No `Base` device.
    Missing,
    /// The ublk device (the engine is in the path).
    Ublk,
    /// The raw partition (not checkpointing, or committed).
    Raw,
    /// Anything else (not ours to drive).
    Other,
}

/// The `Base` device as the steps drive it.
pub trait LinearDevice: Send + Sync + fmt::Debug {
    /// What its table points at.
    fn lower(&self) -> Result<Lower, BackendError>;
    /// Suspends it with a flush (the mounted filesystem frozen, its writes through the engine
    /// durable), loads a linear table over the raw partition, resumes.
    fn switch_to_raw(&self) -> Result<(), BackendError>;
}

/// The kernel's `Base` device of an instance.
#[derive(Debug, Clone)]
struct KernelLinear {
    spec: DeviceSpec,
    id: u32,
}

impl KernelLinear {
    fn lower_with(&self, dm: &DeviceMapper) -> Result<(Lower, Option<Sectors>), BackendError> {
        let base = stack::name(NAME, Role::Base, &self.spec)?;
        if lookup(dm, NAME, &base)?.is_none() {
            return Ok((Lower::Missing, None));
        }
        let lines = dm
            .table(DevRef::Name(&base.name), TableSlot::Active)
            .map_err(|e| errors::dm(NAME, format!("table of {}", base.name), e))?;
        let [one] = &lines[..] else { return Ok((Lower::Other, None)) };
        let Ok(Target::Linear(p)) = Target::parse(&one.target_type, &one.text) else {
            return Ok((Lower::Other, Some(one.length)));
        };
        let (raw, _) = raw_device(&self.spec)?;
        let lower = if p.offset != Sectors::new(0) {
            Lower::Other
        } else if p.device == raw {
            Lower::Raw
        } else if ublk_dev(Path::new("/sys/block"), self.id) == Some(p.device) {
            Lower::Ublk
        } else {
            Lower::Other
        };
        Ok((lower, Some(one.length)))
    }
}

impl LinearDevice for KernelLinear {
    fn lower(&self) -> Result<Lower, BackendError> {
        self.lower_with(&open_dm(NAME)?).map(|(l, _)| l)
    }

    fn switch_to_raw(&self) -> Result<(), BackendError> {
        let dm = open_dm(NAME)?;
        let (lower, length) = self.lower_with(&dm)?;
        match (lower, length) {
            (Lower::Raw, _) => return Ok(()),
            (Lower::Ublk, Some(_)) => {}
            _ => {
                return Err(BackendError::InvalidState {
                    backend: NAME.into(),
                    state: format!("its linear device points at {lower:?}"),
                    operation: "switch to the raw device",
                })
            }
        }
        let base = stack::name(NAME, Role::Base, &self.spec)?;
        let (raw, raw_size) = raw_device(&self.spec)?;
        let length = length.unwrap_or(raw_size).min(raw_size);
        // Lockfs and flush: the filesystem is frozen and everything it wrote has reached the
        // engine (COMMITTED: straight through) and, by the flush, the raw device.
        dm.suspend(DevRef::Name(&base.name), SuspendMode::Flush)
            .map_err(|e| errors::dm(NAME, format!("suspend {}", base.name), e))?;
        let reloaded = dm.reload(DevRef::Name(&base.name), &linear(length, raw)?).map_err(|e| {
            errors::dm(NAME, format!("reload {} linear over the raw device", base.name), e)
        });
        if let Err(e) = reloaded {
            // Never leave /data frozen: back to the table it had.
            let _ = dm.resume(DevRef::Name(&base.name));
            return Err(e);
        }
        log::info!("{} now linear over {}", base.name, self.spec.raw.display());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// f2fs: free space the engine can see

/// f2fs's `f_type`.
const F2FS_MAGIC: i64 = 0xF2F5_2010;

/// f2fs never discards a block twice: it remembers (across mounts) which free blocks it has
/// discarded, so FITRIM on a filesystem whose free space was discarded once (by mkfs, or an
/// earlier FITRIM) trims nothing, and the engine, which learns free space only from discards in
/// TRIM, would have none (measured on the virtual device: FITRIM 0 bytes on a 256 MiB f2fs
/// through the ublk device; and freeing a pinned file first did not make f2fs discard it
/// before the checkpoint either). So on f2fs the backend tells the engine itself: a pinned
/// file (pinned, so f2fs gives it real blocks at fallocate; unpinned it only reserves
/// addresses) is fallocated over most of the free space, its extents (FIEMAP) are discarded
/// through `device` (the engine, in TRIM, records them as free; the file's content is nobody's),
/// then it is unlinked and the filesystem synced, so those blocks are free for f2fs too.
/// Nothing but f2fs's metadata is written. Returns the bytes discarded (0 when not f2fs).
/// The f2fs pinned file's allocation unit: a section of the default 2 MiB.
const SECTION_STEP: u64 = 2 << 20;

fn expose_f2fs_free_space(mount_point: &Path, device: &Path) -> Result<u64, BackendError> {
    use std::os::fd::AsFd;
    let magic = nix::sys::statfs::statfs(mount_point)
        .map_err(|e| errors::io(format!("statfs {}", mount_point.display()), e.into()))?
        .filesystem_type()
        .0;
    #[allow(clippy::useless_conversion)] // the field's width varies by target
    if i64::from(magic) != F2FS_MAGIC {
        return Ok(0);
    }
    let dir = mount_point.join(".checkpointd");
    let path = dir.join("userspace-bow-free");
    let op = |what: &str| format!("{what} {}", path.display());
    std::fs::create_dir_all(&dir).map_err(|e| errors::io(op("create the folder of"), e))?;
    let _ = std::fs::remove_file(&path);
    let available = blockdev::fs::statvfs(mount_point)
        .map_err(|e| errors::fs(format!("statvfs {}", mount_point.display()), e))?
        .available
        .get();
    // Pinned files take whole sections; leave room for f2fs's own writes.
    let len = available / 10 * 9 / SECTION_STEP * SECTION_STEP;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| errors::io(op("create"), e))?;
    let result = (|| -> Result<u64, BackendError> {
        blockdev::fs::f2fs_pin_file(&file, true).map_err(|e| errors::fs(op("pin"), e))?;
        // Grown in steps, each halved on ENOSPC: free sections are fewer than statvfs's free
        // blocks say (partly used sections), and a single request halved on ENOSPC gave up to
        // half the free space away (12 of ~80 MiB on a 128 MiB /data).
        let mut step = len;
        loop {
            // What f2fs allocated so far, a failed request's part included.
            let allocated = file.metadata().map_err(|e| errors::io(op("stat"), e))?.len();
            if allocated >= len || step < SECTION_STEP {
                if allocated < 4 << 20 {
                    return Ok(0);
                }
                break;
            }
            let n = step.min(len - allocated);
            let (offset, bytes) = (
                i64::try_from(allocated).unwrap_or(i64::MAX),
                i64::try_from(n).unwrap_or(i64::MAX),
            );
            match nix::fcntl::fallocate(
                file.as_fd(),
                nix::fcntl::FallocateFlags::empty(),
                offset,
                bytes,
            ) {
                Ok(()) => {}
                Err(nix::errno::Errno::ENOSPC) => step = step / 2 / SECTION_STEP * SECTION_STEP,
                Err(e) => return Err(errors::io(op("fallocate"), e.into())),
            }
        }
        file.sync_all().map_err(|e| errors::io(op("fsync"), e))?;
        let extents = blockdev::fs::fiemap(&file, true).map_err(|e| errors::fs(op("FIEMAP"), e))?;
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|e| errors::io(format!("open {}", device.display()), e))?;
        let mut discarded = 0;
        for e in &extents {
            // Only whole, known blocks, never block 0.
            if blockdev::fs::check_extent(e).is_err() || e.physical.get() < BLOCK {
                continue;
            }
            let start = e.physical.get().div_ceil(BLOCK) * BLOCK;
            let end = (e.physical.get() + e.length.get()) / BLOCK * BLOCK;
            if end <= start {
                continue;
            }
            blockdev::blk::discard(
                &dev,
                blockdev::Bytes::new(start),
                blockdev::Bytes::new(end - start),
            )
            .map_err(|err| errors::blk(format!("discard of {}", device.display()), err))?;
            discarded += end - start;
        }
        Ok(discarded)
    })();
    drop(file);
    let removed = std::fs::remove_file(&path).map_err(|e| errors::io(op("remove"), e));
    let dir_file =
        std::fs::File::open(&dir).map_err(|e| errors::io(op("open the folder of"), e))?;
    nix::unistd::syncfs(dir_file.as_fd()).map_err(|e| errors::io(op("syncfs after"), e.into()))?;
    removed?;
    let discarded = result?;
    log::info!("f2fs: {discarded} bytes of free space discarded for the engine");
    Ok(discarded)
}

// ---------------------------------------------------------------------------------------------
// The steps, over the seams

/// Arms the checkpoint: FITRIM from the second block (the engine records the discards as free
/// space in TRIM; never from sector 0, as for dm-bow), then CHECKPOINT. `None`: already armed.
fn arm(server: &dyn EngineServer, fs: &dyn MountedFs) -> Result<Option<u64>, BackendError> {
    match server.status()?.state {
        BowState::Checkpoint => return Ok(None),
        BowState::Committed => {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: "committed".into(),
                operation: "prepare",
            })
        }
        BowState::Trim => {}
    }
    let trimmed = fs.fitrim_from(BLOCK)?;
    let before = server.status()?;
    if before.free == 0 {
        return Err(BackendError::NoSpace {
            operation: format!(
                "start the engine's checkpoint (FITRIM trimmed {trimmed} bytes, the engine \
                 knows no free block)"
            ),
            needed: 2 * BLOCK,
            available: 0,
        });
    }
    let after = EngineStatus::parse(&server.send(ControlCommand::Checkpoint)?)?;
    log::info!(
        "userspace-bow checkpoint started: {trimmed} bytes trimmed, {} bytes free for backups",
        after.free
    );
    Ok(Some(after.free))
}

/// Commits: the engine's COMMITTED (it copies block 0 back and flushes: from here on the
/// device holds no log and the next boot restores nothing), the table switched to the raw
/// device, the server stopped. Each step looks before it acts, so a rerun finishes the rest.
fn commit_steps(
    server: &dyn EngineServer,
    base: &dyn LinearDevice,
    traces: Option<&TraceStore>,
) -> Result<Action, BackendError> {
    let mut action = Action::Identity;
    match base.lower()? {
        Lower::Missing => {
            return Err(BackendError::NotSetUp { backend: format!("{NAME} (no linear device)") })
        }
        Lower::Other => {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: "its linear device points at a device that is not ours".into(),
                operation: "commit",
            })
        }
        Lower::Ublk => {
            let committed = match server.status()?.state {
                BowState::Checkpoint => {
                    server.send(ControlCommand::Commit)?;
                    log::info!("userspace-bow engine committed (block 0 copied back)");
                    true
                }
                BowState::Trim => {
                    log::info!("userspace-bow commit: the checkpoint was never armed");
                    false
                }
                BowState::Committed => true,
            };
            // Committed now, its trace still in the server until the stop. (An engine that was
            // never armed has none: the last checkpoint's stays.)
            if let (Some(traces), true) = (traces, committed) {
                traces.keep(server, "commit");
            }
            base.switch_to_raw()?;
            action = Action::Changed;
        }
        Lower::Raw => {
            // Switched earlier: an engine still in CHECKPOINT here would mean the filesystem
            // wrote past it, and its log would roll those writes back.
            if let Ok(s) = server.status() {
                if s.state == BowState::Checkpoint {
                    return Err(BackendError::InvalidState {
                        backend: NAME.into(),
                        state: "on the raw device while its engine is still in CHECKPOINT".into(),
                        operation: "commit",
                    });
                }
            }
        }
    }
    if server.stop()? == Action::Changed {
        action = Action::Changed;
    }
    Ok(action)
}

/// Where the checkpoint's write trace is kept for the estimator: the records folder,
/// `userspace_bow_trace-<instance>.cpdtrace` (on the metadata partition, never rolled back),
/// the newest checkpoint's only. `checkpointctl estimate --trace` reads it as it is.
#[derive(Debug)]
pub struct TraceStore {
    records: Records,
    instance: String,
}

/// Records kind of the kept trace.
const TRACE_KIND: &str = "userspace_bow_trace";
/// Its file extension.
const TRACE_EXT: &str = "cpdtrace";

impl TraceStore {
    /// The trace of `spec`'s device in `records`.
    pub fn new(records: Records, spec: &DeviceSpec) -> TraceStore {
        TraceStore { records, instance: crate::instance_for(&spec.mount_point) }
    }

    /// Where the trace is kept.
    pub fn path(&self) -> PathBuf {
        self.records.bytes_path(TRACE_KIND, &self.instance, TRACE_EXT)
    }

    /// Fetches the engine's trace and replaces the kept one. Advisory: a checkpoint's commit
    /// or abort never fails over its trace, so a failure is logged and the old file stays.
    fn keep(&self, server: &dyn EngineServer, at: &str) {
        let kept = server.trace().and_then(|bytes| {
            self.records.save_bytes(TRACE_KIND, &self.instance, TRACE_EXT, &bytes).map(|()| bytes)
        });
        match kept {
            Ok(bytes) => log::info!(
                "userspace-bow {at}: the checkpoint's write trace ({} bytes) kept in {} for the \
                 estimator",
                bytes.len(),
                self.path().display()
            ),
            Err(e) => log::warn!("userspace-bow {at}: the write trace was not kept: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Boot stack

/// Where `auto` records that this boot fell back to snapshot (records kind).
const FALLBACK_KIND: &str = "userspace_bow_fallback";

/// `auto` fell back to snapshot in this boot: the boot flow writes it, the daemon reads it,
/// so both drive the same backend. Tied to the boot by the kernel's boot id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackRecord {
    /// `/proc/sys/kernel/random/boot_id` of the boot that fell back.
    pub boot_id: String,
    /// Why (shown by getStatus).
    pub reason: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The fallback record of this boot for `spec`, if any.
fn fallback_of_this_boot(records: &Records, spec: &DeviceSpec) -> Option<FallbackRecord> {
    match records.load::<FallbackRecord>(FALLBACK_KIND, &spec.instance) {
        Ok(Some(r)) if r.boot_id == boot_id() => Some(r),
        Ok(_) => None,
        Err(e) => {
            log::warn!("userspace-bow fallback record of {}: {e}", spec.instance);
            None
        }
    }
}

/// Paths the stack uses, fixed in production; host tests point them elsewhere.
#[derive(Clone, Debug)]
struct KernelPaths {
    control: PathBuf,
    modprobe: PathBuf,
}

impl Default for KernelPaths {
    fn default() -> Self {
        KernelPaths { control: PathBuf::from(UBLK_CONTROL), modprobe: PathBuf::from("modprobe") }
    }
}

/// The boot flow's half: the server and `Base` over `/dev/ublkbN` when checkpointing, else
/// `Base` over the raw device. Under `auto`, a setup that fails before the mount falls back to
/// snapshot ([`UserspaceBowStack::with_fallback`]).
#[derive(Clone, Debug, Default)]
pub struct UserspaceBowStack {
    opts: UserspaceBowOptions,
    kernel: KernelPaths,
    fallback: Option<(SnapshotStack, Records)>,
}

impl UserspaceBowStack {
    /// A stack with these options.
    pub fn new(opts: UserspaceBowOptions) -> UserspaceBowStack {
        UserspaceBowStack { opts, kernel: KernelPaths::default(), fallback: None }
    }

    /// `auto`'s choice: when the checkpointed setup fails before the mount, set up `snapshot`
    /// instead and record it (in `records`, for the daemon) with the reason.
    pub fn with_fallback(mut self, snapshot: SnapshotStack, records: Records) -> Self {
        self.fallback = Some((snapshot, records));
        self
    }

    fn ensure_checkpointed(&self, spec: &DeviceSpec) -> Result<(PathBuf, Action), BackendError> {
        let dm = open_dm(NAME)?;
        let server = UblkServer::new(spec, &self.opts);
        let id = server.id();
        let linear_dev = KernelLinear { spec: spec.clone(), id };
        let base = stack::name(NAME, Role::Base, spec)?;
        match linear_dev.lower_with(&dm)?.0 {
            Lower::Ublk => {
                // Built earlier in this boot: the server must answer (re-attached if dead).
                server.status()?;
                let info = lookup(&dm, NAME, &base)?.ok_or_else(|| BackendError::NotSetUp {
                    backend: format!("{NAME} ({} vanished)", base.name),
                })?;
                let node = dm
                    .make_node(&base.name, info.dev)
                    .map_err(|e| errors::dm(NAME, format!("node of {}", base.name), e))?;
                return Ok((node, Action::Identity));
            }
            Lower::Raw => {
                // A non-checkpointed stack made earlier in this boot: only if unused.
                let _ = remove_roles(&dm, NAME, spec, &[Role::Base])?;
            }
            Lower::Other => {
                return Err(BackendError::InvalidState {
                    backend: NAME.into(),
                    state: format!("{} has an unexpected table", base.name),
                    operation: "set up the ublk stack",
                })
            }
            Lower::Missing => {}
        }
        // Everything that can be refused is checked before anything is started.
        let binary = find_server(self.opts.server.as_deref())
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })?;
        let _ = raw_device(spec)?;
        ensure_ublk_kernel(&self.kernel.control, &self.kernel.modprobe)?;
        let server = UblkServer { binary: Some(binary), ..server };
        let started = match server.device() {
            Some(_) if server.answers() => false,
            Some(_) => {
                server.recover()?;
                false
            }
            None => {
                server.serve()?;
                true
            }
        };
        let made = (|| {
            let dev = server.device().ok_or_else(|| BackendError::NotSetUp {
                backend: format!("{NAME} (/dev/ublkb{id} missing after the server started)"),
            })?;
            let size = ublk_sectors(&server.sys_block, id)?;
            dm.create_device(&base.name, Some(&base.uuid), &linear(size, dev)?)
                .map_err(|e| errors::dm(NAME, format!("create {}", base.name), e))?;
            log::info!("{} linear over /dev/ublkb{id} ({size} sectors)", base.name);
            Ok(dm.node_path(&base.name))
        })();
        match made {
            Ok(node) => Ok((node, Action::Changed)),
            Err(e) => {
                if started {
                    if let Err(stop) = server.stop() {
                        log::warn!("stopping the server after a failed setup: {stop}");
                    }
                }
                Err(e)
            }
        }
    }

    fn plain(&self, spec: &DeviceSpec) -> Result<(PathBuf, Action), BackendError> {
        let dm = open_dm(NAME)?;
        let server = UblkServer::new(spec, &self.opts);
        let linear_dev = KernelLinear { spec: spec.clone(), id: server.id() };
        if linear_dev.lower_with(&dm)?.0 == Lower::Ublk {
            let _ = remove_roles(&dm, NAME, spec, &[Role::Base])?;
        }
        let _ = server.stop()?;
        ensure_base(&dm, NAME, spec)
    }

    fn own_setup(&self, spec: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError> {
        let (node, action) =
            if checkpointing { self.ensure_checkpointed(spec)? } else { self.plain(spec)? };
        Ok(MountPlan {
            device: node,
            fs_type: spec.fs_type.clone(),
            options: spec.mount_options.clone(),
            checkpointed: checkpointing,
            action,
            checkpoint_disable_max_percent: None,
            note: None,
        })
    }
}

impl BootStack for UserspaceBowStack {
    fn setup(&self, device: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError> {
        let Some((snapshot, records)) = &self.fallback else {
            return self.own_setup(device, checkpointing);
        };
        if let Some(record) = fallback_of_this_boot(records, device) {
            let plan = snapshot.setup(device, checkpointing)?;
            return Ok(MountPlan { note: Some(record.reason), ..plan });
        }
        if !checkpointing {
            return self.own_setup(device, false);
        }
        match self.own_setup(device, true) {
            Ok(plan) => Ok(plan),
            Err(e) => {
                let reason =
                    format!("auto: userspace-bow could not be set up ({e}), using snapshot");
                log::warn!("{reason}");
                // Whatever the failed attempt left (it removes what it made) goes first.
                if let Err(t) = self.teardown_own(device) {
                    log::warn!("cleaning up after userspace-bow's setup: {t}");
                }
                records.save(
                    FALLBACK_KIND,
                    &device.instance,
                    &FallbackRecord { boot_id: boot_id(), reason: reason.clone() },
                )?;
                let plan = snapshot.setup(device, true)?;
                Ok(MountPlan { note: Some(reason), ..plan })
            }
        }
    }

    fn teardown_stack(&self, device: &DeviceSpec) -> Result<Action, BackendError> {
        // A fallback's snapshot devices first (stack tops first; they share the `base` name).
        let mut action = Action::Identity;
        if let Some((snapshot, _)) = &self.fallback {
            action = snapshot.teardown_stack(device)?;
        }
        if self.teardown_own(device)? == Action::Changed {
            action = Action::Changed;
        }
        Ok(action)
    }
}

impl UserspaceBowStack {
    fn teardown_own(&self, device: &DeviceSpec) -> Result<Action, BackendError> {
        let dm = open_dm(NAME)?;
        let mut action = remove_roles(&dm, NAME, device, &[Role::Base])?;
        let server = UblkServer::new(device, &self.opts);
        if server.stop()? == Action::Changed {
            action = Action::Changed;
            drop_raw_cache(&device.raw);
        }
        Ok(action)
    }
}

/// Drops the raw device's buffer cache: after the table switch the filesystem writes below it,
/// so pages the server cached would be stale for whoever opens the raw device next (fsck).
fn drop_raw_cache(raw: &Path) {
    match std::fs::File::open(raw) {
        Ok(f) => {
            if let Err(e) = blockdev::blk::flush_buffers(&f) {
                log::warn!("BLKFLSBUF {}: {e}", raw.display());
            }
        }
        Err(e) => log::warn!("open {}: {e}", raw.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Backend

/// The server, the linear device and the filesystem a step drives.
type Parts = (Arc<dyn EngineServer>, Arc<dyn LinearDevice>, Arc<dyn MountedFs>);

/// The daemon's half for one device.
pub struct UserspaceBowBackend {
    spec: DeviceSpec,
    opts: UserspaceBowOptions,
    restore: RestoreOptions,
    records: Records,
    parts: Option<Parts>,
    /// `auto`'s snapshot, used when the boot flow fell back to it in this boot.
    fallback: Option<SnapshotBackend>,
    fallback_reason: OnceLock<String>,
}

impl fmt::Debug for UserspaceBowBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserspaceBowBackend")
            .field("spec", &self.spec)
            .field("opts", &self.opts)
            .field("fallback", &self.fallback.is_some())
            .finish_non_exhaustive()
    }
}

impl UserspaceBowBackend {
    /// The backend of `spec`.
    pub fn new(
        spec: DeviceSpec,
        opts: UserspaceBowOptions,
        restore: RestoreOptions,
        records: Records,
    ) -> Result<UserspaceBowBackend, BackendError> {
        opts.validate()
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })?;
        Ok(UserspaceBowBackend {
            spec,
            opts,
            restore,
            records,
            parts: None,
            fallback: None,
            fallback_reason: OnceLock::new(),
        })
    }

    /// `auto`'s choice: when the boot flow fell back to snapshot in this boot, `snapshot`
    /// does the work; its restore runs before the engine's log restore at every boot.
    pub fn with_fallback(mut self, options: SnapshotOptions) -> Result<Self, BackendError> {
        self.fallback =
            Some(SnapshotBackend::new(self.spec.clone(), options, self.records.clone())?);
        Ok(self)
    }

    /// Drives these instead of the real server, device and filesystem (host tests).
    pub fn with_parts(
        mut self,
        server: Arc<dyn EngineServer>,
        base: Arc<dyn LinearDevice>,
        fs: Arc<dyn MountedFs>,
    ) -> Self {
        self.parts = Some((server, base, fs));
        self
    }

    fn parts(&self) -> Parts {
        if let Some((s, b, f)) = &self.parts {
            return (s.clone(), b.clone(), f.clone());
        }
        let server = UblkServer::new(&self.spec, &self.opts);
        let base = KernelLinear { spec: self.spec.clone(), id: server.id() };
        (Arc::new(server), Arc::new(base), Arc::new(KernelFs::at(&self.spec.mount_point)))
    }

    /// The snapshot backend when this boot fell back to it.
    fn fell_back(&self) -> Option<&SnapshotBackend> {
        let snapshot = self.fallback.as_ref()?;
        if self.fallback_reason.get().is_some() {
            return Some(snapshot);
        }
        let record = fallback_of_this_boot(&self.records, &self.spec)?;
        let _ = self.fallback_reason.set(record.reason);
        Some(snapshot)
    }

    fn reservations(&self) -> Reservations {
        Reservations::new(self.records.clone())
    }
}

impl Backend for UserspaceBowBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Block
    }

    fn name(&self) -> &str {
        NAME
    }

    fn selection_reason(&self) -> &str {
        match self.fell_back() {
            Some(_) => self.fallback_reason.get().map(String::as_str).unwrap_or_default(),
            None => "",
        }
    }

    fn covers(&self, device: &str) -> bool {
        self.spec.covers(device)
    }

    fn restore(
        &self,
        device: &str,
        request: &RestoreRequest,
        progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        // A checkpoint of an earlier boot that fell back to snapshot is merged first; the two
        // never coexist (every boot restores before it arms).
        if let Some(snapshot) = &self.fallback {
            let report = snapshot.restore(device, request, progress)?;
            if report.outcome != RestoreOutcome::NothingToRestore {
                return Ok(report);
            }
        }
        let mut opts = self.restore.clone();
        if request.limit.is_some() {
            opts.limit = request.limit;
        }
        Ok(restore_log(device, &opts, progress))
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        if let Some(snapshot) = self.fell_back() {
            return snapshot.prepare();
        }
        let (server, base, fs) = self.parts();
        if base.lower()? != Lower::Ublk {
            return Err(BackendError::NotSetUp {
                backend: format!("{NAME} (/data is not mounted through the engine)"),
            });
        }
        if server.status()?.state == BowState::Trim {
            // Hand-over: the reservation's blocks become free before FITRIM, so the engine
            // records them as free space for its backups.
            self.reservations().release_for(&self.spec, "userspace-bow prepare")?;
            if self.parts.is_none() {
                let base = stack::name(NAME, Role::Base, &self.spec)?;
                let node = open_dm(NAME)?.node_path(&base.name);
                expose_f2fs_free_space(&self.spec.mount_point, &node)?;
            }
        }
        Ok(match arm(server.as_ref(), fs.as_ref())? {
            Some(_) => Action::Changed,
            None => Action::Identity,
        })
    }

    fn commit(&self) -> Result<Action, BackendError> {
        if let Some(snapshot) = self.fell_back() {
            return snapshot.commit();
        }
        let (server, base, _) = self.parts();
        let traces = TraceStore::new(self.records.clone(), &self.spec);
        let action = commit_steps(server.as_ref(), base.as_ref(), Some(&traces))?;
        if action == Action::Changed && self.parts.is_none() {
            drop_raw_cache(&self.spec.raw);
            log::info!(
                "userspace-bow checkpoint of {} committed; /data on the raw device",
                self.spec.mount_point.display()
            );
        }
        Ok(action)
    }

    fn abort(&self) -> Result<Action, BackendError> {
        if let Some(snapshot) = self.fell_back() {
            return snapshot.abort();
        }
        // The log stays for the next boot's restore; a reservation not yet handed over goes.
        // The failed attempt's writes are a trace worth keeping too; advisory, like the trace
        // at commit: a stack or server that cannot say where it is fails no abort.
        let (server, base, _) = self.parts();
        if matches!(base.lower(), Ok(Lower::Ublk))
            && server.status().is_ok_and(|s| s.state == BowState::Checkpoint)
        {
            TraceStore::new(self.records.clone(), &self.spec).keep(server.as_ref(), "abort");
        }
        let released = self.reservations().release_for(&self.spec, "userspace-bow abort")?;
        Ok(if released.is_some() { Action::Changed } else { Action::Identity })
    }

    fn teardown(&self) -> Result<Action, BackendError> {
        let mut action = self.reservations().repair_for(&self.spec, "userspace-bow teardown")?;
        if let Some(snapshot) = &self.fallback {
            if snapshot.teardown()? == Action::Changed {
                action = Action::Changed;
            }
        }
        Ok(action)
    }

    fn grow(&self) -> Result<Action, BackendError> {
        match self.fell_back() {
            Some(snapshot) => snapshot.grow(),
            None => Ok(Action::Identity),
        }
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        if let Some(snapshot) = self.fell_back() {
            return snapshot.space();
        }
        let (server, base, _) = self.parts();
        if base.lower()? != Lower::Ublk {
            return Ok(BackupSpace::default());
        }
        let status = server.status()?;
        if status.state != BowState::Checkpoint {
            return Ok(BackupSpace::default());
        }
        Ok(BackupSpace {
            free_bytes: Some(status.free),
            used_bytes: Some(status.used),
            total_bytes: None,
            grow_below_free_bytes: None,
        })
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        if let Some(snapshot) = self.fell_back() {
            return snapshot.status();
        }
        let devices = vec![self.spec.raw.display().to_string()];
        let (server, base, _) = self.parts();
        let (state, space) = match base.lower()? {
            Lower::Missing | Lower::Other => (BackendState::Unknown, BackupSpace::default()),
            Lower::Raw => (BackendState::Idle, BackupSpace::default()),
            Lower::Ublk => {
                let status = server.status()?;
                match status.state {
                    BowState::Trim => (BackendState::Idle, BackupSpace::default()),
                    BowState::Checkpoint => (
                        BackendState::Armed,
                        BackupSpace {
                            free_bytes: Some(status.free),
                            used_bytes: Some(status.used),
                            total_bytes: None,
                            grow_below_free_bytes: None,
                        },
                    ),
                    BowState::Committed => (BackendState::Committed, BackupSpace::default()),
                }
            }
        };
        Ok(BackendStatus {
            state,
            backup_used_bytes: space.used_bytes,
            free_bytes: space.free_bytes,
            devices,
        })
    }
}

#[cfg(test)]
mod tests;
