//! The estimator: how much backup space the next checkpoint will need, per backend, and
//! from what (docs/estimate.md, "The method").
//!
//! Bases, best first: a write **trace** of a comparable boot (exact for the trace: dm-bow's
//! algorithm replayed through the model, dm-snapshot's chunk accounting, f2fs's out-of-place
//! writes); else the device's **history** and the update's **declared** sizes; else a
//! **default** share of the space in use. One margin, the same for every workload, is added
//! on top.

use std::fmt;
use std::str::FromStr;

use bow::dryrun::{self, DryRunConfig, DryRunReport, TraceOp};
use bow::units::{BlockSize, SECTOR_SIZE};
use snapcow::format::ChunkSize;

use crate::error::EstimateError;
use crate::trace::{Record, Trace};

pub use bow::dryrun::FreeExtent;

const MIB: u64 = 1 << 20;

/// The checkpoint backend the estimate is for (`policy::Backend::name` of the backends crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// dm-bow: in-use blocks are backed up into free space on first write.
    Bow,
    /// dm-snapshot: every chunk written is saved in a COW store (a file on the filesystem).
    Snapshot,
    /// f2fs `checkpoint=disable`: nothing overwritten is freed until commit.
    F2fs,
}

impl Backend {
    /// The backend's stable name: `"bow"`, `"snapshot"` or `"f2fs"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Bow => "bow",
            Backend::Snapshot => "snapshot",
            Backend::F2fs => "f2fs",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        [Backend::Bow, Backend::Snapshot, Backend::F2fs]
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?} (bow, snapshot or f2fs)"))
    }
}

/// The filesystem's free space now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreeSpace {
    /// Free extents in bytes on the device (GETFSMAP on ext4), in any order: they are taken in
    /// ascending order, the order FITRIM discards them in before dm-bow is armed.
    Map(Vec<FreeExtent>),
    /// Only a count of free bytes (statvfs `f_bavail × f_frsize`: f2fs and others). With f2fs
    /// mounted `checkpoint=disable` this already excludes the blocks f2fs cannot reuse.
    Bytes(u64),
}

/// One past checkpoint on this device, as the state store records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PastCheckpoint {
    /// The backend that ran it.
    pub backend: Backend,
    /// The device's size then.
    pub device_size: u64,
    /// Backup space it really consumed (bytes).
    pub actual_bytes: u64,
    /// What was estimated before it, if anything (`needed_bytes`); kept for the learning
    /// report, not used by the method.
    pub estimated_bytes: Option<u64>,
}

/// What the estimate is made from.
#[derive(Debug, Clone, Copy)]
pub struct EstimateInput<'a> {
    /// The backend that will run the checkpoint.
    pub backend: Backend,
    /// Size of the device in bytes (a multiple of `block_size`).
    pub device_size: u64,
    /// Block size in bytes: dm-bow's block size for `bow` (512 to 4096), the filesystem's block
    /// size otherwise (512 to 65536).
    pub block_size: u32,
    /// The free space now.
    pub free: &'a FreeSpace,
    /// Past checkpoints on this device (any backend, any order).
    pub history: &'a [PastCheckpoint],
    /// The expected writes of this update, if known (captured on this device's size).
    pub trace: Option<&'a Trace>,
    /// Sizes of the files the update declares it will rewrite, in bytes.
    pub declared_bytes: &'a [u64],
}

/// The safety margin: `percent` of the predicted bytes, plus `floor_bytes` when the prediction
/// rests on no trace; the same for every workload (docs/estimate.md, "The margin").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Margin {
    /// Share of the prediction, percent (0 to 100).
    pub percent: u32,
    /// Fixed bytes added to a prediction without a trace (history, declared sizes, default).
    pub floor_bytes: u64,
}

/// The method's parameters. [`EstimateConfig::default`] holds the documented values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimateConfig {
    /// The snapshot backend's chunk size in bytes (its `chunk_kib` option, default 4 KiB).
    pub snapshot_chunk_bytes: u64,
    /// Largest bio the block layer sends; longer trace records are split (dm-bow's dry run).
    pub max_bio_bytes: u64,
    /// The margin.
    pub margin: Margin,
    /// Free space that must remain on top (the daemon passes `monitor.action_free_bytes`,
    /// under which its health monitor ends the checkpoint).
    pub headroom_bytes: u64,
    /// Which percentile of past actuals the history basis takes (1 to 100).
    pub history_percentile: u32,
    /// Filesystem writes (metadata, journal) added to declared sizes, percent (0 to 100).
    pub declared_overhead_percent: u32,
    /// With neither trace, history nor declared sizes: this percent of the bytes in use is
    /// taken as the update's rewrites (1 to 100).
    pub default_used_percent: u32,
}

