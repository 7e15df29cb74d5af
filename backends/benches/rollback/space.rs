//! Part 3: backup space of the same block trace. ext4 runs a workload (new files in free space,
//! in-place rewrites, replaced and deleted files) over this stack:
//!
//! ```text
//! before the checkpoint:  ext4 ── top: linear ── base: linear(disk a)
//! at checkpoint start:    ext4 ── top: log-writes(base, log) ── base: linear
//!                           ── snapshot-origin(disk a) + snapshot(COW: all of disk b)
//! ```
//!
//! (tables swapped while the file system is frozen; the log is a dm-linear over disk a's spare
//! area)
//!
//! so one run gives both numbers: dm-snapshot's real COW usage (its status) and the block trace
//! (dm-log-writes, between the marks `checkpoint` and `end`), which is then replayed through
//! the dm-bow engine model (`bow::dryrun`) from the free space at checkpoint start (GETFSMAP).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use blockdev::dm::target::{LogWritesParams, SnapshotStatus};
use blockdev::dm::{DevRef, DeviceMapper, SuspendMode, Table, Target};
use blockdev::logwrites::LogReader;
use blockdev::mount::{self, MountOptions};
use blockdev::{DevId, Sectors};
use bow::dryrun::{dry_run, DryRunConfig, DryRunReport, FreeExtent, TraceOp};
use testbench::{guest, Failed};

use crate::common::{
    dm_name, fill, linear, linear_table, mib, sectors, Rng, SnapStack, BLOCK, MIB,
};
use crate::Config;

const MNT: &str = "/dev/shm/rb-mnt";

/// What the two backends need for the trace.
#[derive(Debug)]
pub struct SpaceResult {
    /// dm-snapshot: allocated bytes of the COW store (data and metadata), from its status.
    pub snapshot: u64,
    pub snapshot_metadata: u64,
    /// Distinct 4 KiB chunks the trace writes, and the store size that implies
    /// (chunks + header + one area per 256 chunks).
    pub chunks: u64,
    pub bow: DryRunReport,
    /// Bytes of the trace's writes, and those that landed in free space.
    pub written: u64,
    pub written_free: u64,
    pub ops: usize,
}

fn file_data(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(len).expect("small")];
    fill(&mut v, 0, seed);
    v
}

fn write_file(path: &Path, len: u64, seed: u64) -> Result<(), Failed> {
    let mut f = File::create(path)?;
    f.write_all(&file_data(len, seed))?;
    f.sync_all()?;
    Ok(())
}

/// Files present before the checkpoint: `big` files of 2 MiB and `small` of 4–32 KiB.
fn populate(root: &Path, big: u64, small: u64, rng: &mut Rng) -> Result<(), Failed> {
    fs::create_dir_all(root.join("big"))?;
    fs::create_dir_all(root.join("small"))?;
    for i in 0..big {
        write_file(&root.join(format!("big/{i}")), 2 * MIB, i)?;
    }
    for i in 0..small {
        let len = (1 + rng.below(8)) * BLOCK;
        write_file(&root.join(format!("small/{i}")), len, 1000 + i)?;
    }
    Ok(())
}

/// The checkpointed workload, in `rounds` interleaved rounds: new files (free space), random
/// 4 KiB in-place rewrites of big files, whole in-place overwrites, small files replaced by
/// write-and-rename, deletions, appends.
fn workload(root: &Path, big: u64, small: u64, rng: &mut Rng) -> Result<(), Failed> {
    const ROUNDS: u64 = 8;
    fs::create_dir_all(root.join("new"))?;
    let s = (big / 4).max(1); // scale: 12 at full size
    let page = file_data(BLOCK, 7);
    for r in 0..ROUNDS {
        for i in 0..(s / 4).max(1) {
            write_file(&root.join(format!("new/{r}-{i}")), MIB, 50_000 + r * 100 + i)?;
        }
        for i in 0..s * 10 {
            write_file(&root.join(format!("new/s{r}-{i}")), (1 + rng.below(4)) * BLOCK, i)?;
        }
        let f =
            OpenOptions::new().write(true).open(root.join(format!("big/{}", rng.below(big))))?;
        for _ in 0..s * 40 {
            f.write_all_at(&page, rng.below(2 * MIB / BLOCK) * BLOCK)?;
        }
        f.sync_all()?;
        let i = rng.below(big);
        let f = OpenOptions::new().write(true).open(root.join(format!("big/{i}")))?;
        f.write_all_at(&file_data(2 * MIB, 90_000 + r), 0)?;
        f.sync_all()?;
        for _ in 0..s * 2 {
            let i = rng.below(small);
            let tmp = root.join(format!("small/{i}.tmp"));
            write_file(&tmp, (1 + rng.below(8)) * BLOCK, 70_000 + r)?;
            fs::rename(&tmp, root.join(format!("small/{i}")))?;
        }
        for _ in 0..s {
            let _ = fs::remove_file(root.join(format!("small/{}", rng.below(small))));
        }
        let mut f =
            OpenOptions::new().append(true).open(root.join(format!("big/{}", rng.below(big))))?;
        f.write_all(&file_data(64 * 1024, r))?;
        f.sync_all()?;
    }
    Ok(())
}

fn sync_freeze(mnt: &Path) -> Result<File, Failed> {
    let dir = File::open(mnt)?;
    nix::unistd::syncfs(&dir)?;
    blockdev::fs::freeze(&dir)?;
    Ok(dir)
}

