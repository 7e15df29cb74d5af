//! [`Worker`]: dm-bow's decisions (K66, `drivers/md/dm-bow.c` 1.2.0; dm-bow-format.md §1–§6),
//! written once for every engine that follows them: the state, the range map, the in-memory log
//! and the CHECKPOINT worker (`bow_write`, `prepare_unchanged_range`, rollover, `prepare_log`).
//!
//! What differs between engines is behind [`WorkerIo`]: who copies blocks and writes the log,
//! and when (the model at once through its dm-bufio model, `bow-engine` staged into a batch),
//! and where copies go ([`WorkerIo::choose_free`]: the kernel's head of the trimmed list by
//! default). User writes and reads are passed back through closures, because only the caller
//! holds their data.

use std::ops::Range as ByteRange;

use super::engine::{
    BlkStatus, BowState, DiscardAction, EngineError, KernelWarning, LoggedEntry, Piece,
    PieceAction, Progress, ReadAction, StateChange, WriteAction,
};
use super::ranges::{NodeId, RangeMap, RangeType};
use crate::crc::{seed_for, BowCrc};
use crate::device::DeviceError;
use crate::format::{write_entry, LogEntry, LogHeader, ENTRY_SIZE, HEADER_SIZE_V1_0};
use crate::units::{BlockSize, Sectors, SECTOR_SIZE};

/// Why a step of the worker failed: a status the kernel completes the bio (or the sysfs write)
/// with, or the device.
#[derive(Debug)]
pub enum StepError {
    /// A `blk_status_t` and what caused it.
    Status(BlkStatus, &'static str),
    /// The underlying device failed.
    Device(DeviceError),
}

impl StepError {
    /// `BLK_STS_IOERR`: the kernel's answer to an inconsistency it WARNs about.
    fn io(reason: &'static str) -> StepError {
        StepError::Status(BlkStatus::IoError, reason)
    }
}

impl From<DeviceError> for StepError {
    fn from(e: DeviceError) -> StepError {
        StepError::Device(e)
    }
}

/// A piece of a TRIMMED range chosen to hold a copy: `len` sectors from `start`, inside `range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreePiece {
    /// The TRIMMED range's node.
    pub range: NodeId,
    /// First sector of the piece.
    pub start: u64,
    /// Sectors (at most the wanted length; less when the range is smaller).
    pub len: u64,
}

/// The kernel's allocator: the start of the head of the trimmed list (the most recently created
/// free range), as much of it as is wanted.
pub fn head_of_free_list(ranges: &RangeMap, want: u64) -> Option<FreePiece> {
    let range = ranges.free_head()?;
    Some(FreePiece { range, start: ranges.sector(range), len: ranges.size(range).min(want) })
}

/// The reading half of `copy_data`, the same in every engine: reads `blocks` blocks from block
/// `src` with `read_block`, folding each into a CRC seeded with block index `seed` when given.
/// Returns the blocks and the checksum (0 when not requested).
pub fn read_sources(
    src: u64,
    blocks: u64,
    seed: Option<u64>,
    mut read_block: impl FnMut(u64) -> Result<Vec<u8>, DeviceError>,
) -> Result<(Vec<Vec<u8>>, u32), DeviceError> {
    let mut crc = seed.map(|s| BowCrc::new(seed_for(s)));
    let mut copies = Vec::new();
    for i in 0..blocks {
        let data = read_block(src + i)?;
        if let Some(c) = crc.as_mut() {
            c.update(&data);
        }
        copies.push(data);
    }
    Ok((copies, crc.map_or(0, BowCrc::finish)))
}

/// What an engine does for the worker: the copies and log writes, and where copies go.
pub trait WorkerIo {
    /// Where the next copy of up to `want` sectors goes; `None` when no free space is left.
    /// The default is the kernel's ([`head_of_free_list`]).
    fn choose_free(&mut self, ranges: &RangeMap, want: u64) -> Option<FreePiece> {
        head_of_free_list(ranges, want)
    }

