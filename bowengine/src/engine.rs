//! [`Engine`]: dm-bow's write path (dm-bow-format.md §2–§5) as a device engine with batches,
//! a choice of allocator, exact accounting and the checkpoint's write trace.

use blockcopy::device::{BlockDevice, DeviceError};
use bow::crc::{seed_for, BowCrc};
use bow::format::{write_entry, LogEntry, LogHeader, ENTRY_SIZE, HEADER_SIZE_V1_0};
use bow::model::{
    BlkStatus, BowEngine, BowState, DiscardAction, EngineError, Piece, PieceAction, Progress,
    RangeMap, RangeType, ReadAction, StateChange, WriteAction,
};
use bow::units::{BlockSize, Sectors, SECTOR_SIZE};
use checkpoint_estimate::{Record, Trace};

use crate::order::Staged;

/// Where backup blocks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocator {
    /// The kernel's: the start of the head of the trimmed list (the most recently created free
    /// range). Byte-exact with dm-bow and `bow::model::BowModel`.
    DmBow,
    /// The far end of the largest free range (ties: the highest one). A filesystem allocates
    /// from the start of free space and near its recent writes, so it rarely writes there
    /// during a checkpoint, and backups are rarely backed up again. The chosen range is kept
    /// (carved downwards from its end) until it is gone or has shrunk below half its size
    /// when chosen; only then is the largest range looked up again, so the search over all
    /// free ranges is paid once per half a large range, not once per backup.
    #[default]
    FarEnd,
}

/// How to build an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// The bow block size (4096 on every current Android device).
    pub block_size: BlockSize,
    /// Where backups go.
    pub allocator: Allocator,
}

impl EngineConfig {
    /// `block_size` with the far-end allocator.
    pub fn new(block_size: BlockSize) -> EngineConfig {
        EngineConfig { block_size, allocator: Allocator::FarEnd }
    }
}

/// One user I/O of a batch. Positions are 512-byte sectors, lengths whole blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserIo {
    /// A write.
    Write { sector: Sectors, data: Vec<u8> },
    /// A discard of `len` bytes.
    Discard { sector: Sectors, len: u64 },
}

/// Counters of the engine's work since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Backups logged (one per log entry, entry 0 of each log sector included).
    pub backups: u64,
    /// Backups whose source was itself a backup (BACKUP or SECTOR0_CURRENT): the filesystem
    /// wrote a block the allocator had chosen, so the copy was copied again.
    pub rebackups: u64,
    /// Bytes of those re-backups (each left a backup block CHANGED).
    pub rebackup_bytes: u64,
    /// Bytes carved out of free space for copies ([`SpaceReport::used_bytes`]).
    pub allocated_bytes: u64,
    /// Log sectors saved by a rollover.
    pub log_rollovers: u64,
    /// Batches committed.
    pub batches: u64,
    /// Flushes the engine issued (its own ordering flushes and the user's).
    pub flushes: u64,
}

/// Backup space from the engine's own state: exact, unlike the kernel's `trims_total`.
///
/// At any time, free space at checkpoint start = `free_bytes` + `used_bytes` + the free blocks
/// the filesystem has written since (the tests check this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpaceReport {
    /// Bytes still free for backups (in TRIMMED ranges): what the health monitor compares with
    /// its threshold.
    pub free_bytes: u64,
    /// Bytes the checkpoint took from free space for its own copies: every backup, saved log
    /// sector and the two copies of block 0, including copies the filesystem has since
    /// overwritten (re-backed up). The sum of the log's entry sizes plus SECTOR0_CURRENT.
    pub used_bytes: u64,
    /// Of those, bytes that still hold a copy (BACKUP and SECTOR0_CURRENT blocks).
    pub held_bytes: u64,
}

/// What a committed batch did, one result per submitted I/O.
#[derive(Debug)]
pub struct BatchReport {
    /// In submission order. A failed write was not issued; backups logged before the failure
    /// stay logged (as in the kernel).
    pub results: Vec<Result<IoOutcome, EngineError>>,
    /// Backup blocks written in this batch.
    pub backup_blocks: usize,
    /// Ordering flushes issued (0 or 2).
    pub flushes: usize,
}

