//! The space dry run: how much backup space a write trace would take during a checkpoint.
//!
//! The trace runs through the engine model in [`DataMode::RangesOnly`] over a
//! [`SizeOnlyDevice`]: the range map, the trimmed list, the log bookkeeping (entries, rollovers)
//! and the kernel's `free` counter behave exactly as in the byte-exact model, but no data is
//! read, written or even allocated, so a 64 GiB device costs only its range map (a few nodes per
//! free extent and per write). Checksums are not computed (they do not affect space).
//!
//! The steps are those of a real checkpoint: the free-space map is discarded in state TRIM (as
//! `FITRIM` does before vold writes `1`; pass the extents in the order `FITRIM` issues them,
//! ascending for ext4 and f2fs, because the order decides the trimmed list and so where backups
//! land), then state CHECKPOINT (`prepare_log` takes two blocks), then the trace.
//!
//! What it estimates, and what it cannot: backups and log blocks follow the kernel's algorithm
//! exactly for the given trace, but the trace must be what reaches the block device (after the
//! filesystem's allocator and the page cache), split into bios of at most
//! [`DryRunConfig::max_bio_bytes`]. The block size rounds every I/O outward and every free
//! extent inward; block 0 is never free (a filesystem does not free it, and the kernel would
//! dereference NULL if it were discarded in TRIM).

use crate::model::{
    BlkStatus, BowEngine, BowModel, BowState, DataMode, DiscardAction, EngineError,
    EngineErrorKind, KernelWarning, ModelConfig, Piece, PieceAction, SizeOnlyDevice, WriteAction,
};
use crate::units::{BlockSize, Sectors, SECTOR_SIZE};

/// A free extent of the filesystem, in bytes on the device (e.g. from GETFSMAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FreeExtent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One operation of the trace, in bytes on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TraceOp {
    /// A write of `len` bytes at `offset`.
    Write { offset: u64, len: u64 },
    /// A discard of `len` bytes at `offset` (during the checkpoint: treated as a write by dm-bow).
    Discard { offset: u64, len: u64 },
}

/// Parameters of a dry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DryRunConfig {
    /// Size of the device (the dm-bow target covers it, rounded down to whole blocks).
    pub device_size: u64,
    /// The bow block size.
    pub block_size: BlockSize,
    /// Largest bio the block layer sends; longer trace operations are split (default 512 KiB).
    pub max_bio_bytes: u64,
}

impl DryRunConfig {
    /// A device of `device_size` bytes with 4 KiB blocks and 512 KiB bios.
    pub fn new(device_size: u64) -> DryRunConfig {
        DryRunConfig { device_size, block_size: BlockSize::B4096, max_bio_bytes: 512 * 1024 }
    }
}

/// Where free space ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Enospc {
    /// Entering CHECKPOINT needs two free blocks.
    AtCheckpointStart,
    /// Trace operation `op` (its byte `offset`) failed with ENOSPC; the run stopped there.
    AtOperation { op: usize, offset: u64 },
}

/// What the trace would consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DryRunReport {
    /// Bytes actually free after the free-space map was discarded.
    pub free_at_start: u64,
    /// What the kernel's `free` counter shows at checkpoint start (equal to `free_at_start`).
    pub kernel_free_at_start: u64,
    /// Bytes copied into backups for the trace (log entries other than entry 0 of each log
    /// sector), relocated backups included.
    pub backup_bytes: u64,
    /// Number of such backup entries.
    pub backup_entries: u64,
    /// Bytes of relocations (backups of BACKUP or SECTOR0_CURRENT blocks).
    pub relocation_bytes: u64,
    /// Log sectors written (1 + rollovers); each rollover keeps one block.
    pub log_sectors: u32,
    /// Blocks `prepare_log` takes (SECTOR0_CURRENT and the copy of block 0): 2 once started.
    pub checkpoint_blocks: u32,
    /// Free bytes the filesystem itself wrote into (they stop being free, nothing is copied).
    pub claimed_by_writes: u64,
    /// Free bytes used by dm-bow: backups, saved log sectors, the two blocks of `prepare_log`,
    /// and any backup orphaned by a failed rollover.
    pub consumed_by_bow: u64,
    /// Bytes still free at the end.
    pub free_at_end: u64,
    /// The kernel's `free` counter at the end (over-reports, dm-bow-format.md §2.2).
    pub kernel_free_at_end: u64,
    /// Trace operations applied (all of them unless ENOSPC stopped the run).
    pub ops_applied: usize,
    /// Where free space ran out, if it did.
    pub enospc: Option<Enospc>,
}

