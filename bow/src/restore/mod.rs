//! Restoring a device from its dm-bow log (vold-checkpoint.md §5.4, docs/restore.md).
//!
//! Three steps:
//! 1. **Validate** ([`validate`]), writing nothing: walk the chain of log sectors from the
//!    newest to sequence 0 exactly as vold does, reading every older log sector and backup
//!    through the relocation-map simulation and checking the CRCs; plus the hazards vold misses
//!    (vold-checkpoint.md §5.5) and bounds that keep hostile logs cheap.
//! 2. **Plan**: the final relocation map says, for every block the restore changes, which
//!    physical block holds its final contents ([`RestorePlan`]).
//! 3. **Apply**: copy the plan's extents in sorted, coalesced order with several I/Os in
//!    flight, flush, and rewrite block 0 (which holds the log) last. A plan that could read a
//!    block it also writes falls back to vold's entry-by-entry replay with its WOB progress
//!    records ([`ApplyMode::VoldReplay`]); a crash anywhere, then a new run, gives the same bytes.
//!
//! A log that fails validation is rolled forward (vold) or refused, per [`CorruptLogPolicy`];
//! the outcome is always reported.

mod apply;
#[doc(hidden)]
pub mod fuzzing;
mod kept;
mod plan;
pub mod relocation;
pub mod synth;
#[cfg(test)]
mod tests;
mod validate;
mod vold;

use crate::device::{BlockDevice, DeviceError};
use crate::format::{FormatError, LogHeader, LogSector, Magic};
use crate::units::{BlockSize, Sectors};

pub(crate) use plan::build as build_plan;
pub use plan::{ApplyMode, BlockCopy, RestorePlan};
pub use validate::{validate, walk, CrcStatus, Walk, WalkedSector};

/// What to do with a log that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum CorruptLogPolicy {
    /// vold's behaviour: drop the checkpoint and keep the new data, by putting the live
    /// logical block 0 (the header's `sector0`) back into block 0.
    #[default]
    RollForward,
    /// Leave the device untouched and report [`RestoreOutcome::Refused`].
    Refuse,
}

/// Options of [`restore`].
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub policy: CorruptLogPolicy,
    /// vold's `restoreCheckpointPart(count)`: stop after this many log entries in total,
    /// replayed in vold's order (newest first) with vold's resumable protocol, and report
    /// [`RestoreOutcome::LimitReached`]. `None` (or vold's 0) restores everything.
    pub limit: Option<u64>,
    /// Validate and plan, write nothing, report [`RestoreOutcome::DryRun`].
    pub dry_run: bool,
    /// I/Os in flight while applying a plan (one thread each); 0 counts as 1.
    pub queue_depth: usize,
    /// The largest single read or write while applying a plan, in bytes (rounded down to
    /// whole blocks, at least one block).
    pub max_io_bytes: usize,
    /// Saved copies validation checked are kept in memory up to this many bytes, and the
    /// apply writes them from there instead of reading them again (see `kept.rs`). 0 keeps
    /// nothing: every copy is read twice.
    pub memory_budget: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            policy: CorruptLogPolicy::RollForward,
            limit: None,
            dry_run: false,
            queue_depth: 8,
            max_io_bytes: 1 << 20,
            memory_budget: 256 << 20,
        }
    }
}

/// Which step a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// Counting blocks of saved copies checked, out of all copies with a checksum.
    Validate,
    /// Counting blocks written, out of the plan's blocks (or log entries, in vold replay).
    Apply,
}

