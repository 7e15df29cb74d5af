//! [`BowModel`]: dm-bow's algorithm (K66, `drivers/md/dm-bow.c` 1.2.0; dm-bow-format.md §1–§6)
//! over a [`BlockDevice`].

use std::fmt;

use super::io::{BufioModel, DataMode, Io, IoStats};
use super::ranges::{Range, RangeMap, RangeType};
use super::worker::{StepError, Worker, WorkerIo};
use super::BowEngine;
use crate::device::{BlockDevice, DeviceError};
use crate::format::{LogEntry, LogHeader};
use crate::units::{BlockSize, Sectors, SECTOR_SIZE};

/// The target's state (`/sys/.../bow/state`, dm-bow-format.md §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BowState {
    /// 0: discards are recorded as free space and not sent down.
    Trim,
    /// 1: back up before overwrite, log in block 0.
    Checkpoint,
    /// 2: pass-through.
    Committed,
}

impl BowState {
    /// The number sysfs prints and accepts.
    pub fn value(self) -> u8 {
        match self {
            BowState::Trim => 0,
            BowState::Checkpoint => 1,
            BowState::Committed => 2,
        }
    }

    /// Parses a sysfs value.
    pub fn from_value(v: u8) -> Option<BowState> {
        match v {
            0 => Some(BowState::Trim),
            1 => Some(BowState::Checkpoint),
            2 => Some(BowState::Committed),
            _ => None,
        }
    }
}

impl fmt::Display for BowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

/// A `blk_status_t` the kernel completes a bio (or a sysfs write, §1.4) with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BlkStatus {
    /// `BLK_STS_NOTSUPP` (1): a discard the underlying device cannot take.
    NotSupported,
    /// `BLK_STS_NOSPC` (3): no free space left for a backup or a log sector.
    NoSpace,
    /// `BLK_STS_IOERR` (10): an internal inconsistency the kernel WARNs about.
    IoError,
}

impl BlkStatus {
    /// The kernel's numeric value (which leaks out of `state_store` as a positive count).
    pub fn value(self) -> u8 {
        match self {
            BlkStatus::NotSupported => 1,
            BlkStatus::NoSpace => 3,
            BlkStatus::IoError => 10,
        }
    }
}

impl fmt::Display for BlkStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlkStatus::NotSupported => "BLK_STS_NOTSUPP",
            BlkStatus::NoSpace => "BLK_STS_NOSPC",
            BlkStatus::IoError => "BLK_STS_IOERR",
        })
    }
}

/// What a failed bio had already done before it failed (the kernel does not undo it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Pieces handled before the failing one (their backups are logged and stay logged).
    pub pieces: Vec<Piece>,
    /// The first block of a multi-block write at sector 0 had been submitted to
    /// SECTOR0_CURRENT before the rest failed (`handle_sector0` chains it first).
    pub sector0_written: bool,
}

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Not the next state: the kernel's "Invalid state change" (`-EINVAL`).
    #[error("invalid state change from {from} to {to}")]
    InvalidStateChange { from: BowState, to: BowState },
    /// The I/O is not block-aligned (the block layer never sends such a bio, §1.2).
    #[error("I/O at sector {sector} of {len} bytes is not aligned to the {block_size}-byte block")]
    Misaligned { sector: u64, len: u64, block_size: u32 },
    /// The I/O is outside the device or larger than a bio can be.
    #[error("I/O at sector {sector} of {len} bytes is outside the device")]
    OutOfRange { sector: u64, len: u64 },
    /// The bio completed with an error status.
    #[error("bio at sector {sector} failed with {status}: {reason}")]
    Bio { sector: u64, status: BlkStatus, reason: &'static str, progress: Progress },
    /// `prepare_log` or the commit copy failed; the state did not change (but the range map
    /// keeps what was done, as in the kernel).
    #[error("state change to {to} failed with {status}: {reason}")]
    StateChangeFailed { to: BowState, status: BlkStatus, reason: &'static str },
    /// The underlying device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A data-less write was asked of a model that moves data, or the reverse.
    #[error("operation needs data mode {0:?}")]
    WrongDataMode(DataMode),
}

/// Classification callers branch on (STYLE rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// A request the kernel rejects (`EINVAL`, misaligned, out of range).
    Invalid,
    /// Free space ran out.
    NoSpace,
    /// The device or an internal consistency check failed.
    Io,
    /// A discard the device cannot take.
    NotSupported,
}

