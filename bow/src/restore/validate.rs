//! Walking and validating the chain of log sectors (vold-checkpoint.md §5.4, first pass).
//!
//! From the header's sequence down to 0: read "sector 0" through the relocation map, parse it
//! with every field check, then take its entries newest to oldest, note which physical blocks
//! hold each saved copy at that point, and record the relocation. Then check every CRC
//! (0 = unchecked) from those blocks. Nothing is written.
//!
//! Which blocks a copy is read from depends only on the entries, never on the data, so the
//! CRC checks need not be interleaved with the walk as in vold: they are done afterwards, in
//! batches whose physical ranges are sorted, coalesced and read with several I/Os in flight
//! (vold reads each copy on its own, newest first, i.e. backwards through the backups). The
//! verdict is the same; when a log has several problems the one reported is the first in
//! vold's order among checksum mismatches, else the structural one.
//!
//! Bounds for hostile logs: a log sector holds at most 169 entries (4 KiB blocks); the chain
//! needs one block per sector, so `sequence + 1` may not exceed the device's blocks; every
//! entry must lie inside the device, and all entries together may not save more blocks than the
//! device has (the kernel carves every backup from free space and never reuses one). So the
//! walk reads at most about one device's worth of data and keeps memory proportional to the
//! number of entries.

use super::plan;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use super::kept::{KeptCopies, MergedRead, READ_CHUNK};
use super::relocation::{RelocationMap, Run};
use super::{CorruptLog, Phase, Progress, RestoreError, ValidatedLog};
use crate::crc::{seed_for, BowCrc};
use crate::device::{BlockDevice, IoBuf};
use crate::format::{LogEntry, LogHeader, LogSector, Magic};
use crate::units::BlockSize;

/// Data read per batch of CRC checks (a batch is sent before it would exceed this; a batch
/// of one larger entry is streamed instead of read whole). Small enough that the checks
/// follow the walk closely, large enough for long sorted reads.
const BATCH_BYTES: u64 = 4 << 20;
/// Reads in flight while checking CRCs, unless the caller says otherwise.
const DEFAULT_QUEUE_DEPTH: usize = 8;
/// Most log sector bytes read ahead of the walk (16384 sectors of 4 KiB).
const PREFETCH_BYTES: u64 = 64 << 20;

/// The checksum verdict of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CrcStatus {
    /// The saved copy matches the checksum.
    Ok,
    /// Checksum 0: not checked (SECTOR0_CURRENT relocations, or an all-zero block 0).
    Unchecked,
    /// The saved copy does not match.
    Mismatch { computed: u32 },
}

/// One log sector as the walk found it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalkedSector {
    /// The physical block the sector was read from.
    pub block: u64,
    pub sector: LogSector,
    /// CRC status per entry, indexed like `sector.entries` (filled newest to oldest; entries
    /// not reached because the walk stopped stay `None`).
    pub crc: Vec<Option<CrcStatus>>,
}

/// The result of walking a log.
#[derive(Debug, Clone)]
pub struct Walk {
    pub header: LogHeader,
    pub block_size: BlockSize,
    /// Sectors reached, newest first.
    pub sectors: Vec<WalkedSector>,
    /// The first problem found; the walk stops there (`keep_going` continues past checksum
    /// mismatches only).
    pub error: Option<CorruptLog>,
    /// The relocation map after every entry walked.
    pub map: RelocationMap,
    /// Physical runs the walk read (log sectors and checked copies).
    pub reads: Vec<Run>,
}

/// Validates the log on `dev` (see the module documentation). Writes nothing.
pub fn validate(dev: &impl BlockDevice) -> Result<ValidatedLog, RestoreError> {
    validate_keeping(dev, DEFAULT_QUEUE_DEPTH, 0, &mut |_| {}).map(|(log, _)| log)
}

