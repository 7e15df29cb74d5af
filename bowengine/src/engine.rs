//! [`Engine`]: dm-bow's write path (dm-bow-format.md §2–§5) as a device engine with batches,
//! a choice of allocator, exact accounting and the checkpoint's write trace.
//!
//! The decisions (state, range map, log, the CHECKPOINT worker) are `bow`'s shared
//! [`Worker`], the same code `BowModel` runs; this file supplies its I/O ([`WorkerIo`]: staged
//! into the batch) and its allocator, and keeps the batch, the accounting and the trace.

use blockcopy::device::{BlockDevice, DeviceError};
use bow::model::worker::{head_of_free_list, read_sources, FreePiece, StepError, Worker, WorkerIo};
use bow::model::{
    BlkStatus, BowEngine, BowState, DiscardAction, EngineError, Progress, RangeMap, RangeType,
    ReadAction, StateChange, WriteAction,
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
        let staged = std::mem::take(&mut self.engine.io.staged);
        let backup_blocks = staged.backup_blocks();
        let issued = staged.commit(
            &self.engine.io.dev,
            #[cfg(any(test, feature = "fault"))]
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
        self.engine.batches += 1;
        self.engine.flushes += u64::try_from(issued.flushes).unwrap_or(u64::MAX);
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

/// What the engine does for the shared [`Worker`]: copies and log writes are staged into the
/// batch (reads see them), and copies go where the allocator says.
#[derive(Debug)]
struct EngineIo<D: BlockDevice> {
    dev: D,
    bs: BlockSize,
    allocator: Allocator,
    /// FarEnd: the free range being carved from its end.
    far_end: Option<FarEndCursor>,
    staged: Staged,
}

impl<D: BlockDevice> EngineIo<D> {
    fn read_block(&self, block: u64) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; self.bs.as_usize()];
        self.staged.read_block(&self.dev, block, &mut buf, u64::from(self.bs.bytes()))?;
        Ok(buf)
    }

    fn stage_user(&mut self, sector: u64, data: &[u8]) {
        self.staged.stage_user(sector * SECTOR_SIZE, data, self.bs.as_usize());
    }

    /// FarEnd: the end of the cursor's range while it lasts, else the end of the largest free
    /// range (which becomes the cursor's).
    fn far_end_piece(&mut self, ranges: &RangeMap, want: u64) -> Option<FreePiece> {
        if let Some(range) = self.far_end_range(ranges) {
            let top = ranges.top(range);
            let len = ranges.size(range).min(want);
            if let Some(c) = self.far_end.as_mut() {
                c.end = top - len;
            }
            return Some(FreePiece { range, start: top - len, len });
        }
        let largest = ranges.trimmed_list().into_iter().max_by_key(|r| (r.len(), r.start))?;
        let len = largest.len().min(want);
        let range = ranges.find(largest.start)?;
        self.far_end = Some(FarEndCursor {
            end: largest.end - len,
            floor: (largest.len() / 2).max(self.bs.sectors()),
        });
        Some(FreePiece { range, start: largest.end - len, len })
    }

    /// The free range FarEnd is carving, if it still ends where the cursor says and has not
    /// shrunk below its floor (the filesystem may have written into it).
    fn far_end_range(&self, ranges: &RangeMap) -> Option<usize> {
        let c = self.far_end?;
        let id = ranges.find(c.end.checked_sub(1)?)?;
        let usable = ranges.kind(id) == RangeType::Trimmed
            && ranges.top(id) == c.end
            && ranges.size(id) >= c.floor;
        usable.then_some(id)
    }
}

impl<D: BlockDevice> WorkerIo for EngineIo<D> {
    fn choose_free(&mut self, ranges: &RangeMap, want: u64) -> Option<FreePiece> {
        match self.allocator {
            Allocator::DmBow => head_of_free_list(ranges, want),
            Allocator::FarEnd => self.far_end_piece(ranges, want),
        }
    }

    /// Reads the sources (as the batch leaves them) and stages the copies as backup data.
    fn copy_blocks(
        &mut self,
        src: u64,
        dst: u64,
        blocks: u64,
        seed: Option<u64>,
    ) -> Result<u32, DeviceError> {
        let (copies, checksum) = read_sources(src, blocks, seed, |b| self.read_block(b))?;
        for (i, data) in (0u64..).zip(copies) {
            self.staged.stage_backup(dst + i, data);
        }
        Ok(checksum)
    }

    /// Stages block 0; only the newest one of a batch is written.
    fn write_log(&mut self, block0: &[u8]) -> Result<(), DeviceError> {
        self.staged.stage_log(block0);
        Ok(())
    }
}

