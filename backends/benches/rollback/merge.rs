//! Part 1: rollback time of the same changed blocks by the kernel's snapshot-merge, the
//! offline userspace merge (`snapcow::merge`) and the dm-bow restore (`bow::restore`).

use std::path::Path;
use std::time::{Duration, Instant};

use blockdev::dm::DeviceMapper;
use blockdev::DevId;
use bow::device::{FileDevice, MemDevice};
use bow::model::{BowEngine, BowModel, BowState, ModelConfig};
use bow::restore::{self, RestoreOptions, RestoreOutcome};
use bow::units::BlockSize;
use snapcow::{Extent, MergeOptions};
use testbench::Failed;

use crate::common::{
    check_pattern, drop_caches, median, mib, mib_s, ms, write_pattern, Ranges, Rng, Saved,
    SnapStack, BLOCK, CHANGED, MIB, ORIGINAL,
};
use crate::Config;

/// The two block devices of the benchmark: `a` holds the snapshot state, `b` the dm-bow one.
#[derive(Debug)]
pub struct Disks<'a> {
    pub a: (&'a Path, DevId),
    pub b: (&'a Path, DevId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Kernel,
    User,
    Bow,
}

/// Medians of one case, for the summary.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub kernel: Duration,
    pub user: Duration,
    pub bow: Duration,
}

/// Distinct runs of `run` bytes inside the data area (never the first MiB: block 0 is the
/// dm-bow log), `total` bytes in all, in random order.
fn changes(cfg: &Config, run: u64, seed: u64) -> Ranges {
    let first = MIB / run;
    let slots = cfg.data / run - first;
    let mut rng = Rng(seed);
    rng.distinct(slots, cfg.changed / run).into_iter().map(|s| ((first + s) * run, run)).collect()
}

fn sorted(r: &Ranges) -> Ranges {
    let mut s = r.clone();
    s.sort_unstable();
    s
}

/// Builds the snapshot state on disk `a`: the changes written through snapshot-origin into a
/// fresh store. Returns the saved bytes (changed blocks and the used part of the COW region)
/// and the number of exceptions.
fn build_snapshot(
    cfg: &Config,
    dm: &DeviceMapper,
    a: (&Path, DevId),
    changes: &Ranges,
) -> Result<(Saved, u64), Failed> {
    let stack = SnapStack::create(dm, "rb-m", (a.1, cfg.disk()), (a.1, cfg.data, cfg.spare), true)?;
    write_pattern(&stack.origin_node, changes, CHANGED)?;
    let st = stack.status(dm)?;
    let blockdev::dm::target::SnapshotStatus::Active { allocated, metadata, .. } = st else {
        return Err(format!("snapshot status {st:?}").into());
    };
    let data = (allocated.get() - metadata.get()) * 512;
    if data != cfg.changed {
        return Err(format!("store holds {data} bytes of data, {} written", cfg.changed).into());
    }
    stack.teardown(dm)?;
    let mut ranges = sorted(changes);
    ranges.push((cfg.data, allocated.get() * 512));
    Ok((Saved::read(a.0, &ranges)?, cfg.changed / BLOCK))
}