/// [`validate`], keeping up to `keep_bytes` of the checked saved copies in memory.
pub(super) fn validate_keeping(
    dev: &impl BlockDevice,
    queue_depth: usize,
    keep_bytes: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<(ValidatedLog, KeptCopies), RestoreError> {
    let (walk, kept) = walk_with(dev, false, queue_depth, keep_bytes, progress)?;
    if let Some(error) = walk.error {
        return Err(error.into());
    }
    let plan = plan::build(&walk);
    let entries = walk.sectors.iter().map(|s| s.sector.entries.len() as u64).sum();
    let log = ValidatedLog {
        header: walk.header,
        resumed: walk.header.magic == Magic::Wob,
        sectors: walk.sectors.into_iter().map(|s| s.sector).collect(),
        entries,
        plan,
    };
    Ok((log, kept))
}

/// Walks the chain. `Err(NoLog)` without a magic; device errors are returned as errors (never
/// treated as corruption); problems of the log end up in [`Walk::error`]. With `keep_going`
/// every checksum is checked even after a mismatch (for inspection); without it the checks
/// stop at the first mismatch.
pub fn walk(
    dev: &impl BlockDevice,
    keep_going: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Walk, RestoreError> {
    walk_with(dev, keep_going, DEFAULT_QUEUE_DEPTH, 0, progress).map(|(walk, _)| walk)
}

/// What a worker returns for one batch: the checks, and the batch's data when it is kept.
type BatchResult = Result<(Vec<Checked>, Option<MergedRead>), RestoreError>;

fn walk_with(
    dev: &impl BlockDevice,
    keep_going: bool,
    queue_depth: usize,
    keep_bytes: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Walk, KeptCopies), RestoreError> {
    let Some(header) = super::read_header(dev)? else {
        return Err(RestoreError::NoLog);
    };
    let Some(block_size) = BlockSize::new(header.block_size) else {
        return Err(CorruptLog::BlockSize(header.block_size).into());
    };
    let mut w = Walk {
        header,
        block_size,
        sectors: Vec::new(),
        error: None,
        map: RelocationMap::new(),
        reads: Vec::new(),
    };
    // The structural walk runs here while a second thread reads the saved copies of the
    // entries already walked and checks their CRCs, batch by batch.
    let bs = u64::from(block_size.bytes());
    // Batches are numbered; `queue_depth` workers check them, each reading its batch's merged
    // ranges whole. After a mismatch (without `keep_going`) later batches are skipped.
    let stop_after = AtomicUsize::new(usize::MAX);
    let reserved = AtomicUsize::new(0);
    let workers = queue_depth.clamp(1, 16);
    let (batch_tx, batch_rx) = mpsc::channel::<(usize, Vec<PendingCrc>)>();
    let batch_rx = Mutex::new(batch_rx);
    let (result_tx, result_rx) = mpsc::channel::<(usize, BatchResult)>();
    let mut kept = KeptCopies::default();
    // One worker: checks batches until the channel closes.
    let worker = |result_tx: mpsc::Sender<(usize, BatchResult)>| {
        // One buffer for all batches not kept: no fresh pages to fault in for each.
        let mut buf = IoBuf::default();
        loop {
            let next = batch_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok((number, batch)) = next else { break };
            if number > stop_after.load(Ordering::Relaxed) {
                continue;
            }
            let checked = check_batch(dev, batch, bs, &mut buf).map(|(checks, data)| {
                let failed = checks.iter().any(|c| c.computed != c.expected);
                let keep = data.filter(|_| !failed).and_then(|data| {
                    if reserve(&reserved, data.len(), keep_bytes) {
                        Some(data)
                    } else {
                        buf = data.into_buf();
                        None
                    }
                });
                (checks, keep)
            });
            let failed = match &checked {
                Ok((c, _)) => c.iter().any(|c| c.computed != c.expected),
                Err(_) => true,
            };
            if failed && !keep_going {
                stop_after.fetch_min(number, Ordering::Relaxed);
            }
            if result_tx.send((number, checked)).is_err() {
                break;
            }
        }
    };
    let structural = std::thread::scope(|scope| {
        // Workers start with the batches, up to `workers`: a small log gets one thread.
        let mut spawned = 0;
        let mut dispatch = |item: (usize, Vec<PendingCrc>)| {
            if spawned < workers {
                let tx = result_tx.clone();
                scope.spawn(move || worker(tx));
                spawned += 1;
            }
            let _ = batch_tx.send(item);
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut total = 0;
        let mut number = 0;
        let mut sink = |p: PendingCrc| {
            // A batch never exceeds BATCH_BYTES unless it is one larger entry.
            if !batch.is_empty() && batch_bytes + p.blocks * bs > BATCH_BYTES {
                dispatch((number, std::mem::take(&mut batch)));
                number += 1;
                batch_bytes = 0;
            }
            total += p.blocks;
            batch_bytes += p.blocks * bs;
            batch.push(p);
        };
        let structural = walk_chain(dev, &mut w, &mut sink);
        if !batch.is_empty() {
            dispatch((number, batch));
        }
        drop(batch_tx);
        drop(result_tx);
        let mut done = 0;
        let mut io_error = None;
        // Results arrive in any order; a mismatch is reported in vold's (batch) order.
        let mut mismatches: Vec<(usize, CorruptLog)> = Vec::new();
        for (number, checked) in result_rx {
            match checked {
                Ok((checked, data)) => {
                    if let Some(data) = data {
                        kept.add(data);
                    }
                    for c in checked {
                        done += c.blocks;
                        let status = if c.computed == c.expected {
                            CrcStatus::Ok
                        } else {
                            CrcStatus::Mismatch { computed: c.computed }
                        };
                        if let Some(slot) =
                            w.sectors.get_mut(c.sector).and_then(|s| s.crc.get_mut(c.index))
                        {
                            *slot = Some(status);
                        }
                        if c.computed != c.expected && !mismatches.iter().any(|m| m.0 == number) {
                            mismatches.push((
                                number,
                                CorruptLog::Checksum {
                                    sequence: c.sequence,
                                    index: u32::try_from(c.index).unwrap_or(u32::MAX),
                                    expected: c.expected,
                                    computed: c.computed,
                                },
                            ));
                        }
                    }
                    progress(Progress { phase: Phase::Validate, done, total });
                }
                Err(e) => {
                    io_error.get_or_insert(e);
                }
            }
        }
        let mismatch = mismatches.into_iter().min_by_key(|m| m.0).map(|m| m.1);
        (structural, mismatch, io_error)
    });
    let (structural, mismatch, io_error) = structural;
    if let Some(e) = io_error {
        return Err(e);
    }
    let structural = match structural {
        Ok(()) => None,
        Err(RestoreError::Corrupt(c)) => Some(c),
        Err(other) => return Err(other),
    };
    w.error = mismatch.or(structural);
    kept.seal();
    Ok((w, kept))
}

/// Reserves `bytes` of the keep budget; false (and nothing reserved) when it would overflow.
fn reserve(reserved: &AtomicUsize, bytes: usize, budget: usize) -> bool {
    let before = reserved.fetch_add(bytes, Ordering::Relaxed);
    if before.saturating_add(bytes) <= budget {
        return true;
    }
    reserved.fetch_sub(bytes, Ordering::Relaxed);
    false
}

/// One checked CRC.
#[derive(Debug)]
struct Checked {
    sector: usize,
    index: usize,
    sequence: u32,
    expected: u32,
    computed: u32,
    blocks: u64,
}

/// Checks a batch's CRCs; returns the checks and, unless it was streamed, the data read (the
/// caller keeps it or takes the buffer back; on an error `buf` may have been consumed).
fn check_batch(
    dev: &impl BlockDevice,
    batch: Vec<PendingCrc>,
    bs: u64,
    buf: &mut IoBuf,
) -> Result<(Vec<Checked>, Option<MergedRead>), RestoreError> {
    let bytes: u64 = batch.iter().map(|p| p.blocks * bs).sum();
    let (computed, data): (Vec<u32>, _) = if bytes > BATCH_BYTES {
        // Only a single entry larger than a batch gets here: stream it.
        (batch.iter().map(|p| streamed_crc(dev, p, bs)).collect::<Result<_, _>>()?, None)
    } else {
        let spans = batch.iter().flat_map(|p| p.runs.iter().map(|r| (r.phys, r.phys + r.len)));
        let data = MergedRead::read(dev, spans, bs, std::mem::take(buf))?;
        (batch.iter().map(|p| crc_from(&data, p, bs)).collect(), Some(data))
    };
    let checks = batch
        .into_iter()
        .zip(computed)
        .map(|(p, computed)| Checked {
            sector: p.sector,
            index: p.index,
            sequence: p.sequence,
            expected: p.expected,
            computed,
            blocks: p.blocks,
        })
        .collect();
    Ok((checks, data))
}

/// A CRC to check: entry `index` of walked sector `sector`, over physical `runs`.
#[derive(Debug)]
struct PendingCrc {
    sector: usize,
    index: usize,
    sequence: u32,
    seed: u32,
    expected: u32,
    runs: Vec<Run>,
    blocks: u64,
}

/// The structural walk: log sectors through the map, field checks, bounds, relocations; the
/// CRCs to check are collected in `pending` in vold's order.
fn walk_chain(
    dev: &impl BlockDevice,
    w: &mut Walk,
    pending: &mut dyn FnMut(PendingCrc),
) -> Result<(), RestoreError> {
    let header = w.header;
    let bs = w.block_size;
    let bs_bytes = u64::from(bs.bytes());
    let blocks = dev.size() / bs_bytes;
    check_chain_length(&header, blocks)?;
    let resumed = header.magic == Magic::Wob;
    let mut saved_blocks: u64 = 0;
    let prefetched = prefetch_chain(dev, bs, blocks, header.sequence);
    let mut buf = IoBuf::new(bs.as_usize());
    for sequence in (0..=header.sequence).rev() {
        let at = w.map.resolve(0);
        if at >= blocks {
            return Err(CorruptLog::OutOfDevice { sequence, index: 0, blocks }.into());
        }
        let block = match prefetched.get(&at) {
            Some(block) => block.as_slice(),
            None => {
                dev.read_at(buf.as_mut_slice(), at * bs_bytes)?;
                buf.as_slice()
            }
        };
        w.reads.push(Run { virt: 0, phys: at, len: 1 });
        let sector =
            LogSector::parse(block).map_err(|error| CorruptLog::Format { sequence, error })?;
        let h = sector.header;
        check_sector_header(&h, &header, sequence)?;
        if h.magic == Magic::Wob && !resumed {
            return Err(CorruptLog::UnexpectedWob { sequence }.into());
        }
        check_chain_entry(&sector, sequence, bs)?;
        let count = sector.entries.len();
        let entries = sector.entries.clone();
        let sector_index = w.sectors.len();
        w.sectors.push(WalkedSector { block: at, sector, crc: vec![None; count] });
        for (index, e) in entries.iter().enumerate().rev() {
            let EntryBlocks { source, dest, n } =
                entry_blocks(e, bs, blocks, (sequence, index), &mut saved_blocks)?;
            let runs = w.map.runs(dest, n);
            w.map.relocate_runs(source, dest, n, &runs);
            if e.checksum == 0 {
                if let Some(slot) = w.sectors[sector_index].crc.get_mut(index) {
                    *slot = Some(CrcStatus::Unchecked);
                }
            } else {
                w.reads.extend_from_slice(&runs);
                pending(PendingCrc {
                    sector: sector_index,
                    index,
                    sequence,
                    seed: seed_for(source),
                    expected: e.checksum,
                    runs,
                    blocks: n,
                });
            }
        }
    }
    check_block0_moved(&w.map, w.sectors.last().map(|s| s.sector.entries[0]))?;
    Ok(())
}

// The bounds below are shared by our walk and vold's pass (vold.rs); vold misses all of them
// (vold-checkpoint.md §5.5).

/// A chain no longer than the device has blocks, and a sequence vold's signed loop can count.
pub(super) fn check_chain_length(header: &LogHeader, blocks: u64) -> Result<(), CorruptLog> {
    if header.sequence >= 1 << 31 {
        return Err(CorruptLog::SequenceTooLarge(header.sequence));
    }
    if u64::from(header.sequence) >= blocks {
        return Err(CorruptLog::ChainTooLong { sequence: header.sequence, blocks });
    }
    Ok(())
}

/// An older log sector has the head's block size and the sequence the chain is at (vold's
/// order: block size first).
pub(super) fn check_sector_header(
    h: &LogHeader,
    head: &LogHeader,
    sequence: u32,
) -> Result<(), CorruptLog> {
    if h.block_size != head.block_size {
        return Err(CorruptLog::BlockSizeMismatch {
            sequence,
            expected: head.block_size,
            found: h.block_size,
        });
    }
    if h.sequence != sequence {
        return Err(CorruptLog::SequenceMismatch { expected: sequence, found: h.sequence });
    }
    Ok(())
}

/// Entry 0 of every log sector saves block 0 (the previous log sector, or the original
/// block 0 for sequence 0).
pub(super) fn check_chain_entry(
    sector: &LogSector,
    sequence: u32,
    bs: BlockSize,
) -> Result<(), CorruptLog> {
    let first = sector.entries[0];
    if first.source.0 != 0 || first.size != bs.bytes() {
        return Err(CorruptLog::ChainEntry { sequence, saved: first.source, size: first.size });
    }
    Ok(())
}

/// An entry in blocks.
pub(super) struct EntryBlocks {
    pub source: u64,
    pub dest: u64,
    pub n: u64,
}

/// Converts entry `at = (sequence, index)` to blocks: both ranges inside the device, and all
/// entries so far not saving more blocks than the device has (the kernel never reuses a saved
/// block), counted in `saved_blocks`.
pub(super) fn entry_blocks(
    e: &LogEntry,
    bs: BlockSize,
    blocks: u64,
    (sequence, index): (u32, usize),
    saved_blocks: &mut u64,
) -> Result<EntryBlocks, CorruptLog> {
    // `LogSector::parse` checked alignment, whole blocks and overflow.
    let n = u64::from(e.size) / u64::from(bs.bytes());
    let source = e.source.0 / bs.sectors();
    let dest = e.dest.0 / bs.sectors();
    if source.checked_add(n).is_none_or(|end| end > blocks)
        || dest.checked_add(n).is_none_or(|end| end > blocks)
    {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        return Err(CorruptLog::OutOfDevice { sequence, index, blocks });
    }
    *saved_blocks = saved_blocks.saturating_add(n);
    if *saved_blocks > blocks {
        return Err(CorruptLog::TooManyBlocks { blocks });
    }
    Ok(EntryBlocks { source, dest, n })
}

/// After sequence 0 block 0 must come from somewhere else, or the restore would leave the log
/// in place and run again at every boot. `chain_entry`: entry 0 of sequence 0, if reached.
pub(super) fn check_block0_moved(
    map: &RelocationMap,
    chain_entry: Option<LogEntry>,
) -> Result<(), CorruptLog> {
    if map.resolve(0) == 0 {
        return Err(CorruptLog::ChainEntry {
            sequence: 0,
            saved: chain_entry.map_or(crate::units::Sectors(0), |e| e.source),
            size: chain_entry.map_or(0, |e| e.size),
        });
    }
    Ok(())
}

/// Log sectors read ahead of the walk, by physical block.
///
/// Each log sector's entry 0 saved the previous one; the walk finds it where the relocation
/// map resolves block 0, which is that entry's `dest` unless the file system reused the saved
/// block (the kernel then moved it again). Following the `dest`s reads the chain back to back
/// before the CRC reads start, instead of one synchronous read per sector queued behind them
/// on the walk's critical path. The walk takes a block from here only when the map resolves to
/// it, so a wrong guess costs a read, never a wrong answer. Read errors and malformed sectors
/// end the read-ahead (the walk reports them); at most `PREFETCH_BYTES` are held.
fn prefetch_chain(
    dev: &impl BlockDevice,
    bs: BlockSize,
    blocks: u64,
    sequence: u32,
) -> HashMap<u64, IoBuf> {
    let bs_bytes = u64::from(bs.bytes());
    let limit = (PREFETCH_BYTES / bs_bytes).min(u64::from(sequence) + 1);
    let mut out = HashMap::new();
    let mut at = 0;
    while (out.len() as u64) < limit {
        let mut block = IoBuf::new(bs.as_usize());
        if dev.read_at(block.as_mut_slice(), at * bs_bytes).is_err() {
            break;
        }
        let next = LogSector::parse(block.as_slice())
            .ok()
            .filter(|s| s.header.sequence > 0)
            .map(|s| s.entries[0].dest.0 / bs.sectors());
        out.insert(at, block);
        match next {
            Some(next) if next < blocks && !out.contains_key(&next) => at = next,
            _ => break,
        }
    }
    out
}

/// The CRC of a pending check from the batch's data.
fn crc_from(data: &MergedRead, p: &PendingCrc, bs: u64) -> u32 {
    let mut crc = BowCrc::new(p.seed);
    for run in &p.runs {
        let bytes = data.get(run.phys, run.len, bs);
        crc.update(bytes.expect("a batch's read covers the runs of its checks"));
    }
    crc.finish()
}

/// The CRC of one large entry, read run by run in chunks.
fn streamed_crc(dev: &impl BlockDevice, p: &PendingCrc, bs: u64) -> Result<u32, RestoreError> {
    let mut crc = BowCrc::new(p.seed);
    let chunk_blocks = (READ_CHUNK / bs).max(1);
    let mut buf = Vec::new();
    for run in &p.runs {
        let mut done = 0;
        while done < run.len {
            let take = (run.len - done).min(chunk_blocks);
            buf.resize(usize::try_from(take * bs).unwrap_or(usize::MAX), 0);
            dev.read_at(&mut buf, (run.phys + done) * bs)?;
            crc.update(&buf);
            done += take;
        }
    }
    Ok(crc.finish())
}
