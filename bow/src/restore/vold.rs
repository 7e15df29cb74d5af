//! vold's restore (`cp_restoreCheckpoint`, vold-checkpoint.md §5.4): its validation pass
//! ([`validate_like_vold`]) and its restore pass with the resumable WOB protocol ([`replay`],
//! `restoreSector`).
//!
//! The replay is used for the entry limit (`restoreCheckpointPart`), for the rare plan that is
//! not safe to apply out of order, and (with [`Protocol::Vold`]) as the benchmark's baseline.
//! For each log sector from the newest: read block 0 directly, then for each entry from the
//! newest: read `dest`, check the CRC, and write it to `source` — but first, if `source`
//! overlaps a range already read in this log sector since the last save, flush, store the current
//! log sector in block 0 with `count = i + 1` and the WOB magic, and flush again, so that a
//! resumed restore starts at this entry instead of replaying ones whose input was overwritten.
//! Entry 0 of a sector with sequence > 0 brings back the previous log sector into block 0 with
//! its magic changed to WOB; every entry 0 is followed by a flush. Unlike vold, write errors are
//! not ignored.
//!
//! The validation pass is vold's I/O pattern, one synchronous read at a time: for each log
//! sector from the newest, one block read at virtual block 0 through the relocation map; then for
//! each entry from the newest, one read per block of its saved copy, each block resolved through
//! the map on its own (vold's `relocatedRead`), whether or not the entry has a checksum; the CRC
//! check; the relocation. It never writes. [`super::validate`] reaches the same verdict with
//! sorted, coalesced, parallel reads; this one exists so that the baseline and the tests'
//! reference results are vold's algorithm. It differs from vold where vold is unsafe or silent
//! (vold-checkpoint.md §5.5), with the bounds and error values of our validator:
//! * the block size must be one the kernel accepts, the sequence below 2^31, the chain no longer
//!   than the device has blocks, every entry inside the device, and all entries together may not
//!   save more blocks than the device has;
//! * every field of a log sector is checked when it is read (`LogSector::parse`: entries whole,
//!   aligned, without overflow), where vold checks an entry's size only when it reaches it; entry
//!   0 must save block 0 (the chain), and after sequence 0 block 0 must come from elsewhere;
//! * vold's header checks come first, in its order (magic — an older sector with the WOB magic
//!   is refused —, block size equal to the head's, sequence), then the remaining field checks.
//!   So when one log sector has several faults the error named may differ from
//!   [`super::validate`]'s (which parses first); an older sector whose block size differs is
//!   `BlockSizeMismatch` here and a `Format` error there. The verdict is the same.
//!
//! A log that fails is reported as an error; roll-forward is the caller's business. A WOB head
//! skips validation, as in vold.

use super::relocation::RelocationMap;
use super::validate::{
    check_block0_moved, check_chain_entry, check_chain_length, check_sector_header, entry_blocks,
    EntryBlocks,
};
use super::{CorruptLog, Phase, Progress, RestoreError};
use crate::crc::{seed_for, BowCrc};
use crate::device::BlockDevice;
use crate::format::{LogHeader, LogSector, Magic, MAGIC_BOW, MAGIC_WOB};
use crate::units::BlockSize;

/// Entries up to this size are read into one buffer as vold does; larger ones (never written
/// by the kernel, whose entries are bounded by a bio) are checked and copied in chunks.
const WHOLE_ENTRY_MAX: u64 = 16 << 20;
const CHUNK: u64 = 1 << 20;

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Replayed {
    pub entries: u64,
    pub blocks_written: u64,
}

/// Replays the log on `dev` (which must have validated) until done or until `limit` entries;
/// `total` (the entries expected) is only for progress reports.
///
/// One addition to vold's protocol: a flush before every entry 0 is written. Entry 0 replaces
/// the log sector in block 0 (with the previous one, or for sequence 0 with the original block
/// 0), and vold flushes only *after* that write, so a power cut that keeps the block-0 write but
/// loses earlier unflushed writes of the same sector would skip those entries for good.
pub(crate) fn replay(
    dev: &impl BlockDevice,
    limit: Option<u64>,
    total: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Replayed, RestoreError> {
    replay_with(dev, limit, total, Protocol::Safe, progress)
}

/// Which flushes a replay issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// vold's flushes, plus one before each entry 0.
    Safe,
    /// Exactly vold's flushes (the benchmark baseline and vold-crash tests).
    Vold,
}

