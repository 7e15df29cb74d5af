//! The `bow` backend: Android's dm-bow target (dm-bow-format.md §1, §10–§11).
//!
//! * restore (daemon, before mount): the dm-bow log in block 0 of the raw device is restored
//!   by the `bow` crate ([`restore_log`], vold's outcomes and codes);
//! * setup (boot flow): checkpointing → a `bow` target over the raw device (length rounded
//!   down to 8 sectors, `1 block_size:4096` if configured), state 0; not checkpointing → the
//!   linear `Base` device;
//! * prepare: a backup-space reservation of the device released (so its blocks are free and
//!   trimmed), FITRIM of the mounted filesystem (never from sector 0: hazard (c)), then state 1;
//! * commit: freeze, state 2, check block 0 through the device and rewrite it if the kernel
//!   copied a stale one (hazard (a)), thaw;
//! * space: `bow/free` corrected for what the kernel's counter never subtracts (hazard (b)).
//!
//! The kernel-facing parts are two small traits, [`BowTarget`] (sysfs state/free and block 0
//! through the dm device) and [`MountedFs`] (FITRIM, freeze, thaw, free space), so the step
//! logic runs on the host against the engine model (`bow::model`) behind a fake sysfs tree.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ::bow::device::{BlockDevice, DeviceError, FileDevice};
use ::bow::restore::{RestoreError, RestoreOutcome as BowOutcome};
use blockdev::bowctl::{BowControl, BowState, Sysfs};
use blockdev::dm::target::BowParams;
use blockdev::dm::{DevRef, DeviceInfo, DeviceMapper, DmName, Table, TableSlot, Target};
use blockdev::names::Role;
use blockdev::ErrorKind;
use blockdev::Sectors;
use nix::errno::Errno;
use policy::errno::{EAGAIN, EINVAL, EIO};
use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreOutcome, RestoreReport, RestoreRequest,
};
use serde::{Deserialize, Serialize};

use crate::records::Records;
use crate::reservation::Reservations;
use crate::stack::{self, ensure_base, lookup, open_dm, raw_device, remove_roles};
use crate::{errors, BootStack, DeviceSpec, MountPlan};

const NAME: &str = "bow";

/// Bytes of block 0 read and compared at commit (a whole 4 KiB block; with 512-byte bow blocks
/// this covers block 0 and the seven after it, which the kernel does not touch at commit).
const HEAD: usize = 4096;

/// The restore options of the `bow` crate, under the name the daemon's config uses.
pub mod restore {
    pub use ::bow::restore::{CorruptLogPolicy, RestoreOptions};
}
use restore::RestoreOptions;

/// `[[backend]] type = "bow"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BowOptions {
    /// Add `1 block_size:4096` to the table line (Android with dm-default-key options v2).
    pub block_size_4096: bool,
    /// The sysfs root (`/sys`); tests point it at a directory the engine model serves.
    pub sysfs_root: PathBuf,
}

impl Default for BowOptions {
    fn default() -> Self {
        BowOptions { block_size_4096: false, sysfs_root: PathBuf::from("/sys") }
    }
}