impl EngineError {
    /// The error's kind.
    pub fn kind(&self) -> EngineErrorKind {
        match self {
            EngineError::InvalidStateChange { .. }
            | EngineError::Misaligned { .. }
            | EngineError::OutOfRange { .. }
            | EngineError::WrongDataMode(_) => EngineErrorKind::Invalid,
            EngineError::Bio { status, .. } | EngineError::StateChangeFailed { status, .. } => {
                match status {
                    BlkStatus::NoSpace => EngineErrorKind::NoSpace,
                    BlkStatus::IoError => EngineErrorKind::Io,
                    BlkStatus::NotSupported => EngineErrorKind::NotSupported,
                }
            }
            EngineError::Device(_) => EngineErrorKind::Io,
        }
    }
}

/// Result of a successful state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// `prepare_log` ran: block 0 copied to `sector0` (SECTOR0_CURRENT) and to `backup`
    /// (entry 0), and the first log sector written.
    CheckpointStarted { sector0: Sectors, backup: Sectors },
    /// The SECTOR0_CURRENT range at `from` was copied back onto block 0.
    Committed { from: Sectors },
}

/// What happened to one piece of a write or discard in CHECKPOINT (`prepare_one_range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceAction {
    /// CHANGED: nothing to do.
    AlreadyChanged,
    /// TRIMMED: became CHANGED, no copy, no log entry.
    FreeClaimed,
    /// UNCHANGED, BACKUP or SECTOR0_CURRENT (`was`): copied to free space and logged.
    BackedUp { was: RangeType, entry: LogEntry, rolled_over: bool },
}

/// One piece of a bio, clipped to one range (and to one backup chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First sector.
    pub sector: u64,
    /// Length in sectors.
    pub sectors: u64,
    /// What was done.
    pub action: PieceAction,
}

/// Result of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAction {
    /// COMMITTED: straight to the device.
    PassedThrough,
    /// TRIM: written through; `reclaimed` sectors of it were TRIMMED and are UNCHANGED again.
    Untrimmed { reclaimed: u64 },
    /// CHECKPOINT, at most one block at sector 0: retargeted to SECTOR0_CURRENT.
    Redirected { to: Sectors },
    /// CHECKPOINT: the worker handled these pieces, then the write was submitted.
    /// `sector0_to` is set when the write started at sector 0 and its first block went to
    /// SECTOR0_CURRENT.
    Checkpointed { pieces: Vec<Piece>, sector0_to: Option<Sectors> },
}

/// Result of a discard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscardAction {
    /// TRIM: recorded as free space and completed without being sent down.
    RecordedAsFree,
    /// Sent to the underlying device after the CHECKPOINT worker handled these pieces (empty
    /// in COMMITTED). The model's underlying device keeps its data on a discard.
    Forwarded { pieces: Vec<Piece> },
}

/// Result of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAction {
    /// Read from the same sectors of the device.
    Direct,
    /// The first block came from SECTOR0_CURRENT at `from`; any rest was direct.
    Sector0Redirected { from: Sectors },
}

/// Something the kernel would WARN about, dereference wrongly or leave inconsistent, recorded
/// instead of crashing the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelWarning {
    /// `add_trim`/`remove_trim` met a range that is neither UNCHANGED nor TRIMMED.
    UnexpectedTypeInTrimState { sector: u64, kind: RangeType },
    /// `set_type` on the first range: the kernel dereferences a NULL `prev` here.
    NullPrevDereference { sector: u64 },
    /// A backup was copied and marked BACKUP but its log entry could not be added (rollover
    /// found no free block): the block stays BACKUP with no entry, the source keeps its old
    /// type without being merged with its neighbours.
    OrphanBackup { dest: u64, sectors: u64 },
    /// A write met a SECTOR0, TOP or INVALID range (`prepare_one_range`'s default case).
    WriteToIllegalRange { sector: u64, kind: RangeType },
}

/// How to build a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// The bow block size (`block_size:N`, or the underlying logical block size).
    pub block_size: BlockSize,
    /// Move data (`Full`) or only track ranges (`RangesOnly`, for the dry run).
    pub data: DataMode,
    /// Model of dm-bufio's cache (§10.1).
    pub bufio: BufioModel,
    /// Whether the underlying device takes discards (`forward_trims`, §1.2).
    pub forward_trims: bool,
}

impl ModelConfig {
    /// Full data, uncached bufio, an underlying device that takes discards.
    pub fn new(block_size: BlockSize) -> ModelConfig {
        ModelConfig {
            block_size,
            data: DataMode::Full,
            bufio: BufioModel::Uncached,
            forward_trims: true,
        }
    }
}

/// One log entry as written, with where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedEntry {
    /// Log sector sequence.
    pub sequence: u32,
    /// Index in that log sector.
    pub index: u32,
    /// The entry.
    pub entry: LogEntry,
}

