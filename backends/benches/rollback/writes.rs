//! Part 2: first-touch write throughput through snapshot-origin (an active persistent snapshot,
//! 4 KiB chunks, COW on a dm-linear region) against a plain dm-linear over the same disk,
//! slices interleaved A B B A A B B A; and f2fs mounted `checkpoint=disable` against the same
//! f2fs mounted normally ([`run_f2fs`]).

use std::path::Path;
use std::time::Duration;

use blockdev::dm::target::SnapshotStatus;
use blockdev::dm::DeviceMapper;
use blockdev::DevId;
use testbench::Failed;

use crate::common::{dm_name, linear, mib, mib_s, write_ranges, Rng, SnapStack, BLOCK, MIB};
use crate::Config;

/// Total bytes and time per device, for one pattern.
#[derive(Debug, Default)]
pub struct Throughput {
    pub linear: (u64, Duration),
    pub snapshot: (u64, Duration),
    /// Smallest and largest ratio of one A/B pair of slices.
    pub pair_range: (f64, f64),
}

impl Throughput {
    pub fn ratio(&self) -> f64 {
        mib_s(self.snapshot.0, self.snapshot.1) / mib_s(self.linear.0, self.linear.1)
    }
}

/// Runs `slices[2k]` on the linear device and `slices[2k + 1]` on the origin, in ABBA order.
fn interleave(
    cfg: &Config,
    lin: &Path,
    origin: &Path,
    slices: &[Vec<(u64, u64)>],
) -> Result<Throughput, Failed> {
    let mut t = Throughput { pair_range: (f64::MAX, 0.0), ..Throughput::default() };
    for (k, pair) in slices.chunks(2).enumerate() {
        let bytes = |s: &[(u64, u64)]| s.iter().map(|o| o.1).sum::<u64>();
        let (ba, bb) = (bytes(&pair[0]), bytes(&pair[1]));
        let (da, db) = if k % 2 == 0 {
            let da = write_ranges(lin, &pair[0], None, cfg.qd)?;
            (da, write_ranges(origin, &pair[1], None, cfg.qd)?)
        } else {
            let db = write_ranges(origin, &pair[1], None, cfg.qd)?;
            (write_ranges(lin, &pair[0], None, cfg.qd)?, db)
        };
        let r = mib_s(bb, db) / mib_s(ba, da);
        println!(
            "    slice {}: linear {:>7.1} MiB/s  snapshot {:>7.1} MiB/s  ratio {r:.2}",
            k + 1,
            mib_s(ba, da),
            mib_s(bb, db)
        );
        t.linear.0 += ba;
        t.linear.1 += da;
        t.snapshot.0 += bb;
        t.snapshot.1 += db;
        t.pair_range = (t.pair_range.0.min(r), t.pair_range.1.max(r));
    }
    Ok(t)
}

pub fn run(
    cfg: &Config,
    dm: &DeviceMapper,
    a: (&Path, DevId),
) -> Result<(Throughput, Throughput), Failed> {
    let lin_name = dm_name("rb-w-linear")?;
    let (_, lin) = linear(dm, &lin_name, a.1, 0, cfg.data)?;
    let stack = SnapStack::create(dm, "rb-w", (a.1, cfg.disk()), (a.1, cfg.data, cfg.spare), true)?;
    let n = cfg.slices * 2;

    // Random 4 KiB writes into the first half, every block written once by one device.
    let per_slice = cfg.rand_slice / BLOCK;
    let mut rng = Rng(0xC0FF_EE00);
    let blocks = rng.distinct(cfg.data / 2 / BLOCK, per_slice * n as u64);
    let random: Vec<Vec<(u64, u64)>> = blocks
        .chunks(per_slice as usize)
        .map(|c| c.iter().map(|b| (b * BLOCK, BLOCK)).collect())
        .collect();
    println!(
        "  random 4 KiB writes, {} threads, {} slices of {:.0} MiB per device",
        cfg.qd,
        cfg.slices,
        mib(cfg.rand_slice)
    );
    let rand = interleave(cfg, &lin, &stack.origin_node, &random)?;

    // Sequential 1 MiB writes into the second half, one contiguous area per slice.
    let seq: Vec<Vec<(u64, u64)>> = (0..n as u64)
        .map(|i| {
            let start = cfg.data / 2 + i * cfg.seq_slice;
            (0..cfg.seq_slice / MIB).map(|j| (start + j * MIB, MIB)).collect()
        })
        .collect();
    println!(
        "  sequential 1 MiB writes, {} threads, {} slices of {:.0} MiB per device",
        cfg.qd,
        cfg.slices,
        mib(cfg.seq_slice)
    );
    let sequ = interleave(cfg, &lin, &stack.origin_node, &seq)?;

    // Every write through the origin was a first touch: the store holds exactly those bytes.
    let st = stack.status(dm)?;
    let SnapshotStatus::Active { allocated, metadata, .. } = st else {
        return Err(format!("snapshot status after the writes: {st:?}").into());
    };
    let saved = (allocated.get() - metadata.get()) * 512;
    let written = rand.snapshot.0 + sequ.snapshot.0;
    if saved != written {
        return Err(format!("store saved {saved} bytes for {written} first-touch bytes").into());
    }
    println!(
        "  store: {:.1} MiB saved for {:.1} MiB written through the origin",
        mib(saved),
        mib(written)
    );
    stack.teardown(dm)?;
    dm.remove_device(&lin_name)?;
    Ok((rand, sequ))
}

