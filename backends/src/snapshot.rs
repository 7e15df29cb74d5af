//! The `snapshot` backend: dm-snapshot on any mainline kernel.
//!
//! Device stack (names from [`blockdev::names`], instance from the mount point):
//!
//! ```text
//!   /data ── cpd-<i>-base ── linear(raw)                        not armed
//!   /data ── cpd-<i>-base ── snapshot-origin(raw)               armed (prepare swaps the table)
//!            cpd-<i>-snap ── snapshot(raw, cpd-<i>-cow, P, chunk)
//!            cpd-<i>-cow  ── linear over the COW file's extents on raw
//! ```
//!
//! The COW store is a file on /data itself (`<mount>/<cow_file>`, fallocated, pinned first on
//! f2fs), mapped by FIEMAP onto the raw device; its extents, chunk size and state are kept in a
//! [`Records`] file in the metadata directory, so the next boot can merge the store back before
//! /data is mounted. Step order and crash safety: docs/backends.md.
//!
//! A backup-space reservation of the device ([`Reservations`]) becomes the COW file at
//! prepare: renamed into place (its blocks never move), extended when the configuration asks
//! for more, then mapped like a new file.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::bow::device::{BlockDevice, DeviceError, FileDevice};
use blockdev::dm::target::{
    LinearParams, Persistence, SnapshotOriginParams, SnapshotParams, SnapshotStatus,
};
use blockdev::dm::{DevRef, DeviceMapper, SuspendMode, Table, TableSlot, Target, TargetLine};
use blockdev::names::Role;
use blockdev::{Bytes, DevId, Sectors};
use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreOutcome, RestoreReport, RestoreRequest,
};
use serde::{Deserialize, Serialize};

use crate::mountinfo::{find_mount, read_mountinfo};
use crate::records::Records;
use crate::reservation::Reservations;
use crate::stack::{self, active_target, ensure_base, linear, lookup, open_dm, raw_device};
use crate::{errors, BootStack, DeviceSpec, MountPlan};

const NAME: &str = "snapshot";
const MIB: u64 = 1 << 20;
/// Smallest COW store we arm with.
const MIN_COW_BYTES: u64 = MIB;
/// How often the kernel merge's progress is polled.
const MERGE_POLL: Duration = Duration::from_millis(50);

/// How a snapshot checkpoint is rolled back.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackMethod {
    /// Parse the persistent COW store and copy every chunk back before mount (`snapcow`).
    #[default]
    UserspaceMerge,
    /// The kernel's snapshot-merge target (handover), verified complete before the COW file
    /// is released.
    KernelMerge,
}

/// `[[backend]] type = "snapshot"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotOptions {
    /// The COW file, relative to the mount point.
    pub cow_file: String,
    /// Fixed size of the COW store in bytes; `None`: `cow_free_percent` of the free space at
    /// prepare time.
    pub cow_bytes: Option<u64>,
    /// Share of the filesystem's free space the COW store takes when `cow_bytes` is unset.
    pub cow_free_percent: u8,
    /// Chunk size in KiB (a power of two, 4 to 512).
    pub chunk_kib: u32,
    /// How a rollback merges the COW store back.
    pub rollback: RollbackMethod,
    /// When the store is this full (percent), the monitor grows it by `grow_percent` of its
    /// size ([`SnapshotOptions::grow_below_free_bytes`]), once per size.
    pub grow_at_percent: u8,
    /// Growth step, percent of the current store size (0 = never grow).
    pub grow_percent: u8,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            cow_file: ".checkpointd/cow".into(),
            cow_bytes: None,
            cow_free_percent: 25,
            chunk_kib: 4,
            rollback: RollbackMethod::UserspaceMerge,
            grow_at_percent: 75,
            grow_percent: 50,
        }
    }
}

impl SnapshotOptions {
    /// Checks the options; each error names its key.
    pub fn validate(&self) -> Result<(), String> {
        let p = Path::new(&self.cow_file);
        let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
        if self.cow_file.is_empty() || !plain {
            return Err(format!(
                "cow_file = {:?}: must be a relative path inside the mount point, without `..`",
                self.cow_file
            ));
        }
        if !self.chunk_kib.is_power_of_two() || !(4..=512).contains(&self.chunk_kib) {
            return Err(format!("chunk_kib = {}: a power of two from 4 to 512", self.chunk_kib));
        }
        if let Some(b) = self.cow_bytes {
            if b < MIN_COW_BYTES {
                return Err(format!("cow_bytes = {b}: at least {MIN_COW_BYTES}"));
            }
        }
        if !(1..=90).contains(&self.cow_free_percent) {
            return Err(format!("cow_free_percent = {}: 1 to 90", self.cow_free_percent));
        }
        if !(1..=99).contains(&self.grow_at_percent) {
            return Err(format!("grow_at_percent = {}: 1 to 99", self.grow_at_percent));
        }
        if self.grow_percent > 100 {
            return Err(format!("grow_percent = {}: 0 to 100", self.grow_percent));
        }
        Ok(())
    }

    fn chunk(&self) -> Sectors {
        Sectors::new(u64::from(self.chunk_kib) * 2)
    }

    /// The free space below which a store of `total` bytes asks to be grown: `grow_at_percent`
    /// full. `None` when it never grows (`grow_percent = 0`, or `rollback = "kernel-merge"`,
    /// whose merge cannot leave a growth's reused blocks out; [`Backend::grow`]).
    pub fn grow_below_free_bytes(&self, total: u64) -> Option<u64> {
        if self.grow_percent == 0 || self.rollback == RollbackMethod::KernelMerge {
            return None;
        }
        let free_share = u128::from(100 - self.grow_at_percent.min(99));
        u64::try_from(u128::from(total) * free_share / 100).ok()
    }

    fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_kib) * 1024
    }
}

/// Where a snapshot checkpoint is, as the next boot must know before mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CowState {
    /// The COW file and its map are being made; the store may hold stale bytes and is never
    /// merged. Nothing is armed.
    Preparing,
    /// The store's first chunk was zeroed: from here on it holds only this checkpoint's
    /// exceptions (possibly none yet). An uncommitted boot leaves it armed, and the next
    /// boot's restore merges it back.
    Armed,
    /// Rolled back; the file is left to delete once the filesystem is mounted.
    Merged,
    /// A commit began: the store is never merged again; what is left is cleanup.
    Committing,
}