/// Why a dry run could not run.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// The model rejected something it should not have (a bug or a trace outside the device).
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
}

/// Runs `trace` against `free` on a device described by `config`.
pub fn dry_run(
    config: &DryRunConfig,
    free: &[FreeExtent],
    trace: &[TraceOp],
) -> Result<DryRunReport, DryRunError> {
    let bs = config.block_size;
    let bsb = u64::from(bs.bytes());
    let model_cfg = ModelConfig { data: DataMode::RangesOnly, ..ModelConfig::new(bs) };
    let mut m = BowModel::new(SizeOnlyDevice::new(config.device_size), model_cfg);
    let dev_bytes = m.len_sectors() * SECTOR_SIZE;

    for e in free {
        // Inward to whole blocks, never block 0, clipped to the device.
        let start = e.offset.div_ceil(bsb).max(1) * bsb;
        let end = (e.offset.saturating_add(e.len) / bsb * bsb).min(dev_bytes);
        if end > start {
            m.discard(Sectors(start / SECTOR_SIZE), end - start)?;
        }
    }
    let mut report = DryRunReport {
        free_at_start: m.true_free_bytes(),
        kernel_free_at_start: m.free_bytes(),
        ..DryRunReport::default()
    };
    match m.set_state(BowState::Checkpoint) {
        Ok(_) => report.checkpoint_blocks = 2,
        Err(e) if e.kind() == EngineErrorKind::NoSpace => {
            report.enospc = Some(Enospc::AtCheckpointStart);
            finish(&m, &mut report, bsb);
            return Ok(report);
        }
        Err(e) => return Err(e.into()),
    }

    let step = config.max_bio_bytes.max(bsb) / bsb * bsb;
    'ops: for (i, op) in trace.iter().enumerate() {
        let (offset, len, write) = match *op {
            TraceOp::Write { offset, len } => (offset, len, true),
            TraceOp::Discard { offset, len } => (offset, len, false),
        };
        // Outward to whole blocks, clipped to the device.
        let start = (offset / bsb * bsb).min(dev_bytes);
        let end = offset.saturating_add(len).div_ceil(bsb).saturating_mul(bsb).min(dev_bytes);
        let mut at = start;
        while at < end {
            let n = step.min(end - at);
            let sector = Sectors(at / SECTOR_SIZE);
            let result = if write {
                m.write_extent(sector, n).map(|w| match w {
                    WriteAction::Checkpointed { pieces, .. } => pieces,
                    _ => Vec::new(),
                })
            } else {
                m.discard(sector, n).map(|d| match d {
                    DiscardAction::Forwarded { pieces } => pieces,
                    DiscardAction::RecordedAsFree => Vec::new(),
                })
            };
            match result {
                Ok(pieces) => count(&pieces, &mut report),
                Err(EngineError::Bio { status: BlkStatus::NoSpace, progress, .. }) => {
                    count(&progress.pieces, &mut report);
                    report.enospc = Some(Enospc::AtOperation { op: i, offset });
                    break 'ops;
                }
                Err(e) => return Err(e.into()),
            }
            at += n;
        }
        report.ops_applied = i + 1;
    }
    finish(&m, &mut report, bsb);
    Ok(report)
}

