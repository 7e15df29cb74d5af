//! Applying a hazard-free plan: sorted, coalesced copies with several I/Os in flight, a flush,
//! then block 0 and a flush.
//!
//! Why the order of the copies does not matter and a crash is harmless (see plan.rs and
//! docs/restore.md): no copy reads a block any copy writes, and the log in block 0 is rewritten
//! only after every other copy is durable. Until then a new run sees the same log and the same
//! sources and makes the same copies again; afterwards there is no log and nothing to do.
//!
//! Copies whose saved data validation kept in memory are written from there (kept.rs). The
//! others are read again, grouped by where their sources lie: sorted by source, a group's
//! merged source ranges are read in one go, then its copies are written from that buffer. (Read
//! one by one in target order, scattered sources would cost a random read each.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use super::kept::{KeptCopies, MergedRead};
use super::plan::{BlockCopy, RestorePlan};
use super::{Phase, Progress, RestoreError, RestoreOptions};
use crate::device::{BlockDevice, DeviceError, IoBuf};

/// Applies `plan`; returns the blocks written (block 0 included).
pub(super) fn apply(
    dev: &impl BlockDevice,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    kept: &KeptCopies,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, RestoreError> {
    let bs = u64::from(plan.block_size);
    let max_blocks = (u64::try_from(opts.max_io_bytes).unwrap_or(u64::MAX) / bs).max(1);
    let jobs = units(split(&plan.copies, max_blocks), kept, bs);
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
                    match copy(dev, unit, bs, &mut buf) {
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
            progress(Progress { phase: Phase::Apply, done, total });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e.into());
    }
    // Every copy durable before the log disappears.
    dev.flush()?;
    let mut block0 = vec![0u8; usize::try_from(bs).unwrap_or(usize::MAX)];
    dev.read_at(&mut block0, plan.block0_source * bs)?;
    dev.write_at(&block0, 0)?;
    dev.flush()?;
    progress(Progress { phase: Phase::Apply, done: total, total });
    Ok(total)
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

/// Source bytes a group of copies not kept in memory may span (merged source ranges).
const GROUP_BYTES: u64 = 4 << 20;

/// A unit of work.
enum Unit<'a> {
    /// A copy whose saved data validation kept: written from memory.
    Kept { target: u64, data: &'a [u8] },
    /// Copies read together (sources sorted, merged), then written.
    Group(Vec<BlockCopy>),
}

impl Unit<'_> {
    fn blocks(&self, bs: u64) -> u64 {
        match self {
            Unit::Kept { data, .. } => data.len() as u64 / bs,
            Unit::Group(copies) => copies.iter().map(|c| c.blocks).sum(),
        }
    }
}

/// Splits the copies into units: kept ones alone, the others grouped by source.
fn units(jobs: Vec<BlockCopy>, kept: &KeptCopies, bs: u64) -> Vec<Unit<'_>> {
    let mut out = Vec::new();
    let mut to_read = Vec::new();
    for j in jobs {
        match kept.get(j.source, j.blocks, bs) {
            Some(data) => out.push(Unit::Kept { target: j.target, data }),
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

/// Carries out one unit: writes a kept copy from memory, or reads a group's merged source
/// ranges into `buf` and writes each copy from there.
fn copy(
    dev: &impl BlockDevice,
    unit: &Unit<'_>,
    bs: u64,
    buf: &mut IoBuf,
) -> Result<(), DeviceError> {
    let group = match unit {
        Unit::Kept { target, data } => return dev.write_at(data, target * bs),
        Unit::Group(group) => group,
    };
    let spans = group.iter().map(|j| (j.source, j.source + j.blocks));
    let read = MergedRead::read(dev, spans, bs, std::mem::take(buf))?;
    for j in group {
        let data = read.get(j.source, j.blocks, bs);
        dev.write_at(data.expect("a group's read covers its sources"), j.target * bs)?;
    }
    *buf = read.into_buf();
    Ok(())
}
