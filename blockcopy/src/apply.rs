//! Applying a hazard-free [`CopyPlan`]: sorted, coalesced copies with several I/Os in flight, a
//! flush of the destination, the caller's commit point, a flush.
//!
//! **Why a crash anywhere is harmless.** The engine refuses a plan with hazards (plan.rs): no
//! copy writes a block any copy reads (on one device) or a protected block. So until the commit
//! point every byte the plan and the caller's own checks depend on is unchanged, and a new run
//! derives the same plan and writes the same bytes, whatever subset of the earlier writes
//! reached the disk. The commit point (the write that makes the result final: dm-bow's block 0,
//! a COW store's header) runs only after a flush made every copy durable, and it is followed by
//! a flush. After it, the caller finds nothing left to do.
//!
//! **I/O.** Copies are split into I/Os of at most `max_io_bytes`. Copies whose source data the
//! caller already holds in memory ([`Preloaded`], e.g. dm-bow's checked copies) are written from
//! there. The others are read grouped by where their sources lie: sorted by source, up to 4 MiB
//! of merged source ranges read at once ([`MergedRead`]), then written from that buffer (read
//! one by one in target order, scattered sources would cost a random read each). `queue_depth`
//! threads take units of work from a shared counter; progress goes out in steps of about 1/512.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use crate::device::{BlockDevice, DeviceError, IoBuf};
use crate::merged::MergedRead;
use crate::plan::{BlockCopy, CopyPlan, Hazards, Layout};

/// Source data the caller already holds, looked up by source block.
pub trait Preloaded: Sync {
    /// The bytes of source blocks `[first, first + blocks)`, if held (all of them, contiguous).
    fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]>;
}

/// Options of [`apply`].
#[derive(Clone, Copy)]
pub struct ApplyOptions<'a> {
    /// I/Os in flight (one thread each); 0 counts as 1, at most 64.
    pub queue_depth: usize,
    /// The largest single write, in bytes (rounded down to whole blocks, at least one block).
    pub max_io_bytes: usize,
    /// Whether source and destination are one device (the default) or two.
    pub layout: Layout,
    /// Source data held in memory, written without reading the source again.
    pub preloaded: Option<&'a dyn Preloaded>,
}

impl Default for ApplyOptions<'_> {
    fn default() -> Self {
        ApplyOptions {
            queue_depth: 8,
            max_io_bytes: 1 << 20,
            layout: Layout::SameDevice,
            preloaded: None,
        }
    }
}

impl std::fmt::Debug for ApplyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyOptions")
            .field("queue_depth", &self.queue_depth)
            .field("max_io_bytes", &self.max_io_bytes)
            .field("layout", &self.layout)
            .field("preloaded", &self.preloaded.is_some())
            .finish()
    }
}