impl Default for EstimateConfig {
    fn default() -> Self {
        EstimateConfig {
            snapshot_chunk_bytes: 4096,
            max_bio_bytes: 512 * 1024,
            margin: Margin { percent: 10, floor_bytes: 8 * MIB },
            headroom_bytes: 0,
            history_percentile: 90,
            declared_overhead_percent: 10,
            default_used_percent: 10,
        }
    }
}

impl EstimateConfig {
    /// Checks every parameter; the error names it.
    pub fn validate(&self) -> Result<(), EstimateError> {
        let chunk_ok = self.snapshot_chunk_bytes % SECTOR_SIZE == 0
            && u32::try_from(self.snapshot_chunk_bytes / SECTOR_SIZE)
                .ok()
                .and_then(ChunkSize::from_sectors)
                .is_some();
        if !chunk_ok {
            return Err(EstimateError::invalid(
                "snapshot_chunk_bytes",
                self.snapshot_chunk_bytes,
                "a power of two from 512 bytes to 1 GiB",
            ));
        }
        if self.max_bio_bytes < SECTOR_SIZE || self.max_bio_bytes % SECTOR_SIZE != 0 {
            return Err(EstimateError::invalid(
                "max_bio_bytes",
                self.max_bio_bytes,
                "a non-zero multiple of 512",
            ));
        }
        let percents = [
            ("margin.percent", self.margin.percent, 0),
            ("history_percentile", self.history_percentile, 1),
            ("declared_overhead_percent", self.declared_overhead_percent, 0),
            ("default_used_percent", self.default_used_percent, 1),
        ];
        for (what, value, min) in percents {
            if !(min..=100).contains(&value) {
                let why = if min == 0 { "0 to 100" } else { "1 to 100" };
                return Err(EstimateError::invalid(what, value.into(), why));
            }
        }
        Ok(())
    }
}

/// What the prediction rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// A write trace replayed through the backend's method.
    Trace,
    /// A percentile of this device's past checkpoints.
    History,
    /// The update's declared sizes.
    Declared,
    /// The larger of history and declared sizes.
    HistoryAndDeclared,
    /// The default share of the space in use.
    Default,
}

/// Where the needed bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Breakdown {
    /// Saved data: dm-bow backups (re-backups included), dm-snapshot data chunks, f2fs blocks
    /// written out of place. From history: the whole past actual.
    pub data_bytes: u64,
    /// dm-bow's log (saved log sectors and the two blocks of `prepare_log`), dm-snapshot's
    /// header and exception areas; 0 for f2fs.
    pub overhead_bytes: u64,
    /// The margin.
    pub margin_bytes: u64,
    /// The configured headroom.
    pub headroom_bytes: u64,
}

/// What the dm-bow dry run saw (trace basis, free map known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BowDetail {
    /// Backup entries in the log.
    pub backup_entries: u64,
    /// Bytes of backups that were copies of earlier backups the filesystem overwrote.
    pub relocation_bytes: u64,
    /// Log sectors written (1 + rollovers).
    pub log_sectors: u32,
    /// Trace record at which the real free space runs out, if it does (the estimate then
    /// continues in modelled extra space, so `needed_bytes` still covers the whole trace).
    pub enospc_at_record: Option<usize>,
    /// Whether free space runs out before the checkpoint can even start (two blocks needed).
    pub enospc_at_start: bool,
}

/// The estimate (mirrored by the AIDL parcelable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Estimate {
    /// The backend.
    pub backend: Backend,
    /// What the prediction rests on.
    pub basis: Basis,
    /// The prediction before margin and headroom: `data_bytes + overhead_bytes`. The accuracy
    /// benchmark compares this with the actual consumption.
    pub predicted_bytes: u64,
    /// Backup space to have free: prediction + margin + headroom.
    pub needed_bytes: u64,
    /// Free space now (for `bow` with a free map: whole free blocks, block 0 excluded).
    pub free_bytes: u64,
    /// Free space the update's own new data takes besides the backups (writes into free
    /// blocks), when the trace and the free map tell: dm-bow and dm-snapshot take their backups
    /// from the same free space. `None` when unknown; f2fs counts it in `data_bytes`.
    pub new_data_bytes: Option<u64>,
    /// How much more must be freed: `needed + new data − free`, at least 0.
    pub shortfall_bytes: u64,
    /// Where the needed bytes go.
    pub breakdown: Breakdown,
    /// Past checkpoints used (same backend, same device size).
    pub history_samples: u32,
    /// The dm-bow dry run's details, for a trace with a free map.
    pub bow: Option<BowDetail>,
}