impl BowOptions {
    /// Checks the options; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.sysfs_root.is_absolute() {
            return Err(format!("sysfs_root = {:?}: must be an absolute path", self.sysfs_root));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// restoreCheckpoint on a raw device

fn device_errno(e: &DeviceError) -> i32 {
    match e {
        DeviceError::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
        _ => EIO,
    }
}

fn failed(code: i32, message: String) -> RestoreReport {
    RestoreReport {
        outcome: RestoreOutcome::Failed { errno: code, message: message.clone() },
        result: Err((code, message)),
    }
}

/// Restores the dm-bow log on `device` (vold's `restoreCheckpoint`/`restoreCheckpointPart`;
/// `opts.limit` is the part count), reporting `(done, total)` progress. Outcomes and codes are
/// vold's: no log answers "No magic" with EINVAL (fs_mgr ignores it), the part limit answers
/// EAGAIN "Hit the test limit", a device error answers its errno, a refused log EINVAL.
pub fn restore_log(
    device: &str,
    opts: &RestoreOptions,
    progress: &dyn Fn(u64, u64),
) -> RestoreReport {
    let started = Instant::now();
    let report = run_restore(device, opts, progress);
    log::debug!("restore of {device}: {:?} in {:?}", report.outcome, started.elapsed());
    report
}

fn no_magic() -> RestoreReport {
    RestoreReport {
        outcome: RestoreOutcome::NothingToRestore,
        result: Err((EINVAL, "No magic".into())),
    }
}

fn run_restore(device: &str, opts: &RestoreOptions, progress: &dyn Fn(u64, u64)) -> RestoreReport {
    let dev = match FileDevice::open(Path::new(device)) {
        // The saved copies are read once, before anything is written: no use caching them.
        Ok(dev) => dev.with_direct_reads(),
        Err(e) => return failed(device_errno(&e), format!("Cannot open {device}: {e}")),
    };
    let mut report_progress = |p: ::bow::restore::Progress| progress(p.done, p.total);
    match ::bow::restore::restore(&dev, opts, &mut report_progress) {
        Ok(report) => match report.outcome {
            BowOutcome::NoLog => no_magic(),
            BowOutcome::Restored { entries, blocks_written, resumed, .. } => {
                log::info!(
                    "restored {device}: {entries} log entries, {blocks_written} blocks written{}",
                    if resumed { " (finished an interrupted restore)" } else { "" }
                );
                RestoreReport { outcome: RestoreOutcome::Restored { entries }, result: Ok(()) }
            }
            BowOutcome::RolledForward { reason, .. } => {
                log::warn!(
                    "Checkpoint validation failed - rolled {device} forward (kept the new data): \
                     {reason}"
                );
                RestoreReport { outcome: RestoreOutcome::RolledForward, result: Ok(()) }
            }
            BowOutcome::Refused { reason } => {
                failed(EINVAL, format!("Refused to restore {device}: {reason}"))
            }
            BowOutcome::LimitReached { entries_applied, .. } => RestoreReport {
                outcome: RestoreOutcome::Interrupted { entries: entries_applied },
                result: Err((EAGAIN, "Hit the test limit".into())),
            },
            BowOutcome::DryRun { .. } => failed(EINVAL, "unexpected dry-run outcome".to_owned()),
        },
        Err(RestoreError::NoLog) => no_magic(),
        Err(RestoreError::Device(e)) => {
            failed(device_errno(&e), format!("Restore of {device} failed: {e}"))
        }
        Err(e) => failed(EINVAL, format!("Restore of {device} failed: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel-facing seams

/// A dm-bow device as the backend drives it: its sysfs `state` and `free`, and block 0 read and
/// written through the dm device.
pub trait BowTarget: Send + Sync + fmt::Debug {
    /// `bow/state`.
    fn state(&self) -> Result<BowState, BackendError>;
    /// Writes `bow/state` (checked by reading it back).
    fn set_state(&self, to: BowState) -> Result<(), BackendError>;
    /// `bow/free`: the kernel's `trims_total` in bytes (over-reports: hazard (b)).
    fn free(&self) -> Result<u64, BackendError>;
    /// The bow block size in bytes.
    fn block_size(&self) -> u64;
    /// Reads the first `buf.len()` bytes of the dm device, uncached.
    fn read_head(&self, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `data` at the start of the dm device and makes it durable.
    fn write_head(&self, data: &[u8]) -> Result<(), BackendError>;
}

/// The mounted filesystem on top of a dm-bow device.
pub trait MountedFs: Send + Sync + fmt::Debug {
    /// FITRIM of free extents at byte offsets `>= start`; returns the bytes trimmed.
    fn fitrim_from(&self, start: u64) -> Result<u64, BackendError>;
    /// FIFREEZE.
    fn freeze(&self) -> Result<(), BackendError>;
    /// FITHAW.
    fn thaw(&self) -> Result<(), BackendError>;
    /// Free bytes as the filesystem counts them (statvfs `f_bfree × f_frsize`).
    fn free_bytes(&self) -> Result<u64, BackendError>;
}

/// The real dm-bow device of an instance: found by name, controlled through sysfs.
#[derive(Debug)]
struct KernelBow {
    ctl: BowControl,
    node: PathBuf,
    block_size: u64,
}

impl KernelBow {
    fn find(spec: &DeviceSpec, opts: &BowOptions) -> Result<KernelBow, BackendError> {
        let dm = open_dm(NAME)?;
        let n = stack::name(NAME, Role::Bow, spec)?;
        let (info, node) = match lookup(&dm, NAME, &n)? {
            Some(info) => (info, dm.node_path(&n.name)),
            None => match fs_mgr_bow(&dm, spec)? {
                Some(found) => found,
                None => {
                    return Err(BackendError::NotSetUp {
                        backend: format!("{NAME} ({}, nor fs_mgr's `{FS_MGR_NAME}`)", n.name),
                    })
                }
            },
        };
        let sysfs = Sysfs::at(&opts.sysfs_root);
        let ctl = sysfs.find_bow(info.dev).map_err(|e| bowctl_err("find dm-bow in sysfs", e))?;
        let Some(ctl) = ctl else {
            return Err(BackendError::NotSetUp {
                backend: format!("{NAME} ({} has no bow/ in sysfs)", info.name),
            });
        };
        let block_size = if opts.block_size_4096 {
            4096
        } else {
            let raw = std::fs::File::open(&spec.raw)
                .map_err(|e| errors::io(format!("open {}", spec.raw.display()), e))?;
            u64::from(
                blockdev::blk::logical_block_size(&raw)
                    .map_err(|e| errors::blk("logical block size", e))?,
            )
        };
        Ok(KernelBow { ctl, node, block_size })
    }

    fn device(&self) -> Result<FileDevice, BackendError> {
        FileDevice::open(&self.node)
            .map(FileDevice::with_direct_reads)
            .map_err(|e| errors::io(format!("open {}", self.node.display()), to_io(e)))
    }
}

/// The name Android's fs_mgr gives the dm-bow device it creates itself at `mount_all` for a
/// `checkpoint=block` entry; on Android the bow backend drives that device, not one of its own.
const FS_MGR_NAME: &str = "bow";

/// fs_mgr's `bow` device, if there is one and its table sits on `spec`'s raw device (another
/// device's dm-bow is never ours to drive).
fn fs_mgr_bow(
    dm: &DeviceMapper,
    spec: &DeviceSpec,
) -> Result<Option<(DeviceInfo, PathBuf)>, BackendError> {
    let name = DmName::new(FS_MGR_NAME).map_err(|e| errors::dm(NAME, "device name", e))?;
    let info = match dm.info(DevRef::Name(&name)) {
        Ok(info) => info,
        Err(e) if e.errno() == Some(Errno::ENXIO) || e.kind() == ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(errors::dm(NAME, format!("status of {FS_MGR_NAME}"), e)),
    };
    let (raw, _) = raw_device(spec)?;
    let deps = dm
        .deps(DevRef::Name(&name), TableSlot::Active)
        .map_err(|e| errors::dm(NAME, format!("deps of {FS_MGR_NAME}"), e))?;
    if deps != [raw] {
        return Ok(None);
    }
    Ok(Some((info, dm.node_path(&name))))
}

fn to_io(e: DeviceError) -> std::io::Error {
    match e {
        DeviceError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    }
}

fn bowctl_err(operation: &str, e: blockdev::bowctl::BowError) -> BackendError {
    match e {
        blockdev::bowctl::BowError::Io { path, source } => {
            errors::io(format!("{operation}: {}", path.display()), source)
        }
        blockdev::bowctl::BowError::BadValue { .. } => {
            BackendError::Corrupt { what: operation.to_owned(), reason: e.to_string() }
        }
        blockdev::bowctl::BowError::StateNotChanged { .. } => BackendError::InvalidState {
            backend: NAME.into(),
            state: e.to_string(),
            operation: "change the dm-bow state",
        },
    }
}

impl BowTarget for KernelBow {
    fn state(&self) -> Result<BowState, BackendError> {
        self.ctl.state().map_err(|e| bowctl_err("read bow/state", e))
    }
    fn set_state(&self, to: BowState) -> Result<(), BackendError> {
        self.ctl.set_state(to).map_err(|e| bowctl_err("write bow/state", e))
    }
    fn free(&self) -> Result<u64, BackendError> {
        self.ctl.free().map(|b| b.get()).map_err(|e| bowctl_err("read bow/free", e))
    }
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn read_head(&self, buf: &mut [u8]) -> Result<(), BackendError> {
        self.device()?
            .read_at(buf, 0)
            .map_err(|e| errors::io(format!("read block 0 of {}", self.node.display()), to_io(e)))
    }
    fn write_head(&self, data: &[u8]) -> Result<(), BackendError> {
        let dev = self.device()?;
        let op = || format!("write block 0 of {}", self.node.display());
        dev.write_at(data, 0).map_err(|e| errors::io(op(), to_io(e)))?;
        dev.flush().map_err(|e| errors::io(op(), to_io(e)))
    }
}

/// The real mounted filesystem.
#[derive(Debug)]
pub(crate) struct KernelFs {
    mount_point: PathBuf,
}

impl KernelFs {
    /// The filesystem mounted at `mount_point`.
    pub(crate) fn at(mount_point: &Path) -> KernelFs {
        KernelFs { mount_point: mount_point.to_owned() }
    }

    fn open(&self) -> Result<std::fs::File, BackendError> {
        std::fs::File::open(&self.mount_point)
            .map_err(|e| errors::io(format!("open {}", self.mount_point.display()), e))
    }
}

impl MountedFs for KernelFs {
    fn fitrim_from(&self, start: u64) -> Result<u64, BackendError> {
        use blockdev::Bytes;
        let f = self.open()?;
        blockdev::fs::fitrim(&f, Bytes::new(start), Bytes::new(u64::MAX - start), Bytes::new(0))
            .map(|b| b.get())
            .map_err(|e| errors::fs(format!("FITRIM {}", self.mount_point.display()), e))
    }
    fn freeze(&self) -> Result<(), BackendError> {
        blockdev::fs::freeze(self.open()?)
            .map_err(|e| errors::fs(format!("freeze {}", self.mount_point.display()), e))
    }
    fn thaw(&self) -> Result<(), BackendError> {
        blockdev::fs::thaw(self.open()?)
            .map_err(|e| errors::fs(format!("thaw {}", self.mount_point.display()), e))
    }
    fn free_bytes(&self) -> Result<u64, BackendError> {
        blockdev::fs::statvfs(&self.mount_point)
            .map(|s| s.free.get())
            .map_err(|e| errors::fs(format!("statvfs {}", self.mount_point.display()), e))
    }
}

// ---------------------------------------------------------------------------------------------
// The steps, over the seams

/// What the backend remembers from checkpoint start (in [`Records`]), for the space
/// correction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BowRecord {
    /// `bow/free` right after state 1.
    pub kernel_free_at_start: u64,
    /// The filesystem's free bytes right after state 1.
    pub fs_free_at_start: u64,
    /// The bow block size.
    pub block_size: u64,
}

/// Hazard (b): `bow/free` never subtracts the two blocks `prepare_log` takes at checkpoint
/// start, nor writes that land inside a free range without reaching its end (the carved piece
/// is a fresh node, dm-bow-format.md §2.2, §11). The first is exact; the second is the
/// filesystem's net allocation since checkpoint start (every block it newly writes was free,
/// hence trimmed), which is exact for workloads that free nothing and otherwise errs low
/// (blocks freed and reallocated hide allocations). The result is also capped by what the
/// filesystem itself still counts free, since dm-bow only backs up into blocks free at start.
pub fn corrected_free(
    kernel_free: u64,
    block_size: u64,
    start: Option<&BowRecord>,
    fs_free_now: u64,
) -> u64 {
    let mut free = kernel_free.saturating_sub(2 * block_size);
    if let Some(r) = start {
        free = free.saturating_sub(r.fs_free_at_start.saturating_sub(fs_free_now));
    }
    free.min(fs_free_now)
}

/// Arms the checkpoint: FITRIM from the second block on (a discard starting at sector 0 in
/// state 0 crashes the kernel: hazard (c)), then state 1. Returns the record of the start.
fn arm(target: &dyn BowTarget, fs: &dyn MountedFs) -> Result<Option<BowRecord>, BackendError> {
    match target.state()? {
        BowState::Checkpoint => return Ok(None),
        BowState::Committed => {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: "committed (state 2)".into(),
                operation: "prepare",
            })
        }
        BowState::Trim => {}
    }
    // Hazard (c): never trim from byte 0. Filesystems never have their first block free, but
    // the start offset makes it impossible whatever the filesystem reports.
    let start = target.block_size().max(HEAD as u64);
    let trimmed = fs.fitrim_from(start)?;
    target.set_state(BowState::Checkpoint)?;
    let record = BowRecord {
        kernel_free_at_start: target.free()?,
        fs_free_at_start: fs.free_bytes()?,
        block_size: target.block_size(),
    };
    log::info!(
        "dm-bow checkpoint started: {trimmed} bytes trimmed, bow/free {}",
        record.kernel_free_at_start
    );
    Ok(Some(record))
}

/// Commits: freeze, remember block 0 as the filesystem left it, state 2, and if the kernel
/// copied a stale block 0 (hazard (a): its dm-bufio copy from checkpoint start) write the
/// remembered one back, all while frozen; then thaw (ext4 also rewrites its super block on
/// thaw) and check block 0 once more. Returns whether block 0 had to be repaired.
fn commit_frozen(target: &dyn BowTarget, fs: &dyn MountedFs) -> Result<Option<bool>, BackendError> {
    match target.state()? {
        BowState::Committed => return Ok(None),
        BowState::Trim => {
            log::info!("dm-bow commit: the checkpoint was never armed (state 0); nothing to do");
            return Ok(None);
        }
        BowState::Checkpoint => {}
    }
    fs.freeze()?;
    let result = (|| {
        let mut expected = vec![0u8; HEAD];
        target.read_head(&mut expected)?;
        target.set_state(BowState::Committed)?;
        let mut now = vec![0u8; HEAD];
        target.read_head(&mut now)?;
        if now == expected {
            return Ok(false);
        }
        log::warn!(
            "dm-bow commit wrote a stale block 0 (dm-bufio copy from checkpoint start, \
             dm-bow-format.md §10.1); writing back the block the filesystem left"
        );
        target.write_head(&expected)?;
        target.read_head(&mut now)?;
        if now != expected {
            return Err(BackendError::Corrupt {
                what: "block 0 after dm-bow commit".into(),
                reason: "still differs from the filesystem's after rewriting it".into(),
            });
        }
        Ok(true)
    })();
    let thawed = fs.thaw();
    let repaired = result?;
    thawed?;
    Ok(Some(repaired))
}

// ---------------------------------------------------------------------------------------------
// Boot stack

/// The boot flow's half: a `bow` device over the raw device when checkpointing, else `Base`.
#[derive(Clone, Debug, Default)]
pub struct BowStack {
    opts: BowOptions,
}

impl BowStack {
    /// A stack with these options.
    pub fn new(opts: BowOptions) -> BowStack {
        BowStack { opts }
    }

    fn ensure_bow(&self, spec: &DeviceSpec) -> Result<(PathBuf, Action), BackendError> {
        let dm = open_dm(NAME)?;
        let n = stack::name(NAME, Role::Bow, spec)?;
        if let Some(info) = lookup(&dm, NAME, &n)? {
            let node = dm
                .make_node(&n.name, info.dev)
                .map_err(|e| errors::dm(NAME, format!("node of {}", n.name), e))?;
            return Ok((node, Action::Identity));
        }
        // Switching from a non-checkpointed stack made earlier in this boot: only if unused.
        let _ = remove_roles(&dm, NAME, spec, &[Role::Base])?;
        let (raw, size) = raw_device(spec)?;
        // dm-bow needs whole 4 KiB blocks (fs_mgr rounds the length down to 8 sectors).
        let len = Sectors::new(size.get() / 8 * 8);
        let params =
            BowParams { device: raw, block_size: self.opts.block_size_4096.then_some(4096) };
        let table = Table::single(len, Target::Bow(params))
            .map_err(|e| errors::dm(NAME, "bow table", e.into()))?;
        dm.create_device(&n.name, Some(&n.uuid), &table)
            .map_err(|e| errors::dm(NAME, format!("create {}", n.name), e))?;
        log::info!("dm-bow device {} over {} ({len} sectors)", n.name, spec.raw.display());
        Ok((dm.node_path(&n.name), Action::Changed))
    }
}

impl BootStack for BowStack {
    fn setup(&self, device: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError> {
        let (node, action) = if checkpointing {
            self.ensure_bow(device)?
        } else {
            let dm = open_dm(NAME)?;
            let _ = remove_roles(&dm, NAME, device, &[Role::Bow])?;
            ensure_base(&dm, NAME, device)?
        };
        Ok(MountPlan {
            device: node,
            fs_type: device.fs_type.clone(),
            options: device.mount_options.clone(),
            checkpointed: checkpointing,
            action,
            checkpoint_disable_max_percent: None,
            note: None,
        })
    }

    fn teardown_stack(&self, device: &DeviceSpec) -> Result<Action, BackendError> {
        let dm = open_dm(NAME)?;
        remove_roles(&dm, NAME, device, &[Role::Bow, Role::Base])
    }
}

// ---------------------------------------------------------------------------------------------
// Backend

/// The device and the filesystem a step drives.
type Parts = (Arc<dyn BowTarget>, Arc<dyn MountedFs>);

/// The daemon's half for one dm-bow device.
pub struct BowBackend {
    spec: DeviceSpec,
    opts: BowOptions,
    restore: RestoreOptions,
    records: Records,
    /// Injected seams (tests, other kernels); `None`: the real device and filesystem.
    parts: Option<Parts>,
}

impl fmt::Debug for BowBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BowBackend")
            .field("spec", &self.spec)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl BowBackend {
    /// The backend of `spec`.
    pub fn new(
        spec: DeviceSpec,
        opts: BowOptions,
        restore: RestoreOptions,
        records: Records,
    ) -> Result<BowBackend, BackendError> {
        opts.validate()
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })?;
        Ok(BowBackend { spec, opts, restore, records, parts: None })
    }

    /// Drives `target` and `fs` instead of the kernel's device and the mounted filesystem
    /// (host tests against the engine model).
    pub fn with_parts(mut self, target: Arc<dyn BowTarget>, fs: Arc<dyn MountedFs>) -> BowBackend {
        self.parts = Some((target, fs));
        self
    }

    fn parts(&self) -> Result<Parts, BackendError> {
        if let Some((t, f)) = &self.parts {
            return Ok((t.clone(), f.clone()));
        }
        let target = KernelBow::find(&self.spec, &self.opts)?;
        Ok((Arc::new(target), Arc::new(KernelFs { mount_point: self.spec.mount_point.clone() })))
    }

    fn record(&self) -> Result<Option<BowRecord>, BackendError> {
        self.records.load(NAME, &self.spec.instance)
    }

    fn reservations(&self) -> Reservations {
        Reservations::new(self.records.clone())
    }
}

impl Backend for BowBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Block
    }