const F2FS_MNT: &str = "/dev/shm/rb-f2fs";
const F2FS_DM: &str = "rb-f-linear";

/// After a failed [`run_f2fs`]: unmounts and removes what it may have left (errors ignored:
/// it may not have got that far).
pub fn f2fs_cleanup(dm: &DeviceMapper) {
    let _ = blockdev::mount::umount(Path::new(F2FS_MNT), Default::default());
    if let Ok(name) = dm_name(F2FS_DM) {
        let _ = dm.remove_device(&name);
    }
}

/// f2fs's own checkpoint (`checkpoint=disable`, the `f2fs` backend) against the same file
/// system mounted normally: O_DIRECT overwrites of a file written and checkpointed before, on
/// f2fs over a dm-linear of disk `a`'s data area, slices alternating between the two mounts
/// (A B B A …; the file system is unmounted and mounted again between slices, not timed).
/// Returns (random 4 KiB, sequential 1 MiB); `linear` holds the normal mount, `snapshot` the
/// `checkpoint=disable` one.
pub fn run_f2fs(
    cfg: &Config,
    dm: &DeviceMapper,
    a: (&Path, DevId),
) -> Result<(Throughput, Throughput), Failed> {
    use blockdev::mount::{self, MountOptions};
    let name = dm_name(F2FS_DM)?;
    let (_, node) = linear(dm, &name, a.1, 0, cfg.data)?;
    testbench::guest::sh(&format!("mkfs.f2fs -q -f {}", node.display()))?;
    let mnt = Path::new(F2FS_MNT);
    std::fs::create_dir_all(mnt)?;
    let file = mnt.join("data");
    // Small: f2fs keeps much of a small volume for itself, and checkpoint=disable writes
    // out of place into the free space.
    let file_bytes = cfg.data / 8;
    let mount = |disable: bool| -> Result<(), Failed> {
        let data = if disable { "checkpoint=disable" } else { "" };
        let opts = MountOptions { data: data.to_owned(), ..MountOptions::default() };
        mount::mount(&node, mnt, "f2fs", &opts)
            .map_err(|e| format!("mount f2fs ({data:?}): {e}").into())
    };
    // The file, written once and checkpointed (the unmount writes a checkpoint).
    mount(false)?;
    std::fs::File::create(&file)?;
    crate::common::write_pattern(&file, &[(0, file_bytes)], crate::common::ORIGINAL)?;
    mount::umount(mnt, Default::default())?;

    let n = cfg.slices * 2;
    let mut rng = Rng(0xF2F5_0000);
    let per_slice = cfg.rand_slice / BLOCK;
    let random: Vec<Vec<(u64, u64)>> = (0..n)
        .map(|_| (0..per_slice).map(|_| (rng.below(file_bytes / BLOCK) * BLOCK, BLOCK)).collect())
        .collect();
    let seq_len = cfg.seq_slice.min(file_bytes);
    let seq_slots = file_bytes / seq_len;
    let seq: Vec<Vec<(u64, u64)>> = (0..n as u64)
        .map(|i| {
            let start = (i % seq_slots) * seq_len;
            (0..seq_len / MIB).map(|j| (start + j * MIB, MIB)).collect()
        })
        .collect();
    let mut results = Vec::new();
    for (label, slices) in [("random 4 KiB", &random), ("sequential 1 MiB", &seq)] {
        println!(
            "  f2fs {label} overwrites of a {:.0} MiB file, {} threads, {} slices per mount",
            mib(file_bytes),
            cfg.qd,
            cfg.slices
        );
        let mut t = Throughput { pair_range: (f64::MAX, 0.0), ..Throughput::default() };
        for (k, pair) in slices.chunks(2).enumerate() {
            let timed = |disable: bool, ops: &[(u64, u64)]| -> Result<Duration, Failed> {
                mount(disable)?;
                let d = write_ranges(&file, ops, None, cfg.qd)?;
                mount::umount(mnt, Default::default())?;
                Ok(d)
            };
            let (da, db) = if k % 2 == 0 {
                let da = timed(false, &pair[0])?;
                (da, timed(true, &pair[1])?)
            } else {
                let db = timed(true, &pair[1])?;
                (timed(false, &pair[0])?, db)
            };
            let bytes = |s: &[(u64, u64)]| s.iter().map(|o| o.1).sum::<u64>();
            let (ba, bb) = (bytes(&pair[0]), bytes(&pair[1]));
            let r = mib_s(bb, db) / mib_s(ba, da);
            println!(
                "    slice {}: normal {:>7.1} MiB/s  checkpoint=disable {:>7.1} MiB/s  ratio {r:.2}",
                k + 1,
                mib_s(ba, da),
                mib_s(bb, db)
            );
            t.linear.0 += ba;
            t.linear.1 += da;
            t.snapshot.0 += bb;
            t.snapshot.1 += db;
            t.pair_range = (t.pair_range.0.min(r), t.pair_range.1.max(r));
        }
        results.push(t);
    }
    dm.remove_device(&name)?;
    let seq = results.pop().ok_or("no sequential result")?;
    let rand = results.pop().ok_or("no random result")?;
    Ok((rand, seq))
}