fn count(pieces: &[Piece], report: &mut DryRunReport) {
    for p in pieces {
        match p.action {
            PieceAction::BackedUp { was, entry, .. } => {
                let bytes = u64::from(entry.size);
                report.backup_bytes += bytes;
                report.backup_entries += 1;
                if was != crate::model::RangeType::Unchanged {
                    report.relocation_bytes += bytes;
                }
            }
            PieceAction::FreeClaimed => report.claimed_by_writes += p.sectors * SECTOR_SIZE,
            PieceAction::AlreadyChanged => {}
        }
    }
}

fn finish(m: &BowModel<SizeOnlyDevice>, report: &mut DryRunReport, bsb: u64) {
    report.log_sectors = m.log_sectors();
    let orphans: u64 = m
        .warnings()
        .iter()
        .map(|w| match *w {
            KernelWarning::OrphanBackup { sectors, .. } => sectors * SECTOR_SIZE,
            _ => 0,
        })
        .sum();
    let rollovers = u64::from(report.log_sectors.saturating_sub(1));
    report.consumed_by_bow =
        report.backup_bytes + orphans + (rollovers + u64::from(report.checkpoint_blocks)) * bsb;
    report.free_at_end = m.true_free_bytes();
    report.kernel_free_at_end = m.free_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn accounting_identity_holds() {
        let cfg = DryRunConfig::new(64 * MIB);
        let free = [FreeExtent { offset: 32 * MIB, len: 16 * MIB }];
        let trace: Vec<TraceOp> = (0..100u64)
            .map(|i| TraceOp::Write { offset: (i * 7919 % 16000) * 4096, len: 8192 })
            .collect();
        let r = dry_run(&cfg, &free, &trace).unwrap();
        assert_eq!(r.free_at_start, 16 * MIB);
        assert_eq!(r.ops_applied, 100);
        assert_eq!(r.enospc, None);
        assert_eq!(r.free_at_start - r.free_at_end, r.consumed_by_bow + r.claimed_by_writes);
        assert!(r.backup_bytes > 0);
        assert!(r.kernel_free_at_end >= r.free_at_end);
    }

    #[test]
    fn enospc_is_reported_with_the_operation() {
        let cfg = DryRunConfig::new(16 * MIB);
        let free = [FreeExtent { offset: 15 * MIB, len: MIB }];
        let trace = vec![TraceOp::Write { offset: 4096, len: 2 * MIB }];
        let r = dry_run(&cfg, &free, &trace).unwrap();
        assert_eq!(r.enospc, Some(Enospc::AtOperation { op: 0, offset: 4096 }));
        assert_eq!(r.ops_applied, 0);
        assert_eq!(r.free_at_end, 0);
        // 256 blocks free: 2 for prepare_log, the rest backups (and rollover blocks).
        assert_eq!(r.consumed_by_bow, MIB);
    }

    #[test]
    fn no_free_space_fails_at_checkpoint_start() {
        let r = dry_run(&DryRunConfig::new(MIB), &[], &[]).unwrap();
        assert_eq!(r.enospc, Some(Enospc::AtCheckpointStart));
    }

    #[test]
    fn sixty_four_gib_device_one_gib_trace_without_allocating_it() {
        let cfg = DryRunConfig::new(64 * GIB);
        // 4096 free extents of 4 MiB spread over the device (16 GiB free).
        let free: Vec<FreeExtent> = (0..4096u64)
            .map(|i| FreeExtent { offset: i * 16 * MIB + 8 * MIB, len: 4 * MIB })
            .collect();
        // 1 GiB of 64 KiB writes scattered over used and free space.
        let trace: Vec<TraceOp> = (0..16_384u64)
            .map(|i| TraceOp::Write {
                offset: (i * 2_654_435_761 % (64 * GIB / 65_536)) * 65_536,
                len: 65_536,
            })
            .collect();
        let r = dry_run(&cfg, &free, &trace).unwrap();
        assert_eq!(r.ops_applied, 16_384);
        assert_eq!(r.free_at_start, 16 * GIB);
        assert_eq!(r.enospc, None);
        assert!(r.backup_bytes > 512 * MIB && r.backup_bytes <= GIB, "{r:?}");
        assert!(r.log_sectors > 1);
        assert_eq!(r.free_at_start - r.free_at_end, r.consumed_by_bow + r.claimed_by_writes);
    }

    /// The ranges-only mode the dry run uses makes the same decisions as the byte-exact model.
    #[test]
    fn ranges_only_mode_matches_the_full_model() {
        use crate::device::MemDevice;
        let bs = BlockSize::B512;
        let blocks = 256u64;
        let mut full = BowModel::new(MemDevice::new(512 * 256), ModelConfig::new(bs));
        let ro_cfg = ModelConfig { data: DataMode::RangesOnly, ..ModelConfig::new(bs) };
        let mut ro = BowModel::new(SizeOnlyDevice::new(512 * 256), ro_cfg);
        let mut x = 0x1234_5678_u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..20 {
            let (b, n) = (1 + next(blocks - 9), 1 + next(8));
            full.discard(Sectors(b), n * 512).unwrap();
            ro.discard(Sectors(b), n * 512).unwrap();
        }
        assert_eq!(
            full.set_state(BowState::Checkpoint).is_ok(),
            ro.set_state(BowState::Checkpoint).is_ok()
        );
        for _ in 0..150 {
            let (b, n) = (next(blocks - 8), 1 + next(8));
            let f = full.write(Sectors(b), &vec![7u8; usize::try_from(n).unwrap() * 512]);
            let r = ro.write_extent(Sectors(b), n * 512);
            assert_eq!(f.is_ok(), r.is_ok());
            assert_eq!(full.ranges(), ro.ranges());
            assert_eq!(full.trimmed_list(), ro.trimmed_list());
            assert_eq!(full.free_bytes(), ro.free_bytes());
        }
        let strip = |m: &[crate::model::LoggedEntry]| -> Vec<(u32, u32, u64, u64, u32)> {
            m.iter()
                .map(|l| (l.sequence, l.index, l.entry.source.0, l.entry.dest.0, l.entry.size))
                .collect()
        };
        assert_eq!(strip(full.log_history()), strip(ro.log_history()));
        assert!(full.log_sectors() > 1, "the run should roll the log over");
        assert_eq!(full.io_stats().bufio_write_blocks, ro.io_stats().bufio_write_blocks);
        assert_eq!(full.io_stats().flushes, ro.io_stats().flushes);
    }

    /// 256 MiB of scattered 4 KiB writes (65 536 bios, each its own entry) on a 64 GiB device:
    /// about 1.5 s in a debug build, linear in the number of bios.
    #[test]
    fn scattered_4k_writes_on_a_large_device() {
        let cfg = DryRunConfig::new(64 * GIB);
        let free: Vec<FreeExtent> = (0..1024u64)
            .map(|i| FreeExtent { offset: i * 64 * MIB + 32 * MIB, len: 16 * MIB })
            .collect();
        let blocks = 64 * GIB / 4096;
        let trace: Vec<TraceOp> = (0..65_536u64)
            .map(|i| TraceOp::Write { offset: (i * 2_654_435_761 % blocks) * 4096, len: 4096 })
            .collect();
        let r = dry_run(&cfg, &free, &trace).unwrap();
        assert_eq!(r.free_at_start, 16 * GIB);
        assert_eq!(r.ops_applied, trace.len());
        // Each write is one block: backed up (one entry) if it hits used space.
        assert_eq!(r.backup_bytes, r.backup_entries * 4096);
        assert_eq!(r.free_at_start - r.free_at_end, r.consumed_by_bow + r.claimed_by_writes);
        assert!(u64::from(r.log_sectors) >= r.backup_entries / 169);
    }
}