    fn name(&self) -> &str {
        NAME
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
        let mut opts = self.restore.clone();
        if request.limit.is_some() {
            opts.limit = request.limit;
        }
        let report = restore_log(device, &opts, progress);
        if report.result.is_ok() {
            // The checkpoint the record described is gone (restored or rolled forward).
            let _ = self.records.clear(NAME, &self.spec.instance)?;
        }
        Ok(report)
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        let (target, fs) = self.parts()?;
        if target.state()? == BowState::Trim {
            // Hand-over: the reservation's blocks become free before FITRIM, so dm-bow counts
            // them as free space for its backups.
            self.reservations().release_for(&self.spec, "bow prepare")?;
        }
        match arm(target.as_ref(), fs.as_ref())? {
            Some(record) => {
                self.records.save(NAME, &self.spec.instance, &record)?;
                Ok(Action::Changed)
            }
            None => Ok(Action::Identity),
        }
    }

    fn commit(&self) -> Result<Action, BackendError> {
        let (target, fs) = self.parts()?;
        let done = commit_frozen(target.as_ref(), fs.as_ref())?;
        let _ = self.records.clear(NAME, &self.spec.instance)?;
        Ok(match done {
            Some(_) => {
                log::info!("dm-bow checkpoint of {} committed", self.spec.mount_point.display());
                Action::Changed
            }
            None => Action::Identity,
        })
    }