/// The prediction of one basis, before the margin.
#[derive(Debug, Clone, Copy, Default)]
struct Prediction {
    data: u64,
    overhead: u64,
    free: Option<u64>,
    new_data: Option<u64>,
    bow: Option<BowDetail>,
}

impl Prediction {
    fn total(&self) -> u64 {
        self.data.saturating_add(self.overhead)
    }
}

/// Estimates the backup space the checkpoint will need. Bad input (a trace of another device
/// size, extents outside the device, absurd sizes, a bad configuration) is refused.
pub fn estimate(
    input: &EstimateInput<'_>,
    config: &EstimateConfig,
) -> Result<Estimate, EstimateError> {
    config.validate()?;
    let geometry = Geometry::check(input)?;
    let (free_map, free_total) = match input.free {
        FreeSpace::Map(extents) => {
            let map = geometry.free_map(extents)?;
            let total = geometry.usable_free(&map, input.backend);
            (Some(map), total)
        }
        FreeSpace::Bytes(n) => {
            if *n > input.device_size {
                return Err(EstimateError::invalid("free bytes", *n, "more than the device holds"));
            }
            (None, *n)
        }
    };
    let declared = declared_total(input)?;
    let history = history_samples(input)?;

    let (basis, p) = if let Some(trace) = input.trace {
        trace.check_device(input.device_size)?;
        (Basis::Trace, from_trace(input.backend, &geometry, trace, free_map.as_deref(), config)?)
    } else {
        let from_history = percentile(&history, config.history_percentile)
            .map(|bytes| Prediction { data: bytes, ..Prediction::default() });
        let from_declared = (!input.declared_bytes.is_empty()).then(|| {
            let with_fs = add_percent(declared, config.declared_overhead_percent);
            from_rewrite_bytes(input.backend, &geometry, with_fs, config)
        });
        match (from_history, from_declared) {
            (Some(h), Some(d)) => {
                (Basis::HistoryAndDeclared, if h.total() >= d.total() { h } else { d })
            }
            (Some(h), None) => (Basis::History, h),
            (None, Some(d)) => (Basis::Declared, d),
            (None, None) => {
                let used = input.device_size.saturating_sub(free_total);
                let rewrites = mul_percent_ceil(used, config.default_used_percent);
                let with_fs = add_percent(rewrites, config.declared_overhead_percent);
                (Basis::Default, from_rewrite_bytes(input.backend, &geometry, with_fs, config))
            }
        }
    };

    let predicted = p.total();
    // The floor stands for writes a prediction without a trace cannot see (journal commits,
    // superblock and bitmap updates, logs before the update starts); a trace of a comparable
    // boot holds them, and on a small update the floor alone would ask for far too much
    // (the accuracy benchmark: docs/benchmarks.md, "Estimator accuracy").
    let floor = if basis == Basis::Trace { 0 } else { config.margin.floor_bytes };
    let margin = mul_percent_ceil(predicted, config.margin.percent).saturating_add(floor);
    let needed = predicted.saturating_add(margin).saturating_add(config.headroom_bytes);
    let free = p.free.unwrap_or(free_total);
    let demand = needed.saturating_add(p.new_data.unwrap_or(0));
    Ok(Estimate {
        backend: input.backend,
        basis,
        predicted_bytes: predicted,
        needed_bytes: needed,
        free_bytes: free,
        new_data_bytes: p.new_data,
        shortfall_bytes: demand.saturating_sub(free),
        breakdown: Breakdown {
            data_bytes: p.data,
            overhead_bytes: p.overhead,
            margin_bytes: margin,
            headroom_bytes: config.headroom_bytes,
        },
        history_samples: u32::try_from(history.len()).unwrap_or(u32::MAX),
        bow: p.bow,
    })
}

/// The device's sizes, checked.
struct Geometry {
    device_size: u64,
    block: u64,
    bow_block: Option<BlockSize>,
}