/// The pure dm-bow model over a block device: the shared [`Worker`] doing its I/O at once, in
/// the kernel's order, through the dm-bufio model.
#[derive(Debug)]
pub struct BowModel<D: BlockDevice> {
    io: Io<D>,
    worker: Worker,
    forward_trims: bool,
}

impl<D: BlockDevice> BowModel<D> {
    /// The constructor: a target covering the whole device (its size rounded down to whole
    /// blocks, as fs_mgr rounds the table length), state TRIM, ranges `[UNCHANGED, TOP]`.
    pub fn new(dev: D, config: ModelConfig) -> BowModel<D> {
        let bs = config.block_size;
        let bss = bs.sectors();
        let len = dev.size() / SECTOR_SIZE / bss * bss;
        BowModel {
            io: Io::new(dev, bs, config.data, config.bufio),
            worker: Worker::new(bs, len, true),
            forward_trims: config.forward_trims,
        }
    }

    /// The underlying device.
    pub fn device(&self) -> &D {
        &self.io.dev
    }

    /// Gives the device back.
    pub fn into_device(self) -> D {
        self.io.dev
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.worker.block_size()
    }

    /// Target length in sectors.
    pub fn len_sectors(&self) -> u64 {
        self.worker.ranges().len_sectors()
    }

    /// The range map.
    pub fn range_map(&self) -> &RangeMap {
        self.worker.ranges()
    }

    /// The ranges in order (without TOP).
    pub fn ranges(&self) -> Vec<Range> {
        self.worker.ranges().ranges()
    }

    /// The trimmed list, head first.
    pub fn trimmed_list(&self) -> Vec<Range> {
        self.worker.ranges().trimmed_list()
    }

    /// The kernel's table status text.
    pub fn table_status(&self) -> String {
        self.worker.ranges().table_status()
    }

    /// The in-memory log header (`sector0` may be newer than the one on disk, §10.2).
    pub fn header(&self) -> LogHeader {
        self.worker.header()
    }

    /// The in-memory log block, including stale entries past `count`.
    pub fn log_block(&self) -> &[u8] {
        self.worker.log_block()
    }

    /// Every log entry added, in order (entry 0 of each sequence included).
    pub fn log_history(&self) -> &[LoggedEntry] {
        self.worker.history()
    }

    /// Log sectors written so far (`sequence + 1` once the checkpoint started, else 0).
    pub fn log_sectors(&self) -> u32 {
        if self.worker.history().is_empty() {
            0
        } else {
            self.worker.header().sequence + 1
        }
    }

    /// What the model had to tolerate (see [`KernelWarning`]).
    pub fn warnings(&self) -> &[KernelWarning] {
        self.worker.warnings()
    }

    /// I/O counters.
    pub fn io_stats(&self) -> IoStats {
        self.io.stats
    }

    /// Bytes actually in TRIMMED ranges (`free_bytes` over-reports, §2.2).
    pub fn true_free_bytes(&self) -> u64 {
        self.worker.ranges().trimmed_bytes()
    }

    /// Where logical block 0 lives now (block 0 outside CHECKPOINT).
    pub fn sector0_location(&self) -> Sectors {
        self.worker.sector0_location()
    }

    /// The commit copy: SECTOR0_CURRENT (the whole range holding `sector0`) onto block 0.
    fn commit(worker: &mut Worker, io: &mut Io<D>) -> Result<StateChange, StepError> {
        let (from, size) = worker.sector0_current()?;
        let bss = worker.block_size().sectors();
        io.copy_blocks(from / bss, 0, size / bss, None)?;
        Ok(StateChange::Committed { from: Sectors(from) })
    }