/// One extent of the COW file: `length` bytes at file offset `logical` live at byte
/// `physical` of the raw device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowExtent {
    /// File offset.
    pub logical: u64,
    /// Raw-device offset.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The snapshot backend's record ([`Records`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Where the checkpoint is.
    pub state: CowState,
    /// The COW file, relative to the mount point.
    pub cow_file: String,
    /// The store's chunk size in sectors.
    pub chunk_sectors: u64,
    /// The file's extents, in file order.
    pub extents: Vec<CowExtent>,
    /// The file's length when the snapshot was armed; the monitor's `grow` may extend it
    /// since, with blocks that were free space then (docs/snapcow.md, step 4). `None` in a
    /// record written before this field: the whole file counts as armed.
    #[serde(default)]
    pub armed_bytes: Option<u64>,
}

impl SnapshotRecord {
    /// Bytes the extents cover.
    pub fn cow_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }
}

/// Merges extents that continue each other both in the file and on the device, and drops the
/// flags: FIEMAP may report one run as several extents (and differently from call to call).
pub fn normalize_extents(extents: &[blockdev::fs::Extent]) -> Vec<CowExtent> {
    let mut out: Vec<CowExtent> = Vec::new();
    for e in extents {
        let (logical, physical, length) = (e.logical.get(), e.physical.get(), e.length.get());
        if let Some(last) = out.last_mut() {
            if last.logical + last.length == logical && last.physical + last.length == physical {
                last.length += length;
                continue;
            }
        }
        out.push(CowExtent { logical, physical, length });
    }
    out
}

/// Whether `new` maps the first `old`-covered bytes exactly as `old` does (a grown file keeps
/// its existing blocks).
fn is_prefix(old: &[CowExtent], new: &[CowExtent]) -> bool {
    let Some((last, head)) = old.split_last() else { return true };
    if new.len() < old.len() || new[..head.len()] != *head {
        return false;
    }
    let n = new[head.len()];
    n.logical == last.logical && n.physical == last.physical && n.length >= last.length
}

fn cow_table(raw: DevId, extents: &[CowExtent]) -> Result<Table, BackendError> {
    let bad = |reason: String| BackendError::Corrupt { what: "COW file extents".into(), reason };
    let mut lines = Vec::new();
    let mut at = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if e.logical != at {
            return Err(bad(format!("extent {i} starts at {} instead of {at}", e.logical)));
        }
        let len =
            Bytes::new(e.length).to_sectors_exact().map_err(|e| errors::units("extent", e))?;
        let offset =
            Bytes::new(e.physical).to_sectors_exact().map_err(|e| errors::units("extent", e))?;
        lines.push(TargetLine::new(
            Bytes::new(at).to_sectors_floor(),
            len,
            Target::Linear(LinearParams { device: raw, offset }),
        ));
        at += e.length;
    }
    Table::new(lines).map_err(|e| errors::dm(NAME, "COW table", e.into()))
}

/// The boot flow's half: /data is always mounted through the linear `Base` device (dm then
/// holds the raw device, and the COW device can map it too).
#[derive(Clone, Debug, Default)]
pub struct SnapshotStack {
    _opts: SnapshotOptions,
}

impl SnapshotStack {
    /// A stack with these options.
    pub fn new(opts: SnapshotOptions) -> SnapshotStack {
        SnapshotStack { _opts: opts }
    }
}