impl Geometry {
    fn check(input: &EstimateInput<'_>) -> Result<Geometry, EstimateError> {
        let bs = input.block_size;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(EstimateError::invalid(
                "block size",
                bs.into(),
                "a power of two from 512 to 65536",
            ));
        }
        let bow_block = BlockSize::new(bs);
        if input.backend == Backend::Bow && bow_block.is_none() {
            return Err(EstimateError::invalid(
                "block size",
                bs.into(),
                "dm-bow takes a power of two from 512 to 4096",
            ));
        }
        let block = u64::from(bs);
        if input.device_size == 0 || input.device_size % block != 0 {
            return Err(EstimateError::invalid(
                "device size",
                input.device_size,
                "a non-zero multiple of the block size",
            ));
        }
        Ok(Geometry { device_size: input.device_size, block, bow_block })
    }

    /// Whole free blocks of a merged map; dm-bow never uses block 0 (as its dry run counts).
    fn usable_free(&self, map: &[(u64, u64)], backend: Backend) -> u64 {
        let blocks = inward(map, self.block);
        let block0 = if backend == Backend::Bow {
            intersection_bytes(&blocks, &[(0, self.block)])
        } else {
            0
        };
        intervals_bytes(&blocks) - block0
    }

    /// The free extents sorted, merged and checked to lie inside the device.
    fn free_map(&self, extents: &[FreeExtent]) -> Result<Vec<(u64, u64)>, EstimateError> {
        let mut spans = Vec::with_capacity(extents.len());
        for e in extents {
            let end = e.offset.checked_add(e.len).filter(|&end| end <= self.device_size);
            match end {
                Some(end) if e.len > 0 => spans.push((e.offset, end)),
                Some(_) => {}
                None => {
                    return Err(EstimateError::invalid(
                        "free extent offset",
                        e.offset,
                        "the extent does not lie inside the device",
                    ))
                }
            }
        }
        Ok(merge(spans))
    }
}

fn declared_total(input: &EstimateInput<'_>) -> Result<u64, EstimateError> {
    let mut total = 0u64;
    for &b in input.declared_bytes {
        total = total.checked_add(b).filter(|&t| t <= input.device_size).ok_or(
            EstimateError::invalid(
                "declared bytes",
                b,
                "the declared files add up to more than the device holds",
            ),
        )?;
    }
    Ok(total)
}

/// Past actuals of the same backend on a device of the same size (a resized device is another
/// filesystem: its history says little). An actual larger than its device is refused.
fn history_samples(input: &EstimateInput<'_>) -> Result<Vec<u64>, EstimateError> {
    let mut samples = Vec::new();
    for past in input.history {
        if past.actual_bytes > past.device_size {
            return Err(EstimateError::invalid(
                "history actual bytes",
                past.actual_bytes,
                "more than the device it was recorded on holds",
            ));
        }
        if past.backend == input.backend && past.device_size == input.device_size {
            samples.push(past.actual_bytes);
        }
    }
    Ok(samples)
}

/// The nearest-rank percentile: the smallest sample with at least `p`% of the samples at or
/// below it (with fewer than 100/(100−p) samples, the largest).
fn percentile(samples: &[u64], p: u32) -> Option<u64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = u64::try_from(sorted.len()).ok()?;
    let rank = (n * u64::from(p)).div_ceil(100).max(1);
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