pub fn run(
    cfg: &Config,
    dm: &DeviceMapper,
    a: (&Path, DevId),
    b: (&Path, DevId),
) -> Result<SpaceResult, Failed> {
    let base = dm_name("rb-s-base")?;
    let top = dm_name("rb-s-top")?;
    let log = dm_name("rb-s-log")?;
    let (base_dev, base_node) = linear(dm, &base, a.1, 0, cfg.data)?;
    let (log_dev, log_node) = linear(dm, &log, a.1, cfg.data, cfg.spare)?;
    guest::sh(&format!(
        "mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 {}",
        base_node.display()
    ))?;
    let (_, top_node) = linear(dm, &top, base_dev, 0, cfg.data)?;
    let mnt = Path::new(MNT);
    fs::create_dir_all(mnt)?;
    mount::mount(&top_node, mnt, "ext4", &MountOptions::default())?;

    let big = cfg.data / (5 * MIB) - 3; // ~40 % of the file system in big files (48 at 256 MiB)
    let small = big * 25;
    let mut rng = Rng(0xDA7A_0000);
    populate(mnt, big, small, &mut rng)?;

    // Checkpoint start: free space read after a sync, then `top` suspended (which freezes the
    // file system: a FIFREEZE would make the table swap's own freeze fail with EBUSY), the
    // snapshot armed under base and the log started in top.
    let dir = File::open(mnt)?;
    nix::unistd::syncfs(&dir)?;
    let free: Vec<FreeExtent> = blockdev::fs::free_extents(&dir)?
        .into_iter()
        .map(|(off, len)| FreeExtent { offset: off.get(), len: len.get() })
        .collect();
    drop(dir);
    dm.suspend(DevRef::Name(&top), SuspendMode::Flush)?;
    let stack = SnapStack::create(dm, "rb-s", (a.1, cfg.disk()), (b.1, 0, cfg.disk()), true)?;
    dm.reload(DevRef::Name(&base), &linear_table(stack.origin_dev, 0, cfg.data)?)?;
    let lw = LogWritesParams { device: base_dev, log_device: log_dev };
    dm.load_table(DevRef::Name(&top), &Table::single(sectors(cfg.data), Target::LogWrites(lw))?)?;
    dm.resume(DevRef::Name(&top))?;
    dm.message(DevRef::Name(&top), Sectors::new(0), "mark checkpoint")?;

    workload(mnt, big, small, &mut rng)?;

    let dir = sync_freeze(mnt)?;
    let st = stack.status(dm)?;
    dm.message(DevRef::Name(&top), Sectors::new(0), "mark end")?;
    let lw_status = dm.status(DevRef::Name(&top), blockdev::dm::TableSlot::Active)?;
    blockdev::fs::thaw(&dir)?;
    drop(dir);
    mount::umount(mnt, Default::default())?;
    dm.remove_device(&top)?; // writes the log's final super block
    dm.remove_device(&base)?;
    stack.teardown(dm)?;
    let SnapshotStatus::Active { allocated, metadata, .. } = st else {
        return Err(format!("snapshot status after the workload: {st:?}").into());
    };

    // The trace between the marks.
    let mut reader = LogReader::new(File::open(&log_node)?)?;
    let ss = u64::from(reader.super_block().sector_size);
    let entries = reader.entries()?;
    drop(reader);
    dm.remove_device(&log)?;
    let from = entries.iter().position(|e| e.mark.as_deref() == Some("checkpoint"));
    let to = entries.iter().position(|e| e.mark.as_deref() == Some("end"));
    let (Some(from), Some(to)) = (from, to) else {
        let status = lw_status.first().map(|s| s.text.clone());
        return Err(format!(
            "marks not found in the dm-log-writes log (status {status:?}, log {} MiB)",
            mib(cfg.spare)
        )
        .into());
    };
    let mut trace = Vec::new();
    let mut chunks = BTreeSet::new();
    for e in &entries[from + 1..to] {
        let (offset, len) = (e.sector * ss, e.nr_sectors * ss);
        if len == 0 || !(e.is_data_write() || e.is_discard()) {
            continue;
        }
        trace.push(if e.is_discard() {
            TraceOp::Discard { offset, len }
        } else {
            TraceOp::Write { offset, len }
        });
        chunks.extend(offset / BLOCK..(offset + len).div_ceil(BLOCK));
    }
    let is_free = |blk: u64| {
        let (s, e) = (blk * BLOCK, (blk + 1) * BLOCK);
        free.iter().any(|f| f.offset <= s && e <= f.offset + f.len)
    };
    let written_free = chunks.iter().filter(|&&c| is_free(c)).count() as u64 * BLOCK;
    let bow = dry_run(&DryRunConfig::new(cfg.data), &free, &trace)?;
    if bow.enospc.is_some() {
        return Err(format!("dm-bow dry run ran out of space: {bow:?}").into());
    }
    println!(
        "  trace: {} operations between the marks, {:.1} MiB in {} distinct 4 KiB blocks, \
         free space at checkpoint start {:.1} MiB in {} extents",
        trace.len(),
        mib(chunks.len() as u64 * BLOCK),
        chunks.len(),
        mib(free.iter().map(|f| f.len).sum()),
        free.len()
    );
    Ok(SpaceResult {
        snapshot: allocated.get() * 512,
        snapshot_metadata: metadata.get() * 512,
        chunks: chunks.len() as u64,
        bow,
        written: chunks.len() as u64 * BLOCK,
        written_free,
        ops: trace.len(),
    })
}