/// The userspace backup-on-write engine over the raw device `D`: dm-bow's [`Worker`] with
/// staged, ordered I/O, a choice of allocator, exact accounting and a write trace.
#[derive(Debug)]
pub struct Engine<D: BlockDevice> {
    io: EngineIo<D>,
    worker: Worker,
    /// Batches committed.
    batches: u64,
    /// Flushes issued (ordering flushes and the user's).
    flushes: u64,
    trace: Option<Trace>,
    trace_overflowed: bool,
    poisoned: bool,
    #[cfg(any(test, feature = "fault"))]
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
            io: EngineIo {
                dev,
                bs,
                allocator: config.allocator,
                far_end: None,
                staged: Staged::default(),
            },
            // No entry history: the engine runs for a whole checkpoint.
            worker: Worker::new(bs, len, false),
            batches: 0,
            flushes: 0,
            trace,
            trace_overflowed: false,
            poisoned: false,
            #[cfg(any(test, feature = "fault"))]
            fault: None,
        }
    }

    /// Breaks the write order of every later batch on purpose (feature `fault`: the VM crash
    /// suite's broken servers; never in a production build).
    #[cfg(any(test, feature = "fault"))]
    pub fn set_fault(&mut self, fault: Option<crate::order::Fault>) {
        self.fault = fault;
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.io.dev
    }

    /// Gives the device back.
    pub fn into_device(self) -> D {
        self.io.dev
    }

    /// The allocator in use.
    pub fn allocator(&self) -> Allocator {
        self.io.allocator
    }

    /// The range map (the kernel's table status: `range_map().table_status()`).
    pub fn range_map(&self) -> &RangeMap {
        self.worker.ranges()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let worker = self.worker.stats();
        EngineStats {
            backups: worker.entries_logged,
            rebackups: worker.rebackups,
            rebackup_bytes: worker.rebackup_bytes,
            allocated_bytes: worker.allocated_bytes,
            log_rollovers: worker.log_rollovers,
            batches: self.batches,
            flushes: self.flushes,
        }
    }

    /// Free and used backup space, exact.
    pub fn space(&self) -> SpaceReport {
        let mut report = SpaceReport {
            used_bytes: self.worker.stats().allocated_bytes,
            ..SpaceReport::default()
        };
        for r in self.worker.ranges().ranges() {
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
        if self.worker.state() == BowState::Checkpoint && !self.trace_overflowed {
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

    /// Plans `ios` in order (range map, log, staged copies) and returns the batch to commit.
    pub fn submit(&mut self, ios: Vec<UserIo>) -> Result<Batch<'_, D>, EngineError> {
        self.check_usable()?;
        if !self.io.staged.is_empty() {
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

    /// The commit copy: SECTOR0_CURRENT back onto block 0 (one block write, then a flush).
    fn commit_copy(worker: &Worker, io: &mut EngineIo<D>) -> Result<StateChange, StepError> {
        let (from, _) = worker.sector0_current()?;
        let data = io.read_block(from / worker.block_size().sectors())?;
        io.dev.write_at(&data, 0)?;
        io.dev.flush()?;
        Ok(StateChange::Committed { from: Sectors(from) })
    }

    // ---- bios: the worker decides, the batch stages ----

    fn plan_write(
        &mut self,
        sector: u64,
        len: u64,
        data: &[u8],
    ) -> Result<WriteAction, EngineError> {
        self.worker.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors > 0 {
            self.record(Record::write(sector, sectors));
        }
        self.worker.write(&mut self.io, sector, len, |io, at, bytes| {
            io.stage_user(at, &data[bytes]);
            Ok(())
        })
    }

    fn plan_discard(&mut self, sector: u64, len: u64) -> Result<DiscardAction, EngineError> {
        self.worker.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors > 0 {
            self.record(Record::discard(sector, sectors));
        }
        // BlockDevice has no discard: a forwarded discard leaves the data (as the model's).
        self.worker.discard(&mut self.io, sector, len, true)
    }

    fn one(&mut self, io: UserIo) -> Result<IoOutcome, EngineError> {
        let mut report = self.submit(vec![io])?.commit()?;
        report.results.pop().unwrap_or(Err(EngineError::OutOfRange { sector: 0, len: 0 }))
    }
}

impl<D: BlockDevice> BowEngine for Engine<D> {
    fn state(&self) -> BowState {
        self.worker.state()
    }

    fn set_state(&mut self, to: BowState) -> Result<StateChange, EngineError> {
        self.check_usable()?;
        let (io, flushes, poisoned) = (&mut self.io, &mut self.flushes, &mut self.poisoned);
        self.worker.set_state(to, |worker| match to {
            BowState::Checkpoint => {
                let change = worker.prepare_log(io);
                // Both copies of block 0 durable before the magic appears in block 0.
                let staged = std::mem::take(&mut io.staged);
                let issued = staged.commit(
                    &io.dev,
                    #[cfg(any(test, feature = "fault"))]
                    None,
                );
                match (change, issued) {
                    (Ok(c), Ok(i)) => {
                        *flushes += u64::try_from(i.flushes).unwrap_or(u64::MAX);
                        Ok(c)
                    }
                    (Err(e), _) => Err(e),
                    (_, Err(e)) => {
                        *poisoned = true;
                        Err(StepError::Device(e))
                    }
                }
            }
            BowState::Committed => {
                let change = Self::commit_copy(worker, io)?;
                *flushes += 1;
                Ok(change)
            }
            BowState::Trim => Err(StepError::Status(BlkStatus::IoError, "TRIM is never next")),
        })
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
        let dev = &self.io.dev;
        self.worker.read(sector.0, buf, |at, part| dev.read_at(part, at * SECTOR_SIZE))
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.record(Record::Flush);
        self.io.dev.flush()?;
        self.flushes += 1;
        Ok(())
    }
}
