//! [`BowModel`]: dm-bow's algorithm (K66, `drivers/md/dm-bow.c` 1.2.0; dm-bow-format.md §1–§6)
//! over a [`BlockDevice`].

use std::fmt;

use super::io::{BufioModel, DataMode, Io, IoStats};
use super::ranges::{NodeId, Range, RangeMap, RangeType};
use super::BowEngine;
use crate::device::{BlockDevice, DeviceError};
use crate::format::{write_entry, LogEntry, LogHeader, ENTRY_SIZE, HEADER_SIZE_V1_0};
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

/// The pure dm-bow model over a block device.
#[derive(Debug)]
pub struct BowModel<D: BlockDevice> {
    io: Io<D>,
    bs: BlockSize,
    bss: u64,
    state: BowState,
    ranges: RangeMap,
    /// The in-memory log block (`bc->log_sector`), zeroed at construction.
    log: Vec<u8>,
    header: LogHeader,
    forward_trims: bool,
    history: Vec<LoggedEntry>,
    warnings: Vec<KernelWarning>,
}

/// Why an internal step failed: a status the kernel completes the bio with, or the device.
#[derive(Debug)]
enum Fail {
    Status(BlkStatus, &'static str),
    Device(DeviceError),
}

impl From<DeviceError> for Fail {
    fn from(e: DeviceError) -> Fail {
        Fail::Device(e)
    }
}

type PieceResult = Result<Piece, Fail>;

impl<D: BlockDevice> BowModel<D> {
    /// The constructor: a target covering the whole device (its size rounded down to whole
    /// blocks, as fs_mgr rounds the table length), state TRIM, ranges `[UNCHANGED, TOP]`.
    pub fn new(dev: D, config: ModelConfig) -> BowModel<D> {
        let bs = config.block_size;
        let bss = bs.sectors();
        let len = dev.size() / SECTOR_SIZE / bss * bss;
        BowModel {
            io: Io::new(dev, bs, config.data, config.bufio),
            bs,
            bss,
            state: BowState::Trim,
            ranges: RangeMap::new(len),
            log: vec![0; bs.as_usize()],
            header: LogHeader { count: 0, ..LogHeader::new(bs, 0, Sectors(0)) },
            forward_trims: config.forward_trims,
            history: Vec::new(),
            warnings: Vec::new(),
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
        self.bs
    }

    /// Target length in sectors.
    pub fn len_sectors(&self) -> u64 {
        self.ranges.len_sectors()
    }

    /// The range map.
    pub fn range_map(&self) -> &RangeMap {
        &self.ranges
    }

    /// The ranges in order (without TOP).
    pub fn ranges(&self) -> Vec<Range> {
        self.ranges.ranges()
    }

    /// The trimmed list, head first.
    pub fn trimmed_list(&self) -> Vec<Range> {
        self.ranges.trimmed_list()
    }

    /// The kernel's table status text.
    pub fn table_status(&self) -> String {
        self.ranges.table_status()
    }

    /// The in-memory log header (`sector0` may be newer than the one on disk, §10.2).
    pub fn header(&self) -> LogHeader {
        self.header
    }

    /// The in-memory log block, including stale entries past `count`.
    pub fn log_block(&self) -> &[u8] {
        &self.log
    }

    /// Every log entry added, in order (entry 0 of each sequence included).
    pub fn log_history(&self) -> &[LoggedEntry] {
        &self.history
    }

    /// Log sectors written so far (`sequence + 1` once the checkpoint started, else 0).
    pub fn log_sectors(&self) -> u32 {
        if self.history.is_empty() {
            0
        } else {
            self.header.sequence + 1
        }
    }

    /// What the model had to tolerate (see [`KernelWarning`]).
    pub fn warnings(&self) -> &[KernelWarning] {
        &self.warnings
    }

    /// I/O counters.
    pub fn io_stats(&self) -> IoStats {
        self.io.stats
    }

    /// Bytes actually in TRIMMED ranges (`free_bytes` over-reports, §2.2).
    pub fn true_free_bytes(&self) -> u64 {
        self.ranges.trimmed_bytes()
    }

    /// Where logical block 0 lives now (block 0 outside CHECKPOINT).
    pub fn sector0_location(&self) -> Sectors {
        match self.state {
            BowState::Checkpoint => self.header.sector0,
            _ => Sectors(0),
        }
    }

    // ---- argument checks ----

    fn check_io(&self, sector: u64, len: u64) -> Result<(), EngineError> {
        let bsb = u64::from(self.bs.bytes());
        if sector % self.bss != 0 || len % bsb != 0 {
            return Err(EngineError::Misaligned { sector, len, block_size: self.bs.bytes() });
        }
        let end = len.checked_div(SECTOR_SIZE).and_then(|s| s.checked_add(sector));
        match end {
            Some(end) if end <= self.len_sectors() && u32::try_from(len).is_ok() => Ok(()),
            _ => Err(EngineError::OutOfRange { sector, len }),
        }
    }

    // ---- TRIM state ----

    /// `add_trim`.
    fn add_trim(&mut self, sector: u64, len: u64) {
        let end = sector + len;
        let mut cur = sector;
        while cur < end {
            let Some(id) = self.ranges.find(cur) else { break };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            match self.ranges.kind(id) {
                RangeType::Unchanged => {
                    if let Some((piece, _)) = self.ranges.split(id, cur, clip) {
                        self.set_type(piece, RangeType::Trimmed);
                    }
                }
                RangeType::Trimmed => {}
                kind => self
                    .warnings
                    .push(KernelWarning::UnexpectedTypeInTrimState { sector: cur, kind }),
            }
            cur += clip;
        }
    }

    /// `remove_trim`. Returns the sectors that were TRIMMED.
    fn remove_trim(&mut self, sector: u64, len: u64) -> u64 {
        let end = sector + len;
        let mut cur = sector;
        let mut reclaimed = 0;
        while cur < end {
            let Some(id) = self.ranges.find(cur) else { break };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            match self.ranges.kind(id) {
                RangeType::Unchanged => {}
                RangeType::Trimmed => {
                    if let Some((piece, _)) = self.ranges.split(id, cur, clip) {
                        self.set_type(piece, RangeType::Unchanged);
                        reclaimed += clip;
                    }
                }
                kind => self
                    .warnings
                    .push(KernelWarning::UnexpectedTypeInTrimState { sector: cur, kind }),
            }
            cur += clip;
        }
        reclaimed
    }

    fn set_type(&mut self, id: NodeId, kind: RangeType) {
        let before = self.ranges.missing_prev_hits();
        let sector = self.ranges.sector(id);
        self.ranges.set_type(id, kind);
        if self.ranges.missing_prev_hits() != before {
            self.warnings.push(KernelWarning::NullPrevDereference { sector });
        }
    }

    // ---- CHECKPOINT state: the worker ----

    /// `bow_write` over `[sector, sector + len)`: piece by piece until done or an error.
    fn bow_write(&mut self, sector: u64, len_sectors: u64) -> Result<Vec<Piece>, EngineError> {
        let end = sector + len_sectors;
        let mut cur = sector;
        let mut pieces = Vec::new();
        while cur < end {
            let Some(id) = self.ranges.find(cur) else {
                return Err(EngineError::OutOfRange { sector: cur, len: 0 });
            };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            match self.prepare_one_range(id, cur, clip) {
                Ok(piece) => {
                    cur += piece.sectors;
                    pieces.push(piece);
                }
                Err(Fail::Device(e)) => return Err(EngineError::Device(e)),
                Err(Fail::Status(status, reason)) => {
                    return Err(EngineError::Bio {
                        sector: cur,
                        status,
                        reason,
                        progress: Progress { pieces, sector0_written: false },
                    });
                }
            }
        }
        Ok(pieces)
    }

    fn prepare_one_range(&mut self, id: NodeId, cur: u64, clip: u64) -> PieceResult {
        match self.ranges.kind(id) {
            RangeType::Changed => {
                Ok(Piece { sector: cur, sectors: clip, action: PieceAction::AlreadyChanged })
            }
            RangeType::Trimmed => {
                let (piece, len) = self
                    .ranges
                    .split(id, cur, clip)
                    .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
                self.set_type(piece, RangeType::Changed);
                Ok(Piece { sector: cur, sectors: len, action: PieceAction::FreeClaimed })
            }
            RangeType::Unchanged | RangeType::Backup => {
                self.prepare_unchanged_range(id, cur, clip, true)
            }
            RangeType::Sector0Current => self.prepare_unchanged_range(id, cur, clip, false),
            kind @ (RangeType::Sector0 | RangeType::Top | RangeType::Invalid) => {
                self.warnings.push(KernelWarning::WriteToIllegalRange { sector: cur, kind });
                Err(Fail::Status(BlkStatus::IoError, "write to a SECTOR0, TOP or INVALID range"))
            }
        }
    }

    /// `prepare_unchanged_range`: back up one piece into the head free range.
    fn prepare_unchanged_range(
        &mut self,
        br: NodeId,
        cur: u64,
        clip: u64,
        record_checksum: bool,
    ) -> PieceResult {
        let was = self.ranges.kind(br);
        let free = self
            .ranges
            .free_head()
            .ok_or(Fail::Status(BlkStatus::NoSpace, "no free space to back up to"))?;
        let free_start = self.ranges.sector(free);
        let want = self.ranges.size(free).min(clip);
        let (backup, blen) = self
            .ranges
            .split(free, free_start, want)
            .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        let (br, plen) =
            self.ranges.split(br, cur, blen).ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        if plen != blen {
            return Err(Fail::Status(BlkStatus::IoError, "backup and source sizes differ"));
        }
        let src = self.ranges.sector(br);
        let dst = self.ranges.sector(backup);
        let blocks = plen / self.bss;
        let seed = record_checksum.then_some(src / self.bss);
        let checksum = self.io.copy_blocks(src / self.bss, dst / self.bss, blocks, seed)?;
        let size = u32::try_from(plen * SECTOR_SIZE)
            .map_err(|_| Fail::Status(BlkStatus::IoError, "piece larger than a bio"))?;
        // The kernel reads the type after the split: a piece carved from inside a range is a
        // fresh INVALID node, so on a log failure the piece is left INVALID (reproduced).
        let original = self.ranges.kind(br);
        // Types first, then set_type on the backup, as the kernel does (both must be final
        // before either merges).
        self.ranges.sub_trims(plen * SECTOR_SIZE);
        match self.ranges.kind(backup) {
            RangeType::Trimmed => self.ranges.list_del(backup),
            // A fresh node carved from inside the free range: its bytes were counted as
            // unsubtracted by the split and are subtracted now.
            _ => self.ranges.settle_unsubtracted(plen * SECTOR_SIZE),
        }
        let backup_kind = if original == RangeType::Sector0Current {
            RangeType::Sector0Current
        } else {
            RangeType::Backup
        };
        self.ranges.set_kind_raw(backup, backup_kind);
        self.ranges.set_kind_raw(br, RangeType::Changed);
        self.set_type(backup, backup_kind);
        let entry = LogEntry { source: Sectors(src), dest: Sectors(dst), size, checksum };
        let rolled_over = match self.add_log_entry(entry) {
            Ok(r) => r,
            Err(e) => {
                self.ranges.set_kind_raw(br, original);
                self.warnings.push(KernelWarning::OrphanBackup { dest: dst, sectors: plen });
                return Err(e);
            }
        };
        if original == RangeType::Sector0Current {
            self.header.sector0 = Sectors(dst);
        }
        if self.ranges.alive(br) {
            self.set_type(br, RangeType::Changed);
        }
        Ok(Piece {
            sector: src,
            sectors: plen,
            action: PieceAction::BackedUp { was, entry, rolled_over },
        })
    }

    // ---- the log ----

    /// `add_log_entry`; returns whether a rollover happened first.
    fn add_log_entry(&mut self, entry: LogEntry) -> Result<bool, Fail> {
        let needed = usize::from(HEADER_SIZE_V1_0) + ENTRY_SIZE * (self.header.count as usize + 1);
        let mut rolled = false;
        if needed > self.bs.as_usize() {
            self.backup_log_sector()?;
            rolled = true;
        }
        self.append_entry(entry)?;
        Ok(rolled)
    }

    fn append_entry(&mut self, entry: LogEntry) -> Result<(), Fail> {
        let index = self.header.count;
        write_entry(&mut self.log, HEADER_SIZE_V1_0, index, &entry);
        self.header.count += 1;
        self.header.encode_into(&mut self.log);
        self.history.push(LoggedEntry { sequence: self.header.sequence, index, entry });
        Ok(self.io.write_log(&self.log)?)
    }

    /// `backup_log_sector`: save block 0 in a free block, start the next log sector with it.
    fn backup_log_sector(&mut self) -> Result<(), Fail> {
        let first = self.ranges.first().ok_or(Fail::Status(BlkStatus::IoError, "no ranges"))?;
        if self.ranges.kind(first) != RangeType::Sector0 || self.ranges.size(first) != self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "first range is not a one-block SECTOR0"));
        }
        let free = self
            .ranges
            .free_head()
            .ok_or(Fail::Status(BlkStatus::NoSpace, "no free block for the log"))?;
        let start = self.ranges.sector(free);
        let (l, len) = self
            .ranges
            .split(free, start, self.bss)
            .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        if len != self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "free range smaller than a block"));
        }
        let checksum = self.io.copy_blocks(0, start / self.bss, 1, Some(0))?;
        self.header.count = 0;
        self.header.sequence = self.header.sequence.wrapping_add(1);
        self.append_entry(LogEntry {
            source: Sectors(0),
            dest: Sectors(start),
            size: self.bs.bytes(),
            checksum,
        })?;
        self.set_type(l, RangeType::Backup);
        Ok(())
    }

    /// `prepare_log` (K66: SECTOR0_CURRENT through `set_type`).
    fn prepare_log(&mut self) -> Result<StateChange, Fail> {
        let first = self.ranges.first().ok_or(Fail::Status(BlkStatus::IoError, "no ranges"))?;
        if self.ranges.kind(first) != RangeType::Unchanged {
            return Err(Fail::Status(BlkStatus::IoError, "first range is not UNCHANGED"));
        }
        if self.ranges.size(first) < self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "first range smaller than a block"));
        }
        let (first, _) = self
            .ranges
            .split(first, 0, self.bss)
            .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        self.ranges.set_kind_raw(first, RangeType::Sector0);
        if self.ranges.size(first) != self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "SECTOR0 is not one block"));
        }
        let sector0 = self.carve_free_block()?;
        self.io.copy_blocks(0, sector0 / self.bss, 1, None)?;
        self.header.sector0 = Sectors(sector0);
        if let Some(id) = self.ranges.find(sector0) {
            self.set_type(id, RangeType::Sector0Current);
        }
        let backup = self.carve_free_block()?;
        let checksum = self.io.copy_blocks(0, backup / self.bss, 1, Some(0))?;
        self.header = LogHeader::new(self.bs, 0, Sectors(sector0));
        self.append_entry(LogEntry {
            source: Sectors(0),
            dest: Sectors(backup),
            size: self.bs.bytes(),
            checksum,
        })?;
        if let Some(id) = self.ranges.find(backup) {
            self.set_type(id, RangeType::Backup);
        }
        Ok(StateChange::CheckpointStarted { sector0: Sectors(sector0), backup: Sectors(backup) })
    }

    /// Carves one block from the start of the head free range; returns its sector.
    fn carve_free_block(&mut self) -> Result<u64, Fail> {
        let free =
            self.ranges.free_head().ok_or(Fail::Status(BlkStatus::NoSpace, "no free block"))?;
        let start = self.ranges.sector(free);
        let (id, _) = self
            .ranges
            .split(free, start, self.bss)
            .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        Ok(self.ranges.sector(id))
    }

    /// The commit copy: SECTOR0_CURRENT (the whole range holding `sector0`) onto block 0.
    fn commit(&mut self) -> Result<StateChange, Fail> {
        let cur = self
            .ranges
            .find(self.header.sector0.0)
            .ok_or(Fail::Status(BlkStatus::IoError, "sector0"))?;
        let first = self.ranges.first().ok_or(Fail::Status(BlkStatus::IoError, "no ranges"))?;
        let size = self.ranges.size(cur);
        if size != self.ranges.size(first) {
            return Err(Fail::Status(
                BlkStatus::IoError,
                "SECTOR0_CURRENT and SECTOR0 sizes differ",
            ));
        }
        let from = self.ranges.sector(cur);
        self.io.copy_blocks(from / self.bss, 0, size / self.bss, None)?;
        Ok(StateChange::Committed { from: Sectors(from) })
    }

    // ---- bios ----

    fn write_impl(
        &mut self,
        sector: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<WriteAction, EngineError> {
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Ok(WriteAction::PassedThrough);
        }
        let submit = |io: &mut Io<D>, at: u64, from: usize, to: usize| -> Result<(), EngineError> {
            match data {
                Some(d) => io.direct_write(at, &d[from..to])?,
                None => io.count_write(u64::try_from(to - from).unwrap_or(u64::MAX)),
            }
            Ok(())
        };
        let all = usize::try_from(len).unwrap_or(usize::MAX);
        match self.state {
            BowState::Committed => {
                submit(&mut self.io, sector, 0, all)?;
                Ok(WriteAction::PassedThrough)
            }
            BowState::Trim => {
                let reclaimed = self.remove_trim(sector, sectors);
                submit(&mut self.io, sector, 0, all)?;
                Ok(WriteAction::Untrimmed { reclaimed })
            }
            BowState::Checkpoint if sector == 0 => {
                let to = self.header.sector0;
                if sectors <= self.bss {
                    submit(&mut self.io, to.0, 0, all)?;
                    return Ok(WriteAction::Redirected { to });
                }
                // handle_sector0: the first block is chained to SECTOR0_CURRENT at once, the
                // rest goes through the worker.
                let bsz = self.bs.as_usize();
                submit(&mut self.io, to.0, 0, bsz)?;
                match self.bow_write(self.bss, sectors - self.bss) {
                    Ok(pieces) => {
                        submit(&mut self.io, self.bss, bsz, all)?;
                        Ok(WriteAction::Checkpointed { pieces, sector0_to: Some(to) })
                    }
                    Err(EngineError::Bio { sector, status, reason, mut progress }) => {
                        progress.sector0_written = true;
                        Err(EngineError::Bio { sector, status, reason, progress })
                    }
                    Err(e) => Err(e),
                }
            }
            BowState::Checkpoint => {
                let pieces = self.bow_write(sector, sectors)?;
                submit(&mut self.io, sector, 0, all)?;
                Ok(WriteAction::Checkpointed { pieces, sector0_to: None })
            }
        }
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
        self.state
    }

    fn set_state(&mut self, to: BowState) -> Result<StateChange, EngineError> {
        let from = self.state;
        if to.value() != from.value() + 1 {
            return Err(EngineError::InvalidStateChange { from, to });
        }
        let done = match to {
            BowState::Checkpoint => self.prepare_log(),
            BowState::Committed => self.commit(),
            BowState::Trim => {
                Err(Fail::Status(BlkStatus::IoError, "unreachable: TRIM is never next"))
            }
        };
        match done {
            Ok(change) => {
                self.state = to;
                Ok(change)
            }
            Err(Fail::Status(status, reason)) => {
                Err(EngineError::StateChangeFailed { to, status, reason })
            }
            Err(Fail::Device(e)) => Err(EngineError::Device(e)),
        }
    }

    fn free_bytes(&self) -> u64 {
        self.ranges.trims_total()
    }

    fn write(&mut self, sector: Sectors, data: &[u8]) -> Result<WriteAction, EngineError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        self.write_impl(sector.0, len, Some(data))
    }

    fn discard(&mut self, sector: Sectors, len: u64) -> Result<DiscardAction, EngineError> {
        let sector = sector.0;
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        let not_supported = |sector| EngineError::Bio {
            sector,
            status: BlkStatus::NotSupported,
            reason: "the underlying device takes no discards",
            progress: Progress::default(),
        };
        match self.state {
            BowState::Trim => {
                if sectors > 0 {
                    self.add_trim(sector, sectors);
                }
                Ok(DiscardAction::RecordedAsFree)
            }
            BowState::Committed => {
                if self.forward_trims {
                    Ok(DiscardAction::Forwarded { pieces: Vec::new() })
                } else {
                    Err(not_supported(sector))
                }
            }
            BowState::Checkpoint if sector == 0 => {
                if sectors <= self.bss {
                    // Retargeted to SECTOR0_CURRENT, then remap_unless_illegal_trim.
                    return if self.forward_trims {
                        Ok(DiscardAction::Forwarded { pieces: Vec::new() })
                    } else {
                        Err(not_supported(sector))
                    };
                }
                // The split first block is submitted directly; the rest goes through the worker
                // and is then submitted directly too (forward_trims is not consulted).
                let pieces = self.bow_write(self.bss, sectors - self.bss)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
            BowState::Checkpoint => {
                let pieces = self.bow_write(sector, sectors)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
        }
    }

    fn read(&mut self, sector: Sectors, buf: &mut [u8]) -> Result<ReadAction, EngineError> {
        let sector = sector.0;
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_io(sector, len)?;
        if self.state == BowState::Checkpoint && sector == 0 && !buf.is_empty() {
            let from = self.header.sector0;
            let bsz = self.bs.as_usize();
            let (head, rest) = buf.split_at_mut(bsz.min(buf.len()));
            self.io.direct_read(from.0, head)?;
            if !rest.is_empty() {
                self.io.direct_read(self.bss, rest)?;
            }
            return Ok(ReadAction::Sector0Redirected { from });
        }
        self.io.direct_read(sector, buf)?;
        Ok(ReadAction::Direct)
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