/// A progress report: `done` of `total` units of `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// Why a log is not acceptable. Every variant is a property of the bytes on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum CorruptLog {
    /// A log sector failed the field checks.
    #[error("log sector {sequence}: {error}")]
    Format {
        sequence: u32,
        #[serde(serialize_with = "serialize_display")]
        error: FormatError,
    },
    /// The header's block size is not one the kernel accepts.
    #[error("invalid block size {0}")]
    BlockSize(u32),
    /// An older log sector has a different block size than the newest.
    #[error("log sector {sequence}: block size {found}, expected {expected}")]
    BlockSizeMismatch { sequence: u32, expected: u32, found: u32 },
    /// The chain of log sectors is broken: the sector reached is not the expected one.
    #[error("expecting log sector {expected} but got {found}")]
    SequenceMismatch { expected: u32, found: u32 },
    /// An older log sector carries the WOB magic although the log is not being resumed.
    #[error("log sector {sequence} has the WOB magic in a BOW log")]
    UnexpectedWob { sequence: u32 },
    /// `sequence ≥ 2^31`: vold's signed loop would restore nothing (vold-checkpoint.md §5.5).
    #[error("sequence {0} is out of range")]
    SequenceTooLarge(u32),
    /// The chain needs more log sectors than the device has blocks.
    #[error("sequence {sequence} needs more log sectors than the device's {blocks} blocks")]
    ChainTooLong { sequence: u32, blocks: u64 },
    /// Entry 0 of a log sector does not save block 0 (the previous log sector, or for
    /// sequence 0 the original block 0).
    #[error("log sector {sequence}: entry 0 does not save block 0 (source {saved}, size {size})")]
    ChainEntry { sequence: u32, saved: Sectors, size: u32 },
    /// An entry reaches past the end of the device.
    #[error("log sector {sequence} entry {index}: range outside the device of {blocks} blocks")]
    OutOfDevice { sequence: u32, index: u32, blocks: u64 },
    /// The entries together save more blocks than the device has: the kernel never reuses a
    /// backup location, so no real log does.
    #[error("the log saves more blocks than the device's {blocks}")]
    TooManyBlocks { blocks: u64 },
    /// A saved copy does not match its checksum.
    #[error(
        "log sector {sequence} entry {index}: checksum {computed:#010x}, log says {expected:#010x}"
    )]
    Checksum { sequence: u32, index: u32, expected: u32, computed: u32 },
    /// Roll-forward is impossible: the live block 0 location is outside the device.
    #[error("sector0 {0} is not a block inside the device")]
    Sector0(Sectors),
}

fn serialize_display<S: serde::Serializer, T: std::fmt::Display>(
    value: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// Broad classes of [`RestoreError`] that callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device failed an I/O.
    Io,
    /// The log is invalid.
    Corrupt,
    /// There is no log on the device.
    NoLog,
}

/// Why a restore or validation failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A device read, write or flush failed. Never a reason to roll forward: an I/O error says
    /// nothing about the log.
    #[error("device I/O failed: {0}")]
    Device(#[from] DeviceError),
    /// No BOW or WOB magic in block 0 (vold: "No magic").
    #[error("no dm-bow log on the device")]
    NoLog,
    /// The log is invalid.
    #[error("invalid dm-bow log: {0}")]
    Corrupt(#[from] CorruptLog),
    /// The copy engine refused the plan before writing anything (a hazard or a copy outside
    /// the device; validation excludes both, so this only guards the plan's own invariants).
    #[error("the copy engine refused the restore plan: {0}")]
    Engine(blockcopy::ApplyError),
}

impl RestoreError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RestoreError::Device(_) => ErrorKind::Io,
            RestoreError::NoLog => ErrorKind::NoLog,
            RestoreError::Corrupt(_) | RestoreError::Engine(_) => ErrorKind::Corrupt,
        }
    }
}

/// A log that passed validation, and what restoring it means.
#[derive(Debug, Clone)]
pub struct ValidatedLog {
    /// The newest log sector's header (block 0 as found).
    pub header: LogHeader,
    /// The log sectors, newest first (for a resumed log: as truncated by the interrupted
    /// restore).
    pub sectors: Vec<LogSector>,
    /// Entries in all sectors.
    pub entries: u64,
    /// The head carries the WOB magic: an earlier restore was interrupted.
    pub resumed: bool,
    pub plan: RestorePlan,
}

