//! Walking and validating the chain of log sectors (vold-checkpoint.md §5.4, first pass).
//!
//! From the header's sequence down to 0: read "sector 0" through the relocation map, parse it
//! with every field check, then take its entries newest to oldest, read each saved copy through
//! the map, check its CRC (0 = unchecked) and record the relocation. Nothing is written.
//!
//! Bounds for hostile logs: a log sector holds at most 169 entries (4 KiB blocks); the chain
//! needs one block per sector, so `sequence + 1` may not exceed the device's blocks; every
//! entry must lie inside the device, and all entries together may not save more blocks than the
//! device has (the kernel carves every backup from free space and never reuses one). So the
//! walk reads at most about one device's worth of data and keeps memory proportional to the
//! number of entries.

use super::plan;
use super::relocation::{RelocationMap, Run};
use super::{CorruptLog, Phase, Progress, RestoreError, ValidatedLog};
use crate::crc::{seed_for, BowCrc};
use crate::device::BlockDevice;
use crate::format::{LogHeader, LogSector, Magic};
use crate::units::BlockSize;

/// Largest read while checking a CRC.
const READ_CHUNK: u64 = 1 << 20;

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
    validate_with_progress(dev, &mut |_| {})
}

pub(super) fn validate_with_progress(
    dev: &impl BlockDevice,
    progress: &mut dyn FnMut(Progress),
) -> Result<ValidatedLog, RestoreError> {
    let walk = walk(dev, false, progress)?;
    if let Some(error) = walk.error {
        return Err(error.into());
    }
    let plan = plan::build(&walk);
    let entries = walk.sectors.iter().map(|s| s.sector.entries.len() as u64).sum();
    Ok(ValidatedLog {
        header: walk.header,
        resumed: walk.header.magic == Magic::Wob,
        sectors: walk.sectors.into_iter().map(|s| s.sector).collect(),
        entries,
        plan,
    })
}