fn mul_percent_ceil(bytes: u64, percent: u32) -> u64 {
    let v = (u128::from(bytes) * u128::from(percent)).div_ceil(100);
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn add_percent(bytes: u64, percent: u32) -> u64 {
    bytes.saturating_add(mul_percent_ceil(bytes, percent))
}

/// dm-bow log blocks for `entries` backups, at most one entry per block (a bound): the two
/// blocks of `prepare_log` and one saved log sector per rollover.
fn bow_log_blocks(entries: u64, bs: BlockSize) -> u64 {
    let per_sector = u64::from(bs.max_entries()) - 1;
    2 + entries.div_ceil(per_sector).saturating_sub(1)
}

/// dm-snapshot's store for `chunks` data chunks: (data, header + exception areas), as the
/// kernel allocates it (`persistent_prepare_exception`: data chunks from 2 on, skipping an area
/// every `C/16` chunks; a full area makes the next one).
pub fn snapshot_store_bytes(chunks: u64, chunk_bytes: u64) -> (u64, u64) {
    let per_area = chunk_bytes / 16;
    let areas = chunks / per_area + 1;
    (chunks.saturating_mul(chunk_bytes), (1 + areas).saturating_mul(chunk_bytes))
}

/// A prediction for `bytes` of rewrites with no trace: every block in use (dm-bow: one backup
/// each, one entry each), every chunk distinct (dm-snapshot), every block out of place (f2fs).
fn from_rewrite_bytes(
    backend: Backend,
    g: &Geometry,
    bytes: u64,
    config: &EstimateConfig,
) -> Prediction {
    match backend {
        Backend::Bow => {
            let bs = g.bow_block.unwrap_or(BlockSize::B4096);
            let bsb = u64::from(bs.bytes());
            let blocks = bytes.div_ceil(bsb);
            Prediction {
                data: blocks.saturating_mul(bsb),
                overhead: bow_log_blocks(blocks, bs).saturating_mul(bsb),
                ..Prediction::default()
            }
        }
        Backend::Snapshot => {
            let c = config.snapshot_chunk_bytes;
            let (data, overhead) = snapshot_store_bytes(bytes.div_ceil(c), c);
            Prediction { data, overhead, ..Prediction::default() }
        }
        Backend::F2fs => Prediction {
            data: bytes.div_ceil(g.block).saturating_mul(g.block),
            ..Prediction::default()
        },
    }
}

fn from_trace(
    backend: Backend,
    g: &Geometry,
    trace: &Trace,
    free_map: Option<&[(u64, u64)]>,
    config: &EstimateConfig,
) -> Result<Prediction, EstimateError> {
    let writes = || {
        trace.records().iter().filter_map(|r| match *r {
            Record::Write { start, len, .. } => Some((start.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE)),
            _ => None,
        })
    };
    match (backend, free_map) {
        (Backend::Bow, Some(map)) => bow_dry_run(g, trace, map, config),
        (Backend::Bow, None) => {
            // No map: every block written or discarded is taken to be in use (an upper bound
            // but for relocations, which need the map).
            let bs = g.bow_block.unwrap_or(BlockSize::B4096);
            let bsb = u64::from(bs.bytes());
            let touched = merge(
                trace
                    .records()
                    .iter()
                    .filter_map(Record::extent)
                    .map(|(s, l)| outward(s.0 * SECTOR_SIZE, l.0 * SECTOR_SIZE, bsb))
                    .collect(),
            );
            let blocks = intervals_bytes(&touched) / bsb;
            Ok(Prediction {
                data: blocks * bsb,
                overhead: bow_log_blocks(blocks, bs) * bsb,
                ..Prediction::default()
            })
        }
        (Backend::Snapshot, _) => {
            // snapshot-origin takes no discards (its constructor sets no discard bios), and every
            // chunk a write touches is saved once, whole.
            let c = config.snapshot_chunk_bytes;
            let chunks = merge(writes().map(|(o, l)| outward(o, l, c)).collect());
            let (data, overhead) = snapshot_store_bytes(intervals_bytes(&chunks) / c, c);
            let new_data = free_map.map(|map| {
                let blocks = merge(writes().map(|(o, l)| outward(o, l, g.block)).collect());
                intersection_bytes(&blocks, &inward(map, g.block))
            });
            Ok(Prediction { data, overhead, new_data, ..Prediction::default() })
        }
        (Backend::F2fs, _) => {
            // With checkpoints disabled, f2fs writes checkpointed data out of place and reuses
            // no block freed since: every distinct block written takes a free block until
            // commit. Without a map the fixed-location metadata writes count too (a bound).
            let blocks = merge(writes().map(|(o, l)| outward(o, l, g.block)).collect());
            let data = match free_map {
                Some(map) => intersection_bytes(&blocks, &inward(map, g.block)),
                None => intervals_bytes(&blocks),
            };
            Ok(Prediction { data, ..Prediction::default() })
        }
    }
}

/// dm-bow: the trace through the engine model against the real free map. If the real space
/// runs out, the run is repeated with modelled extra space beyond the device's end, discarded
/// first so it sits at the tail of dm-bow's free list and is used only once the real space is
/// gone: the first run says where it runs out, the second how much the whole trace needs.
fn bow_dry_run(
    g: &Geometry,
    trace: &Trace,
    map: &[(u64, u64)],
    config: &EstimateConfig,
) -> Result<Prediction, EstimateError> {
    let bs = g.bow_block.unwrap_or(BlockSize::B4096);
    let bsb = u64::from(bs.bytes());
    let ops: Vec<TraceOp> = trace
        .records()
        .iter()
        .filter_map(|r| match *r {
            Record::Write { start, len, .. } => {
                Some(TraceOp::Write { offset: start.0 * SECTOR_SIZE, len: len.0 * SECTOR_SIZE })
            }
            Record::Discard { start, len } => {
                Some(TraceOp::Discard { offset: start.0 * SECTOR_SIZE, len: len.0 * SECTOR_SIZE })
            }
            Record::Flush => None,
        })
        .collect();
    // Record indexes of the ops (flushes are not ops), to report ENOSPC by record.
    let record_of_op: Vec<usize> = trace
        .records()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.extent().is_some())
        .map(|(i, _)| i)
        .collect();
    let extents: Vec<FreeExtent> =
        map.iter().map(|&(s, e)| FreeExtent { offset: s, len: e - s }).collect();
    let cfg = DryRunConfig {
        device_size: g.device_size,
        block_size: bs,
        max_bio_bytes: config.max_bio_bytes,
    };
    let real = dryrun::dry_run(&cfg, &extents, &ops)?;
    let mut detail = BowDetail {
        backup_entries: real.backup_entries,
        relocation_bytes: real.relocation_bytes,
        log_sectors: real.log_sectors,
        enospc_at_record: None,
        enospc_at_start: false,
    };
    let full = match real.enospc {
        None => real,
        Some(at) => {
            match at {
                dryrun::Enospc::AtCheckpointStart => detail.enospc_at_start = true,
                dryrun::Enospc::AtOperation { op, .. } => {
                    detail.enospc_at_record = record_of_op.get(op).copied();
                }
            }
            let full = with_extra_space(&cfg, &extents, &ops, bsb)?;
            detail.backup_entries = full.backup_entries;
            detail.relocation_bytes = full.relocation_bytes;
            detail.log_sectors = full.log_sectors;
            full
        }
    };
    Ok(Prediction {
        data: full.backup_bytes,
        overhead: full.consumed_by_bow - full.backup_bytes,
        free: Some(real.free_at_start),
        new_data: Some(full.claimed_by_writes),
        bow: Some(detail),
    })
}