/// Why [`apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The plan has hazards (checked before anything is written).
    #[error(
        "the plan is not safe to apply out of order: {} blocks both read and written, \
         {} protected blocks written",
        .0.read_and_written,
        .0.protected_written
    )]
    Hazard(Hazards),
    /// A copy reaches past the end of a device (checked before anything is written).
    #[error("the plan reaches block {end} of the {device} device of {size} bytes")]
    OutOfDevice { device: &'static str, end: u64, size: u64 },
    /// A read, write or flush failed; the destination may hold part of the copies (the caller
    /// runs the plan again).
    #[error("device I/O failed: {0}")]
    Device(#[from] DeviceError),
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ApplyReport {
    /// Blocks copied (the plan's blocks).
    pub blocks: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Copies written from preloaded data without reading the source.
    pub preloaded_copies: u64,
}

/// Applies `plan` from `source` to `dest` (which may be the same device; say so in
/// `opts.layout`), then flushes `dest`, calls `commit` (the write that makes the result final;
/// it must write through `dest`), and flushes `dest` again. `progress(done, total)` counts
/// blocks copied.
///
/// Nothing is written when the plan has hazards or does not fit the devices.
pub fn apply<S, D>(
    source: &S,
    dest: &D,
    plan: &CopyPlan,
    opts: &ApplyOptions<'_>,
    commit: impl FnOnce() -> Result<(), DeviceError>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ApplyReport, ApplyError>
where
    S: BlockDevice + ?Sized,
    D: BlockDevice + ?Sized,
{
    let hazards = plan.hazards(opts.layout);
    if !hazards.is_empty() {
        return Err(ApplyError::Hazard(hazards));
    }
    let bs = plan.block_size();
    for (device, end, size) in [
        ("source", plan.source_end(), source.size()),
        ("destination", plan.target_end(), dest.size()),
    ] {
        // `CopyPlan::new` checked that `end * bs` fits in 64 bits.
        if end.saturating_mul(bs) > size {
            return Err(ApplyError::OutOfDevice { device, end, size });
        }
    }
    let max_blocks = (u64::try_from(opts.max_io_bytes).unwrap_or(u64::MAX) / bs).max(1);
    let jobs = units(split(plan.copies(), max_blocks), opts.preloaded, bs);
    let preloaded_copies =
        u64::try_from(jobs.iter().filter(|u| matches!(u, Unit::Held { .. })).count())
            .unwrap_or(u64::MAX);
    let total = plan.blocks();
    let workers = opts.queue_depth.clamp(1, 64).min(jobs.len().max(1));
    let step = (total / 512).max(1);

    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<DeviceError>> = Mutex::new(None);
    let (tx, rx) = mpsc::channel::<u64>();
    let mut done = 0;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, failed, first_error, jobs) = (&next, &failed, &first_error, &jobs);
            scope.spawn(move || {
                let mut buf = IoBuf::default();
                // Progress goes out in steps of about 1/512 of the plan: one message per 4 KiB
                // copy would wake the reporting thread thousands of times.
                let mut unreported = 0;
                while !failed.load(Ordering::Relaxed) {
                    let Some(unit) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    match copy(source, dest, unit, bs, &mut buf) {
                        Ok(()) => {
                            unreported += unit.blocks(bs);
                            if unreported >= step {
                                let _ = tx.send(std::mem::take(&mut unreported));
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            slot.get_or_insert(e);
                        }
                    }
                }
                if unreported > 0 {
                    let _ = tx.send(unreported);
                }
            });
        }
        drop(tx);
        for blocks in rx {
            done += blocks;
            progress(done, total);
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e.into());
    }
    // Every copy durable before the commit point makes the result final.
    dest.flush()?;
    commit()?;
    dest.flush()?;
    Ok(ApplyReport { blocks: total, bytes: plan.bytes(), preloaded_copies })
}

/// Splits extents into I/Os of at most `max_blocks` blocks, keeping target order.
fn split(copies: &[BlockCopy], max_blocks: u64) -> Vec<BlockCopy> {
    let mut out = Vec::with_capacity(copies.len());
    for c in copies {
        let mut at = 0;
        while at < c.blocks {
            let n = (c.blocks - at).min(max_blocks);
            out.push(BlockCopy { target: c.target + at, source: c.source + at, blocks: n });
            at += n;
        }
    }
    out
}

/// Source bytes a group of copies not held in memory may span (merged source ranges).
const GROUP_BYTES: u64 = 4 << 20;

/// A unit of work.
enum Unit<'a> {
    /// A copy whose source data the caller holds: written from memory.
    Held { target: u64, data: &'a [u8] },
    /// Copies read together (sources sorted, merged), then written.
    Group(Vec<BlockCopy>),
}

impl Unit<'_> {
    fn blocks(&self, bs: u64) -> u64 {
        match self {
            Unit::Held { data, .. } => u64::try_from(data.len()).unwrap_or(u64::MAX) / bs,
            Unit::Group(copies) => copies.iter().map(|c| c.blocks).sum(),
        }
    }
}

/// Splits the copies into units: held ones alone, the others grouped by source.
fn units<'a>(jobs: Vec<BlockCopy>, held: Option<&'a dyn Preloaded>, bs: u64) -> Vec<Unit<'a>> {
    let mut out = Vec::new();
    let mut to_read = Vec::new();
    for j in jobs {
        let data = held.and_then(|h| h.get(j.source, j.blocks, bs));
        // A lookup that returns the wrong length is ignored: the copy is read instead.
        match data.filter(|d| u64::try_from(d.len()).ok() == Some(j.blocks * bs)) {
            Some(data) => out.push(Unit::Held { target: j.target, data }),
            None => to_read.push(j),
        }
    }
    to_read.sort_unstable_by_key(|j| j.source);
    let mut group: Vec<BlockCopy> = Vec::new();
    let mut span = 0;
    for j in to_read {
        let bytes = j.blocks * bs;
        if !group.is_empty() && span + bytes > GROUP_BYTES {
            out.push(Unit::Group(std::mem::take(&mut group)));
            span = 0;
        }
        span += bytes;
        group.push(j);
    }
    if !group.is_empty() {
        out.push(Unit::Group(group));
    }
    out
}

/// Carries out one unit: writes a held copy from memory, or reads a group's merged source
/// ranges into `buf` and writes each copy from there.
fn copy<S, D>(
    source: &S,
    dest: &D,
    unit: &Unit<'_>,
    bs: u64,
    buf: &mut IoBuf,
) -> Result<(), DeviceError>
where
    S: BlockDevice + ?Sized,
    D: BlockDevice + ?Sized,
{
    let group = match unit {
        Unit::Held { target, data } => return dest.write_at(data, target * bs),
        Unit::Group(group) => group,
    };
    let spans = group.iter().map(|j| (j.source, j.source + j.blocks));
    let read = MergedRead::read(source, spans, bs, std::mem::take(buf))?;
    for j in group {
        let data = read.get(j.source, j.blocks, bs);
        dest.write_at(data.expect("a group's read covers its sources"), j.target * bs)?;
    }
    *buf = read.into_buf();
    Ok(())
}