impl BootStack for SnapshotStack {
    fn setup(&self, device: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError> {
        let dm = open_dm(NAME)?;
        let (node, action) = ensure_base(&dm, NAME, device)?;
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
        stack::remove_roles(
            &dm,
            NAME,
            device,
            &[Role::Base, Role::Origin, Role::Snapshot, Role::Cow],
        )
    }
}

/// The daemon's half for one filesystem.
#[derive(Debug)]
pub struct SnapshotBackend {
    spec: DeviceSpec,
    opts: SnapshotOptions,
    records: Records,
    committed: AtomicBool,
    /// Steps run one at a time (the monitor's `grow` against a commit, say).
    steps: Mutex<()>,
}

fn raw_file(spec: &DeviceSpec) -> Result<FileDevice, BackendError> {
    FileDevice::open(&spec.raw)
        .map_err(|e| errors::io(format!("open {}", spec.raw.display()), dev_io(e)))
}

fn dev_io(e: DeviceError) -> std::io::Error {
    match e {
        DeviceError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Drops the page cache of the raw device (`BLKFLSBUF`: written back, then invalidated).
///
/// The filesystem reaches the raw device through device-mapper, below its page cache, so that
/// cache is never updated by the filesystem's writes: blocks cached by anything that read or
/// wrote the raw device by path earlier (mkfs, fsck, blkid, an earlier restore) go stale. A
/// merge that read the COW store through it would copy stale chunks back, and readers after a
/// merge (fsck) would see blocks from before it.
fn drop_raw_cache(spec: &DeviceSpec) -> Result<(), BackendError> {
    let f =
        File::open(&spec.raw).map_err(|e| errors::io(format!("open {}", spec.raw.display()), e))?;
    blockdev::blk::flush_buffers(&f)
        .map_err(|e| errors::blk(format!("flush buffers of {}", spec.raw.display()), e))
}

/// Writes `len` zero bytes at `offset` of `dev` and makes them durable.
fn zero(dev: &FileDevice, offset: u64, len: u64, what: &str) -> Result<(), BackendError> {
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    dev.write_at(&zeros, offset)
        .and_then(|()| dev.flush())
        .map_err(|e| errors::io(format!("zero {what}"), dev_io(e)))
}

fn sync_parent(path: &Path) -> Result<(), BackendError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| errors::io(format!("fsync {}", dir.display()), e))
}

impl SnapshotBackend {
    /// The backend of `spec`.
    pub fn new(
        spec: DeviceSpec,
        opts: SnapshotOptions,
        records: Records,
    ) -> Result<SnapshotBackend, BackendError> {
        opts.validate()
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })?;
        Ok(SnapshotBackend {
            spec,
            opts,
            records,
            committed: AtomicBool::new(false),
            steps: Mutex::new(()),
        })
    }

    /// The COW file's path.
    pub fn cow_path(&self) -> PathBuf {
        self.spec.mount_point.join(&self.opts.cow_file)
    }

    /// The durable record, if any.
    pub fn record(&self) -> Result<Option<SnapshotRecord>, BackendError> {
        self.records.load(NAME, &self.spec.instance)
    }

    fn save(&self, r: &SnapshotRecord) -> Result<(), BackendError> {
        self.records.save(NAME, &self.spec.instance, r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.steps.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn name(&self, role: Role) -> Result<blockdev::names::ObjectName, BackendError> {
        stack::name(NAME, role, &self.spec)
    }

    /// The filesystem is mounted on the mount point through our base device.
    fn check_mounted(
        &self,
        dm: &DeviceMapper,
        operation: &'static str,
    ) -> Result<DevId, BackendError> {
        let base = self.name(Role::Base)?;
        let Some(info) = lookup(dm, NAME, &base)? else {
            return Err(BackendError::NotSetUp { backend: format!("{NAME} ({})", base.name) });
        };
        match find_mount(&read_mountinfo()?, &self.spec.mount_point) {
            Some(m) if m.dev == info.dev => Ok(info.dev),
            _ => Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: format!(
                    "{} is not mounted through {}",
                    self.spec.mount_point.display(),
                    base.name
                ),
                operation,
            }),
        }
    }

    fn is_f2fs(&self) -> Result<bool, BackendError> {
        if let Some(t) = &self.spec.fs_type {
            return Ok(t == "f2fs");
        }
        Ok(find_mount(&read_mountinfo()?, &self.spec.mount_point)
            .is_some_and(|m| m.fs_type == "f2fs"))
    }

    /// How big a new COW file is: `cow_bytes`, or `cow_free_percent` of the free space, in
    /// whole chunks; `NoSpace` when that cannot be had.
    fn wanted_size(&self) -> Result<u64, BackendError> {
        let s = blockdev::fs::statvfs(&self.spec.mount_point)
            .map_err(|e| errors::fs(format!("statvfs {}", self.spec.mount_point.display()), e))?;
        let available = s.available.get();
        let chunk = self.opts.chunk_bytes();
        let want = match self.opts.cow_bytes {
            Some(b) => b,
            None => available / 100 * u64::from(self.opts.cow_free_percent),
        } / chunk
            * chunk;
        if want < MIN_COW_BYTES || want > available {
            return Err(BackendError::NoSpace {
                operation: format!("allocate the COW file {}", self.cow_path().display()),
                needed: want.max(MIN_COW_BYTES),
                available,
            });
        }
        Ok(want)
    }

    /// Creates the COW file (pinned first on f2fs, then fallocated, fsynced with its folder),
    /// or reuses the existing one when `expected` (the recorded map) still matches FIEMAP.
    fn cow_file(&self, expected: Option<&[CowExtent]>) -> Result<Vec<CowExtent>, BackendError> {
        let path = self.cow_path();
        let op = |what: &str| format!("{what} {}", path.display());
        if path.exists() {
            if let Some(expected) = expected.filter(|e| !e.is_empty()) {
                let f = File::open(&path).map_err(|e| errors::io(op("open"), e))?;
                let now = normalize_extents(
                    &blockdev::fs::mappable_extents(&f).map_err(|e| errors::fs(op("FIEMAP"), e))?,
                );
                if now != expected {
                    return Err(BackendError::Corrupt {
                        what: op("COW file"),
                        reason: format!(
                            "its extents changed since they were recorded ({} now, {} recorded); \
                             refusing to arm on a wrong map",
                            now.len(),
                            expected.len()
                        ),
                    });
                }
                return Ok(now);
            }
            // A file made by a prepare that crashed before recording its map: nothing was
            // armed on it, so start again.
            fs::remove_file(&path).map_err(|e| errors::io(op("remove"), e))?;
        }
        if let Some(extents) = self.adopt_reservation(&path)? {
            return Ok(extents);
        }
        let size = self.wanted_size()?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| errors::io(op("create the folder of"), e))?;
            sync_parent(dir)?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| errors::io(op("create"), e))?;
        if self.is_f2fs()? {
            // Before fallocate, or f2fs reports the extents at physical 0 (vm-bench.md).
            blockdev::fs::f2fs_pin_file(&f, true).map_err(|e| errors::fs(op("pin"), e))?;
        }
        let len = i64::try_from(size).map_err(|_| BackendError::NoSpace {
            operation: op("allocate"),
            needed: size,
            available: 0,
        })?;
        nix::fcntl::fallocate(f.as_fd(), nix::fcntl::FallocateFlags::empty(), 0, len).map_err(
            |e| {
                let _ = fs::remove_file(&path);
                errors::io(op("fallocate"), std::io::Error::from(e))
            },
        )?;
        f.sync_all().map_err(|e| errors::io(op("fsync"), e))?;
        sync_parent(&path)?;
        let extents = normalize_extents(
            &blockdev::fs::mappable_extents(&f).map_err(|e| errors::fs(op("FIEMAP"), e))?,
        );
        log::info!("COW file {}: {size} bytes in {} extents", path.display(), extents.len());
        Ok(extents)
    }

    /// The hand-over of a backup-space reservation: the reservation file of this device is
    /// renamed to `path` (the same filesystem, so its blocks stay where they are: no second
    /// file, no change in free space), extended when `cow_bytes` or `cow_free_percent` (of the
    /// free space counting the reservation as free) asks for more and the filesystem has it,
    /// rounded up to whole chunks, then synced and mapped. `None`: no reservation to adopt.
    fn adopt_reservation(&self, path: &Path) -> Result<Option<Vec<CowExtent>>, BackendError> {
        let reservations = Reservations::new(self.records.clone());
        let Some(reserved) = reservations.take_for(&self.spec, path, "snapshot prepare")? else {
            return Ok(None);
        };
        let op = |what: &str| format!("{what} {}", path.display());
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| errors::io(op("open"), e))?;
        let have = f.metadata().map_err(|e| errors::io(op("stat"), e))?.len();
        let available = blockdev::fs::statvfs(&self.spec.mount_point)
            .map_err(|e| errors::fs(format!("statvfs {}", self.spec.mount_point.display()), e))?
            .available
            .get();
        let chunk = self.opts.chunk_bytes();
        let configured = match self.opts.cow_bytes {
            Some(b) => b,
            None => available.saturating_add(have) / 100 * u64::from(self.opts.cow_free_percent),
        };
        let whole = |n: u64| n.div_ceil(chunk).saturating_mul(chunk);
        let mut target = whole(configured.max(have));
        if target - have > available {
            log::warn!(
                "COW file {}: the configuration asks for {target} bytes but only {available} \
                 more are free; using the reservation's {have} bytes",
                path.display()
            );
            target = whole(have).min(have + available);
        }
        if target > have {
            let (Ok(at), Ok(len)) = (i64::try_from(have), i64::try_from(target - have)) else {
                return Err(BackendError::NoSpace {
                    operation: op("extend"),
                    needed: target,
                    available,
                });
            };
            nix::fcntl::fallocate(f.as_fd(), nix::fcntl::FallocateFlags::empty(), at, len)
                .map_err(|e| errors::io(op("extend"), std::io::Error::from(e)))?;
        }
        f.sync_all().map_err(|e| errors::io(op("fsync"), e))?;
        let extents = normalize_extents(
            &blockdev::fs::mappable_extents(&f).map_err(|e| errors::fs(op("FIEMAP"), e))?,
        );
        if !reserved.extents.is_empty() && !is_prefix(&reserved.extents, &extents) {
            // Harmless for the store (it is mapped now), but worth knowing.
            log::warn!("COW file {}: the reservation's blocks moved since reserve", path.display());
        }
        log::info!(
            "snapshot prepare of {}: the reservation ({} bytes) became the COW file {} \
             ({target} bytes in {} extents)",
            self.spec.mount_point.display(),
            reserved.bytes,
            path.display(),
            extents.len()
        );
        Ok(Some(extents))
    }

    /// Creates (or reloads) the COW device over `extents` of the raw device.
    fn cow_device(
        &self,
        dm: &DeviceMapper,
        raw: DevId,
        extents: &[CowExtent],
    ) -> Result<DevId, BackendError> {
        let cow = self.name(Role::Cow)?;
        let table = cow_table(raw, extents)?;
        let info = match lookup(dm, NAME, &cow)? {
            Some(_) => dm.reload(DevRef::Name(&cow.name), &table),
            None => dm.create_device(&cow.name, Some(&cow.uuid), &table),
        }
        .map_err(|e| errors::dm(NAME, format!("set up {}", cow.name), e))?;
        dm.make_node(&cow.name, info.dev)
            .map_err(|e| errors::dm(NAME, format!("node of {}", cow.name), e))?;
        Ok(info.dev)
    }

    fn snap_params(&self, raw: DevId, cow: DevId, chunk_sectors: u64) -> SnapshotParams {
        SnapshotParams {
            origin: raw,
            cow,
            persistence: Persistence::Persistent,
            chunk: Sectors::new(chunk_sectors),
            features: vec![],
        }
    }

    /// Takes the live snapshot layer down while nothing has the filesystem mounted: base back
    /// to linear (if it was swapped), snapshot and COW devices removed. Refuses when base is open.
    fn release_stack(&self, dm: &DeviceMapper) -> Result<Action, BackendError> {
        let base = self.name(Role::Base)?;
        let mut action = Action::Identity;
        if let Some(info) = lookup(dm, NAME, &base)? {
            if info.open_count > 0 {
                return Err(BackendError::InvalidState {
                    backend: NAME.into(),
                    state: format!("{} is open (mounted?)", base.name),
                    operation: "restore",
                });
            }
            if let Some(Target::SnapshotOrigin(_)) = active_target(dm, NAME, &base)? {
                let (raw, size) = raw_device(&self.spec)?;
                dm.reload(DevRef::Name(&base.name), &linear(size, raw)?)
                    .map_err(|e| errors::dm(NAME, format!("reload {} linear", base.name), e))?;
                action = Action::Changed;
            }
        }
        if stack::remove_roles(dm, NAME, &self.spec, &[Role::Snapshot, Role::Cow])?
            == Action::Changed
        {
            action = Action::Changed;
        }
        Ok(action)
    }

    fn snapshot_status(&self, dm: &DeviceMapper) -> Result<Option<SnapshotStatus>, BackendError> {
        let snap = self.name(Role::Snapshot)?;
        if lookup(dm, NAME, &snap)?.is_none() {
            return Ok(None);
        }
        let lines = dm
            .status(DevRef::Name(&snap.name), TableSlot::Active)
            .map_err(|e| errors::dm(NAME, format!("status of {}", snap.name), e))?;
        let line = lines.first().ok_or_else(|| BackendError::Corrupt {
            what: format!("status of {}", snap.name),
            reason: "no status line".into(),
        })?;
        line.text.parse().map(Some).map_err(|e: blockdev::dm::TableError| BackendError::Corrupt {
            what: format!("status of {}", snap.name),
            reason: e.to_string(),
        })
    }

    // ---- rollback ----

    fn merge_in_kernel(
        &self,
        dm: &DeviceMapper,
        record: &SnapshotRecord,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, BackendError> {
        let (raw, size) = raw_device(&self.spec)?;
        let cow = self.cow_device(dm, raw, &record.extents)?;
        let base = self.name(Role::Base)?;
        let merge = Table::single(
            size,
            Target::SnapshotMerge(self.snap_params(raw, cow, record.chunk_sectors)),
        )
        .map_err(|e| errors::dm(NAME, "snapshot-merge table", e.into()))?;
        let started = Instant::now();
        match lookup(dm, NAME, &base)? {
            Some(_) => dm.reload(DevRef::Name(&base.name), &merge),
            None => dm.create_device(&base.name, Some(&base.uuid), &merge),
        }
        .map_err(|e| errors::dm(NAME, format!("load snapshot-merge into {}", base.name), e))?;
        // The merge runs in the kernel; done when only metadata is left allocated.
        let mut first = None;
        loop {
            let lines = dm
                .status(DevRef::Name(&base.name), TableSlot::Active)
                .map_err(|e| errors::dm(NAME, format!("status of {}", base.name), e))?;
            let st: SnapshotStatus =
                lines.first().and_then(|l| l.text.parse().ok()).unwrap_or(SnapshotStatus::Unknown);
            match st {
                SnapshotStatus::Active { allocated, metadata, .. } => {
                    let left = allocated.get().saturating_sub(metadata.get());
                    let total = *first.get_or_insert(left);
                    progress(total.saturating_sub(left), total);
                    if allocated == metadata {
                        break;
                    }
                }
                other => {
                    return Err(BackendError::Corrupt {
                        what: format!("kernel merge of {}", self.spec.raw.display()),
                        reason: format!("snapshot-merge status {other:?}"),
                    })
                }
            }
            std::thread::sleep(MERGE_POLL);
        }
        dm.reload(DevRef::Name(&base.name), &linear(size, raw)?)
            .map_err(|e| errors::dm(NAME, format!("reload {} linear", base.name), e))?;
        let _ = stack::remove_roles(dm, NAME, &self.spec, &[Role::Cow])?;
        // The merge wrote below the raw device's cache: readers by path (fsck) must not see
        // blocks from before it.
        drop_raw_cache(&self.spec)?;
        let merged_sectors = first.unwrap_or(0);
        log::info!(
            "kernel merge of {}: {merged_sectors} sectors of exceptions in {:?}",
            self.spec.raw.display(),
            started.elapsed()
        );
        Ok(merged_sectors)
    }

    /// The offline merge; `limit` (restoreCheckpointPart) stops it after that many exceptions,
    /// before the commit point. Returns the report (exceptions, whether the limit stopped it).
    fn merge_in_userspace(
        &self,
        dm: &DeviceMapper,
        record: &SnapshotRecord,
        limit: Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<snapcow::merge::MergeReport, BackendError> {
        // The store is read through the raw device: never from a stale cache.
        drop_raw_cache(&self.spec)?;
        let raw = raw_file(&self.spec)?.with_direct_reads();
        let extents: Vec<snapcow::Extent> = record
            .extents
            .iter()
            .map(|e| snapcow::Extent { logical: e.logical, physical: e.physical, len: e.length })
            .collect();
        let mut report = |done: u64, total: u64| progress(done, total);
        let started = Instant::now();
        let r = snapcow::merge::merge(
            &raw,
            &extents,
            &snapcow::merge::MergeOptions {
                limit,
                armed_len: record.armed_bytes,
                ..Default::default()
            },
            &mut report,
        )
        .map_err(|e| match e {
            snapcow::MergeError::Device(d) => errors::io(
                format!("merge the COW store into {}", self.spec.raw.display()),
                dev_io(d),
            ),
            other => BackendError::Corrupt {
                what: format!("COW store of {}", self.spec.raw.display()),
                reason: other.to_string(),
            },
        })?;
        if r.skipped_in_cow_file > 0 {
            // Harmless for the data (docs/snapcow.md, step 4): blocks the store grew over after
            // the file system wrote them, or of the file's unused tail (no writer known).
            log::warn!(
                "userspace merge of {}: {} saved chunks of blocks now in the COW file left out \
                 (written during the checkpoint before the store grew over them, or past the \
                 store)",
                self.spec.raw.display(),
                r.skipped_in_cow_file
            );
        }
        // The raw device and a base device over it may cache blocks from before the merge.
        drop_raw_cache(&self.spec)?;
        let base = self.name(Role::Base)?;
        if lookup(dm, NAME, &base)?.is_some() {
            if let Ok(f) = File::open(dm.node_path(&base.name)) {
                blockdev::blk::flush_buffers(&f)
                    .map_err(|e| errors::blk(format!("flush buffers of {}", base.name), e))?;
            }
        }
        log::info!(
            "userspace merge of {}: {} exceptions, {} bytes in {:?}",
            self.spec.raw.display(),
            r.exceptions,
            r.bytes_copied,
            started.elapsed()
        );
        Ok(r)
    }

    /// Removes what a finished checkpoint (merged, committing or never armed) left: our
    /// snapshot and COW devices if unused, the COW file, the record.
    fn drop_leftovers(&self, dm: &DeviceMapper) -> Result<Action, BackendError> {
        let mut action = stack::remove_roles(dm, NAME, &self.spec, &[Role::Snapshot, Role::Cow])?;
        let path = self.cow_path();
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_parent(&path)?;
                log::info!("removed the COW file {}", path.display());
                action = Action::Changed;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(errors::io(format!("remove {}", path.display()), e)),
        }
        if self.records.clear(NAME, &self.spec.instance)? == Action::Changed {
            action = Action::Changed;
        }
        Ok(action)
    }
}