/// The outcome of one I/O of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOutcome {
    /// A write.
    Write(WriteAction),
    /// A discard.
    Discard(DiscardAction),
}

/// A planned batch: the range map and the in-memory log already say what it does; its writes
/// are staged. [`Batch::commit`] issues them in order. Dropping it without committing poisons
/// the engine (the range map would describe writes that never happened).
#[derive(Debug)]
#[must_use = "a batch must be committed; dropping it poisons the engine"]
pub struct Batch<'a, D: BlockDevice> {
    engine: &'a mut Engine<D>,
    results: Vec<Result<IoOutcome, EngineError>>,
    committed: bool,
}

impl<D: BlockDevice> Batch<'_, D> {
    /// Issues the batch: backup data → flush → log → flush → user writes (see [`crate::order`]).
    pub fn commit(mut self) -> Result<BatchReport, EngineError> {
        self.committed = true;
        let staged = std::mem::take(&mut self.engine.staged);
        let backup_blocks = staged.backup_blocks();
        let issued = staged.commit(
            &self.engine.dev,
            #[cfg(test)]
            self.engine.fault,
        );
        let issued = match issued {
            Ok(i) => i,
            Err(e) => {
                // The device failed part-way: the range map no longer matches the disk.
                self.engine.poisoned = true;
                return Err(EngineError::Device(e));
            }
        };
        self.engine.stats.batches += 1;
        self.engine.stats.flushes += u64::try_from(issued.flushes).unwrap_or(u64::MAX);
        Ok(BatchReport {
            results: std::mem::take(&mut self.results),
            backup_blocks,
            flushes: issued.flushes,
        })
    }
}

impl<D: BlockDevice> Drop for Batch<'_, D> {
    fn drop(&mut self) {
        if !self.committed {
            self.engine.poisoned = true;
        }
    }
}

/// The range FarEnd carves from: `end` is one past its next free sector; it is given up when
/// the free range ending there is smaller than `floor` sectors.
#[derive(Debug, Clone, Copy)]
struct FarEndCursor {
    end: u64,
    floor: u64,
}

/// Why an internal step failed.
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

/// The userspace backup-on-write engine over the raw device `D`.
#[derive(Debug)]
pub struct Engine<D: BlockDevice> {
    dev: D,
    bs: BlockSize,
    bss: u64,
    allocator: Allocator,
    state: BowState,
    ranges: RangeMap,
    /// The in-memory block 0 (zeroed once, never cleared, as the kernel's `log_sector`).
    log: Vec<u8>,
    header: LogHeader,
    staged: Staged,
    /// FarEnd: the free range being carved from its end.
    far_end: Option<FarEndCursor>,
    stats: EngineStats,
    trace: Option<Trace>,
    trace_overflowed: bool,
    poisoned: bool,
    #[cfg(test)]
    pub(crate) fault: Option<crate::order::Fault>,
}