/// What a dry run would do.
#[derive(Debug, Clone, serde::Serialize)]
pub enum PlannedAction {
    /// Apply this plan.
    Restore(RestorePlan),
    /// The log is invalid; the policy would roll forward from `sector0`.
    RollForward { reason: CorruptLog, sector0: Sectors },
    /// The log is invalid; the device would be left untouched.
    Refuse { reason: CorruptLog },
}

/// The result of [`restore`]. Every case is reported; nothing is silent.
#[derive(Debug, Clone, serde::Serialize)]
pub enum RestoreOutcome {
    /// No log on the device (the normal case on every boot without a pending checkpoint).
    NoLog,
    /// The device was restored to its contents at checkpoint start.
    Restored {
        /// Log entries the log held (for a resumed log, those left to replay).
        entries: u64,
        /// Blocks written, block 0 included.
        blocks_written: u64,
        mode: ApplyMode,
        /// The log had the WOB magic: an interrupted restore was finished.
        resumed: bool,
    },
    /// The log was invalid and the policy rolled forward: block 0 now holds the live block 0
    /// read from `sector0`, every other block keeps its new data, the checkpoint is gone.
    RolledForward { reason: CorruptLog, sector0: Sectors },
    /// The log was invalid and the device was left untouched, because the policy is
    /// [`CorruptLogPolicy::Refuse`] or because the log is a half-restored one (WOB), which is
    /// never rolled forward (vold fails it too).
    Refused { reason: CorruptLog },
    /// The entry limit stopped the restore; the device is left resumable, as vold's
    /// `restoreCheckpointPart` leaves it (its EAGAIN "Hit the test limit").
    LimitReached { entries_applied: u64, entries_remaining: u64 },
    /// Dry run: nothing was written.
    DryRun { action: PlannedAction },
}

/// A restore's report: the outcome, and the head of the log found (if any).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub header: Option<LogHeader>,
    pub outcome: RestoreOutcome,
}

/// Reads block 0's header. `Ok(None)`: no log.
fn read_header(dev: &impl BlockDevice) -> Result<Option<LogHeader>, RestoreError> {
    let mut head = [0u8; 28];
    if dev.size() < 28 {
        return Ok(None);
    }
    dev.read_at(&mut head, 0)?;
    match LogHeader::decode(&head) {
        Ok(h) => Ok(Some(h)),
        Err(_) => Ok(None),
    }
}

