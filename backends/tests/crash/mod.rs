//! The crash-consistency checker over dm-log-writes logs (docs/crash-consistency.md), shared by
//! `vm_crash.rs` (capture on the virtual device, check on the host) and `crash_cases.rs` (the
//! saved cases).
//!
//! A log is what a real kernel wrote below the whole device stack. A **crash state** is what
//! the disk may hold after a power cut: every entry up to a flush (`REQ_PREFLUSH`) is durable;
//! after it, any subset of the following writes may have landed, except that a FUA write that
//! completed is durable. Writes are atomic per log entry (one bio), as in CrashMonkey and
//! xfstests' `replay-log`. The states enumerated per flush interval of a checked window:
//! * a prefix at every flush and every FUA entry (xfstests' `replay-log --check flush|fua`);
//! * `subsets` random states (seeded): a cut point in the interval, every FUA entry before it
//!   kept, every other write before it kept with probability 1/2 (CrashMonkey).
//!
//! Images are built incrementally on one image file with an undo list, so a state costs only
//! the writes that differ, never a copy of the device.

#![allow(dead_code)] // Each test binary uses its own part.

pub mod capture;
pub mod ublk;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use backends::snapshot::{CowState, SnapshotRecord};
use blockcopy::crashdev::{CrashDevice, XorShift};
use blockcopy::device::{BlockDevice, DeviceError, MemDevice};
use blockdev::logwrites::{flags, LogReader};
use bow::model::{BowEngine, BowModel, BowState, EngineError, ModelConfig, RangeType};
use bow::units::{BlockSize, Sectors};
use policy::{Checkpointer, HistoryKind, NoBootControl, PolicyOptions, Store};
use serde::{Deserialize, Serialize};

pub type Failed = Box<dyn std::error::Error + Send + Sync>;

pub const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// the log in memory

/// One entry of a dm-log-writes log, offsets in bytes.
#[derive(Debug, Clone)]
pub struct Op {
    pub index: usize,
    pub flags: u64,
    pub offset: u64,
    pub len: u64,
    /// Where the data is in [`OpLog::data`] (writes only).
    pub data_at: usize,
    pub mark: Option<String>,
}

impl Op {
    pub fn is_write(&self) -> bool {
        self.flags & (flags::DISCARD | flags::MARK) == 0 && self.len > 0
    }
    pub fn is_discard(&self) -> bool {
        self.flags & flags::DISCARD != 0
    }
    pub fn is_flush(&self) -> bool {
        self.flags & flags::FLUSH != 0
    }
    pub fn is_fua(&self) -> bool {
        self.flags & flags::FUA != 0
    }
    fn changes_data(&self) -> bool {
        self.is_write() || self.is_discard()
    }
}

/// A whole log, data included.
#[derive(Debug)]
pub struct OpLog {
    pub ops: Vec<Op>,
    pub data: Vec<u8>,
}

impl OpLog {
    /// Reads a dm-log-writes log file.
    pub fn load(path: &Path) -> Result<OpLog, Failed> {
        let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let mut r = LogReader::new(std::io::BufReader::new(file))?;
        let s = u64::from(r.super_block().sector_size);
        let entries = r.entries()?;
        let mut ops = Vec::with_capacity(entries.len());
        let mut data = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let data_at = data.len();
            if e.is_data_write() {
                data.extend_from_slice(&r.read_data(e)?);
            }
            ops.push(Op {
                index: i,
                flags: e.flags,
                offset: e.sector * s,
                len: e.nr_sectors * s,
                data_at,
                mark: e.mark.clone(),
            });
        }
        Ok(OpLog { ops, data })
    }

    pub fn bytes(&self, op: &Op) -> &[u8] {
        &self.data[op.data_at..op.data_at + usize::try_from(op.len).unwrap_or(0)]
    }

    /// Index of the mark `name`.
    pub fn mark(&self, name: &str) -> Result<usize, Failed> {
        self.ops
            .iter()
            .position(|o| o.mark.as_deref() == Some(name))
            .ok_or_else(|| format!("mark {name:?} not in the log").into())
    }

    pub fn flushes(&self) -> usize {
        self.ops.iter().filter(|o| o.is_flush()).count()
    }
}

/// One crash state: entries `..=point` all applied, plus `extra` (indices after `point`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashPoint {
    pub point: usize,
    pub extra: Vec<usize>,
}

