//! Part 3: backup space of the same block trace, dm-snapshot against the dm-bow engine model.
//! Two kinds of trace, each captured once through this stack:
//!
//! ```text
//! before the checkpoint:  [ext4] ── top: linear ── base: linear(disk a)
//! at checkpoint start:    [ext4] ── top: log-writes(base, log) ── base: linear
//!                           ── snapshot-origin(disk a) + snapshot(COW: all of disk b)
//! ```
//!
//! (tables swapped while the top device is suspended; the log is a dm-linear over disk a's
//! spare area)
//!
//! * **ext4 at a fill level**: ext4 populated to about that fill, then a workload (new files in
//!   free space, in-place rewrites, replaced and deleted files, the same at every level);
//! * **raw, half in free space** (the seed's claim, dm-bow-format.md §11): no file system; the
//!   lower half of the data area counts as in use, the upper half as free; 64 KiB writes, half
//!   into each half, either all used-space writes first or alternating.
//!
//! so one run gives both numbers per trace: dm-snapshot's real COW usage (its status) and the
//! block trace (dm-log-writes, between the marks `checkpoint` and `end`), which is then replayed
//! through the dm-bow engine model (`bow::dryrun`) from the free space at checkpoint start
//! (GETFSMAP for ext4, the declared upper half for raw).

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

/// Which trace to capture.
#[derive(Debug, Clone, Copy)]
pub enum Trace {
    /// ext4 populated to about `fill_percent` of the data area, then the workload.
    Ext4 { fill_percent: u64 },
    /// Raw 64 KiB writes, half into space in use, half into free space; `interleaved`:
    /// alternating, else every used-space write first.
    Raw { interleaved: bool },
}

impl Trace {
    pub fn name(&self) -> String {
        match self {
            Trace::Ext4 { fill_percent } => format!("ext4, populated for {fill_percent} %"),
            Trace::Raw { interleaved: false } => "raw, half free: used-space writes first".into(),
            Trace::Raw { interleaved: true } => "raw, half free: interleaved".into(),
        }
    }
}