    /// `copy_data`: copies `blocks` blocks from block `src` to block `dst`; returns their CRC
    /// seeded with block index `seed`, or 0 when `seed` is `None`.
    fn copy_blocks(
        &mut self,
        src: u64,
        dst: u64,
        blocks: u64,
        seed: Option<u64>,
    ) -> Result<u32, DeviceError>;

    /// Writes the in-memory log block (`block0`) to block 0; once per entry added.
    fn write_log(&mut self, block0: &[u8]) -> Result<(), DeviceError>;
}

/// Counters of the worker's copies and log entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerStats {
    /// Log entries added (entry 0 of each log sector included).
    pub entries_logged: u64,
    /// Backups whose source was itself a copy (BACKUP or SECTOR0_CURRENT).
    pub rebackups: u64,
    /// Bytes of those re-backups.
    pub rebackup_bytes: u64,
    /// Bytes carved out of free space for copies.
    pub allocated_bytes: u64,
    /// Log sectors saved by a rollover.
    pub log_rollovers: u64,
}

/// dm-bow's state and bookkeeping, and its algorithm over them.
#[derive(Debug)]
pub struct Worker {
    bs: BlockSize,
    bss: u64,
    state: BowState,
    ranges: RangeMap,
    /// The in-memory log block (`bc->log_sector`): zeroed once, never cleared.
    log: Vec<u8>,
    header: LogHeader,
    /// Every entry added, for the model's tests; `None` in an engine that runs for long.
    history: Option<Vec<LoggedEntry>>,
    warnings: Vec<KernelWarning>,
    stats: WorkerStats,
}

impl Worker {
    /// A target of `len_sectors` (whole blocks), state TRIM, ranges `[UNCHANGED, TOP]`.
    /// `keep_history` keeps every log entry added ([`Worker::history`]).
    pub fn new(bs: BlockSize, len_sectors: u64, keep_history: bool) -> Worker {
        Worker {
            bs,
            bss: bs.sectors(),
            state: BowState::Trim,
            ranges: RangeMap::new(len_sectors),
            log: vec![0; bs.as_usize()],
            header: LogHeader { count: 0, ..LogHeader::new(bs, 0, Sectors(0)) },
            history: keep_history.then(Vec::new),
            warnings: Vec::new(),
            stats: WorkerStats::default(),
        }
    }

    /// The current state.
    pub fn state(&self) -> BowState {
        self.state
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.bs
    }

    /// The range map.
    pub fn ranges(&self) -> &RangeMap {
        &self.ranges
    }

    /// The in-memory log header (`sector0` may be newer than the one on disk, §10.2).
    pub fn header(&self) -> LogHeader {
        self.header
    }

    /// The in-memory log block, including stale entries past `count`.
    pub fn log_block(&self) -> &[u8] {
        &self.log
    }

    /// Replaces the in-memory log block with `block` (one block), for an engine resumed by
    /// replaying its decisions: the replay has every entry but not its checksum (that needs the
    /// source data), which the block 0 on disk has. The caller checks that `block` holds the
    /// same header and entries. Returns false (nothing changed) for a wrong length.
    pub fn replace_log_block(&mut self, block: &[u8]) -> bool {
        if block.len() != self.log.len() {
            return false;
        }
        self.log.copy_from_slice(block);
        true
    }

    /// Every log entry added, when kept.
    pub fn history(&self) -> &[LoggedEntry] {
        self.history.as_deref().unwrap_or(&[])
    }

    /// What the kernel would have WARNed about or crashed on.
    pub fn warnings(&self) -> &[KernelWarning] {
        &self.warnings
    }

    /// Counters.
    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// Where logical block 0 lives now (block 0 outside CHECKPOINT).
    pub fn sector0_location(&self) -> Sectors {
        match self.state {
            BowState::Checkpoint => self.header.sector0,
            _ => Sectors(0),
        }
    }