fn with_extra_space(
    cfg: &DryRunConfig,
    extents: &[FreeExtent],
    ops: &[TraceOp],
    bsb: u64,
) -> Result<DryRunReport, EstimateError> {
    let io: u64 = ops
        .iter()
        .map(|op| match *op {
            TraceOp::Write { len, .. } | TraceOp::Discard { len, .. } => len.div_ceil(bsb) + 1,
        })
        .fold(0u64, u64::saturating_add);
    // Every backup copies a block the trace writes (or a backup it overwrites), and the log
    // takes a block per 168 entries: twice the trace's blocks always suffices; the loop is
    // belt and braces.
    let mut extra_blocks = io.saturating_mul(2).saturating_add(64);
    for _ in 0..4 {
        let extra = extra_blocks.saturating_mul(bsb);
        // One block of gap so the extra space never merges with a real free range at the end.
        let offset = cfg.device_size / bsb * bsb + bsb;
        let device_size = offset.checked_add(extra).ok_or(EstimateError::invalid(
            "device size",
            cfg.device_size,
            "too large to model the missing space",
        ))?;
        let mut all = Vec::with_capacity(extents.len() + 1);
        all.push(FreeExtent { offset, len: extra });
        all.extend_from_slice(extents);
        let r = dryrun::dry_run(&DryRunConfig { device_size, ..*cfg }, &all, ops)?;
        if r.enospc.is_none() {
            return Ok(r);
        }
        extra_blocks = extra_blocks.saturating_mul(4);
    }
    Err(EstimateError::invalid(
        "trace records",
        u64::try_from(ops.len()).unwrap_or(u64::MAX),
        "needs more backup space than the dry run could model",
    ))
}

/// `[offset, offset + len)` rounded outward to `unit`.
fn outward(offset: u64, len: u64, unit: u64) -> (u64, u64) {
    (offset / unit * unit, offset.saturating_add(len).div_ceil(unit).saturating_mul(unit))
}

/// Half-open intervals rounded inward to `unit` (empty ones dropped).
fn inward(spans: &[(u64, u64)], unit: u64) -> Vec<(u64, u64)> {
    spans
        .iter()
        .map(|&(s, e)| (s.div_ceil(unit).saturating_mul(unit), e / unit * unit))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Sorted, with overlapping and touching intervals joined.
fn merge(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.retain(|(s, e)| s < e);
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn intervals_bytes(spans: &[(u64, u64)]) -> u64 {
    spans.iter().map(|(s, e)| e - s).fold(0, u64::saturating_add)
}

/// Bytes in both of two merged interval lists.
fn intersection_bytes(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo < hi {
            total += hi - lo;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

#[cfg(test)]
mod tests;