    fn write_impl(
        &mut self,
        sector: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<WriteAction, EngineError> {
        self.worker.write(&mut self.io, sector, len, |io, at, bytes| match data {
            Some(d) => io.direct_write(at, &d[bytes]),
            None => {
                io.count_write(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
                Ok(())
            }
        })
    }

    /// A write of `len` bytes without data, for [`DataMode::RangesOnly`].
    pub fn write_extent(&mut self, sector: Sectors, len: u64) -> Result<WriteAction, EngineError> {
        if self.io.mode != DataMode::RangesOnly {
            return Err(EngineError::WrongDataMode(DataMode::RangesOnly));
        }
        self.write_impl(sector.0, len, None)
    }
}

impl<D: BlockDevice> BowEngine for BowModel<D> {
    fn state(&self) -> BowState {
        self.worker.state()
    }

    fn set_state(&mut self, to: BowState) -> Result<StateChange, EngineError> {
        let io = &mut self.io;
        self.worker.set_state(to, |worker| match to {
            BowState::Checkpoint => worker.prepare_log(io),
            BowState::Committed => Self::commit(worker, io),
            BowState::Trim => {
                Err(StepError::Status(BlkStatus::IoError, "unreachable: TRIM is never next"))
            }
        })
    }

    fn free_bytes(&self) -> u64 {
        self.worker.ranges().trims_total()
    }

    fn write(&mut self, sector: Sectors, data: &[u8]) -> Result<WriteAction, EngineError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        self.write_impl(sector.0, len, Some(data))
    }

    fn discard(&mut self, sector: Sectors, len: u64) -> Result<DiscardAction, EngineError> {
        self.worker.discard(&mut self.io, sector.0, len, self.forward_trims)
    }

    fn read(&mut self, sector: Sectors, buf: &mut [u8]) -> Result<ReadAction, EngineError> {
        let io = &mut self.io;
        self.worker.read(sector.0, buf, |at, part| io.direct_read(at, part))
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.io.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::model::SizeOnlyDevice;

    fn model(blocks: usize) -> BowModel<MemDevice> {
        BowModel::new(MemDevice::new(blocks * 4096), ModelConfig::new(BlockSize::B4096))
    }

    #[test]
    fn only_the_next_state_is_accepted() {
        let mut m = model(16);
        m.discard(Sectors(64), 8 * 4096).unwrap();
        for to in [BowState::Trim, BowState::Committed] {
            let e = m.set_state(to).unwrap_err();
            assert!(matches!(e, EngineError::InvalidStateChange { from: BowState::Trim, .. }));
            assert_eq!(e.kind(), EngineErrorKind::Invalid);
        }
        m.set_state(BowState::Checkpoint).unwrap();
        for to in [BowState::Trim, BowState::Checkpoint] {
            assert!(matches!(m.set_state(to), Err(EngineError::InvalidStateChange { .. })));
        }
        m.set_state(BowState::Committed).unwrap();
        for to in [BowState::Trim, BowState::Checkpoint, BowState::Committed] {
            assert!(matches!(m.set_state(to), Err(EngineError::InvalidStateChange { .. })));
        }
        assert_eq!(m.state(), BowState::Committed);
        assert_eq!(BowState::from_value(3), None);
    }

    #[test]
    fn misaligned_and_out_of_range_io_is_rejected() {
        let mut m = model(4);
        assert!(matches!(m.write(Sectors(1), &[0; 4096]), Err(EngineError::Misaligned { .. })));
        assert!(matches!(m.write(Sectors(0), &[0; 512]), Err(EngineError::Misaligned { .. })));
        assert!(matches!(m.write(Sectors(32), &[0; 4096]), Err(EngineError::OutOfRange { .. })));
        assert!(matches!(m.discard(Sectors(24), 8192), Err(EngineError::OutOfRange { .. })));
        let mut buf = [0u8; 4096];
        assert!(matches!(
            m.read(Sectors(u64::MAX - 7), &mut buf),
            Err(EngineError::OutOfRange { .. })
        ));
    }

    #[test]
    fn committed_passes_through_and_discards_need_device_support() {
        let cfg = ModelConfig { forward_trims: false, ..ModelConfig::new(BlockSize::B4096) };
        let mut m = BowModel::new(MemDevice::new(16 * 4096), cfg);
        m.discard(Sectors(64), 8 * 4096).unwrap();
        m.set_state(BowState::Checkpoint).unwrap();
        let e = m.discard(Sectors(0), 4096).unwrap_err();
        assert_eq!(e.kind(), EngineErrorKind::NotSupported);
        // A longer discard in CHECKPOINT is forwarded regardless (the worker submits it).
        assert!(matches!(m.discard(Sectors(8), 4096), Ok(DiscardAction::Forwarded { .. })));
        m.set_state(BowState::Committed).unwrap();
        assert_eq!(m.write(Sectors(8), &[3; 4096]).unwrap(), WriteAction::PassedThrough);
        assert_eq!(m.discard(Sectors(8), 4096).unwrap_err().kind(), EngineErrorKind::NotSupported);
        let mut buf = [0u8; 4096];
        assert_eq!(m.read(Sectors(0), &mut buf).unwrap(), ReadAction::Direct);
    }

    #[test]
    fn device_errors_are_reported_as_such() {
        let mut m =
            BowModel::new(SizeOnlyDevice::new(16 * 4096), ModelConfig::new(BlockSize::B4096));
        m.discard(Sectors(64), 8 * 4096).unwrap();
        assert!(matches!(m.set_state(BowState::Checkpoint), Err(EngineError::Device(_))));
        assert_eq!(m.state(), BowState::Trim);
        assert!(matches!(m.write_extent(Sectors(8), 4096), Err(EngineError::WrongDataMode(_))));
    }
}
