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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crashdev::{report_count, CrashDevice, IoEvent, XorShift};
    use crate::device::MemDevice;
    use crate::BlockRange;
    use proptest::prelude::*;

    const BS: u64 = 512;

    fn c(target: u64, source: u64, blocks: u64) -> BlockCopy {
        BlockCopy { target, source, blocks }
    }

    /// `blocks` blocks, each filled with its number plus `salt`.
    fn image(blocks: u64, salt: u8) -> Vec<u8> {
        let bs = usize::try_from(BS).unwrap();
        (0..blocks)
            .flat_map(|b| vec![u8::try_from(b % 200).unwrap().wrapping_add(salt); bs])
            .collect()
    }

    /// The naive reference: copies one block at a time, from a snapshot of the source.
    fn reference(source: &[u8], dest: &[u8], copies: &[BlockCopy]) -> Vec<u8> {
        let mut out = dest.to_vec();
        let at = |b: u64| usize::try_from(b * BS).unwrap();
        for cp in copies {
            for i in 0..cp.blocks {
                out[at(cp.target + i)..at(cp.target + i + 1)]
                    .copy_from_slice(&source[at(cp.source + i)..at(cp.source + i + 1)]);
            }
        }
        out
    }

    fn small_io() -> ApplyOptions<'static> {
        ApplyOptions { queue_depth: 3, max_io_bytes: 1024, ..ApplyOptions::default() }
    }

    #[test]
    fn copies_between_devices_and_commits_between_two_flushes() {
        let src = MemDevice::from_bytes(image(64, 0));
        let dst = CrashDevice::new(image(64, 50), 512);
        let copies = vec![c(3, 60, 2), c(10, 0, 7), c(20, 5, 1), c(30, 30, 4)];
        let plan = CopyPlan::new(BS, copies.clone()).unwrap();
        let opts = ApplyOptions { layout: Layout::SeparateDevices, ..small_io() };
        let mut last = (0, 0);
        let commit = || dst.write_at(&[0xC0; 512], 63 * BS);
        let report = apply(&src, &dst, &plan, &opts, commit, &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(report, ApplyReport { blocks: 14, bytes: 14 * BS, preloaded_copies: 0 });
        assert_eq!(last, (14, 14), "progress reaches the total");
        let mut want = reference(&src.snapshot(), &image(64, 50), &copies);
        want[usize::try_from(63 * BS).unwrap()..].fill(0xC0);
        assert!(dst.current() == want);
        // The commit point is the only write after the copies' flush, and a flush follows it.
        let events = dst.events_without_reads();
        let n = events.len();
        assert_eq!(events[n - 3], IoEvent::Flush);
        assert_eq!(events[n - 2], IoEvent::Write { offset: 63 * BS, len: 512 });
        assert_eq!(events[n - 1], IoEvent::Flush);
        // 1024-byte I/Os: no write is larger.
        assert!(events.iter().all(|e| !matches!(e, IoEvent::Write { len, .. } if *len > 1024)));
    }

    #[test]
    fn same_device_copies_read_sources_the_plan_never_writes() {
        let dev = MemDevice::from_bytes(image(64, 0));
        let copies = vec![c(0, 40, 8), c(8, 56, 4), c(20, 48, 3)];
        let plan = CopyPlan::new(BS, copies.clone()).unwrap();
        let report = apply(&dev, &dev, &plan, &small_io(), || Ok(()), &mut |_, _| {}).unwrap();
        assert_eq!(report.blocks, 15);
        assert!(dev.snapshot() == reference(&image(64, 0), &image(64, 0), &copies));
    }

    #[test]
    fn hazards_and_plans_outside_the_devices_write_nothing() {
        let dev = CrashDevice::new(image(16, 0), 512);
        // 0..4 <- 2..6: blocks 2 and 3 are read and written.
        let plan = CopyPlan::new(BS, vec![c(0, 2, 4)]).unwrap();
        let err = apply(&dev, &dev, &plan, &ApplyOptions::default(), || Ok(()), &mut |_, _| {});
        match err {
            Err(ApplyError::Hazard(h)) => assert_eq!(h.read_and_written, 2),
            other => panic!("expected a hazard, got {other:?}"),
        }
        // A protected target.
        let plan = CopyPlan::new(BS, vec![c(0, 8, 2)])
            .unwrap()
            .protect([BlockRange { start: 1, blocks: 1 }])
            .unwrap();
        let err = apply(&dev, &dev, &plan, &ApplyOptions::default(), || Ok(()), &mut |_, _| {});
        assert!(matches!(err, Err(ApplyError::Hazard(h)) if h.protected_written == 1));
        // Past the end of either device.
        for copies in [vec![c(15, 8, 2)], vec![c(0, 15, 2)]] {
            let plan = CopyPlan::new(BS, copies).unwrap();
            let err = apply(&dev, &dev, &plan, &ApplyOptions::default(), || Ok(()), &mut |_, _| {});
            assert!(matches!(err, Err(ApplyError::OutOfDevice { end: 17, .. })), "{err:?}");
        }
        assert_eq!(dev.write_count(), 0);
        assert!(dev.events().iter().all(|e| !matches!(e, IoEvent::Flush)));
    }

    /// Holds blocks 40..48 with bytes unlike the device's, to see they are used.
    struct Held(Vec<u8>);
    impl Preloaded for Held {
        fn get(&self, first: u64, blocks: u64, bs: u64) -> Option<&[u8]> {
            let from = first.checked_sub(40)?;
            let end = usize::try_from((from + blocks) * bs).ok()?;
            self.0.get(usize::try_from(from * bs).ok()?..end)
        }
    }

    #[test]
    fn preloaded_sources_are_written_without_reading_them() {
        let dev = CrashDevice::new(image(64, 0), 512);
        let held = Held(vec![0xAB; 8 * 512]);
        let plan = CopyPlan::new(BS, vec![c(0, 40, 4), c(10, 46, 4)]).unwrap();
        let opts = ApplyOptions { preloaded: Some(&held), ..small_io() };
        let report = apply(&dev, &dev, &plan, &opts, || Ok(()), &mut |_, _| {}).unwrap();
        // 0..4 came from memory (two 1024-byte I/Os); 10..12 too, 12..14 (46+2..) is past it.
        assert_eq!(report.preloaded_copies, 3);
        let now = dev.current();
        assert!(now[..4 * 512].iter().all(|&b| b == 0xAB));
        assert!(now[10 * 512..12 * 512].iter().all(|&b| b == 0xAB));
        assert_eq!(&now[12 * 512..14 * 512], &image(64, 0)[48 * 512..50 * 512]);
        let reads: Vec<IoEvent> =
            dev.events().into_iter().filter(|e| matches!(e, IoEvent::Read { .. })).collect();
        assert_eq!(reads, vec![IoEvent::Read { offset: 48 * 512, len: 1024 }]);
    }

    #[test]
    fn io_errors_are_returned_and_the_commit_point_is_not_reached() {
        struct Failing(MemDevice);
        impl BlockDevice for Failing {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
                self.0.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
                let len = u64::try_from(buf.len()).unwrap();
                if (offset..offset + len).contains(&(5 * BS)) {
                    return Err(DeviceError::Injected("bad block"));
                }
                self.0.write_at(buf, offset)
            }
            fn flush(&self) -> Result<(), DeviceError> {
                self.0.flush()
            }
        }
        let dev = Failing(MemDevice::from_bytes(image(32, 0)));
        let plan = CopyPlan::new(BS, vec![c(0, 16, 8)]).unwrap();
        let mut committed = false;
        let err = apply(
            &dev,
            &dev,
            &plan,
            &small_io(),
            || {
                committed = true;
                Ok(())
            },
            &mut |_, _| {},
        );
        assert!(matches!(err, Err(ApplyError::Device(DeviceError::Injected(_)))));
        assert!(!committed);
    }

    /// A resumable job: block 63 holds "PEND" until the commit point zeroes it; a run does
    /// nothing without it.
    fn run(dev: &impl BlockDevice, plan: &CopyPlan) -> bool {
        let mut marker = [0u8; 4];
        dev.read_at(&mut marker, 63 * BS).unwrap();
        if &marker != b"PEND" {
            return false;
        }
        let commit = || dev.write_at(&[0; 512], 63 * BS);
        apply(dev, dev, plan, &small_io(), commit, &mut |_, _| {}).unwrap();
        true
    }

    #[test]
    fn a_crash_at_any_point_then_a_rerun_gives_the_same_result() {
        let mut rng = XorShift::new(7);
        let mut states = 0;
        for round in 0..6 {
            let mut base = image(64, u8::try_from(round).unwrap());
            base[usize::try_from(63 * BS).unwrap()..][..4].copy_from_slice(b"PEND");
            // Targets in 0..32, sources in 32..63, the marker protected.
            let copies: Vec<BlockCopy> =
                (0..8).map(|i| c(i * 4, 32 + rng.below(28), 1 + rng.below(3))).collect();
            let plan = CopyPlan::new(BS, copies.clone())
                .unwrap()
                .protect([BlockRange { start: 63, blocks: 1 }])
                .unwrap();
            let mut want = reference(&base, &base, &copies);
            want[usize::try_from(63 * BS).unwrap()..].fill(0);

            let dev = CrashDevice::new(base.clone(), 512);
            assert!(run(&dev, &plan));
            assert!(dev.current() == want);
            dev.for_each_epoch(|epoch| {
                for keep in epoch.standard_states(16, 8, round) {
                    let crashed = MemDevice::from_bytes(epoch.image(&keep));
                    run(&crashed, &plan);
                    assert!(crashed.snapshot() == want, "epoch {} {keep:?}", epoch.index);
                    states += 1;
                }
            });
            // After the commit point a rerun does nothing.
            let done = MemDevice::from_bytes(want.clone());
            assert!(!run(&done, &plan));
        }
        report_count(&format!("blockcopy crash states tested: {states}"));
        assert!(states > 100, "only {states} crash states");
    }

    proptest! {
        #[test]
        fn random_plans_match_the_naive_reference(
            layout_same in any::<bool>(),
            qd in 1usize..6,
            io_blocks in 1u64..6,
            raw in proptest::collection::vec((0u64..3, 1u64..6, 0u64..60), 0..12),
        ) {
            // Disjoint targets in 0..~100 with gaps; sources anywhere (separate devices) or in
            // 128..192 (same device, never a target).
            let mut at = 0;
            let mut copies = Vec::new();
            for (gap, blocks, src) in raw {
                at += gap;
                let source = if layout_same { 128 + src } else { src };
                copies.push(c(at, source, blocks));
                at += blocks;
            }
            let plan = CopyPlan::new(BS, copies.clone()).unwrap();
            let opts = ApplyOptions {
                queue_depth: qd,
                max_io_bytes: usize::try_from(io_blocks * BS).unwrap(),
                layout: if layout_same { Layout::SameDevice } else { Layout::SeparateDevices },
                preloaded: None,
            };
            let src_img = image(200, 0);
            let dst_img = image(200, 77);
            if layout_same {
                let dev = MemDevice::from_bytes(src_img.clone());
                let report = apply(&dev, &dev, &plan, &opts, || Ok(()), &mut |_, _| {}).unwrap();
                prop_assert_eq!(report.blocks, copies.iter().map(|c| c.blocks).sum::<u64>());
                prop_assert!(dev.snapshot() == reference(&src_img, &src_img, &copies));
            } else {
                let src = MemDevice::from_bytes(src_img.clone());
                let dst = MemDevice::from_bytes(dst_img.clone());
                apply(&src, &dst, &plan, &opts, || Ok(()), &mut |_, _| {}).unwrap();
                prop_assert!(dst.snapshot() == reference(&src_img, &dst_img, &copies));
                prop_assert!(src.snapshot() == src_img);
            }
        }
    }
}