impl Backend for SnapshotBackend {
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
        let _step = self.lock();
        if request.limit.is_some() && self.opts.rollback == RollbackMethod::KernelMerge {
            log::info!("restore of {device}: the part limit does not apply to the kernel's merge");
        }
        let nothing = RestoreReport { outcome: RestoreOutcome::NothingToRestore, result: Ok(()) };
        let Some(mut record) = self.record()? else { return Ok(nothing) };
        match record.state {
            CowState::Armed => {}
            CowState::Preparing | CowState::Merged | CowState::Committing => return Ok(nothing),
        }
        let dm = open_dm(NAME)?;
        let _ = self.release_stack(&dm)?;
        let merged = match self.opts.rollback {
            RollbackMethod::UserspaceMerge => {
                let r = self.merge_in_userspace(&dm, &record, request.limit, progress)?;
                if r.limit_reached {
                    // vold's restoreCheckpointPart: stopped before the commit point, the store
                    // still armed; the next restore finishes the merge.
                    let entries = request.limit.unwrap_or(0);
                    log::info!("restore of {device}: stopped after {entries} exceptions (part)");
                    return Ok(RestoreReport {
                        outcome: RestoreOutcome::Interrupted { entries },
                        result: Err((policy::errno::EAGAIN, "Hit the test limit".into())),
                    });
                }
                r.exceptions
            }
            RollbackMethod::KernelMerge => self.merge_in_kernel(&dm, &record, progress)?,
        };
        record.state = CowState::Merged;
        self.save(&record)?;
        log::info!("{device} rolled back to its snapshot");
        Ok(RestoreReport { outcome: RestoreOutcome::Restored { entries: merged }, result: Ok(()) })
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        let _step = self.lock();
        let dm = open_dm(NAME)?;
        self.check_mounted(&dm, "prepare")?;
        let base = self.name(Role::Base)?;
        let snap = self.name(Role::Snapshot)?;
        let cow = self.name(Role::Cow)?;
        let record = self.record()?;
        let swapped = matches!(active_target(&dm, NAME, &base)?, Some(Target::SnapshotOrigin(_)));
        let snap_live = lookup(&dm, NAME, &snap)?.is_some();
        let cow_live = lookup(&dm, NAME, &cow)?.is_some();
        if let Some(r) = &record {
            if r.state == CowState::Armed {
                if swapped && snap_live {
                    return Ok(Action::Identity);
                }
                if !cow_live {
                    return Err(BackendError::InvalidState {
                        backend: NAME.into(),
                        state: "an armed snapshot of an earlier boot was never merged back \
                                (restoreCheckpoint must run before mount)"
                            .into(),
                        operation: "prepare",
                    });
                }
                // Armed in this boot and interrupted before the swap: arm again from the start
                // of the store (no exception was written: the origin was never swapped).
            }
        }
        if swapped {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: format!("{} is a snapshot-origin without a recorded store", base.name),
                operation: "prepare",
            });
        }
        if snap_live {
            let _ = stack::remove_roles(&dm, NAME, &self.spec, &[Role::Snapshot])?;
        }
        // 1. The COW file and its map, recorded before anything is armed.
        // Only a map recorded by an unfinished prepare is reused: the file a merged or
        // committed store leaves is the rolled-back filesystem's, which may map it otherwise
        // (seen on f2fs), so it is made again.
        let expected = record
            .as_ref()
            .filter(|r| r.cow_file == self.opts.cow_file && r.state == CowState::Preparing);
        let extents = self.cow_file(expected.map(|r| r.extents.as_slice()))?;
        let chunk_sectors = self.opts.chunk().get();
        let mut rec = SnapshotRecord {
            state: CowState::Preparing,
            cow_file: self.opts.cow_file.clone(),
            chunk_sectors,
            extents,
            armed_bytes: None,
        };
        rec.armed_bytes = Some(rec.cow_bytes());
        self.save(&rec)?;
        // The COW file is ours now: a reservation moved into it is forgotten only after the
        // map above is durable (a crash before leaves a reservation record without a file,
        // cleared here on the rerun).
        let _ = Reservations::new(self.records.clone()).forget_moved(&self.spec)?;
        // 2. The COW device, and a store that starts empty.
        let (raw, size) = raw_device(&self.spec)?;
        let cow_dev = self.cow_device(&dm, raw, &rec.extents)?;
        let cow_node = FileDevice::open(&dm.node_path(&cow.name))
            .map_err(|e| errors::io(format!("open {}", cow.name), dev_io(e)))?;
        zero(&cow_node, 0, self.opts.chunk_bytes(), "the COW store's header chunk")?;
        rec.state = CowState::Armed;
        self.save(&rec)?;
        // 3. Swap: base frozen (lockfs + flush) while the snapshot is made and the origin
        //    loaded, so the checkpoint starts at a consistent filesystem.
        dm.suspend(DevRef::Name(&base.name), SuspendMode::Flush)
            .map_err(|e| errors::dm(NAME, format!("suspend {}", base.name), e))?;
        let armed = (|| {
            let table = Table::single(
                size,
                Target::Snapshot(self.snap_params(raw, cow_dev, chunk_sectors)),
            )
            .map_err(|e| errors::dm(NAME, "snapshot table", e.into()))?;
            dm.create_device(&snap.name, Some(&snap.uuid), &table)
                .map_err(|e| errors::dm(NAME, format!("create {}", snap.name), e))?;
            let origin =
                Table::single(size, Target::SnapshotOrigin(SnapshotOriginParams { origin: raw }))
                    .map_err(|e| errors::dm(NAME, "snapshot-origin table", e.into()))?;
            dm.load_table(DevRef::Name(&base.name), &origin).map_err(|e| {
                errors::dm(NAME, format!("load snapshot-origin into {}", base.name), e)
            })
        })();
        let resumed = dm
            .resume(DevRef::Name(&base.name))
            .map_err(|e| errors::dm(NAME, format!("resume {}", base.name), e));
        armed?;
        resumed?;
        log::info!(
            "snapshot checkpoint of {} armed: {} byte COW store, {} KiB chunks",
            self.spec.mount_point.display(),
            rec.cow_bytes(),
            self.opts.chunk_kib
        );
        Ok(Action::Changed)
    }

    fn commit(&self) -> Result<Action, BackendError> {
        let _step = self.lock();
        let dm = open_dm(NAME)?;
        let base = self.name(Role::Base)?;
        let mut action = Action::Identity;
        if let Some(mut r) = self.record()? {
            if r.state != CowState::Committing {
                // From here on a crash never merges this store back.
                r.state = CowState::Committing;
                self.save(&r)?;
                action = Action::Changed;
            }
        }
        if let Some(Target::SnapshotOrigin(p)) = active_target(&dm, NAME, &base)? {
            let (_, size) = raw_device(&self.spec)?;
            dm.reload(DevRef::Name(&base.name), &linear(size, p.origin)?)
                .map_err(|e| errors::dm(NAME, format!("reload {} linear", base.name), e))?;
            action = Action::Changed;
        }
        if self.drop_leftovers(&dm)? == Action::Changed {
            action = Action::Changed;
        }
        if action == Action::Changed {
            self.committed.store(true, Ordering::SeqCst);
            log::info!("snapshot checkpoint of {} committed", self.spec.mount_point.display());
        }
        Ok(action)
    }

    fn abort(&self) -> Result<Action, BackendError> {
        // The store stays armed; the next boot's restore merges it back. The update is
        // abandoned: a reservation not yet handed over goes.
        let released =
            Reservations::new(self.records.clone()).release_for(&self.spec, "snapshot abort")?;
        Ok(if released.is_some() { Action::Changed } else { Action::Identity })
    }

    fn teardown(&self) -> Result<Action, BackendError> {
        let _step = self.lock();
        let repaired =
            Reservations::new(self.records.clone()).repair_for(&self.spec, "snapshot teardown")?;
        let Some(r) = self.record()? else { return Ok(repaired) };
        let dm = open_dm(NAME)?;
        if r.state == CowState::Armed {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: if lookup(&dm, NAME, &self.name(Role::Snapshot)?)?.is_some() {
                    "armed in this boot".into()
                } else {
                    "an armed snapshot of an earlier boot was never merged back \
                     (restoreCheckpoint must run before mount)"
                        .into()
                },
                operation: "tear down",
            });
        }
        let dropped = self.drop_leftovers(&dm)?;
        Ok(if repaired == Action::Changed { Action::Changed } else { dropped })
    }

    fn grow(&self) -> Result<Action, BackendError> {
        let _step = self.lock();
        if self.opts.grow_percent == 0 {
            return Ok(Action::Identity);
        }
        if self.opts.rollback == RollbackMethod::KernelMerge {
            // The growth takes blocks the file system may have written and freed during the
            // checkpoint; the kernel's merge would copy their saved chunks back into the store
            // it reads. Only the offline merge leaves them out (docs/snapcow.md, step 4).
            log::info!(
                "COW store of {}: not grown (rollback = \"kernel-merge\")",
                self.spec.mount_point.display()
            );
            return Ok(Action::Identity);
        }
        let dm = open_dm(NAME)?;
        let Some(mut rec) = self.record()?.filter(|r| r.state == CowState::Armed) else {
            return Ok(Action::Identity);
        };
        if self.snapshot_status(&dm)?.is_none() {
            return Ok(Action::Identity);
        }
        let chunk = self.opts.chunk_bytes();
        let old = rec.cow_bytes();
        let add = (old / 100 * u64::from(self.opts.grow_percent)).div_ceil(chunk) * chunk;
        let path = self.cow_path();
        let op = |what: &str| format!("{what} {}", path.display());
        let available = blockdev::fs::statvfs(&self.spec.mount_point)
            .map_err(|e| errors::fs(op("statvfs of"), e))?
            .available
            .get();
        if add == 0 || add > available {
            return Err(BackendError::NoSpace { operation: op("grow"), needed: add, available });
        }
        let f =
            OpenOptions::new().write(true).open(&path).map_err(|e| errors::io(op("open"), e))?;
        let (at, len) = (i64::try_from(old), i64::try_from(add));
        let (Ok(at), Ok(len)) = (at, len) else {
            return Err(BackendError::NoSpace { operation: op("grow"), needed: add, available });
        };
        nix::fcntl::fallocate(f.as_fd(), nix::fcntl::FallocateFlags::empty(), at, len)
            .map_err(|e| errors::io(op("fallocate"), std::io::Error::from(e)))?;
        f.sync_all().map_err(|e| errors::io(op("fsync"), e))?;
        let extents = normalize_extents(
            &blockdev::fs::mappable_extents(&f).map_err(|e| errors::fs(op("FIEMAP"), e))?,
        );
        if !is_prefix(&rec.extents, &extents) {
            return Err(BackendError::Corrupt {
                what: op("COW file"),
                reason: "growing it moved blocks already in the store".into(),
            });
        }
        // The extension's first chunk may become the next metadata area: start it zeroed.
        let raw = raw_file(&self.spec)?;
        let mut left = chunk;
        let mut pos = old;
        for e in extents.iter().filter(|e| e.logical + e.length > old) {
            let skip = pos.saturating_sub(e.logical);
            let n = left.min(e.length - skip);
            zero(&raw, e.physical + skip, n, "the COW store's extension")?;
            left -= n;
            pos += n;
            if left == 0 {
                break;
            }
        }
        // Record the longer map first: a merge through a longer map is still right.
        rec.extents = extents;
        self.save(&rec)?;
        let (raw_dev, _) = raw_device(&self.spec)?;
        let base = self.name(Role::Base)?;
        let cow = self.name(Role::Cow)?;
        let table = cow_table(raw_dev, &rec.extents)?;
        // Base suspended (no origin writes, so no COW I/O in flight) while the COW device's
        // table grows; dm-snapshot reads the COW device's size when it allocates.
        dm.suspend(DevRef::Name(&base.name), SuspendMode::Flush)
            .map_err(|e| errors::dm(NAME, format!("suspend {}", base.name), e))?;
        let reloaded = dm
            .reload(DevRef::Name(&cow.name), &table)
            .map_err(|e| errors::dm(NAME, format!("reload {}", cow.name), e));
        let resumed = dm
            .resume(DevRef::Name(&base.name))
            .map_err(|e| errors::dm(NAME, format!("resume {}", base.name), e));
        reloaded?;
        resumed?;
        log::info!(
            "COW store of {} grown from {old} to {} bytes",
            self.spec.mount_point.display(),
            rec.cow_bytes()
        );
        Ok(Action::Changed)
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        let dm = open_dm(NAME)?;
        match self.snapshot_status(&dm)? {
            None => Ok(BackupSpace::default()),
            Some(SnapshotStatus::Active { allocated, total, .. }) => {
                let used = allocated.get() * 512;
                let total = total.get() * 512;
                Ok(BackupSpace {
                    free_bytes: Some(total.saturating_sub(used)),
                    used_bytes: Some(used),
                    total_bytes: Some(total),
                    grow_below_free_bytes: self.opts.grow_below_free_bytes(total),
                })
            }
            Some(SnapshotStatus::Invalid | SnapshotStatus::Overflow) => {
                Err(BackendError::NoSpace {
                    operation: format!(
                        "COW store of {}: the kernel invalidated the snapshot (full or I/O error)",
                        self.spec.mount_point.display()
                    ),
                    needed: 0,
                    available: 0,
                })
            }
            Some(other) => Err(BackendError::Corrupt {
                what: format!("snapshot of {}", self.spec.mount_point.display()),
                reason: format!("status {other:?}"),
            }),
        }
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        let dm = open_dm(NAME)?;
        let live = self.snapshot_status(&dm)?.is_some();
        let state = if live {
            BackendState::Armed
        } else if self.committed.load(Ordering::SeqCst) {
            BackendState::Committed
        } else {
            BackendState::Idle
        };
        let space = if live { self.space().unwrap_or_default() } else { BackupSpace::default() };
        Ok(BackendStatus {
            state,
            backup_used_bytes: space.used_bytes,
            free_bytes: space.free_bytes,
            devices: vec![self.spec.raw.display().to_string()],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::fs::Extent;

    fn ext(l: u64, p: u64, n: u64) -> Extent {
        Extent { logical: Bytes::new(l), physical: Bytes::new(p), length: Bytes::new(n), flags: 0 }
    }

    #[test]
    fn options_are_validated_with_the_key_named() {
        assert!(SnapshotOptions::default().validate().is_ok());
        let bad = |f: fn(&mut SnapshotOptions)| {
            let mut o = SnapshotOptions::default();
            f(&mut o);
            o.validate().unwrap_err()
        };
        assert!(bad(|o| o.cow_file = "../escape".into()).starts_with("cow_file"));
        assert!(bad(|o| o.cow_file = "/abs".into()).starts_with("cow_file"));
        assert!(bad(|o| o.cow_file = String::new()).starts_with("cow_file"));
        assert!(bad(|o| o.chunk_kib = 6).starts_with("chunk_kib"));
        assert!(bad(|o| o.chunk_kib = 1024).starts_with("chunk_kib"));
        assert!(bad(|o| o.cow_bytes = Some(4096)).starts_with("cow_bytes"));
        assert!(bad(|o| o.cow_free_percent = 0).starts_with("cow_free_percent"));
        assert!(bad(|o| o.grow_at_percent = 100).starts_with("grow_at_percent"));
        assert!(bad(|o| o.grow_percent = 101).starts_with("grow_percent"));
    }

    /// `grow_at_percent` full: the free space below which the monitor grows the store.
    #[test]
    fn the_growth_threshold_follows_grow_at_percent_and_is_absent_when_it_cannot_grow() {
        let mib = 1u64 << 20;
        let o = SnapshotOptions::default();
        assert_eq!(o.grow_below_free_bytes(100 * mib), Some(25 * mib), "75% full by default");
        let o = SnapshotOptions { grow_at_percent: 50, ..SnapshotOptions::default() };
        assert_eq!(o.grow_below_free_bytes(32 * mib), Some(16 * mib));
        let o = SnapshotOptions { grow_percent: 0, ..SnapshotOptions::default() };
        assert_eq!(o.grow_below_free_bytes(100 * mib), None, "never grows");
        let o =
            SnapshotOptions { rollback: RollbackMethod::KernelMerge, ..SnapshotOptions::default() };
        assert_eq!(o.grow_below_free_bytes(100 * mib), None, "the kernel's merge: never grown");
    }

    #[test]
    fn f2fs_is_accepted_by_the_backend() {
        // The rollback on f2fs is exact once the raw device's stale page cache is dropped
        // around the merge (drop_raw_cache); the VM test checks it block by block.
        let dir = tempfile::tempdir().unwrap();
        let spec = DeviceSpec {
            raw: "/dev/vdb".into(),
            mount_point: "/data".into(),
            fs_type: Some("f2fs".into()),
            mount_options: String::new(),
            instance: "data".into(),
        };
        let records = Records::open(dir.path()).unwrap();
        let backend = SnapshotBackend::new(spec, SnapshotOptions::default(), records)
            .expect("snapshot over f2fs");
        assert!(backend.is_f2fs().unwrap(), "the COW file is pinned on f2fs");
    }

    #[test]
    fn options_deserialize_with_defaults() {
        let o: SnapshotOptions =
            serde_json::from_str(r#"{"rollback":"kernel-merge","chunk_kib":8}"#).unwrap();
        assert_eq!(o.rollback, RollbackMethod::KernelMerge);
        assert_eq!(o.chunk(), Sectors::new(16));
        assert_eq!(o.cow_file, ".checkpointd/cow");
        assert!(serde_json::from_str::<SnapshotOptions>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn extents_are_merged_and_checked_as_prefixes() {
        let n = normalize_extents(&[
            ext(0, 8192, 4096),
            ext(4096, 12288, 4096),
            ext(8192, 65536, 4096),
        ]);
        assert_eq!(
            n,
            [
                CowExtent { logical: 0, physical: 8192, length: 8192 },
                CowExtent { logical: 8192, physical: 65536, length: 4096 }
            ]
        );
        let grown = normalize_extents(&[
            ext(0, 8192, 8192),
            ext(8192, 65536, 8192),
            ext(16384, 1 << 20, 4096),
        ]);
        assert!(is_prefix(&n, &grown), "the last extent grew in place, one more added");
        let moved = normalize_extents(&[ext(0, 8192, 8192), ext(8192, 69632, 8192)]);
        assert!(!is_prefix(&n, &moved));
        assert!(is_prefix(&[], &moved));
    }

    #[test]
    fn cow_table_maps_extents_in_order_and_refuses_holes() {
        let raw: DevId = "7:0".parse().unwrap();
        let t = cow_table(raw, &normalize_extents(&[ext(0, 8192, 4096), ext(4096, 65536, 8192)]))
            .unwrap();
        assert_eq!(t.size(), Sectors::new(24));
        assert_eq!(t.lines().len(), 2);
        let hole = [CowExtent { logical: 4096, physical: 8192, length: 4096 }];
        assert!(matches!(cow_table(raw, &hole), Err(BackendError::Corrupt { .. })));
    }
}