/// Validates the log on `dev`, plans, and applies (see the module documentation).
///
/// Never writes when the log is invalid and the policy is [`CorruptLogPolicy::Refuse`], when
/// `opts.dry_run` is set, or when there is no log. Crash-safe: if the process or the machine
/// stops anywhere inside, running `restore` again (or vold's restore) gives the same final bytes.
pub fn restore(
    dev: &impl BlockDevice,
    opts: &RestoreOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RestoreReport, RestoreError> {
    let Some(header) = read_header(dev)? else {
        return Ok(RestoreReport { header: None, outcome: RestoreOutcome::NoLog });
    };
    let report = |outcome| Ok(RestoreReport { header: Some(header), outcome });
    let keep =
        if opts.dry_run || opts.limit.is_some_and(|l| l > 0) { 0 } else { opts.memory_budget };
    let (log, kept) = match validate::validate_keeping(dev, opts.queue_depth, keep, progress) {
        Ok(validated) => validated,
        Err(RestoreError::Corrupt(reason)) => {
            let resumed = header.magic == Magic::Wob;
            if resumed || opts.policy == CorruptLogPolicy::Refuse {
                if opts.dry_run {
                    return report(RestoreOutcome::DryRun {
                        action: PlannedAction::Refuse { reason },
                    });
                }
                return report(RestoreOutcome::Refused { reason });
            }
            let sector0 = roll_forward_source(dev, &header)?;
            if opts.dry_run {
                return report(RestoreOutcome::DryRun {
                    action: PlannedAction::RollForward { reason, sector0 },
                });
            }
            roll_forward(dev, &header, sector0)?;
            return report(RestoreOutcome::RolledForward { reason, sector0 });
        }
        Err(e) => return Err(e),
    };
    if opts.dry_run {
        return report(RestoreOutcome::DryRun { action: PlannedAction::Restore(log.plan) });
    }
    if let Some(limit) = opts.limit.filter(|&l| l > 0) {
        let done = vold::replay(dev, Some(limit), log.entries, progress)?;
        let remaining = log.entries.saturating_sub(done.entries);
        if remaining > 0 {
            return report(RestoreOutcome::LimitReached {
                entries_applied: done.entries,
                entries_remaining: remaining,
            });
        }
        return report(RestoreOutcome::Restored {
            entries: log.entries,
            blocks_written: done.blocks_written,
            mode: ApplyMode::VoldReplay,
            resumed: log.resumed,
        });
    }
    let blocks_written = match (log.plan.mode, &log.plan.engine) {
        (ApplyMode::Plan, Some(copies)) => {
            apply::apply(dev, &log.plan, copies, opts, &kept, progress)?
        }
        _ => vold::replay(dev, None, log.entries, progress)?.blocks_written,
    };
    report(RestoreOutcome::Restored {
        entries: log.entries,
        blocks_written,
        mode: log.plan.mode,
        resumed: log.resumed,
    })
}

/// vold's restore, for comparison (the benchmark's baseline): its validation pass (one read
/// per block, newest first, through the relocation map), then its entry-by-entry replay with
/// exactly its flushes. Returns the entries replayed. Prefer [`restore`].
pub fn vold_baseline(dev: &impl BlockDevice) -> Result<u64, RestoreError> {
    vold::faithful_baseline(dev)
}

/// Where roll-forward reads the live block 0 from: the header's `sector0`, except when the
/// newest entry relocated exactly that block (a SECTOR0_CURRENT relocation, checksum 0): the
/// kernel updates `sector0` on disk only at the next log write (dm-bow-format.md §10 item 2),
/// so the live block 0 is at that entry's `dest`. vold would copy the stale location.
fn roll_forward_source(
    dev: &impl BlockDevice,
    header: &LogHeader,
) -> Result<Sectors, RestoreError> {
    let Some(bs) = BlockSize::new(header.block_size) else {
        return Err(CorruptLog::BlockSize(header.block_size).into());
    };
    let mut sector0 = header.sector0;
    let mut buf = vec![0u8; bs.as_usize()];
    if dev.size() >= u64::from(bs.bytes()) {
        dev.read_at(&mut buf, 0)?;
        if let Ok(head) = LogSector::parse(&buf) {
            if let Some(last) = head.entries.last() {
                if last.source == header.sector0 && last.checksum == 0 && head.entries.len() > 1 {
                    sector0 = last.dest;
                }
            }
        }
    }
    let ok = bs
        .block_of_sector(sector0)
        .and_then(|b| b.checked_add(1))
        .is_some_and(|end| end <= dev.size() / u64::from(bs.bytes()) && sector0.0 != 0);
    if !ok {
        return Err(CorruptLog::Sector0(sector0).into());
    }
    Ok(sector0)
}

/// vold's roll-forward: block 0 ← the live block 0, flushed.
fn roll_forward(
    dev: &impl BlockDevice,
    header: &LogHeader,
    sector0: Sectors,
) -> Result<(), RestoreError> {
    let len = usize::try_from(header.block_size).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; len];
    let offset = sector0.to_bytes().ok_or(CorruptLog::Sector0(sector0))?;
    dev.read_at(&mut buf, offset)?;
    dev.write_at(&buf, 0)?;
    dev.flush()?;
    Ok(())
}