    fn abort(&self) -> Result<Action, BackendError> {
        // The log stays for the next boot's restore. The update is abandoned: a reservation
        // not yet handed over goes.
        let released = self.reservations().release_for(&self.spec, "bow abort")?;
        Ok(if released.is_some() { Action::Changed } else { Action::Identity })
    }

    fn teardown(&self) -> Result<Action, BackendError> {
        self.reservations().repair_for(&self.spec, "bow teardown")
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        let (target, fs) = self.parts()?;
        if target.state()? != BowState::Checkpoint {
            return Ok(BackupSpace::default());
        }
        let kernel = target.free()?;
        let record = self.record()?;
        let free = corrected_free(kernel, target.block_size(), record.as_ref(), fs.free_bytes()?);
        let used = record.map(|r| r.kernel_free_at_start.saturating_sub(kernel));
        Ok(BackupSpace {
            free_bytes: Some(free),
            used_bytes: used,
            total_bytes: None,
            grow_below_free_bytes: None,
        })
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        let devices = vec![self.spec.raw.display().to_string()];
        let (target, _) = match self.parts() {
            Ok(p) => p,
            Err(BackendError::NotSetUp { .. }) => {
                return Ok(BackendStatus {
                    state: BackendState::Unknown,
                    backup_used_bytes: None,
                    free_bytes: None,
                    devices,
                })
            }
            Err(e) => return Err(e),
        };
        let state = match target.state()? {
            BowState::Trim => BackendState::Idle,
            BowState::Checkpoint => BackendState::Armed,
            BowState::Committed => BackendState::Committed,
        };
        let space = self.space()?;
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