/// Builds the dm-bow state with the engine model, in memory, and writes it to disk `b`: the
/// original data, the area past it TRIMmed, CHECKPOINT, then the same changes. Returns the
/// bytes a restore rewrites (every entry's source and block 0) and the number of log entries.
fn build_bow(cfg: &Config, b: &Path, changes: &Ranges) -> Result<(Saved, u64), Failed> {
    let mut image = vec![0u8; usize::try_from(cfg.disk())?];
    crate::common::fill(&mut image[..usize::try_from(cfg.data)?], 0, ORIGINAL);
    let mut m = BowModel::new(MemDevice::from_bytes(image), ModelConfig::new(BlockSize::B4096));
    m.discard(bow::units::Sectors(cfg.data / 512), cfg.spare)?;
    m.set_state(BowState::Checkpoint)?;
    let mut buf = vec![0u8; usize::try_from(changes.iter().map(|c| c.1).max().unwrap_or(0))?];
    for &(off, len) in changes {
        crate::common::fill(&mut buf, off, CHANGED);
        m.write(bow::units::Sectors(off / 512), &buf[..usize::try_from(len)?])?;
    }
    m.flush()?;
    let dev = m.into_device();
    let log = restore::validate(&dev)?;
    let image = dev.snapshot();
    drop(dev);
    write_image(b, &image)?;
    let mut ranges: Ranges = vec![(0, BLOCK)];
    for sector in &log.sectors {
        for e in &sector.entries {
            ranges.push((e.source.0 * 512, u64::from(e.size)));
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    Ok((Saved::from_image(&image, &ranges), log.entries))
}

/// Writes a whole image to the device with O_DIRECT, then flushes.
fn write_image(path: &Path, image: &[u8]) -> Result<(), Failed> {
    let len = u64::try_from(image.len())?;
    let mut at = 0;
    let f = crate::common::open_direct(path)?;
    let mut buf = blockcopy::device::IoBuf::new(usize::try_from(MIB)?);
    while at < len {
        let n = usize::try_from((len - at).min(MIB))?;
        let from = usize::try_from(at)?;
        buf.set_len(n);
        buf.as_mut_slice().copy_from_slice(&image[from..from + n]);
        std::os::unix::fs::FileExt::write_all_at(&f, buf.as_slice(), at)?;
        at += MIB;
    }
    f.sync_data()?;
    Ok(())
}

/// Times `f` on `path` opened as the daemon opens devices (direct reads), the open included.
fn timed_on(
    path: &Path,
    f: impl FnOnce(&FileDevice) -> Result<(), Failed>,
) -> Result<Duration, Failed> {
    let start = Instant::now();
    f(&FileDevice::open(path)?.with_direct_reads())?;
    Ok(start.elapsed())
}

pub fn run(cfg: &Config, dm: &DeviceMapper, disks: &Disks<'_>) -> Result<Vec<CaseResult>, Failed> {
    let t = Instant::now();
    write_pattern(disks.a.0, &[(0, cfg.data)], ORIGINAL)?;
    println!("  original data written to disk a ({:.1} s)", t.elapsed().as_secs_f64());
    let mut results = Vec::new();
    let cases = [("scattered 4 KiB", BLOCK, 1u64), ("coalesced 1 MiB runs", MIB, 2)];
    for (name, run_bytes, seed) in cases {
        let changes = changes(cfg, run_bytes, 0x5EED_0000 + seed);
        let check_ranges = sorted(&changes);
        let t = Instant::now();
        let (snap_state, exceptions) = build_snapshot(cfg, dm, disks.a, &changes)?;
        let t_snap = t.elapsed();
        let t = Instant::now();
        let (bow_state, entries) = build_bow(cfg, disks.b.0, &changes)?;
        println!(
            "\n{name}: {:.0} MiB changed in {} writes; store {} exceptions (built through \
             snapshot-origin in {:.1} s), dm-bow log {entries} entries (engine model in memory, image written, {:.1} s); \
             reset before each run: {:.1} / {:.1} MiB",
            mib(cfg.changed),
            changes.len(),
            exceptions,
            t_snap.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            mib(snap_state.bytes()),
            mib(bow_state.bytes()),
        );
        let mut times: [Vec<Duration>; 3] = Default::default();
        let methods = [Method::Kernel, Method::User, Method::Bow];
        for round in 0..cfg.rounds {
            for k in 0..methods.len() {
                let method = methods[(k + round) % methods.len()];
                let (state, path) = match method {
                    Method::Kernel | Method::User => (&snap_state, disks.a.0),
                    Method::Bow => (&bow_state, disks.b.0),
                };
                state.write_back(path)?;
                drop_caches()?;
                let took = match method {
                    Method::Kernel => SnapStack::create(
                        dm,
                        "rb-m",
                        (disks.a.1, cfg.disk()),
                        (disks.a.1, cfg.data, cfg.spare),
                        false,
                    )?
                    .kernel_merge(dm)?,
                    Method::User => timed_on(path, |dev| {
                        let cow = [Extent { logical: 0, physical: cfg.data, len: cfg.spare }];
                        let report =
                            snapcow::merge(dev, &cow, &MergeOptions::default(), &mut |_, _| {})?;
                        if report.exceptions != exceptions {
                            return Err(format!("userspace merge: {report:?}").into());
                        }
                        Ok(())
                    })?,
                    Method::Bow => timed_on(path, |dev| {
                        let report =
                            restore::restore(dev, &RestoreOptions::default(), &mut |_| {})?;
                        if !matches!(report.outcome, RestoreOutcome::Restored { .. }) {
                            return Err(format!("bow restore: {:?}", report.outcome).into());
                        }
                        Ok(())
                    })?,
                };
                check_pattern(path, &check_ranges, ORIGINAL, &format!("{method:?}"))?;
                times[method as usize].push(took);
                println!("  round {} {method:?}: {:.1} ms", round + 1, ms(took));
            }
        }
        let r = CaseResult {
            name: name.to_owned(),
            kernel: median(&times[Method::Kernel as usize]),
            user: median(&times[Method::User as usize]),
            bow: median(&times[Method::Bow as usize]),
        };
        println!("  {:<28} {:>10} {:>10}", "method (median)", "ms", "MiB/s");
        for (label, d) in [
            ("kernel snapshot-merge", r.kernel),
            ("userspace merge (snapcow)", r.user),
            ("dm-bow restore (bow)", r.bow),
        ] {
            println!("  {label:<28} {:>10.1} {:>10.1}", ms(d), mib_s(cfg.changed, d));
        }
        results.push(r);
    }
    Ok(results)
}