pub(crate) fn replay_with(
    dev: &impl BlockDevice,
    limit: Option<u64>,
    total: u64,
    protocol: Protocol,
    progress: &mut dyn FnMut(Progress),
) -> Result<Replayed, RestoreError> {
    let Some(header) = super::read_header(dev)? else {
        return Err(RestoreError::NoLog);
    };
    let bs = BlockSize::new(header.block_size).ok_or(CorruptLog::BlockSize(header.block_size))?;
    if header.sequence >= 1 << 31 {
        return Err(CorruptLog::SequenceTooLarge(header.sequence).into());
    }
    let bs_bytes = u64::from(bs.bytes());
    let mut done = Replayed::default();
    let mut raw = vec![0u8; bs.as_usize()];
    let mut data = Vec::new();
    for sequence in (0..=header.sequence).rev() {
        dev.read_at(&mut raw, 0)?;
        let sector =
            LogSector::parse(&raw).map_err(|error| CorruptLog::Format { sequence, error })?;
        if sector.header.block_size != header.block_size {
            return Err(CorruptLog::BlockSizeMismatch {
                sequence,
                expected: header.block_size,
                found: sector.header.block_size,
            }
            .into());
        }
        if sector.header.sequence != sequence {
            return Err(CorruptLog::SequenceMismatch {
                expected: sequence,
                found: sector.header.sequence,
            }
            .into());
        }
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (index, e) in sector.entries.iter().enumerate().rev() {
            let index32 = u32::try_from(index).unwrap_or(u32::MAX);
            let n = u64::from(e.size) / bs_bytes;
            let source = e.source.0 / bs.sectors();
            let dest = e.dest.0 / bs.sectors();
            let whole = n * bs_bytes <= WHOLE_ENTRY_MAX;
            // Read and check before writing anything of this entry.
            let computed = if whole {
                data.resize(usize::try_from(n * bs_bytes).unwrap_or(usize::MAX), 0);
                dev.read_at(&mut data, dest * bs_bytes)?;
                let mut crc = BowCrc::new(seed_for(source));
                crc.update(&data);
                crc.finish()
            } else {
                chunked_crc(dev, source, dest, n, bs_bytes)?
            };
            check_crc(e.checksum, computed, sequence, index32)?;
            if used.iter().any(|&(s, end)| source < end && s < source + n) {
                save_progress(dev, &raw, &sector.header, index32 + 1)?;
                used.clear();
            }
            used.push((dest, dest + n));
            if index == 0 && protocol == Protocol::Safe {
                dev.flush()?;
            }
            if whole {
                if index == 0 && sequence != 0 && data.get(..4) == Some(&MAGIC_BOW.to_le_bytes()) {
                    data[..4].copy_from_slice(&MAGIC_WOB.to_le_bytes());
                }
                dev.write_at(&data, source * bs_bytes)?;
            } else {
                chunked_move(dev, source, dest, n, bs_bytes)?;
            }
            if index == 0 {
                dev.flush()?;
            }
            done.entries += 1;
            done.blocks_written += n;
            progress(Progress { phase: Phase::Apply, done: done.entries, total });
            if limit == Some(done.entries) {
                dev.flush()?;
                return Ok(done);
            }
        }
    }
    Ok(done)
}