impl<D: BlockDevice> Engine<D> {
    /// An engine over the whole device (rounded down to whole blocks), state TRIM.
    pub fn new(dev: D, config: EngineConfig) -> Engine<D> {
        let bs = config.block_size;
        let bss = bs.sectors();
        let len = dev.size() / SECTOR_SIZE / bss * bss;
        // Only a device of no whole block has no trace (the format needs a size).
        let trace = Trace::new(len * SECTOR_SIZE, bs.bytes()).ok();
        Engine {
            dev,
            bs,
            bss,
            allocator: config.allocator,
            state: BowState::Trim,
            ranges: RangeMap::new(len),
            log: vec![0; bs.as_usize()],
            header: LogHeader { count: 0, ..LogHeader::new(bs, 0, Sectors(0)) },
            staged: Staged::default(),
            far_end: None,
            stats: EngineStats::default(),
            trace,
            trace_overflowed: false,
            poisoned: false,
            #[cfg(test)]
            fault: None,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Gives the device back.
    pub fn into_device(self) -> D {
        self.dev
    }

    /// The allocator in use.
    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// The range map (the kernel's table status: `range_map().table_status()`).
    pub fn range_map(&self) -> &RangeMap {
        &self.ranges
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Free and used backup space, exact.
    pub fn space(&self) -> SpaceReport {
        let mut report =
            SpaceReport { used_bytes: self.stats.allocated_bytes, ..SpaceReport::default() };
        for r in self.ranges.ranges() {
            let bytes = r.len() * SECTOR_SIZE;
            match r.kind {
                RangeType::Trimmed => report.free_bytes += bytes,
                RangeType::Backup | RangeType::Sector0Current => report.held_bytes += bytes,
                _ => {}
            }
        }
        report
    }

    /// The write trace of the checkpoint so far (every write, discard and flush received in
    /// CHECKPOINT), in the estimator's format.
    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    /// Whether the trace stopped recording because it reached the format's record limit.
    pub fn trace_overflowed(&self) -> bool {
        self.trace_overflowed
    }

    fn record(&mut self, record: Record) {
        if self.state == BowState::Checkpoint && !self.trace_overflowed {
            if let Some(t) = self.trace.as_mut() {
                self.trace_overflowed = t.push(record).is_err();
            }
        }
    }

    fn check_usable(&self) -> Result<(), EngineError> {
        if self.poisoned {
            return Err(EngineError::Bio {
                sector: 0,
                status: BlkStatus::IoError,
                reason: "engine poisoned: a batch was dropped or its device failed",
                progress: Progress::default(),
            });
        }
        Ok(())
    }

    fn check_io(&self, sector: u64, len: u64) -> Result<(), EngineError> {
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

    /// Plans `ios` in order (range map, log, staged copies) and returns the batch to commit.
    pub fn submit(&mut self, ios: Vec<UserIo>) -> Result<Batch<'_, D>, EngineError> {
        self.check_usable()?;
        if !self.staged.is_empty() {
            // Only a failed commit leaves writes staged, and it poisons the engine first.
            self.poisoned = true;
            self.check_usable()?;
        }
        let mut results = Vec::with_capacity(ios.len());
        for io in ios {
            let outcome = match io {
                UserIo::Write { sector, data } => {
                    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    self.plan_write(sector.0, len, &data).map(IoOutcome::Write)
                }
                UserIo::Discard { sector, len } => {
                    self.plan_discard(sector.0, len).map(IoOutcome::Discard)
                }
            };
            if let Err(EngineError::Device(_)) = &outcome {
                // A read failed while planning: what is staged is inconsistent.
                self.poisoned = true;
            }
            results.push(outcome);
        }
        Ok(Batch { engine: self, results, committed: false })
    }

    // ---- staged I/O ----

    fn read_block(&self, block: u64) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; self.bs.as_usize()];
        self.staged.read_block(&self.dev, block, &mut buf, u64::from(self.bs.bytes()))?;
        Ok(buf)
    }

    /// Copies `blocks` blocks from `src` to `dst` into the batch; returns the CRC (seeded with
    /// `seed`'s block index) or 0.
    fn copy_blocks(
        &mut self,
        src: u64,
        dst: u64,
        blocks: u64,
        seed: Option<u64>,
    ) -> Result<u32, Fail> {
        let mut crc = seed.map(|s| BowCrc::new(seed_for(s)));
        let mut copies = Vec::new();
        for i in 0..blocks {
            let data = self.read_block(src + i)?;
            if let Some(c) = crc.as_mut() {
                c.update(&data);
            }
            copies.push(data);
        }
        for (i, data) in (0u64..).zip(copies) {
            self.staged.stage_backup(dst + i, data);
        }
        Ok(crc.map_or(0, BowCrc::finish))
    }

    fn stage_user(&mut self, sector: u64, data: &[u8]) {
        self.staged.stage_user(sector * SECTOR_SIZE, data, self.bs.as_usize());
    }

    // ---- TRIM state ----

    fn add_trim(&mut self, sector: u64, len: u64) {
        let end = sector + len;
        let mut cur = sector;
        while cur < end {
            let Some(id) = self.ranges.find(cur) else { break };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            if self.ranges.kind(id) == RangeType::Unchanged {
                if let Some((piece, _)) = self.ranges.split(id, cur, clip) {
                    self.ranges.set_type(piece, RangeType::Trimmed);
                }
            }
            cur += clip;
        }
    }

    fn remove_trim(&mut self, sector: u64, len: u64) -> u64 {
        let end = sector + len;
        let mut cur = sector;
        let mut reclaimed = 0;
        while cur < end {
            let Some(id) = self.ranges.find(cur) else { break };
            let clip = (end - cur).min(self.ranges.top(id) - cur);
            if self.ranges.kind(id) == RangeType::Trimmed {
                if let Some((piece, _)) = self.ranges.split(id, cur, clip) {
                    self.ranges.set_type(piece, RangeType::Unchanged);
                    reclaimed += clip;
                }
            }
            cur += clip;
        }
        reclaimed
    }

    // ---- the allocator ----

    /// Carves up to `want` sectors of free space; returns the node and its length.
    fn carve(&mut self, want: u64) -> Result<(usize, u64), Fail> {
        let carved = self.carve_with_allocator(want)?;
        self.stats.allocated_bytes += carved.1 * SECTOR_SIZE;
        Ok(carved)
    }

    fn carve_with_allocator(&mut self, want: u64) -> Result<(usize, u64), Fail> {
        let no_space = Fail::Status(BlkStatus::NoSpace, "no free space to back up to");
        match self.allocator {
            Allocator::DmBow => {
                let free = self.ranges.free_head().ok_or(no_space)?;
                let start = self.ranges.sector(free);
                let len = self.ranges.size(free).min(want);
                self.ranges.split(free, start, len).ok_or(Fail::Status(BlkStatus::IoError, "split"))
            }
            Allocator::FarEnd => {
                let split = Fail::Status(BlkStatus::IoError, "split");
                if let Some(free) = self.far_end_range() {
                    let top = self.ranges.top(free);
                    let len = self.ranges.size(free).min(want);
                    let carved = self.ranges.split(free, top - len, len).ok_or(split)?;
                    if let Some(c) = self.far_end.as_mut() {
                        c.end = top - len;
                    }
                    return Ok(carved);
                }
                let largest = self
                    .ranges
                    .trimmed_list()
                    .into_iter()
                    .max_by_key(|r| (r.len(), r.start))
                    .ok_or(no_space)?;
                let len = largest.len().min(want);
                let free = self
                    .ranges
                    .find(largest.start)
                    .ok_or(Fail::Status(BlkStatus::IoError, "free range not found"))?;
                let carved = self.ranges.split(free, largest.end - len, len).ok_or(split)?;
                self.far_end = Some(FarEndCursor {
                    end: largest.end - len,
                    floor: (largest.len() / 2).max(self.bss),
                });
                Ok(carved)
            }
        }
    }

    /// The free range FarEnd is carving, if it still ends where the cursor says and has not
    /// shrunk below its floor (the filesystem may have written into it).
    fn far_end_range(&self) -> Option<usize> {
        let c = self.far_end?;
        let id = self.ranges.find(c.end.checked_sub(1)?)?;
        let usable = self.ranges.kind(id) == RangeType::Trimmed
            && self.ranges.top(id) == c.end
            && self.ranges.size(id) >= c.floor;
        usable.then_some(id)
    }

    // ---- CHECKPOINT: the worker ----

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
                    })
                }
            }
        }
        Ok(pieces)
    }

    fn prepare_one_range(&mut self, id: usize, cur: u64, clip: u64) -> Result<Piece, Fail> {
        match self.ranges.kind(id) {
            RangeType::Changed => {
                Ok(Piece { sector: cur, sectors: clip, action: PieceAction::AlreadyChanged })
            }
            RangeType::Trimmed => {
                let (piece, len) = self
                    .ranges
                    .split(id, cur, clip)
                    .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
                self.ranges.set_type(piece, RangeType::Changed);
                Ok(Piece { sector: cur, sectors: len, action: PieceAction::FreeClaimed })
            }
            RangeType::Unchanged | RangeType::Backup => {
                self.prepare_unchanged_range(id, cur, clip, true)
            }
            RangeType::Sector0Current => self.prepare_unchanged_range(id, cur, clip, false),
            RangeType::Sector0 | RangeType::Top | RangeType::Invalid => {
                Err(Fail::Status(BlkStatus::IoError, "write to a SECTOR0, TOP or INVALID range"))
            }
        }
    }

    /// Backs up one piece: the kernel's `prepare_unchanged_range` with the allocator's chunk.
    fn prepare_unchanged_range(
        &mut self,
        br: usize,
        cur: u64,
        clip: u64,
        record_checksum: bool,
    ) -> Result<Piece, Fail> {
        let was = self.ranges.kind(br);
        let (backup, blen) = self.carve(clip)?;
        let (br, plen) =
            self.ranges.split(br, cur, blen).ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        if plen != blen {
            return Err(Fail::Status(BlkStatus::IoError, "backup and source sizes differ"));
        }
        let src = self.ranges.sector(br);
        let dst = self.ranges.sector(backup);
        let seed = record_checksum.then_some(src / self.bss);
        let checksum = self.copy_blocks(src / self.bss, dst / self.bss, plen / self.bss, seed)?;
        let size = u32::try_from(plen * SECTOR_SIZE)
            .map_err(|_| Fail::Status(BlkStatus::IoError, "piece larger than a bio"))?;
        let original = self.ranges.kind(br);
        self.ranges.sub_trims(plen * SECTOR_SIZE);
        match self.ranges.kind(backup) {
            RangeType::Trimmed => self.ranges.list_del(backup),
            _ => self.ranges.settle_unsubtracted(plen * SECTOR_SIZE),
        }
        let backup_kind = if original == RangeType::Sector0Current {
            RangeType::Sector0Current
        } else {
            RangeType::Backup
        };
        self.ranges.set_kind_raw(backup, backup_kind);
        self.ranges.set_kind_raw(br, RangeType::Changed);
        self.ranges.set_type(backup, backup_kind);
        let entry = LogEntry { source: Sectors(src), dest: Sectors(dst), size, checksum };
        let rolled_over = match self.add_log_entry(entry) {
            Ok(r) => r,
            Err(e) => {
                self.ranges.set_kind_raw(br, original);
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
            self.ranges.set_type(br, RangeType::Changed);
        }
        Ok(Piece {
            sector: src,
            sectors: plen,
            action: PieceAction::BackedUp { was, entry, rolled_over },
        })
    }

    // ---- the log ----

    fn add_log_entry(&mut self, entry: LogEntry) -> Result<bool, Fail> {
        let count = usize::try_from(self.header.count).unwrap_or(usize::MAX);
        let needed = usize::from(HEADER_SIZE_V1_0) + ENTRY_SIZE * (count + 1);
        let mut rolled = false;
        if needed > self.bs.as_usize() {
            self.backup_log_sector()?;
            rolled = true;
        }
        self.append_entry(entry);
        Ok(rolled)
    }

    fn append_entry(&mut self, entry: LogEntry) {
        let index = self.header.count;
        write_entry(&mut self.log, HEADER_SIZE_V1_0, index, &entry);
        self.header.count += 1;
        self.header.encode_into(&mut self.log);
        self.staged.stage_log(&self.log);
        self.stats.backups += 1;
    }

    /// Saves block 0 in a free block and starts the next log sector with it as entry 0.
    fn backup_log_sector(&mut self) -> Result<(), Fail> {
        let (l, len) = self.carve(self.bss)?;
        if len != self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "free range smaller than a block"));
        }
        let start = self.ranges.sector(l);
        let checksum = self.copy_blocks(0, start / self.bss, 1, Some(0))?;
        self.header.count = 0;
        self.header.sequence = self.header.sequence.wrapping_add(1);
        self.append_entry(LogEntry {
            source: Sectors(0),
            dest: Sectors(start),
            size: self.bs.bytes(),
            checksum,
        });
        self.ranges.set_type(l, RangeType::Backup);
        self.stats.log_rollovers += 1;
        Ok(())
    }

    fn carve_free_block(&mut self) -> Result<u64, Fail> {
        let (id, len) = self.carve(self.bss)?;
        if len != self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "free range smaller than a block"));
        }
        Ok(self.ranges.sector(id))
    }

    /// `prepare_log`: block 0 copied to SECTOR0_CURRENT and to a backup (entry 0).
    fn prepare_log(&mut self) -> Result<StateChange, Fail> {
        let first = self.ranges.first().ok_or(Fail::Status(BlkStatus::IoError, "no ranges"))?;
        if self.ranges.kind(first) != RangeType::Unchanged || self.ranges.size(first) < self.bss {
            return Err(Fail::Status(BlkStatus::IoError, "block 0 is not an UNCHANGED block"));
        }
        let (first, _) = self
            .ranges
            .split(first, 0, self.bss)
            .ok_or(Fail::Status(BlkStatus::IoError, "split"))?;
        self.ranges.set_kind_raw(first, RangeType::Sector0);
        let sector0 = self.carve_free_block()?;
        self.copy_blocks(0, sector0 / self.bss, 1, None)?;
        self.header.sector0 = Sectors(sector0);
        if let Some(id) = self.ranges.find(sector0) {
            self.ranges.set_type(id, RangeType::Sector0Current);
        }
        let backup = self.carve_free_block()?;
        let checksum = self.copy_blocks(0, backup / self.bss, 1, Some(0))?;
        self.header = LogHeader::new(self.bs, 0, Sectors(sector0));
        self.append_entry(LogEntry {
            source: Sectors(0),
            dest: Sectors(backup),
            size: self.bs.bytes(),
            checksum,
        });
        if let Some(id) = self.ranges.find(backup) {
            self.ranges.set_type(id, RangeType::Backup);
        }
        Ok(StateChange::CheckpointStarted { sector0: Sectors(sector0), backup: Sectors(backup) })
    }

    /// The commit copy: SECTOR0_CURRENT back onto block 0 (one block write, then a flush).
    fn commit_copy(&mut self) -> Result<StateChange, Fail> {
        let from = self.header.sector0.0;
        let data = self.read_block(from / self.bss)?;
        self.dev.write_at(&data, 0)?;
        self.dev.flush()?;
        self.stats.flushes += 1;
        Ok(StateChange::Committed { from: Sectors(from) })
    }

    // ---- bios ----

    fn plan_write(
        &mut self,
        sector: u64,
        len: u64,
        data: &[u8],
    ) -> Result<WriteAction, EngineError> {
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Ok(WriteAction::PassedThrough);
        }
        self.record(Record::write(sector, sectors));
        match self.state {
            BowState::Committed => {
                self.stage_user(sector, data);
                Ok(WriteAction::PassedThrough)
            }
            BowState::Trim => {
                let reclaimed = self.remove_trim(sector, sectors);
                self.stage_user(sector, data);
                Ok(WriteAction::Untrimmed { reclaimed })
            }
            BowState::Checkpoint if sector == 0 => {
                let to = self.header.sector0;
                let bsz = self.bs.as_usize();
                if sectors <= self.bss {
                    self.stage_user(to.0, data);
                    return Ok(WriteAction::Redirected { to });
                }
                // The first block goes to SECTOR0_CURRENT at once, the rest through the worker.
                let (head, rest) = data.split_at(bsz);
                self.stage_user(to.0, head);
                match self.bow_write(self.bss, sectors - self.bss) {
                    Ok(pieces) => {
                        self.stage_user(self.bss, rest);
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
                self.stage_user(sector, data);
                Ok(WriteAction::Checkpointed { pieces, sector0_to: None })
            }
        }
    }

    fn plan_discard(&mut self, sector: u64, len: u64) -> Result<DiscardAction, EngineError> {
        self.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors > 0 && self.state == BowState::Checkpoint {
            self.record(Record::discard(sector, sectors));
        }
        match self.state {
            BowState::Trim => {
                if sectors > 0 {
                    self.add_trim(sector, sectors);
                }
                Ok(DiscardAction::RecordedAsFree)
            }
            // BlockDevice has no discard: a forwarded discard leaves the data (as the model).
            BowState::Committed => Ok(DiscardAction::Forwarded { pieces: Vec::new() }),
            BowState::Checkpoint if sector == 0 && sectors <= self.bss => {
                Ok(DiscardAction::Forwarded { pieces: Vec::new() })
            }
            BowState::Checkpoint if sector == 0 => {
                let pieces = self.bow_write(self.bss, sectors - self.bss)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
            BowState::Checkpoint => {
                let pieces = self.bow_write(sector, sectors)?;
                Ok(DiscardAction::Forwarded { pieces })
            }
        }
    }

    fn one(&mut self, io: UserIo) -> Result<IoOutcome, EngineError> {
        let mut report = self.submit(vec![io])?.commit()?;
        report.results.pop().unwrap_or(Err(EngineError::OutOfRange { sector: 0, len: 0 }))
    }
}

impl<D: BlockDevice> BowEngine for Engine<D> {
    fn state(&self) -> BowState {
        self.state
    }

    fn set_state(&mut self, to: BowState) -> Result<StateChange, EngineError> {
        self.check_usable()?;
        let from = self.state;
        if to.value() != from.value() + 1 {
            return Err(EngineError::InvalidStateChange { from, to });
        }
        let done = match to {
            BowState::Checkpoint => {
                let change = self.prepare_log();
                // Both copies of block 0 durable before the magic appears in block 0.
                let staged = std::mem::take(&mut self.staged);
                let issued = staged.commit(
                    &self.dev,
                    #[cfg(test)]
                    None,
                );
                match (change, issued) {
                    (Ok(c), Ok(i)) => {
                        self.stats.flushes += u64::try_from(i.flushes).unwrap_or(u64::MAX);
                        Ok(c)
                    }
                    (Err(e), _) => Err(e),
                    (_, Err(e)) => {
                        self.poisoned = true;
                        Err(Fail::Device(e))
                    }
                }
            }
            BowState::Committed => self.commit_copy(),
            BowState::Trim => Err(Fail::Status(BlkStatus::IoError, "TRIM is never next")),
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

    /// Exact free backup space ([`SpaceReport::free_bytes`]), not the kernel's over-count.
    fn free_bytes(&self) -> u64 {
        self.space().free_bytes
    }

    fn write(&mut self, sector: Sectors, data: &[u8]) -> Result<WriteAction, EngineError> {
        match self.one(UserIo::Write { sector, data: data.to_vec() })? {
            IoOutcome::Write(w) => Ok(w),
            IoOutcome::Discard(_) => Err(EngineError::OutOfRange { sector: sector.0, len: 0 }),
        }
    }

    fn discard(&mut self, sector: Sectors, len: u64) -> Result<DiscardAction, EngineError> {
        match self.one(UserIo::Discard { sector, len })? {
            IoOutcome::Discard(d) => Ok(d),
            IoOutcome::Write(_) => Err(EngineError::OutOfRange { sector: sector.0, len }),
        }
    }

    fn read(&mut self, sector: Sectors, buf: &mut [u8]) -> Result<ReadAction, EngineError> {
        let sector = sector.0;
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_io(sector, len)?;
        if self.state == BowState::Checkpoint && sector == 0 && !buf.is_empty() {
            let from = self.header.sector0;
            let (head, rest) = buf.split_at_mut(self.bs.as_usize().min(buf.len()));
            self.dev.read_at(head, from.0 * SECTOR_SIZE)?;
            if !rest.is_empty() {
                self.dev.read_at(rest, self.bss * SECTOR_SIZE)?;
            }
            return Ok(ReadAction::Sector0Redirected { from });
        }
        self.dev.read_at(buf, sector * SECTOR_SIZE)?;
        Ok(ReadAction::Direct)
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.record(Record::Flush);
        self.dev.flush()?;
        self.stats.flushes += 1;
        Ok(())
    }
}