    /// Rejects I/O the block layer would never send: misaligned, outside the target, or larger
    /// than a bio.
    pub fn check_io(&self, sector: u64, len: u64) -> Result<(), EngineError> {
        let bsb = u64::from(self.bs.bytes());
        if sector % self.bss != 0 || len % bsb != 0 {
            return Err(EngineError::Misaligned { sector, len, block_size: self.bs.bytes() });
        }
        let end = len.checked_div(SECTOR_SIZE).and_then(|s| s.checked_add(sector));
        match end {
            Some(end) if end <= self.ranges.len_sectors() && u32::try_from(len).is_ok() => Ok(()),
            _ => Err(EngineError::OutOfRange { sector, len }),
        }
    }

    // ---- state changes ----

    /// A sysfs `state` write: only the next state is accepted; `change` does the work
    /// ([`Worker::prepare_log`] or the engine's commit copy). On failure the state stays.
    pub fn set_state(
        &mut self,
        to: BowState,
        change: impl FnOnce(&mut Worker) -> Result<StateChange, StepError>,
    ) -> Result<StateChange, EngineError> {
        let from = self.state;
        if to.value() != from.value() + 1 {
            return Err(EngineError::InvalidStateChange { from, to });
        }
        match change(self) {
            Ok(change) => {
                self.state = to;
                Ok(change)
            }
            Err(StepError::Status(status, reason)) => {
                Err(EngineError::StateChangeFailed { to, status, reason })
            }
            Err(StepError::Device(e)) => Err(EngineError::Device(e)),
        }
    }

    /// `prepare_log` (K66: SECTOR0_CURRENT through `set_type`).
    pub fn prepare_log(&mut self, io: &mut impl WorkerIo) -> Result<StateChange, StepError> {
        let first = self.first_range()?;
        if self.ranges.kind(first) != RangeType::Unchanged {
            return Err(StepError::io("first range is not UNCHANGED"));
        }
        if self.ranges.size(first) < self.bss {
            return Err(StepError::io("first range smaller than a block"));
        }
        let (first, _) = self.ranges.split(first, 0, self.bss).ok_or(StepError::io("split"))?;
        self.ranges.set_kind_raw(first, RangeType::Sector0);
        if self.ranges.size(first) != self.bss {
            return Err(StepError::io("SECTOR0 is not one block"));
        }
        let (_, sector0) = self.carve_free_block(io, "no free block")?;
        io.copy_blocks(0, sector0 / self.bss, 1, None)?;
        self.header.sector0 = Sectors(sector0);
        if let Some(id) = self.ranges.find(sector0) {
            self.set_type(id, RangeType::Sector0Current);
        }
        let (_, backup) = self.carve_free_block(io, "no free block")?;
        let checksum = io.copy_blocks(0, backup / self.bss, 1, Some(0))?;
        self.header = LogHeader::new(self.bs, 0, Sectors(sector0));
        self.append_entry(
            io,
            LogEntry { source: Sectors(0), dest: Sectors(backup), size: self.bs.bytes(), checksum },
        )?;
        if let Some(id) = self.ranges.find(backup) {
            self.set_type(id, RangeType::Backup);
        }
        Ok(StateChange::CheckpointStarted { sector0: Sectors(sector0), backup: Sectors(backup) })
    }

    /// The commit copy's source: the SECTOR0_CURRENT range (its first sector and its length),
    /// checked to be as large as SECTOR0.
    pub fn sector0_current(&self) -> Result<(u64, u64), StepError> {
        let cur = self.ranges.find(self.header.sector0.0).ok_or(StepError::io("sector0"))?;
        let first = self.first_range()?;
        let size = self.ranges.size(cur);
        if size != self.ranges.size(first) {
            return Err(StepError::io("SECTOR0_CURRENT and SECTOR0 sizes differ"));
        }
        Ok((self.ranges.sector(cur), size))
    }