/// What the two backends need for the trace.
#[derive(Debug)]
pub struct SpaceResult {
    pub name: String,
    /// Fraction of the data area in use at checkpoint start (from the free-space map).
    pub fill: f64,
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
    println!("  populating: {big} files of 2 MiB, {small} small files");
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
fn workload(root: &Path, s: u64, big: u64, small: u64, rng: &mut Rng) -> Result<(), Failed> {
    const ROUNDS: u64 = 8;
    fs::create_dir_all(root.join("new"))?;
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
    kind: Trace,
) -> Result<SpaceResult, Failed> {
    let base = dm_name("rb-s-base")?;
    let top = dm_name("rb-s-top")?;
    let log = dm_name("rb-s-log")?;
    let (base_dev, base_node) = linear(dm, &base, a.1, 0, cfg.data)?;
    let (log_dev, log_node) = linear(dm, &log, a.1, cfg.data, cfg.spare)?;
    let mnt = Path::new(MNT);
    // The workload's scale (12 at 256 MiB), the same at every fill level.
    let scale = ((cfg.data / (5 * MIB)).saturating_sub(3) / 4).max(1);
    let small = scale * 100;
    let mut rng = Rng(0xDA7A_0000);
    let (top_node, free, big) = match kind {
        Trace::Ext4 { fill_percent } => {
            guest::sh(&format!(
                "mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 {}",
                base_node.display()
            ))?;
            let (_, top_node) = linear(dm, &top, base_dev, 0, cfg.data)?;
            fs::create_dir_all(mnt)?;
            mount::mount(&top_node, mnt, "ext4", &MountOptions::default())?;
            // Small files average ~18 KiB; the journal and inode tables take ~10 MiB. The fill
            // really reached (in the results) comes out ~10 points higher: file systems
            // round up.
            let target = cfg.data / 100 * fill_percent;
            let big = (target.saturating_sub(small * 18 * 1024 + 10 * MIB) / (2 * MIB)).max(scale);
            populate(mnt, big, small, &mut rng)?;
            // Checkpoint start: free space read after a sync, then `top` suspended (which
            // freezes the file system: a FIFREEZE would make the table swap's own freeze fail
            // with EBUSY), the snapshot armed under base and the log started in top.
            let dir = File::open(mnt)?;
            nix::unistd::syncfs(&dir)?;
            let free: Vec<FreeExtent> = blockdev::fs::free_extents(&dir)?
                .into_iter()
                .map(|(off, len)| FreeExtent { offset: off.get(), len: len.get() })
                .collect();
            (top_node, free, big)
        }
        Trace::Raw { .. } => {
            let (_, top_node) = linear(dm, &top, base_dev, 0, cfg.data)?;
            (top_node, vec![FreeExtent { offset: cfg.data / 2, len: cfg.data / 2 }], 0)
        }
    };
    let free_bytes: u64 = free.iter().map(|f| f.len).sum();
    dm.suspend(DevRef::Name(&top), SuspendMode::Flush)?;
    let stack = SnapStack::create(dm, "rb-s", (a.1, cfg.disk()), (b.1, 0, cfg.disk()), true)?;
    dm.reload(DevRef::Name(&base), &linear_table(stack.origin_dev, 0, cfg.data)?)?;
    let lw = LogWritesParams { device: base_dev, log_device: log_dev };
    dm.load_table(DevRef::Name(&top), &Table::single(sectors(cfg.data), Target::LogWrites(lw))?)?;
    dm.resume(DevRef::Name(&top))?;
    dm.message(DevRef::Name(&top), Sectors::new(0), "mark checkpoint")?;

    let (st, lw_status) = match kind {
        Trace::Ext4 { .. } => {
            workload(mnt, scale, big, small, &mut rng)?;
            let dir = sync_freeze(mnt)?;
            let st = stack.status(dm)?;
            dm.message(DevRef::Name(&top), Sectors::new(0), "mark end")?;
            let lw_status = dm.status(DevRef::Name(&top), blockdev::dm::TableSlot::Active)?;
            blockdev::fs::thaw(&dir)?;
            drop(dir);
            mount::umount(mnt, Default::default())?;
            (st, lw_status)
        }
        Trace::Raw { interleaved } => {
            const IO: u64 = 64 * 1024;
            let half = cfg.data / 2;
            let n = (cfg.changed / 2 / IO).max(1);
            // In use: past the first MiB of the lower half; free: the upper half.
            let used: Vec<(u64, u64)> = rng
                .distinct((half - MIB) / IO, n)
                .into_iter()
                .map(|s| (MIB + s * IO, IO))
                .collect();
            let free_w: Vec<(u64, u64)> =
                rng.distinct(half / IO, n).into_iter().map(|s| (half + s * IO, IO)).collect();
            let ops: Vec<(u64, u64)> = if interleaved {
                used.iter().zip(&free_w).flat_map(|(u, f)| [*u, *f]).collect()
            } else {
                used.iter().chain(&free_w).copied().collect()
            };
            // One writer keeps the order.
            crate::common::write_ranges(&top_node, &ops, None, 1)?;
            let st = stack.status(dm)?;
            dm.message(DevRef::Name(&top), Sectors::new(0), "mark end")?;
            let lw_status = dm.status(DevRef::Name(&top), blockdev::dm::TableSlot::Active)?;
            (st, lw_status)
        }
    };
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
    // Running out of free space is a result (dm-bow's backups live in /data's free space,
    // dm-snapshot's on another device), reported, not an error.
    let bow = dry_run(&DryRunConfig::new(cfg.data), &free, &trace)?;
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
        name: kind.name(),
        fill: 1.0 - free_bytes as f64 / cfg.data as f64,
        snapshot: allocated.get() * 512,
        snapshot_metadata: metadata.get() * 512,
        chunks: chunks.len() as u64,
        bow,
        written: chunks.len() as u64 * BLOCK,
        written_free,
        ops: trace.len(),
    })
}