/// Walks the chain. `Err(NoLog)` without a magic; device errors are returned as errors (never
/// treated as corruption); problems of the log end up in [`Walk::error`]. With `keep_going`
/// a checksum mismatch is recorded and the walk continues (for inspection).
pub fn walk(
    dev: &impl BlockDevice,
    keep_going: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Walk, RestoreError> {
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
    if let Err(e) = walk_chain(dev, &mut w, keep_going, progress) {
        match e {
            RestoreError::Corrupt(c) => {
                // Keep the first problem (a checksum mismatch seen with `keep_going`).
                if w.error.is_none() {
                    w.error = Some(c);
                }
            }
            other => return Err(other),
        }
    }
    Ok(w)
}

fn walk_chain(
    dev: &impl BlockDevice,
    w: &mut Walk,
    keep_going: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), RestoreError> {
    let header = w.header;
    let bs = w.block_size;
    let bs_bytes = u64::from(bs.bytes());
    let blocks = dev.size() / bs_bytes;
    if header.sequence >= 1 << 31 {
        return Err(CorruptLog::SequenceTooLarge(header.sequence).into());
    }
    if u64::from(header.sequence) >= blocks {
        return Err(CorruptLog::ChainTooLong { sequence: header.sequence, blocks }.into());
    }
    let resumed = header.magic == Magic::Wob;
    let total_sectors = u64::from(header.sequence) + 1;
    let mut saved_blocks: u64 = 0;
    let mut buf = vec![0u8; bs.as_usize()];
    for (done, sequence) in (0..=header.sequence).rev().enumerate() {
        let at = w.map.resolve(0);
        if at >= blocks {
            return Err(CorruptLog::OutOfDevice { sequence, index: 0, blocks }.into());
        }
        dev.read_at(&mut buf, at * bs_bytes)?;
        w.reads.push(Run { virt: 0, phys: at, len: 1 });
        let sector =
            LogSector::parse(&buf).map_err(|error| CorruptLog::Format { sequence, error })?;
        let h = sector.header;
        if h.block_size != header.block_size {
            return Err(CorruptLog::BlockSizeMismatch {
                sequence,
                expected: header.block_size,
                found: h.block_size,
            }
            .into());
        }
        if h.sequence != sequence {
            return Err(
                CorruptLog::SequenceMismatch { expected: sequence, found: h.sequence }.into()
            );
        }
        if h.magic == Magic::Wob && !resumed {
            return Err(CorruptLog::UnexpectedWob { sequence }.into());
        }
        let first = sector.entries[0];
        if first.source.0 != 0 || first.size != bs.bytes() {
            return Err(
                CorruptLog::ChainEntry { sequence, saved: first.source, size: first.size }.into()
            );
        }
        let count = sector.entries.len();
        let entries = sector.entries.clone();
        w.sectors.push(WalkedSector { block: at, sector, crc: vec![None; count] });
        for (index, e) in entries.iter().enumerate().rev() {
            let index32 = u32::try_from(index).unwrap_or(u32::MAX);
            // `LogSector::parse` checked alignment, whole blocks and overflow.
            let n = u64::from(e.size) / bs_bytes;
            let source = e.source.0 / bs.sectors();
            let dest = e.dest.0 / bs.sectors();
            if source.checked_add(n).is_none_or(|end| end > blocks)
                || dest.checked_add(n).is_none_or(|end| end > blocks)
            {
                return Err(CorruptLog::OutOfDevice { sequence, index: index32, blocks }.into());
            }
            saved_blocks = saved_blocks.saturating_add(n);
            if saved_blocks > blocks {
                return Err(CorruptLog::TooManyBlocks { blocks }.into());
            }
            let status = if e.checksum == 0 {
                CrcStatus::Unchecked
            } else {
                let computed = crc_through_map(dev, &w.map, &mut w.reads, bs, source, dest, n)?;
                if computed == e.checksum {
                    CrcStatus::Ok
                } else {
                    CrcStatus::Mismatch { computed }
                }
            };
            if let Some(slot) = w.sectors.last_mut().and_then(|s| s.crc.get_mut(index)) {
                *slot = Some(status);
            }
            if let CrcStatus::Mismatch { computed } = status {
                let error = CorruptLog::Checksum {
                    sequence,
                    index: index32,
                    expected: e.checksum,
                    computed,
                };
                if !keep_going {
                    return Err(error.into());
                }
                w.error.get_or_insert(error);
            }
            w.map.relocate(source, dest, n);
        }
        progress(Progress {
            phase: Phase::Validate,
            done: u64::try_from(done).unwrap_or(u64::MAX) + 1,
            total: total_sectors,
        });
    }
    // After sequence 0 block 0 must come from somewhere else, or the restore would leave the
    // log in place and run again at every boot.
    if w.error.is_none() && w.map.resolve(0) == 0 {
        let first = w.sectors.last().map(|s| s.sector.entries[0]);
        return Err(CorruptLog::ChainEntry {
            sequence: 0,
            saved: first.map_or(crate::units::Sectors(0), |e| e.source),
            size: first.map_or(0, |e| e.size),
        }
        .into());
    }
    Ok(())
}

/// The kernel's CRC of virtual blocks `[dest, dest + n)` as they read through `map`, seeded
/// with the source block.
fn crc_through_map(
    dev: &impl BlockDevice,
    map: &RelocationMap,
    reads: &mut Vec<Run>,
    bs: BlockSize,
    source: u64,
    dest: u64,
    n: u64,
) -> Result<u32, RestoreError> {
    let bs_bytes = u64::from(bs.bytes());
    let mut crc = BowCrc::new(seed_for(source));
    let chunk_blocks = (READ_CHUNK / bs_bytes).max(1);
    let mut buf = Vec::new();
    for run in map.runs(dest, n) {
        reads.push(run);
        let mut done = 0;
        while done < run.len {
            let take = (run.len - done).min(chunk_blocks);
            let len = usize::try_from(take * bs_bytes).unwrap_or(usize::MAX);
            buf.resize(len, 0);
            dev.read_at(&mut buf, (run.phys + done) * bs_bytes)?;
            crc.update(&buf);
            done += take;
        }
    }
    Ok(crc.finish())
}