    // ---- bios ----

    /// A write bio of `len` bytes at `sector`. `submit(io, at, bytes)` sends `bytes` of the
    /// user's data to sector `at` of the underlying device; it is called after the worker has
    /// backed up what the write overwrites (and for the first block of a long sector-0 write,
    /// before: the kernel chains it first).
    pub fn write<S: WorkerIo>(
        &mut self,
        io: &mut S,
        sector: u64,
        len: u64,
        mut submit: impl FnMut(&mut S, u64, ByteRange<usize>) -> Result<(), DeviceError>,
    ) -> Result<WriteAction, EngineError> {
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Ok(WriteAction::PassedThrough);
        }
        let all = usize::try_from(len).unwrap_or(usize::MAX);
        match self.state {
            BowState::Committed => {
                submit(io, sector, 0..all)?;
                Ok(WriteAction::PassedThrough)
            }
            BowState::Trim => {
                let reclaimed = self.remove_trim(sector, sectors);
                submit(io, sector, 0..all)?;
                Ok(WriteAction::Untrimmed { reclaimed })
            }
            BowState::Checkpoint if sector == 0 => {
                let to = self.header.sector0;
                if sectors <= self.bss {
                    submit(io, to.0, 0..all)?;
                    return Ok(WriteAction::Redirected { to });
                }
                // handle_sector0: the first block is chained to SECTOR0_CURRENT at once, the
                // rest goes through the worker.
                let bsz = self.bs.as_usize();
                submit(io, to.0, 0..bsz)?;
                match self.bow_write(io, self.bss, sectors - self.bss) {
                    Ok(pieces) => {
                        submit(io, self.bss, bsz..all)?;
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
                let pieces = self.bow_write(io, sector, sectors)?;
                submit(io, sector, 0..all)?;
                Ok(WriteAction::Checkpointed { pieces, sector0_to: None })
            }
        }
    }

    /// A discard bio of `len` bytes at `sector`. `forward_trims`: whether the underlying device
    /// takes discards (the caller forwards them; the data stays, as on a device that may keep it).
    pub fn discard(
        &mut self,
        io: &mut impl WorkerIo,
        sector: u64,
        len: u64,
        forward_trims: bool,
    ) -> Result<DiscardAction, EngineError> {
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        let forwarded_as_is = || {
            if forward_trims {
                Ok(DiscardAction::Forwarded { pieces: Vec::new() })
            } else {
                Err(EngineError::Bio {
                    sector,
                    status: BlkStatus::NotSupported,
                    reason: "the underlying device takes no discards",
                    progress: Progress::default(),
                })
            }
        };
        match self.state {
            BowState::Trim => {
                if sectors > 0 {
                    self.add_trim(sector, sectors);
                }
                Ok(DiscardAction::RecordedAsFree)
            }
            BowState::Committed => forwarded_as_is(),
            // Retargeted to SECTOR0_CURRENT, then remap_unless_illegal_trim.
            BowState::Checkpoint if sector == 0 && sectors <= self.bss => forwarded_as_is(),
            BowState::Checkpoint if sector == 0 => {
                // The split first block is submitted directly; the rest goes through the worker
                // and is then submitted directly too (forward_trims is not consulted).
                let pieces = self.bow_write(io, self.bss, sectors - self.bss)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
            BowState::Checkpoint => {
                let pieces = self.bow_write(io, sector, sectors)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
        }
    }

    /// A read bio into `buf`; `read_at(sector, part)` reads the underlying device. In
    /// CHECKPOINT the first block at sector 0 comes from SECTOR0_CURRENT.
    pub fn read(
        &self,
        sector: u64,
        buf: &mut [u8],
        mut read_at: impl FnMut(u64, &mut [u8]) -> Result<(), DeviceError>,
    ) -> Result<ReadAction, EngineError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_io(sector, len)?;
        if self.state == BowState::Checkpoint && sector == 0 && !buf.is_empty() {
            let from = self.header.sector0;
            let (head, rest) = buf.split_at_mut(self.bs.as_usize().min(buf.len()));
            read_at(from.0, head)?;
            if !rest.is_empty() {
                read_at(self.bss, rest)?;
            }
            return Ok(ReadAction::Sector0Redirected { from });
        }
        read_at(sector, buf)?;
        Ok(ReadAction::Direct)
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

    /// `set_type`, recording the kernel's NULL `prev` dereference instead of crashing.
    fn set_type(&mut self, id: NodeId, kind: RangeType) {
        let before = self.ranges.missing_prev_hits();
        let sector = self.ranges.sector(id);
        self.ranges.set_type(id, kind);
        if self.ranges.missing_prev_hits() != before {
            self.warnings.push(KernelWarning::NullPrevDereference { sector });
        }
    }

    fn first_range(&self) -> Result<NodeId, StepError> {
        self.ranges.first().ok_or(StepError::io("no ranges"))
    }

    // ---- the allocator ----

    /// Carves the piece `io` chooses out of free space; returns its node and length.
    /// `no_space` says what found no free space.
    fn carve(
        &mut self,
        io: &mut impl WorkerIo,
        want: u64,
        no_space: &'static str,
    ) -> Result<(NodeId, u64), StepError> {
        let free = io
            .choose_free(&self.ranges, want)
            .ok_or(StepError::Status(BlkStatus::NoSpace, no_space))?;
        let carved =
            self.ranges.split(free.range, free.start, free.len).ok_or(StepError::io("split"))?;
        self.stats.allocated_bytes += carved.1 * SECTOR_SIZE;
        Ok(carved)
    }

    /// Carves one block; returns its node and sector.
    fn carve_free_block(
        &mut self,
        io: &mut impl WorkerIo,
        no_space: &'static str,
    ) -> Result<(NodeId, u64), StepError> {
        let (id, len) = self.carve(io, self.bss, no_space)?;
        if len != self.bss {
            return Err(StepError::io("free range smaller than a block"));
        }
        Ok((id, self.ranges.sector(id)))
    }

    // ---- CHECKPOINT state: the worker ----

    /// `bow_write` over `[sector, sector + len)`: piece by piece until done or an error.
    fn bow_write(
        &mut self,
        io: &mut impl WorkerIo,
        sector: u64,
        len_sectors: u64,
    ) -> Result<Vec<Piece>, EngineError> {
        let end = sector + len_sectors;
        let mut cur = sector;
        let mut pieces = Vec::new();
        while cur < end {
            let Some(id) = self.ranges.find(cur) else {
                return Err(EngineError::OutOfRange { sector: cur, len: 0 });
            };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            match self.prepare_one_range(io, id, cur, clip) {
                Ok(piece) => {
                    cur += piece.sectors;
                    pieces.push(piece);
                }
                Err(StepError::Device(e)) => return Err(EngineError::Device(e)),
                Err(StepError::Status(status, reason)) => {
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

    fn prepare_one_range(
        &mut self,
        io: &mut impl WorkerIo,
        id: NodeId,
        cur: u64,
        clip: u64,
    ) -> Result<Piece, StepError> {
        match self.ranges.kind(id) {
            RangeType::Changed => {
                Ok(Piece { sector: cur, sectors: clip, action: PieceAction::AlreadyChanged })
            }
            RangeType::Trimmed => {
                let (piece, len) =
                    self.ranges.split(id, cur, clip).ok_or(StepError::io("split"))?;
                self.set_type(piece, RangeType::Changed);
                Ok(Piece { sector: cur, sectors: len, action: PieceAction::FreeClaimed })
            }
            RangeType::Unchanged | RangeType::Backup => {
                self.prepare_unchanged_range(io, id, cur, clip, true)
            }
            RangeType::Sector0Current => self.prepare_unchanged_range(io, id, cur, clip, false),
            kind @ (RangeType::Sector0 | RangeType::Top | RangeType::Invalid) => {
                self.warnings.push(KernelWarning::WriteToIllegalRange { sector: cur, kind });
                Err(StepError::io("write to a SECTOR0, TOP or INVALID range"))
            }
        }
    }

    /// `prepare_unchanged_range`: back up one piece into the free piece `io` chooses.
    fn prepare_unchanged_range(
        &mut self,
        io: &mut impl WorkerIo,
        br: NodeId,
        cur: u64,
        clip: u64,
        record_checksum: bool,
    ) -> Result<Piece, StepError> {
        let was = self.ranges.kind(br);
        let (backup, blen) = self.carve(io, clip, "no free space to back up to")?;
        let (br, plen) = self.ranges.split(br, cur, blen).ok_or(StepError::io("split"))?;
        if plen != blen {
            return Err(StepError::io("backup and source sizes differ"));
        }
        let src = self.ranges.sector(br);
        let dst = self.ranges.sector(backup);
        let seed = record_checksum.then_some(src / self.bss);
        let checksum = io.copy_blocks(src / self.bss, dst / self.bss, plen / self.bss, seed)?;
        let size = u32::try_from(plen * SECTOR_SIZE)
            .map_err(|_| StepError::io("piece larger than a bio"))?;
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
        let rolled_over = match self.add_log_entry(io, entry) {
            Ok(r) => r,
            Err(e) => {
                self.ranges.set_kind_raw(br, original);
                self.warnings.push(KernelWarning::OrphanBackup { dest: dst, sectors: plen });
                return Err(e);
            }
        };
        if matches!(was, RangeType::Backup | RangeType::Sector0Current) {
            self.stats.rebackups += 1;
            self.stats.rebackup_bytes += plen * SECTOR_SIZE;
        }
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
    fn add_log_entry(
        &mut self,
        io: &mut impl WorkerIo,
        entry: LogEntry,
    ) -> Result<bool, StepError> {
        let count = usize::try_from(self.header.count).unwrap_or(usize::MAX);
        let needed = usize::from(HEADER_SIZE_V1_0) + ENTRY_SIZE * (count + 1);
        let mut rolled = false;
        if needed > self.bs.as_usize() {
            self.backup_log_sector(io)?;
            rolled = true;
        }
        self.append_entry(io, entry)?;
        Ok(rolled)
    }

    fn append_entry(&mut self, io: &mut impl WorkerIo, entry: LogEntry) -> Result<(), StepError> {
        let index = self.header.count;
        write_entry(&mut self.log, HEADER_SIZE_V1_0, index, &entry);
        self.header.count += 1;
        self.header.encode_into(&mut self.log);
        if let Some(history) = self.history.as_mut() {
            history.push(LoggedEntry { sequence: self.header.sequence, index, entry });
        }
        self.stats.entries_logged += 1;
        Ok(io.write_log(&self.log)?)
    }

    /// `backup_log_sector`: save block 0 in a free block, start the next log sector with it.
    fn backup_log_sector(&mut self, io: &mut impl WorkerIo) -> Result<(), StepError> {
        let first = self.first_range()?;
        if self.ranges.kind(first) != RangeType::Sector0 || self.ranges.size(first) != self.bss {
            return Err(StepError::io("first range is not a one-block SECTOR0"));
        }
        let (saved, start) = self.carve_free_block(io, "no free block for the log")?;
        let checksum = io.copy_blocks(0, start / self.bss, 1, Some(0))?;
        self.header.count = 0;
        self.header.sequence = self.header.sequence.wrapping_add(1);
        self.append_entry(
            io,
            LogEntry { source: Sectors(0), dest: Sectors(start), size: self.bs.bytes(), checksum },
        )?;
        self.set_type(saved, RangeType::Backup);
        self.stats.log_rollovers += 1;
        Ok(())
    }
}