/// The crash states of `log` in the window `(from, to)` (entry indices), in log order.
pub fn enumerate(
    log: &OpLog,
    from: usize,
    to: usize,
    subsets: usize,
    seed: u64,
) -> Vec<CrashPoint> {
    let mut out = Vec::new();
    let mut rng = XorShift::new(seed);
    let window = &log.ops[from..=to.min(log.ops.len() - 1)];
    let flushes: Vec<usize> = window.iter().filter(|o| o.is_flush()).map(|o| o.index).collect();
    let mut starts = vec![from];
    starts.extend(&flushes);
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(to);
        out.push(CrashPoint { point: start, extra: Vec::new() });
        // Prefixes at FUA entries inside the interval.
        for o in &log.ops[start + 1..end] {
            if o.is_fua() && !o.is_flush() {
                out.push(CrashPoint { point: o.index, extra: Vec::new() });
            }
        }
        let writes: Vec<&Op> =
            log.ops[start + 1..end].iter().filter(|o| o.changes_data()).collect();
        if writes.len() < 2 {
            continue;
        }
        for _ in 0..subsets {
            let cut = 1 + usize::try_from(rng.below(writes.len() as u64)).unwrap_or(0);
            let extra: Vec<usize> = writes[..cut]
                .iter()
                .filter(|o| o.is_fua() || rng.next() & 1 == 1)
                .map(|o| o.index)
                .collect();
            let state = CrashPoint { point: start, extra };
            if !out.contains(&state) {
                out.push(state);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// images with undo

/// A region of the logged device that is one partition (meta, data).
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// An image file written with an undo list, so a crash state is built and taken back cheaply.
#[derive(Debug)]
pub struct UndoImage {
    pub path: PathBuf,
    file: File,
    size: u64,
    undo: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Blocks written since the last [`UndoImage::forget_touched`].
    touched: Mutex<BTreeSet<u64>>,
}

impl UndoImage {
    pub fn create(path: &Path, size: u64) -> Result<UndoImage, Failed> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Ok(UndoImage {
            path: path.to_owned(),
            file,
            size,
            undo: Mutex::new(Vec::new()),
            touched: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn mark(&self) -> usize {
        self.undo.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Takes back every write after `mark`.
    pub fn undo_to(&self, mark: usize) -> Result<(), Failed> {
        let mut undo = self.undo.lock().unwrap_or_else(|e| e.into_inner());
        while undo.len() > mark {
            let (at, old) = undo.pop().ok_or("undo list")?;
            self.file.write_all_at(&old, at)?;
        }
        Ok(())
    }

    /// Makes the writes so far permanent (no undo).
    pub fn forget_undo(&self) {
        self.undo.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn touched(&self) -> BTreeSet<u64> {
        self.touched.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn forget_touched(&self) {
        self.touched.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, Failed> {
        let mut b = vec![0u8; len];
        self.file.read_exact_at(&mut b, offset)?;
        Ok(b)
    }
}

impl BlockDevice for UndoImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.file.read_exact_at(buf, offset).map_err(|source| DeviceError::Io { offset, source })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DeviceError::OutOfRange { offset, len: buf.len(), size: self.size });
        }
        let mut old = vec![0u8; buf.len()];
        self.file
            .read_exact_at(&mut old, offset)
            .map_err(|source| DeviceError::Io { offset, source })?;
        self.undo.lock().unwrap_or_else(|e| e.into_inner()).push((offset, old));
        self.file.write_all_at(buf, offset).map_err(|source| DeviceError::Io { offset, source })?;
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            t.insert(b);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Applies one log entry to the partitions it falls in.
pub fn apply_op(log: &OpLog, op: &Op, parts: &[(&Region, &UndoImage)]) -> Result<(), Failed> {
    if !op.changes_data() {
        return Ok(());
    }
    for (region, img) in parts {
        let start = op.offset.max(region.offset);
        let end = (op.offset + op.len).min(region.offset + region.len);
        if start >= end {
            continue;
        }
        let n = usize::try_from(end - start)?;
        if op.is_discard() {
            // A loop device punches a hole: reads return zeros.
            img.write_at(&vec![0u8; n], start - region.offset)?;
        } else {
            let from = usize::try_from(start - op.offset)?;
            img.write_at(&log.bytes(op)[from..from + n], start - region.offset)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// faults: a deliberately broken recovery, to show the checks catch it

/// A recovery broken on purpose (only ever used by the tests that prove the suite fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Correct recovery.
    None,
    /// The `n`-th write of the recovery is skipped (reported as done).
    SkipWrite(usize),
    /// The `n`-th flush of the recovery is dropped (reported as done).
    DropFlush(usize),
    /// The daemon's store cleared before the backend's commit (the wrong order): every crash
    /// state of a `commit` window sees the store as it is at the window's last mark (cleared,
    /// history `commit`), whatever the record says. The I/O of the recovery is not touched.
    StoreClearedFirst,
}

/// A [`BlockDevice`] that injects a [`Fault`] into the recovery running over it.
pub struct FaultyDevice<'a, D: BlockDevice + ?Sized> {
    inner: &'a D,
    fault: Fault,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl<'a, D: BlockDevice + ?Sized> FaultyDevice<'a, D> {
    pub fn new(inner: &'a D, fault: Fault) -> Self {
        FaultyDevice { inner, fault, writes: AtomicUsize::new(0), flushes: AtomicUsize::new(0) }
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for FaultyDevice<'_, D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if self.fault == Fault::SkipWrite(n) {
            return Ok(());
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let n = self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.fault == Fault::DropFlush(n) {
            return Ok(());
        }
        self.inner.flush()
    }
}

/// Records a recovery's writes and flushes (in order) while passing them on, so crashes
/// **during** the recovery can be enumerated.
pub struct Recorder<'a, D: BlockDevice + ?Sized> {
    inner: &'a D,
    pub ops: Mutex<Vec<RecOp>>,
}

#[derive(Debug, Clone)]
pub enum RecOp {
    Write(u64, Vec<u8>),
    Flush,
}

impl<'a, D: BlockDevice + ?Sized> Recorder<'a, D> {
    pub fn new(inner: &'a D) -> Self {
        Recorder { inner, ops: Mutex::new(Vec::new()) }
    }
    pub fn take(&self) -> Vec<RecOp> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for Recorder<'_, D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        // Held across the write: the order recorded is the order applied.
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.write_at(buf, offset)?;
        ops.push(RecOp::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.flush()?;
        ops.push(RecOp::Flush);
        Ok(())
    }
}

/// Crash states of a recorded recovery: per flush epoch, none / all / the first half /
/// all but the last, and `random` random subsets. Each is (writes durable before the epoch,
/// mask over the epoch's writes).
pub fn recovery_states(ops: &[RecOp], random: usize, seed: u64) -> Vec<(usize, Vec<bool>)> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::new();
    let mut epoch_start = 0usize;
    let mut i = 0usize;
    while i <= ops.len() {
        let end =
            ops[i..].iter().position(|o| matches!(o, RecOp::Flush)).map_or(ops.len(), |p| i + p);
        let n = end - epoch_start;
        let mut masks = vec![vec![false; n]];
        if n > 0 {
            masks.push(vec![true; n]);
            masks.push((0..n).map(|k| k < n / 2).collect());
            masks.push((0..n).map(|k| k + 1 != n).collect());
            for _ in 0..random {
                masks.push((0..n).map(|_| rng.next() & 1 == 1).collect());
            }
        }
        masks.dedup();
        for m in masks {
            out.push((epoch_start, m));
        }
        epoch_start = end + 1;
        i = end + 1;
    }
    out
}

/// Applies the crash state `(start, mask)` of recorded `ops` onto `dev`.
fn apply_recovery_state(
    ops: &[RecOp],
    start: usize,
    mask: &[bool],
    dev: &dyn BlockDevice,
) -> Result<(), Failed> {
    for op in &ops[..start] {
        if let RecOp::Write(at, data) = op {
            dev.write_at(data, *at)?;
        }
    }
    let epoch = ops[start.min(ops.len())..].iter().take(mask.len());
    for (op, keep) in epoch.zip(mask) {
        if let (RecOp::Write(at, data), true) = (op, keep) {
            dev.write_at(data, *at)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// results

#[derive(Debug, Default)]
pub struct Tally {
    pub states: usize,
    pub recovery_states: usize,
    pub fsck_runs: usize,
    /// Crash states whose state store was checked against the record (and the data).
    pub store_checks: usize,
    /// Times the store was read out of a crashed metadata image and opened (only when the
    /// metadata partition changed).
    pub store_opens: usize,
    /// Time spent reading the store out of images and opening it.
    pub store_time: std::time::Duration,
    /// Crash states that passed the store checks, by window, record and store state (which
    /// cases the checks met).
    pub store_seen: BTreeMap<String, usize>,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn fail(&mut self, what: String) {
        if self.failures.len() < 200 {
            self.failures.push(what);
        }
    }
}

/// A saved case: everything needed to replay one failing crash state (or a whole run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseSpec {
    /// `snapshot`, `bow` or `ublk`.
    pub kind: String,
    /// The log, relative to the case directory.
    pub log: String,
    /// Snapshot: the image of the snapshot device when the checkpoint was armed.
    #[serde(default)]
    pub reference: Option<String>,
    /// Snapshot: the same for the checkpoint that the kernel's snapshot-merge rolls back
    /// (windows of kind `kernel-merge`).
    #[serde(default)]
    pub kernel_merge_reference: Option<String>,
    /// Snapshot: the metadata partition (bytes at the start of the logged device).
    #[serde(default)]
    pub meta_bytes: u64,
    /// Snapshot: the record's instance name.
    #[serde(default)]
    pub instance: String,
    /// Bow: the logged device's size.
    #[serde(default)]
    pub device_bytes: u64,
    /// Windows as (first mark, last mark, expectation: `rollback` or `commit`).
    pub windows: Vec<(String, String, String)>,
    /// Random subsets per flush interval.
    pub subsets: usize,
    pub seed: u64,
    /// One crash state only (a saved failure); `None` checks every enumerated state.
    #[serde(default)]
    pub only: Option<CrashPoint>,
    /// Crash states during recovery checked for every n-th state (0: none).
    #[serde(default)]
    pub recovery_every: usize,
    /// Bow: about this many crash states, from flush epochs spread evenly over the run
    /// (0: every epoch).
    #[serde(default)]
    pub max_states: usize,
    /// Snapshot: the daemon's state store is on the metadata partition (the capture drove the
    /// checkpoint through `policy::Checkpointer`); `None`: no store checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSpec>,
}

/// What the capture asked of the daemon, so the host knows what its store must say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSpec {
    /// `startCheckpoint(retry)` of the checkpoint that is committed (windows `rollback`,
    /// `commit`); one boot attempt was marked before `armed`.
    pub retry: i32,
    /// `startCheckpoint(retry)` of the checkpoint rolled back by the kernel's merge; its
    /// budget was spent (boot attempts marked) before `armed-2`.
    pub kernel_merge_retry: i32,
    /// A file written and fsynced at the end of the workload (path in the data file system):
    /// once the commit began and the record left `armed`, it must be there (the new data).
    pub update_file: String,
    /// Its contents.
    pub update_text: String,
}

impl CaseSpec {
    pub fn load(dir: &Path) -> Result<CaseSpec, Failed> {
        let text = fs::read_to_string(dir.join("case.json"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Saves a failing crash state as a case directory under `root` (log hard-linked or copied).
pub fn save_failure(
    root: &Path,
    case_dir: &Path,
    spec: &CaseSpec,
    point: &CrashPoint,
    n: usize,
) -> Result<PathBuf, Failed> {
    let dir = root.join(format!("{}-{}-{n}", spec.kind, point.point));
    fs::create_dir_all(&dir)?;
    let files = [Some(&spec.log), spec.reference.as_ref(), spec.kernel_merge_reference.as_ref()];
    for name in files.into_iter().flatten() {
        let to = dir.join(name);
        if !to.exists() && fs::hard_link(case_dir.join(name), &to).is_err() {
            fs::copy(case_dir.join(name), &to)?;
        }
    }
    let one = CaseSpec { only: Some(point.clone()), ..spec.clone() };
    fs::write(dir.join("case.json"), serde_json::to_string_pretty(&one)?)?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// the snapshot backend: offline merge, bit-exact outside the COW file, fsck, the record

fn e2fsck() -> PathBuf {
    tool("e2fsck")
}

/// A tool from e2fsprogs; a missing one fails with the fix.
pub fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: run `cargo xtask setup` (e2fsprogs)"))
}

/// `e2fsck -fn` on an image; `Err` with its output when it finds anything.
pub fn fsck_clean(image: &Path) -> Result<(), String> {
    let out = Command::new(e2fsck())
        .args(["-fn"])
        .arg(image)
        .output()
        .map_err(|e| format!("run e2fsck: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).lines().take(12).collect::<Vec<_>>().join(" | "),
            String::from_utf8_lossy(&out.stderr).lines().take(4).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The snapshot record in a crashed metadata image: the journal replayed on a copy, then the
/// file read with debugfs. `Ok(None)`: no record.
pub fn read_record(
    meta: &UndoImage,
    scratch: &Path,
    instance: &str,
) -> Result<Option<SnapshotRecord>, String> {
    fs::copy(&meta.path, scratch).map_err(|e| format!("copy the metadata image: {e}"))?;
    let replay = Command::new(e2fsck())
        .args(["-fy", "-E", "journal_only"])
        .arg(scratch)
        .output()
        .map_err(|e| format!("run e2fsck: {e}"))?;
    // 0: clean, 1: journal replayed (errors corrected).
    if !matches!(replay.status.code(), Some(0 | 1)) {
        return Err(format!(
            "metadata journal replay failed: {}",
            String::from_utf8_lossy(&replay.stdout)
        ));
    }
    let path = format!("/backends/snapshot-{instance}.json");
    let out = Command::new(tool("debugfs"))
        .args(["-R", &format!("cat {path}")])
        .arg(scratch)
        .output()
        .map_err(|e| format!("run debugfs: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Envelope {
        record: SnapshotRecord,
    }
    serde_json::from_str::<Envelope>(&text)
        .map(|e| Some(e.record))
        .map_err(|e| format!("record {path} does not parse ({e}): {text}"))
}

/// What the daemon's state store in a crashed metadata partition says, once the next boot's
/// daemon opened it (`Store::open`: its file checks, integrity check and crash recovery) and
/// evaluated it (`Checkpointer`, no boot control, no backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreView {
    /// The requested checkpoint: (retry, attempts left, attempts used); `None`: none.
    pub pending: Option<(Option<i32>, Option<u32>, u32)>,
    /// The open rolled back an interrupted commit: the row was in phase `committing`.
    pub commit_interrupted: bool,
    /// The next boot's `needsCheckpoint` (the latch).
    pub needs_checkpoint: bool,
    /// Its `needsRollback`.
    pub needs_rollback: bool,
    /// The newest history event the capture wrote (not the open's recovery) and its outcome.
    pub last_event: Option<(HistoryKind, Option<String>)>,
}

/// The store read from a crashed metadata image, or why it did not open.
pub type StoreRead = Result<StoreView, String>;

/// The store files the daemon keeps in its metadata directory (the WAL beside the database;
/// `locking_mode=EXCLUSIVE` keeps no `-shm` file).
fn store_files() -> [String; 3] {
    [
        Store::FILE_NAME.to_owned(),
        format!("{}-wal", Store::FILE_NAME),
        Store::MARKER_FILE_NAME.to_owned(),
    ]
}

/// Reads the daemon's store out of `replayed_meta` (a metadata image whose journal was
/// replayed) into `dir` with debugfs, and opens it with the daemon's own code.
pub fn read_store(replayed_meta: &Path, dir: &Path) -> StoreRead {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("clear {}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // One debugfs run dumps all three (a missing file is reported and skipped).
    let script = dir.with_extension("debugfs");
    let commands: String = store_files()
        .iter()
        .map(|name| format!("dump /{name} {}\n", dir.join(name).display()))
        .collect();
    fs::write(&script, commands).map_err(|e| format!("write {}: {e}", script.display()))?;
    let out = Command::new(tool("debugfs"))
        .arg("-f")
        .arg(&script)
        .arg(replayed_meta)
        .output()
        .map_err(|e| format!("run debugfs: {e}"))?;
    if !out.status.success() {
        return Err(format!("debugfs dump failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let store = Store::open(dir).map_err(|e| format!("the state store does not open: {e}"))?;
    let daemon =
        Checkpointer::new(store, Box::new(NoBootControl), Vec::new(), PolicyOptions::default())
            .map_err(|e| format!("the policy refuses the store: {e}"))?;
    let needs_checkpoint =
        daemon.needs_checkpoint().map_err(|e| format!("needsCheckpoint: {e}"))?;
    let needs_rollback = daemon.needs_rollback().map_err(|e| format!("needsRollback: {e}"))?;
    let status = daemon.status().map_err(|e| format!("status: {e}"))?;
    let history = daemon.history(64).map_err(|e| format!("history: {e}"))?;
    let recovery = |e: &policy::HistoryEvent| {
        e.kind == HistoryKind::Recovery && e.outcome.as_deref() == Some("commit_interrupted")
    };
    Ok(StoreView {
        pending: status.budget.is_some().then_some((
            status.requested_retry,
            status.attempts_left,
            status.attempts_used,
        )),
        commit_interrupted: history.iter().any(recovery),
        needs_checkpoint,
        needs_rollback,
        last_event: history
            .iter()
            .find(|e| e.kind != HistoryKind::Recovery)
            .map(|e| (e.kind, e.outcome.clone())),
    })
}

/// The store against the record, for a crash state of a window of kind `expect`
/// (docs/crash-consistency.md, "The state store"). `record`: the record's state (`None`: no
/// record).
pub fn store_agrees(
    spec: &StoreSpec,
    expect: &str,
    record: Option<CowState>,
    view: &StoreView,
) -> Result<(), String> {
    let armed = record == Some(CowState::Armed);
    // The checkpoint being committed: requested with `retry`, one boot attempt used.
    let requested = |view: &StoreView| -> Result<(), String> {
        let budget_left = u32::try_from(spec.retry).ok();
        let want = (Some(spec.retry), budget_left, 1);
        if view.pending != Some(want) {
            return Err(format!(
                "the store holds {:?} (retry, attempts left, used), the capture requested {want:?}",
                view.pending
            ));
        }
        if !view.needs_checkpoint || view.needs_rollback {
            return Err(format!(
                "the next boot would answer needsCheckpoint {} / needsRollback {} for a pending \
                 checkpoint",
                view.needs_checkpoint, view.needs_rollback
            ));
        }
        Ok(())
    };
    match expect {
        "rollback" => {
            if view.pending.is_none() {
                return Err(format!(
                    "the record is {record:?} but the store holds no checkpoint (last event \
                     {:?}): the next boot would not say the data is checkpointed",
                    view.last_event
                ));
            }
            requested(view)?;
            if view.commit_interrupted {
                return Err("the store was committing before the commit began".into());
            }
            Ok(())
        }
        "commit" => match &view.pending {
            Some(_) => {
                requested(view)?;
                if !armed && !view.commit_interrupted {
                    return Err(format!(
                        "the record is {record:?} (no longer armed) while the store's checkpoint \
                         is not marked committing: the backend committed before the daemon \
                         recorded the commit"
                    ));
                }
                Ok(())
            }
            None => {
                if armed {
                    return Err(
                        "the store says committed (no checkpoint) but the record is still armed: \
                         the next boot would roll the committed update back"
                            .into(),
                    );
                }
                match &view.last_event {
                    Some((HistoryKind::Commit, Some(outcome))) if outcome == "ok" => {}
                    other => {
                        return Err(format!(
                            "the store holds no checkpoint and its last event is {other:?}, not \
                             the commit"
                        ))
                    }
                }
                if view.needs_checkpoint {
                    return Err("no checkpoint in the store, yet needsCheckpoint".into());
                }
                Ok(())
            }
        },
        "kernel-merge" => {
            // Spent: every attempt of its budget used, so the next boot rolls back.
            let spent = view
                .pending
                .is_some_and(|p| p.0 == Some(spec.kernel_merge_retry) && p.1 == Some(0));
            if !spent || !view.needs_rollback || view.needs_checkpoint {
                return Err(format!(
                    "during the rollback the store holds {:?} (retry, attempts left, used), \
                     needsRollback {}, needsCheckpoint {}: want the spent checkpoint of retry {}",
                    view.pending,
                    view.needs_rollback,
                    view.needs_checkpoint,
                    spec.kernel_merge_retry
                ));
            }
            if view.commit_interrupted {
                return Err("the store was committing during the rollback".into());
            }
            Ok(())
        }
        other => Err(format!("unknown window kind {other:?}")),
    }
}

/// The update's file in a data image (its journal replayed): `Err` unless it holds `text`.
fn update_is_there(image: &Path, file: &str, text: &str) -> Result<(), String> {
    let out = Command::new(tool("debugfs"))
        .args(["-R", &format!("cat /{file}")])
        .arg(image)
        .output()
        .map_err(|e| format!("run debugfs: {e}"))?;
    if out.stdout == text.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "the update's file /{file} holds {:?} after the commit began, not the update ({})",
            String::from_utf8_lossy(&out.stdout).chars().take(80).collect::<String>(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The snapshot case, loaded.
pub struct SnapshotCase {
    pub spec: CaseSpec,
    pub dir: PathBuf,
    pub log: OpLog,
    pub reference: Vec<u8>,
    /// The reference of the `kernel-merge` windows (empty without one).
    pub kernel_merge_reference: Vec<u8>,
    meta_region: Region,
    data_region: Region,
}

impl SnapshotCase {
    pub fn load(dir: &Path, spec: CaseSpec) -> Result<SnapshotCase, Failed> {
        let log = OpLog::load(&dir.join(&spec.log))?;
        let reference = fs::read(dir.join(spec.reference.as_deref().ok_or("no reference image")?))?;
        let kernel_merge_reference = match &spec.kernel_merge_reference {
            Some(name) => fs::read(dir.join(name))?,
            None => Vec::new(),
        };
        let meta_region = Region { offset: 0, len: spec.meta_bytes };
        let data_region = Region { offset: spec.meta_bytes, len: u64::try_from(reference.len())? };
        Ok(SnapshotCase {
            spec,
            dir: dir.to_owned(),
            log,
            reference,
            kernel_merge_reference,
            meta_region,
            data_region,
        })
    }
}

fn in_extents(block: u64, rec: &SnapshotRecord) -> bool {
    rec.extents.iter().any(|e| block * BLOCK >= e.physical && block * BLOCK < e.physical + e.length)
}

/// Blocks of `blocks` outside the COW file that differ from the reference.
fn differing(
    img: &UndoImage,
    reference: &[u8],
    blocks: &BTreeSet<u64>,
    rec: &SnapshotRecord,
) -> Result<Vec<u64>, Failed> {
    let mut out = Vec::new();
    for &b in blocks {
        if in_extents(b, rec) {
            continue;
        }
        let at = usize::try_from(b * BLOCK)?;
        let Some(want) = reference.get(at..at + BLOCK_USIZE) else { continue };
        if img.read_vec(b * BLOCK, BLOCK_USIZE)? != want {
            out.push(b);
        }
    }
    Ok(out)
}

/// Runs the snapshot backend's next-boot recovery on one crash state and checks it. `data`
/// holds the crashed image; on return it holds it again (all recovery writes undone).
/// `record` is what the crashed metadata partition holds.
#[allow(clippy::too_many_arguments)]
fn check_snapshot_state(
    reference: &[u8],
    expect: &str,
    data: &UndoImage,
    record: Result<Option<SnapshotRecord>, String>,
    scratch: &Path,
    since_armed: &BTreeSet<u64>,
    store: Option<(&StoreSpec, &StoreRead)>,
    fault: Fault,
    recovery: bool,
    tally: &mut Tally,
    what: &str,
) -> Result<bool, Failed> {
    let record = match record {
        Ok(r) => r,
        Err(e) => {
            tally.fail(format!("{what}: {e}"));
            return Ok(false);
        }
    };
    if let Some((spec, read)) = store {
        tally.store_checks += 1;
        let verdict = read
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|view| store_agrees(spec, expect, record.as_ref().map(|r| r.state), view));
        match verdict {
            Err(e) => {
                tally.fail(format!("{what}: state store: {e}"));
                return Ok(false);
            }
            Ok(()) => {
                let view = read.as_ref().map_err(Clone::clone)?;
                let store = match view.pending {
                    None => "cleared",
                    Some((_, Some(0), _)) => "spent (rollback pending)",
                    Some(_) if view.commit_interrupted => "committing (rolled back at open)",
                    Some(_) => "pending",
                };
                let rec = record
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |r| format!("{:?}", r.state).to_lowercase());
                *tally
                    .store_seen
                    .entry(format!("{expect}: record {rec}, store {store}"))
                    .or_default() += 1;
            }
        }
    }
    let armed = record.as_ref().is_some_and(|r| r.state == CowState::Armed);
    if let (false, "kernel-merge", Some(rec)) = (armed, expect, &record) {
        // After the kernel's merge finished, the record says merged: the next boot merges
        // nothing, and the data must already be the checkpoint's.
        if rec.state != CowState::Merged {
            tally.fail(format!("{what}: the record says {:?} during a rollback", rec.state));
            return Ok(false);
        }
        let diff = differing(data, reference, since_armed, rec)?;
        if !diff.is_empty() {
            tally.fail(format!(
                "{what}: merged, yet {} blocks outside the COW file differ from checkpoint \
                 start (first {:?})",
                diff.len(),
                &diff[..diff.len().min(8)]
            ));
            return Ok(false);
        }
        tally.fsck_runs += 1;
        if let Err(e) = fsck_clean(&data.path) {
            tally.fail(format!("{what}: merged by the kernel: {e}"));
            return Ok(false);
        }
        return Ok(true);
    }
    if expect != "commit" && !armed {
        tally.fail(format!(
            "{what}: the record says {:?}, not armed: no rollback would run",
            record.map(|r| r.state)
        ));
        return Ok(false);
    }
    if !armed {
        // A crash during the commit after the record left `armed`: no merge; the new data
        // must mount: fsck (journal replayed first, on a copy) must be clean.
        let copy = scratch.join("data-commit.img");
        fs::copy(&data.path, &copy)?;
        let _ = Command::new(e2fsck()).args(["-fy", "-E", "journal_only"]).arg(&copy).output();
        tally.fsck_runs += 1;
        if let Err(e) = fsck_clean(&copy) {
            tally.fail(format!("{what}: committed state: {e}"));
            return Ok(false);
        }
        // The record left `armed` after the update was durable: the data is the new data.
        if let Some((spec, _)) = store {
            if let Err(e) = update_is_there(&copy, &spec.update_file, &spec.update_text) {
                tally.fail(format!("{what}: {e}"));
                return Ok(false);
            }
        }
        return Ok(true);
    }
    let rec = record.ok_or("record")?;
    let extents: Vec<blockcopy::Extent> = rec
        .extents
        .iter()
        .map(|e| blockcopy::Extent { logical: e.logical, physical: e.physical, len: e.length })
        .collect();
    let before = data.mark();
    data.forget_touched();
    let opts = snapcow::merge::MergeOptions::default();
    let recorder = Recorder::new(data);
    let faulty = FaultyDevice::new(&recorder, fault);
    let merged = snapcow::merge::merge(&faulty, &extents, &opts, &mut |_, _| {});
    let mut ok = true;
    match merged {
        Err(e) => {
            tally.fail(format!("{what}: merge failed: {e}"));
            ok = false;
        }
        Ok(r) if !r.had_store => {
            tally.fail(format!("{what}: the armed record's COW file holds no store"));
            ok = false;
        }
        Ok(_) => {}
    }
    let recorded = recorder.take();
    if ok {
        let mut blocks = since_armed.clone();
        blocks.extend(data.touched());
        let diff = differing(data, reference, &blocks, &rec)?;
        if !diff.is_empty() {
            tally.fail(format!(
                "{what}: {} blocks outside the COW file differ from checkpoint start after the \
                 merge (first {:?})",
                diff.len(),
                &diff[..diff.len().min(8)]
            ));
            ok = false;
        } else {
            tally.fsck_runs += 1;
            if let Err(e) = fsck_clean(&data.path) {
                tally.fail(format!("{what}: after the merge: {e}"));
                ok = false;
            }
        }
    }
    data.undo_to(before)?;
    // Crashes during the merge: each recorded crash state of the merge, then the merge again
    // (the next boot's restore finds the record still armed).
    if ok && recovery {
        for (k, (start, mask)) in recovery_states(&recorded, 2, 7).into_iter().enumerate() {
            let mark = data.mark();
            data.forget_touched();
            apply_recovery_state(&recorded, start, &mask, data)?;
            let again = snapcow::merge::merge(data, &extents, &opts, &mut |_, _| {});
            tally.recovery_states += 1;
            let rwhat = format!(
                "{what}, merge crash state {k} (epoch from write {start}, {} of {} kept)",
                mask.iter().filter(|k| **k).count(),
                mask.len()
            );
            match again {
                Err(e) => {
                    tally.fail(format!("{rwhat}: merge again failed: {e}"));
                    ok = false;
                }
                Ok(_) => {
                    let mut blocks = since_armed.clone();
                    blocks.extend(data.touched());
                    let diff = differing(data, reference, &blocks, &rec)?;
                    if !diff.is_empty() {
                        tally.fail(format!(
                            "{rwhat}: {} blocks differ after the second merge (first {:?})",
                            diff.len(),
                            &diff[..diff.len().min(8)]
                        ));
                        ok = false;
                    }
                }
            }
            data.undo_to(mark)?;
            if !ok {
                break;
            }
        }
    }
    Ok(ok)
}

/// Data blocks (of `region`) that `op` changes.
fn blocks_of(op: &Op, region: &Region, out: &mut BTreeSet<u64>) {
    if !op.changes_data() {
        return;
    }
    let s = op.offset.max(region.offset);
    let e = (op.offset + op.len).min(region.offset + region.len);
    if s < e {
        out.extend((s - region.offset) / BLOCK..(e - region.offset).div_ceil(BLOCK));
    }
}

fn touches(op: &Op, region: &Region) -> bool {
    op.changes_data()
        && op.offset < region.offset + region.len
        && op.offset + op.len > region.offset
}

/// What the crashed metadata partition says: the record, none, or why it cannot be read.
type RecordRead = Result<Option<SnapshotRecord>, String>;

/// A cached read of the metadata partition: (its version, the later entries kept in it), the
/// record, the store (when the case has one).
type MetaRead = ((usize, Vec<usize>), RecordRead, Option<StoreRead>);

/// The store as it is at the mark `name`: the metadata partition replayed up to it (alone) and
/// read as in a crash state. For [`Fault::StoreClearedFirst`].
fn store_at_mark(case: &SnapshotCase, name: &str, scratch: &Path) -> Result<StoreRead, Failed> {
    let at = case.log.mark(name)?;
    let meta = UndoImage::create(&scratch.join("meta-at-mark.img"), case.meta_region.len)?;
    for op in &case.log.ops[..=at] {
        apply_op(&case.log, op, &[(&case.meta_region, &meta)])?;
    }
    let replayed = scratch.join("meta-at-mark-replayed.img");
    read_record(&meta, &replayed, &case.spec.instance)?;
    Ok(read_store(&replayed, &scratch.join("store-at-mark")))
}

/// Checks every crash state of a snapshot case (or only `spec.only`). `failures_dir`: where
/// failing states are saved as cases. `stop_at_first`: return at the first failing state.
pub fn run_snapshot(
    case: &SnapshotCase,
    fault: Fault,
    failures_dir: Option<&Path>,
    stop_at_first: bool,
) -> Result<Tally, Failed> {
    let scratch = tempfile::tempdir()?;
    let data = UndoImage::create(&scratch.path().join("data.img"), case.data_region.len)?;
    let meta = UndoImage::create(&scratch.path().join("meta-live.img"), case.meta_region.len)?;
    let parts = [(&case.meta_region, &meta), (&case.data_region, &data)];
    let meta_copy = scratch.path().join("meta.img");
    let mut tally = Tally::default();
    let log = &case.log;
    let mut applied = 0usize; // entries [0, applied) are in the images
    let mut n_state = 0usize;
    // Blocks written since the checkpoint started (and those that differed from the
    // reference then): only they, and the merge's writes, can differ from the reference.
    let mut since: Option<BTreeSet<u64>> = None;
    // The record, read again only when the metadata partition changed.
    let mut meta_version = 0usize;
    let mut cached: Option<MetaRead> = None;
    let store_dir = scratch.path().join("store");
    let spec_store = case.spec.store.as_ref();
    // The broken order: from the commit's start the store is already the cleared one.
    let cleared_first = match (fault, &case.spec.windows.iter().find(|w| w.2 == "commit")) {
        (Fault::StoreClearedFirst, Some(w)) => Some(store_at_mark(case, &w.1, scratch.path())?),
        _ => None,
    };
    for (first, last, expect) in &case.spec.windows {
        let from = log.mark(first)?;
        let to = log.mark(last)?;
        let reference: &[u8] =
            if expect == "kernel-merge" { &case.kernel_merge_reference } else { &case.reference };
        if reference.is_empty() {
            return Err(format!("window {first}..{last}: no reference image").into());
        }
        let mut states =
            enumerate(log, from, to, case.spec.subsets, case.spec.seed ^ u64::try_from(from)?);
        if let Some(only) = &case.spec.only {
            states.retain(|s| s == only);
        }
        println!("window {first}..{last} ({expect}): {} crash states", states.len());
        for st in states {
            while applied <= st.point {
                let op = &log.ops[applied];
                if let Some(s) = since.as_mut() {
                    blocks_of(op, &case.data_region, s);
                }
                if touches(op, &case.meta_region) {
                    meta_version += 1;
                }
                apply_op(log, op, &parts)?;
                if applied == from {
                    // The window's start: from here on only the blocks that differ from its
                    // reference now, or are written later, can differ.
                    let rec = read_record(&meta, &meta_copy, &case.spec.instance)?
                        .ok_or("no record at the checkpoint's start")?;
                    let all: BTreeSet<u64> = (0..case.data_region.len / BLOCK).collect();
                    let diff = differing(&data, reference, &all, &rec)?;
                    println!(
                        "at mark {first}: {} blocks outside the COW file differ from the \
                         checkpoint's image",
                        diff.len()
                    );
                    since = Some(diff.into_iter().collect());
                }
                applied += 1;
            }
            data.forget_undo();
            meta.forget_undo();
            let (dmark, mmark) = (data.mark(), meta.mark());
            let mut blocks = since.clone().unwrap_or_default();
            let mut meta_extra = Vec::new();
            for &i in &st.extra {
                let op = &log.ops[i];
                apply_op(log, op, &parts)?;
                blocks_of(op, &case.data_region, &mut blocks);
                if touches(op, &case.meta_region) {
                    meta_extra.push(i);
                }
            }
            let key = (meta_version, meta_extra);
            let (record, store_read) = match &cached {
                Some((k, r, s)) if *k == key => (r.clone(), s.clone()),
                _ => {
                    let r = read_record(&meta, &meta_copy, &case.spec.instance);
                    // The store lives on the same partition: read it from the same replayed
                    // copy (only when the record's read got that far).
                    let s = match (&r, spec_store) {
                        (Ok(_), Some(_)) => {
                            let started = std::time::Instant::now();
                            let read = read_store(&meta_copy, &store_dir);
                            tally.store_opens += 1;
                            tally.store_time += started.elapsed();
                            Some(read)
                        }
                        (Err(e), Some(_)) => Some(Err(format!("metadata unreadable: {e}"))),
                        (_, None) => None,
                    };
                    cached = Some((key, r.clone(), s.clone()));
                    (r, s)
                }
            };
            let store_read = match (&cleared_first, expect.as_str()) {
                (Some(late), "commit") => Some(late.clone()),
                _ => store_read,
            };
            let what = format!(
                "{} state {n_state} (entry {} + {} later writes)",
                case.dir.display(),
                st.point,
                st.extra.len()
            );
            let recovery = case.spec.recovery_every > 0 && n_state % case.spec.recovery_every == 0;
            let ok = check_snapshot_state(
                reference,
                expect,
                &data,
                record,
                scratch.path(),
                &blocks,
                spec_store.zip(store_read.as_ref()),
                fault,
                recovery,
                &mut tally,
                &what,
            )?;
            tally.states += 1;
            if tally.states % 1000 == 0 {
                println!(
                    "  {} states checked ({} during the merge), {} failures so far",
                    tally.states,
                    tally.recovery_states,
                    tally.failures.len()
                );
            }
            data.undo_to(dmark)?;
            meta.undo_to(mmark)?;
            if !ok {
                if let Some(root) = failures_dir {
                    let saved = save_failure(root, &case.dir, &case.spec, &st, n_state)?;
                    tally.fail(format!("saved as {}", saved.display()));
                }
                if stop_at_first {
                    return Ok(tally);
                }
            }
            n_state += 1;
        }
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// bow: the captured trace through the engine model, crash states of the model's device

/// Runs a bow case: the log's writes go straight to the image until the mark `bow-trim`, then
/// through the engine model (TRIM state: the discards of `fstrim`), `bow-checkpoint` starts the
/// checkpoint, and every write up to the last mark goes through the model. Then every flush
/// epoch of the model's own device (its writes, backups and log included) is crashed and
/// restored with `bow::restore`; every block in use at checkpoint start must come back.
pub fn run_bow(
    dir: &Path,
    spec: &CaseSpec,
    fault: Fault,
    failures_dir: Option<&Path>,
) -> Result<Tally, Failed> {
    let log = OpLog::load(&dir.join(&spec.log))?;
    let (trim_mark, end_mark) = spec
        .windows
        .first()
        .map(|w| (w.0.clone(), w.1.clone()))
        .ok_or("a bow case needs a window")?;
    let trim = log.mark(&trim_mark)?;
    let checkpoint = log.mark("bow-checkpoint")?;
    let end = log.mark(&end_mark)?;
    let size = usize::try_from(spec.device_bytes)?;
    let mut image = vec![0u8; size];
    for op in &log.ops[..trim] {
        let at = usize::try_from(op.offset)?;
        let n = usize::try_from(op.len)?;
        if op.is_write() {
            image[at..at + n].copy_from_slice(log.bytes(op));
        } else if op.is_discard() {
            image[at..at + n].fill(0);
        }
    }
    let bs = BlockSize::B4096;
    let mut m = BowModel::new(CrashDevice::new(image, BLOCK_USIZE), ModelConfig::new(bs));
    // A new model is in TRIM state (0), as the kernel's target after its table loads.
    let mut pre = Vec::new();
    let mut in_use = Vec::new();
    let mut first_epoch = 0usize;
    let mut rejected = 0usize;
    for op in &log.ops[trim..=end] {
        if op.index == checkpoint {
            m.flush().map_err(|e| e.to_string())?;
            pre = m.device().current();
            in_use = (0..spec.device_bytes / BLOCK)
                .map(|b| {
                    m.range_map().range_at(b * bs.sectors()).map(|r| r.kind)
                        != Some(RangeType::Trimmed)
                })
                .collect();
            first_epoch = count_flushes(m.device());
            m.set_state(BowState::Checkpoint).map_err(|e| format!("bow CHECKPOINT: {e}"))?;
            continue;
        }
        if op.is_flush() {
            m.flush().map_err(|e| e.to_string())?;
        }
        let (start, end_b) =
            (op.offset / BLOCK * BLOCK, (op.offset + op.len).div_ceil(BLOCK) * BLOCK);
        if op.is_discard() {
            // Only whole blocks can be discarded.
            let (s, e) = (op.offset.div_ceil(BLOCK) * BLOCK, (op.offset + op.len) / BLOCK * BLOCK);
            if s < e {
                let _ = m.discard(Sectors(s / 512), e - s);
            }
        } else if op.is_write() {
            // Widen to whole blocks with what the device holds now.
            let mut buf = vec![0u8; usize::try_from(end_b - start)?];
            if start != op.offset || end_b != op.offset + op.len {
                m.read(Sectors(start / 512), &mut buf).map_err(|e| e.to_string())?;
            }
            let at = usize::try_from(op.offset - start)?;
            buf[at..at + usize::try_from(op.len)?].copy_from_slice(log.bytes(op));
            match m.write(Sectors(start / 512), &buf) {
                Ok(_) => {}
                Err(EngineError::Bio { .. }) => rejected += 1,
                Err(e) => return Err(format!("entry {}: {e}", op.index).into()),
            }
        }
        if op.is_fua() {
            m.flush().map_err(|e| e.to_string())?;
        }
    }
    if pre.is_empty() {
        return Err("the log has no bow-checkpoint mark inside the window".into());
    }
    let dev = m.into_device();
    let mut tally = Tally::default();
    // Recorded restores run serially (one order of writes); the others as in production.
    let serial =
        bow::restore::RestoreOptions { queue_depth: 1, memory_budget: 0, ..Default::default() };
    let parallel = bow::restore::RestoreOptions::default();
    let mut n_state = 0usize;
    let mut result: Result<(), Failed> = Ok(());
    // About three states per epoch: a stride over the epochs keeps the run near max_states.
    let epochs = count_flushes(&dev).saturating_sub(first_epoch) + 1;
    let stride =
        if spec.max_states == 0 { 1 } else { (epochs * 3).div_ceil(spec.max_states).max(1) };
    let stop_at_first = fault != Fault::None;
    let mut stopped = false;
    dev.for_each_epoch(|epoch| {
        if epoch.index < first_epoch || result.is_err() || stopped {
            return;
        }
        let last = !epoch.ends_with_flush;
        if (epoch.index - first_epoch) % stride != 0 && !last && spec.only.is_none() {
            return;
        }
        for keep in epoch.standard_states(1, spec.subsets, spec.seed) {
            let id = CrashPoint { point: epoch.index, extra: keep_code(&keep) };
            if spec.only.as_ref().is_some_and(|o| *o != id) {
                continue;
            }
            let what = format!("{} bow epoch {} keep {keep:?}", dir.display(), epoch.index);
            let faulty_restore = |d: &dyn BlockDevice, opts| -> Result<(), String> {
                let f = FaultyDevice::new(d, fault);
                bow::restore::restore(&Dyn(&f), opts, &mut |_| {})
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            let mut ok = true;
            let recovery = (spec.recovery_every > 0 && n_state % spec.recovery_every == 0)
                || matches!(fault, Fault::DropFlush(_));
            // The restore's own writes are recorded only when its crashes are checked.
            let recorded = recovery.then(|| CrashDevice::new(epoch.image(&keep), BLOCK_USIZE));
            let plain =
                MemDevice::from_bytes(if recovery { Vec::new() } else { epoch.image(&keep) });
            let restored: &dyn BlockDevice = match &recorded {
                Some(r) => r,
                None => &plain,
            };
            let opts = if recovery { &serial } else { &parallel };
            if let Err(e) = faulty_restore(restored, opts) {
                tally.fail(format!("{what}: restore failed: {e}"));
                ok = false;
            } else if let Some(b) = first_bad_dev(restored, &pre, &in_use) {
                tally.fail(format!(
                    "{what}: block {b} in use at checkpoint start differs after the restore"
                ));
                ok = false;
            }
            tally.states += 1;
            // Crashes during the restore: each crash state of it, then restore again.
            if let (true, Some(rec)) = (ok, &recorded) {
                rec.for_each_epoch(|re| {
                    for rk in re.standard_states(1, 1, spec.seed ^ 0xA5) {
                        if !ok {
                            return;
                        }
                        let again = MemDevice::from_bytes(re.image(&rk));
                        tally.recovery_states += 1;
                        let r = bow::restore::restore(&again, &parallel, &mut |_| {});
                        let rwhat = format!("{what}, restore epoch {} keep {rk:?}", re.index);
                        if let Err(e) = r {
                            tally.fail(format!("{rwhat}: restore again failed: {e}"));
                            ok = false;
                        } else if let Some(b) = first_bad_dev(&again, &pre, &in_use) {
                            tally.fail(format!("{rwhat}: block {b} differs after restoring again"));
                            ok = false;
                        }
                    }
                });
            }
            if !ok {
                if let Some(root) = failures_dir {
                    match save_failure(root, dir, spec, &id, n_state) {
                        Ok(saved) => tally.fail(format!("saved as {}", saved.display())),
                        Err(e) => result = Err(e),
                    }
                }
                if stop_at_first {
                    stopped = true;
                    return;
                }
            }
            n_state += 1;
        }
    });
    result?;
    if rejected > 0 {
        println!("bow model: {rejected} writes rejected as the kernel would (illegal ranges)");
    }
    Ok(tally)
}

/// `&dyn BlockDevice` as a sized `BlockDevice` (bow's restore takes `impl BlockDevice`).
struct Dyn<'a>(&'a dyn BlockDevice);

impl BlockDevice for Dyn<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush()
    }
}

fn keep_code(k: &blockcopy::crashdev::Keep) -> Vec<usize> {
    use blockcopy::crashdev::Keep;
    match k {
        Keep::None => vec![0],
        Keep::All => vec![1],
        Keep::Prefix(n) => vec![2, *n],
        Keep::AllBut(n) => vec![3, *n],
        Keep::Mask(m) => std::iter::once(4).chain(m.iter().map(|b| usize::from(*b))).collect(),
    }
}

fn count_flushes(dev: &CrashDevice) -> usize {
    dev.events_without_reads()
        .iter()
        .filter(|e| matches!(e, blockcopy::crashdev::IoEvent::Flush))
        .count()
}

fn first_bad_dev(dev: &dyn BlockDevice, pre: &[u8], in_use: &[bool]) -> Option<usize> {
    let mut buf = vec![0u8; BLOCK_USIZE];
    in_use.iter().enumerate().find_map(|(b, used)| {
        if !*used {
            return None;
        }
        let r = b * BLOCK_USIZE..(b + 1) * BLOCK_USIZE;
        let read = dev.read_at(&mut buf, u64::try_from(r.start).ok()?);
        (read.is_err() || buf[..] != pre[r]).then_some(b)
    })
}

fn first_bad(img: &[u8], pre: &[u8], in_use: &[bool]) -> Option<usize> {
    in_use.iter().enumerate().find_map(|(b, used)| {
        let r = b * BLOCK_USIZE..(b + 1) * BLOCK_USIZE;
        (*used && img[r.clone()] != pre[r]).then_some(b)
    })
}

/// Runs the case in `dir` (kind from its `case.json`).
pub fn run_case(dir: &Path, fault: Fault, failures_dir: Option<&Path>) -> Result<Tally, Failed> {
    let spec = CaseSpec::load(dir)?;
    match spec.kind.as_str() {
        "snapshot" => {
            let case = SnapshotCase::load(dir, spec)?;
            run_snapshot(&case, fault, failures_dir, false)
        }
        "bow" => run_bow(dir, &spec, fault, failures_dir),
        // The engine's broken orders are in the capture (`bow-ublk serve --fault`), not here.
        "ublk" if fault != Fault::None => {
            Err(format!("{}: a ublk case takes no recovery fault ({fault:?})", dir.display())
                .into())
        }
        "ublk" => ublk::run_ublk(dir, &spec, failures_dir, false).map(|u| u.tally),
        other => Err(format!("{}: unknown case kind {other:?}", dir.display()).into()),
    }
}

// ---------------------------------------------------------------------------------------------
// a log writer in the kernel's layout, for the synthetic case

/// Writes a dm-log-writes log (512-byte sectors) the way the kernel lays it out.
pub struct LogWriter {
    buf: Vec<u8>,
    n: u64,
}

impl Default for LogWriter {
    fn default() -> Self {
        LogWriter { buf: vec![0; 512], n: 0 }
    }
}

impl LogWriter {
    fn header(&mut self, sector: u64, nr: u64, fl: u64, mark: &[u8]) {
        let mut block = [0u8; 512];
        block[0..8].copy_from_slice(&sector.to_le_bytes());
        block[8..16].copy_from_slice(&nr.to_le_bytes());
        block[16..24].copy_from_slice(&fl.to_le_bytes());
        block[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
        block[32..32 + mark.len()].copy_from_slice(mark);
        self.buf.extend_from_slice(&block);
        self.n += 1;
    }
    pub fn write(&mut self, offset: u64, data: &[u8], fl: u64) {
        self.header(offset / 512, data.len() as u64 / 512, fl, &[]);
        self.buf.extend_from_slice(data);
    }
    pub fn flush(&mut self) {
        self.header(0, 0, flags::FLUSH, &[]);
    }
    pub fn discard(&mut self, offset: u64, len: u64) {
        self.header(offset / 512, len / 512, flags::DISCARD, &[]);
    }
    pub fn mark(&mut self, label: &str) {
        self.header(0, 0, flags::MARK, label.as_bytes());
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[0..8].copy_from_slice(&blockdev::logwrites::LOG_MAGIC.to_le_bytes());
        self.buf[8..16].copy_from_slice(&blockdev::logwrites::LOG_VERSION.to_le_bytes());
        self.buf[16..24].copy_from_slice(&self.n.to_le_bytes());
        self.buf[24..28].copy_from_slice(&512u32.to_le_bytes());
        self.buf
    }
}