/// vold's validation pass (see the module documentation). Returns the log's entries, or `Ok(0)`
/// without reading further for a WOB head (vold skips validation then; nothing is counted).
/// Device errors are returned as they are; writes nothing.
pub(crate) fn validate_like_vold(dev: &impl BlockDevice) -> Result<u64, RestoreError> {
    let Some(header) = super::read_header(dev)? else {
        return Err(RestoreError::NoLog);
    };
    if header.magic == Magic::Wob {
        return Ok(0);
    }
    let bs = BlockSize::new(header.block_size).ok_or(CorruptLog::BlockSize(header.block_size))?;
    let bs_bytes = u64::from(bs.bytes());
    let blocks = dev.size() / bs_bytes;
    check_chain_length(&header, blocks)?;
    let mut map = RelocationMap::new();
    let mut raw = vec![0u8; bs.as_usize()];
    let mut block = vec![0u8; bs.as_usize()];
    let mut saved_blocks: u64 = 0;
    let mut entries: u64 = 0;
    let mut chain_entry = None;
    for sequence in (0..=header.sequence).rev() {
        let at = map.resolve(0);
        if at >= blocks {
            return Err(CorruptLog::OutOfDevice { sequence, index: 0, blocks }.into());
        }
        dev.read_at(&mut raw, at * bs_bytes)?;
        let format = |error| CorruptLog::Format { sequence, error };
        // vold's order: magic (BOW only while validating), block size, sequence.
        let h = LogHeader::decode(&raw).map_err(format)?;
        if h.magic == Magic::Wob {
            return Err(CorruptLog::UnexpectedWob { sequence }.into());
        }
        check_sector_header(&h, &header, sequence)?;
        // Header size and count (vold's next checks), then every entry's fields.
        let sector = LogSector::parse(&raw).map_err(format)?;
        check_chain_entry(&sector, sequence, bs)?;
        chain_entry = Some(sector.entries[0]);
        for (index, e) in sector.entries.iter().enumerate().rev() {
            let index32 = u32::try_from(index).unwrap_or(u32::MAX);
            let EntryBlocks { source, dest, n } =
                entry_blocks(e, bs, blocks, (sequence, index), &mut saved_blocks)?;
            // vold's relocatedRead: each block of the copy resolved and read on its own.
            let mut crc = BowCrc::new(seed_for(source));
            for i in 0..n {
                dev.read_at(&mut block, map.resolve(dest + i) * bs_bytes)?;
                crc.update(&block);
            }
            let computed = crc.finish();
            check_crc(e.checksum, computed, sequence, index32)?;
            map.relocate(source, dest, n);
        }
        entries += sector.entries.len() as u64;
    }
    check_block0_moved(&map, chain_entry)?;
    Ok(entries)
}

/// A stored checksum of 0 is not checked; any other must equal the computed one.
fn check_crc(expected: u32, computed: u32, sequence: u32, index: u32) -> Result<(), CorruptLog> {
    if expected != 0 && computed != expected {
        return Err(CorruptLog::Checksum { sequence, index, expected, computed });
    }
    Ok(())
}

/// vold's whole restore, for comparison (the benchmark's baseline): [`validate_like_vold`],
/// then [`replay_with`] with exactly vold's flushes. Returns the entries replayed. A log that
/// fails validation is an error (vold would roll forward).
pub(crate) fn faithful_baseline(dev: &impl BlockDevice) -> Result<u64, RestoreError> {
    let entries = validate_like_vold(dev)?;
    let done = replay_with(dev, None, entries, Protocol::Vold, &mut |_| {})?;
    Ok(done.entries)
}

/// Persists "resume from entry `count - 1` of this sector": the log sector as read, with
/// `count` truncated and the WOB magic, between two flushes.
fn save_progress(
    dev: &impl BlockDevice,
    raw: &[u8],
    header: &LogHeader,
    count: u32,
) -> Result<(), RestoreError> {
    dev.flush()?;
    let mut block = raw.to_vec();
    LogHeader { magic: Magic::Wob, count, ..*header }.encode_into(&mut block);
    dev.write_at(&block, 0)?;
    dev.flush()?;
    Ok(())
}

fn chunked_crc(
    dev: &impl BlockDevice,
    source: u64,
    dest: u64,
    n: u64,
    bs: u64,
) -> Result<u32, RestoreError> {
    let mut crc = BowCrc::new(seed_for(source));
    let per = CHUNK / bs;
    let mut buf = Vec::new();
    let mut at = 0;
    while at < n {
        let take = (n - at).min(per);
        buf.resize(usize::try_from(take * bs).unwrap_or(usize::MAX), 0);
        dev.read_at(&mut buf, (dest + at) * bs)?;
        crc.update(&buf);
        at += take;
    }
    Ok(crc.finish())
}

/// Copies `[dest, dest + n)` to `[source, source + n)` like `memmove` (the result equals one
/// whole-buffer read followed by one write, even if the ranges overlap).
fn chunked_move(
    dev: &impl BlockDevice,
    source: u64,
    dest: u64,
    n: u64,
    bs: u64,
) -> Result<(), RestoreError> {
    let per = CHUNK / bs;
    let mut buf = Vec::new();
    let chunks: Vec<(u64, u64)> =
        (0..n.div_ceil(per)).map(|i| (i * per, per.min(n - i * per))).collect();
    let backwards = source > dest;
    let order: Box<dyn Iterator<Item = &(u64, u64)>> =
        if backwards { Box::new(chunks.iter().rev()) } else { Box::new(chunks.iter()) };
    for &(at, take) in order {
        buf.resize(usize::try_from(take * bs).unwrap_or(usize::MAX), 0);
        dev.read_at(&mut buf, (dest + at) * bs)?;
        dev.write_at(&buf, (source + at) * bs)?;
    }
    Ok(())
}
