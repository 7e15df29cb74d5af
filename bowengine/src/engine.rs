//! [`Engine`]: dm-bow's write path (dm-bow-format.md §2–§5) as a device engine with batches,
//! a choice of allocator, exact accounting and the checkpoint's write trace.
//!
//! The decisions (state, range map, log, the CHECKPOINT worker) are `bow`'s shared
//! [`Worker`], the same code `BowModel` runs; this file supplies its I/O ([`WorkerIo`]: staged
//! into the batch) and its allocator, and keeps the batch, the accounting and the trace.

use blockcopy::device::{BlockDevice, DeviceError};
use bow::format::{LogEntry, LogHeader, ENTRY_SIZE, HEADER_SIZE_V1_0};
use bow::model::worker::{head_of_free_list, read_sources, FreePiece, StepError, Worker, WorkerIo};
use bow::model::{
    BlkStatus, BowEngine, BowState, DiscardAction, EngineError, Progress, RangeMap, RangeType,
    ReadAction, StateChange, WriteAction,
};
use bow::units::{BlockSize, Sectors, SECTOR_SIZE};
use bytes::Bytes;
use checkpoint_estimate::{Record, Trace};

use crate::journal::{self, Entry, JournalError, JournalIo};
use crate::order::{append_journal, DurableWrites, JournalSink, Staged};

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
    /// A write. Its data is shared, not copied: the batch writes it from where the caller
    /// keeps it (a `Vec` converts for free; the ublk server's held writes are slices of its
    /// held-writes file).
    Write { sector: Sectors, data: Bytes },
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
    /// The batch's journal frame, appended before anything is issued.
    frame: Vec<u8>,
    committed: bool,
}

impl<D: BlockDevice> Batch<'_, D> {
    /// Issues the batch: backup data → flush → log → flush → user writes (see [`crate::order`]).
    pub fn commit(mut self) -> Result<BatchReport, EngineError> {
        self.committed = true;
        let staged = std::mem::take(&mut self.engine.io.staged);
        let backup_blocks = staged.backup_blocks();
        let issued = if self.engine.io.replay {
            Ok(staged.replay_commit())
        } else {
            match append_journal(self.engine.journal.as_mut(), &self.frame) {
                Ok(journaled) => staged.commit(
                    &self.engine.io.dev,
                    self.engine.durable.as_deref(),
                    journaled,
                    #[cfg(any(test, feature = "fault"))]
                    self.engine.fault,
                ),
                Err(source) => Err(DeviceError::Io { offset: 0, source }),
            }
        };
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

/// Why an engine could not be resumed from its journal and its device. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("the op journal: {0}")]
    Journal(#[from] JournalError),
    #[error("reading block 0: {0}")]
    ReadBlock0(DeviceError),
    #[error(
        "block 0 on the device is neither the log after the journal's last step ({after}) nor \
         the log before it ({before}): the journal and the device do not belong together"
    )]
    Block0Mismatch { after: String, before: String },
    #[error("redoing the interrupted commit copy: {0}")]
    CommitCopy(String),
}

/// A deliberately broken recovery, for the test that shows the kill-point suite catches it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecoverFault {
    /// Replay the whole journal and never look at block 0: a batch that died before its
    /// block 0 is kept as if it had landed.
    SkipBlock0Check,
}

/// An engine resumed by [`Engine::recover`].
#[derive(Debug)]
pub struct Recovered<D: BlockDevice> {
    /// The engine, exactly as the dead server's after its last step that reached the device.
    pub engine: Engine<D>,
    /// Journal steps replayed into it.
    pub steps: usize,
    /// Whether the journal's last step was left out: its batch stopped before block 0 (its
    /// user writes were never issued; the kernel issues them again).
    pub dropped_last: bool,
    /// Bytes of a frame cut short by the process's death (its batch never started).
    pub torn_tail: usize,
    /// The journal's bytes that describe `engine`: the journal must be cut to this length
    /// before it is appended to again ([`Engine::resume_journal`]).
    pub journal_len: usize,
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
    /// Replaying a journal: decisions only, no device I/O (copies are counted, not read).
    replay: bool,
}

impl<D: BlockDevice> EngineIo<D> {
    fn read_block(&self, block: u64) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; self.bs.as_usize()];
        self.staged.read_block(&self.dev, block, &mut buf, u64::from(self.bs.bytes()))?;
        Ok(buf)
    }

    fn stage_user(&mut self, sector: u64, data: Bytes, read_later: bool) {
        self.staged.stage_user(sector * SECTOR_SIZE, data, self.bs.as_usize(), read_later);
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
        if self.replay {
            // The checksum needs the source data; the resumed engine takes the log's
            // checksums from block 0 on disk (Engine::recover).
            for i in 0..blocks {
                self.staged.count_backup(dst + i);
            }
            return Ok(0);
        }
        let (copies, checksum) = read_sources(src, blocks, seed, |b| self.read_block(b))?;
        let bytes = u64::from(self.bs.bytes());
        self.staged.note_read(src * bytes, blocks * bytes);
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
    /// The op journal, when kept ([`Engine::with_journal`]).
    journal: Option<JournalSink>,
    /// How the ordering points make their writes durable ([`Engine::set_durable_writes`]).
    durable: Option<Box<dyn DurableWrites>>,
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
                replay: false,
            },
            // No entry history: the engine runs for a whole checkpoint.
            worker: Worker::new(bs, len, false),
            batches: 0,
            flushes: 0,
            trace,
            trace_overflowed: false,
            poisoned: false,
            journal: None,
            durable: None,
            #[cfg(any(test, feature = "fault"))]
            fault: None,
        }
    }

    /// An engine that journals every step ([`crate::journal`]) to `out`, which gets the
    /// journal's header now. A server killed at any point is resumed by [`Engine::recover`]
    /// from the journal and the device.
    pub fn with_journal(
        dev: D,
        config: EngineConfig,
        mut out: Box<dyn std::io::Write + Send>,
    ) -> std::io::Result<Engine<D>> {
        let engine = Engine::new(dev, config);
        let header = journal::header(config.block_size, engine.len_bytes(), config.allocator);
        out.write_all(&header)?;
        out.flush()?;
        Ok(Engine { journal: Some(JournalSink::new(out)), ..engine })
    }

    /// Makes the batches' two ordering points (the backups, then block 0) durable through
    /// `durable` instead of the device's writes and a flush of the whole device
    /// ([`crate::order`]). The server's writes back only the batch's own blocks, so a flush
    /// no longer carries every user write buffered since the last one.
    pub fn set_durable_writes(&mut self, durable: Box<dyn DurableWrites>) {
        self.durable = Some(durable);
    }

    /// The bytes of user writes written to the device directly so far, bypassing its page
    /// cache, or `None` if they are not ([`DurableWrites::direct_writes`]); the server reports
    /// it in `status`.
    pub fn direct_writes(&self) -> Option<u64> {
        self.durable.as_deref().and_then(DurableWrites::direct_writes)
    }

    /// Goes on journaling to `out`, which holds the first [`Recovered::journal_len`] bytes of
    /// the journal this engine was recovered from.
    pub fn resume_journal(&mut self, out: Box<dyn std::io::Write + Send>) {
        self.journal = Some(JournalSink::new(out));
    }

    /// Resumes the engine of a server that died: replays `journal` with no device I/O (the
    /// decisions: range map, allocator, log positions, counters, trace), then checks it against
    /// block 0 on `dev`, the batch's commit point (one atomic block write, after the batch's
    /// backups and before its user writes):
    ///
    /// * block 0 holds the log after the last step: that state;
    /// * else, if it holds the log before the last step, the state without it (its backups went
    ///   to blocks still free; its user writes were never issued; the kernel reissues them);
    /// * else refused, nothing written.
    ///
    /// A last step that left the log as it was (writes into free space or CHANGED blocks only,
    /// TRIM-state I/O) is kept: its writes may have reached the disk, and a map that called
    /// those blocks free could later place a backup over them. In CHECKPOINT the log sector
    /// (with the checksums a replay cannot compute) is then taken from block 0. A commit that
    /// was the last step has its copy of block 0 redone (SECTOR0_CURRENT is still intact: no
    /// write came after it).
    pub fn recover(
        dev: D,
        config: EngineConfig,
        journal: &[u8],
    ) -> Result<Recovered<D>, RecoverError> {
        Self::recover_with(
            dev,
            config,
            journal,
            #[cfg(test)]
            None,
        )
    }

    pub(crate) fn recover_with(
        dev: D,
        config: EngineConfig,
        journal: &[u8],
        #[cfg(test)] fault: Option<RecoverFault>,
    ) -> Result<Recovered<D>, RecoverError> {
        let probe = Engine::new(dev, config);
        let len_bytes = probe.len_bytes();
        let dev = probe.into_device();
        let read = journal::read(journal, config.block_size, len_bytes, config.allocator)?;
        let mut block0 = vec![0; config.block_size.as_usize()];
        dev.read_at(&mut block0, 0).map_err(RecoverError::ReadBlock0)?;
        let n = read.entries.len();
        let after = Self::replay(dev, config, &read.entries);
        #[cfg(test)]
        if fault == Some(RecoverFault::SkipBlock0Check) {
            let mut engine = after;
            engine.io.replay = false;
            engine.adopt_matching_checksums(&block0);
            return Ok(Recovered {
                engine,
                steps: n,
                dropped_last: false,
                torn_tail: read.torn_tail,
                journal_len: read.ends.last().copied().unwrap_or(journal::HEADER_BYTES),
            });
        }
        let (mut engine, kept) = match after.matches_block0(&block0) {
            Ok(()) => (after, n),
            Err(why_after) => {
                let Some(without_last) = n.checked_sub(1) else {
                    return Err(RecoverError::Block0Mismatch {
                        after: why_after,
                        before: "the journal has no step".into(),
                    });
                };
                let before =
                    Self::replay(after.into_device(), config, &read.entries[..without_last]);
                match before.matches_block0(&block0) {
                    Ok(()) => (before, without_last),
                    Err(why_before) => {
                        return Err(RecoverError::Block0Mismatch {
                            after: why_after,
                            before: why_before,
                        })
                    }
                }
            }
        };
        engine.io.replay = false;
        match engine.state() {
            BowState::Checkpoint => {
                // Same header and entries (checked above); the checksums come from the disk.
                engine.worker.replace_log_block(&block0);
            }
            BowState::Committed
                if kept == n
                    && read.entries.last() == Some(&Entry::State(BowState::Committed.value())) =>
            {
                Self::commit_copy(&engine.worker, &mut engine.io)
                    .map_err(|e| RecoverError::CommitCopy(format!("{e:?}")))?;
                engine.flushes += 1;
            }
            _ => {}
        }
        let journal_len = match kept.checked_sub(1) {
            Some(last) => read.ends[last],
            None => journal::HEADER_BYTES,
        };
        Ok(Recovered {
            engine,
            steps: kept,
            dropped_last: kept < n,
            torn_tail: read.torn_tail,
            journal_len,
        })
    }

    /// Everything a decision depends on (tests): state, range map, the log block's bytes and
    /// header, the allocator's remembered range, the counters of backups and space.
    #[cfg(test)]
    pub(crate) fn decision_state(&self) -> String {
        let stats = self.worker.stats();
        format!(
            "{:?}\n{}{:?}\nlog crc {:08x}\n{:?}\n{:?}\n{:?}",
            self.worker.state(),
            self.worker.ranges().table_status(),
            self.worker.header(),
            crc32fast::hash(self.worker.log_block()),
            self.io.far_end,
            stats,
            self.space(),
        )
    }

    /// A broken recovery's log (tests): the replayed log, with each entry's checksum taken
    /// from block 0 where block 0 has the same entry, 0 elsewhere.
    #[cfg(test)]
    fn adopt_matching_checksums(&mut self, block0: &[u8]) {
        let mut log = self.worker.log_block().to_vec();
        let count = self.worker.header().count;
        for i in 0..count {
            let at = usize::from(HEADER_SIZE_V1_0) + usize::try_from(i).unwrap_or(0) * ENTRY_SIZE;
            let (Some(m), Some(d)) = (log.get(at..at + 20), block0.get(at..at + 20)) else {
                break;
            };
            if m == d {
                log[at + 20..at + 24].copy_from_slice(&block0[at + 20..at + 24]);
            }
        }
        self.worker.replace_log_block(&log);
    }

    /// The engine after `entries`, decisions only.
    fn replay(dev: D, config: EngineConfig, entries: &[Entry]) -> Engine<D> {
        let mut engine = Engine::new(dev, config);
        engine.io.replay = true;
        for entry in entries {
            // Each step fails (or not) exactly as it did in the live engine: same state,
            // same decisions. Its outcome was already reported then.
            match entry {
                Entry::Batch(ios) => {
                    let planned = ios.iter().map(|io| (*io, None)).collect();
                    if let Ok(batch) = engine.plan(planned, Vec::new()) {
                        let _ = batch.commit();
                    }
                }
                Entry::State(value) => {
                    if let Some(to) = BowState::from_value(*value) {
                        let _ = engine.set_state(to);
                    }
                }
                Entry::Flush => {
                    let _ = engine.flush();
                }
            }
        }
        engine
    }

    /// Whether block 0 on disk is this engine's log: in CHECKPOINT the same header and the
    /// same entries (source, dest, size; the checksums need data a replay does not have).
    /// Outside CHECKPOINT block 0 holds the user's data, which says nothing.
    fn matches_block0(&self, block0: &[u8]) -> Result<(), String> {
        if self.state() != BowState::Checkpoint {
            return Ok(());
        }
        let mine = self.worker.header();
        let disk = LogHeader::decode(block0).map_err(|e| {
            format!("state CHECKPOINT with log {mine:?}, block 0 holds no log: {e}")
        })?;
        if disk != mine {
            return Err(format!("log header {mine:?}, block 0 has {disk:?}"));
        }
        let entry = |block: &[u8], i: u32| -> Option<LogEntry> {
            let at = usize::from(HEADER_SIZE_V1_0) + usize::try_from(i).ok()? * ENTRY_SIZE;
            let bytes: &[u8; ENTRY_SIZE] = block.get(at..at + ENTRY_SIZE)?.try_into().ok()?;
            Some(LogEntry::decode(bytes))
        };
        for i in 0..mine.count {
            let (m, d) = (entry(self.worker.log_block(), i), entry(block0, i));
            let same = match (m, d) {
                (Some(m), Some(d)) => (m.source, m.dest, m.size) == (d.source, d.dest, d.size),
                _ => false,
            };
            if !same {
                return Err(format!("log entry {i}: {m:?}, block 0 has {d:?}"));
            }
        }
        Ok(())
    }

    /// The device's size in whole blocks, in bytes.
    fn len_bytes(&self) -> u64 {
        self.worker.ranges().len_sectors() * SECTOR_SIZE
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

    /// Whether a write of `len` bytes at `sector` would copy anything to back it up now: in
    /// CHECKPOINT, a write at sector 0 or touching a range that is neither CHANGED nor free.
    /// A look-up only (the server uses it to decide whether gathering more requests into a
    /// round can share ordering flushes).
    pub fn needs_backup(&self, sector: Sectors, len: u64) -> bool {
        if self.worker.state() != BowState::Checkpoint {
            return false;
        }
        let ranges = self.worker.ranges();
        let end = sector.0.saturating_add(len / SECTOR_SIZE);
        let mut cur = sector.0;
        if cur == 0 {
            return true;
        }
        while cur < end {
            let Some(id) = ranges.find(cur) else { return false };
            if !matches!(ranges.kind(id), RangeType::Changed | RangeType::Trimmed) {
                return true;
            }
            cur = ranges.top(id);
        }
        false
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
        let journaled: Vec<JournalIo> = ios
            .iter()
            .map(|io| match io {
                UserIo::Write { sector, data } => JournalIo::Write {
                    sector: *sector,
                    len: u64::try_from(data.len()).unwrap_or(u64::MAX),
                },
                UserIo::Discard { sector, len } => {
                    JournalIo::Discard { sector: *sector, len: *len }
                }
            })
            .collect();
        let frame = if self.journal.is_some() {
            journal::frame(&Entry::Batch(journaled))
        } else {
            Vec::new()
        };
        let planned = ios.into_iter().map(|io| match io {
            UserIo::Write { sector, data } => (
                JournalIo::Write { sector, len: u64::try_from(data.len()).unwrap_or(u64::MAX) },
                Some(data),
            ),
            UserIo::Discard { sector, len } => (JournalIo::Discard { sector, len }, None),
        });
        self.plan(planned.collect(), frame)
    }

    /// Plans a batch: `data` is `None` only in a replay (and for discards).
    fn plan(
        &mut self,
        ios: Vec<(JournalIo, Option<Bytes>)>,
        frame: Vec<u8>,
    ) -> Result<Batch<'_, D>, EngineError> {
        self.check_usable()?;
        if !self.io.staged.is_empty() {
            // Only a failed commit leaves writes staged, and it poisons the engine first.
            self.poisoned = true;
            self.check_usable()?;
        }
        if let Some(durable) = self.durable.as_deref() {
            // The old contents the batch will copy, asked for together.
            for (io, _) in &ios {
                if let JournalIo::Write { sector, len } = io {
                    if self.needs_backup(*sector, *len) {
                        durable.will_read(sector.0 * SECTOR_SIZE, *len);
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(ios.len());
        for (io, data) in ios {
            let outcome = match io {
                JournalIo::Write { sector, len } => {
                    self.plan_write(sector.0, len, data).map(IoOutcome::Write)
                }
                JournalIo::Discard { sector, len } => {
                    self.plan_discard(sector.0, len).map(IoOutcome::Discard)
                }
            };
            if let Err(EngineError::Device(_)) = &outcome {
                // A read failed while planning: what is staged is inconsistent.
                self.poisoned = true;
            }
            results.push(outcome);
        }
        Ok(Batch { engine: self, results, frame, committed: false })
    }

    /// The commit copy: SECTOR0_CURRENT back onto block 0 (one block write, then a flush).
    fn commit_copy(worker: &Worker, io: &mut EngineIo<D>) -> Result<StateChange, StepError> {
        let (from, _) = worker.sector0_current()?;
        if io.replay {
            return Ok(StateChange::Committed { from: Sectors(from) });
        }
        let data = io.read_block(from / worker.block_size().sectors())?;
        io.dev.write_at(&data, 0)?;
        io.dev.flush()?;
        Ok(StateChange::Committed { from: Sectors(from) })
    }

    // ---- bios: the worker decides, the batch stages ----

    /// `data` is `None` in a replay (nothing is staged then).
    fn plan_write(
        &mut self,
        sector: u64,
        len: u64,
        mut data: Option<Bytes>,
    ) -> Result<WriteAction, EngineError> {
        self.worker.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors > 0 {
            self.record(Record::write(sector, sectors));
        }
        if data.as_ref().is_some_and(|d| u64::try_from(d.len()).ok() != Some(len)) {
            return Err(EngineError::OutOfRange { sector, len });
        }
        self.worker.write(&mut self.io, sector, len, |io, at, bytes| {
            if let Some(d) = data.as_mut() {
                // Written where it was sent: its blocks end up CHANGED. Elsewhere: the
                // SECTOR0_CURRENT block, which a later write in the batch may copy.
                let in_place = u64::try_from(bytes.start)
                    .is_ok_and(|skip| sector * SECTOR_SIZE + skip == at * SECTOR_SIZE);
                // The whole write is handed over as it is (the usual case), a part shared.
                let part = if bytes.start == 0 && bytes.end == d.len() {
                    std::mem::take(d)
                } else {
                    d.slice(bytes)
                };
                io.stage_user(at, part, !in_place);
            }
            Ok(())
        })
    }

    fn plan_discard(&mut self, sector: u64, len: u64) -> Result<DiscardAction, EngineError> {
        self.worker.check_io(sector, len)?;
        let sectors = len / SECTOR_SIZE;
        if sectors > 0 {
            self.record(Record::discard(sector, sectors));
        }
        // A discard in CHECKPOINT changes nothing with the far-end allocator. BlockDevice has no
        // discard, so the data stays on the device either way; dm-bow's way (back the range up as
        // a write, for the discard it forwards) would spend backup space on it, and turn the
        // free blocks in it CHANGED, taking them out of the backup pool, where f2fs discarding
        // its free space at unmount emptied the pool. The dm-bow allocator keeps dm-bow's
        // behaviour, which is what it is there to reproduce.
        if self.io.allocator == Allocator::FarEnd && self.worker.state() == BowState::Checkpoint {
            return Ok(DiscardAction::Forwarded { pieces: Vec::new() });
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
        // The state change's frame goes to the journal before it touches the device.
        let journaled = if self.io.replay {
            None
        } else {
            let frame = journal::frame(&Entry::State(to.value()));
            match append_journal(self.journal.as_mut(), &frame) {
                Ok(j) => Some(j),
                Err(source) => {
                    return Err(EngineError::Device(DeviceError::Io { offset: 0, source }))
                }
            }
        };
        let (io, flushes, poisoned) = (&mut self.io, &mut self.flushes, &mut self.poisoned);
        let durable = self.durable.as_deref();
        self.worker.set_state(to, |worker| match to {
            BowState::Checkpoint => {
                let change = worker.prepare_log(io);
                // Both copies of block 0 durable before the magic appears in block 0.
                let staged = std::mem::take(&mut io.staged);
                let issued = match journaled {
                    None => Ok(staged.replay_commit()),
                    Some(journaled) => staged.commit(
                        &io.dev,
                        durable,
                        journaled,
                        #[cfg(any(test, feature = "fault"))]
                        None,
                    ),
                };
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
        match self.one(UserIo::Write { sector, data: Bytes::copy_from_slice(data) })? {
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
        if !self.io.replay {
            let frame = journal::frame(&Entry::Flush);
            append_journal(self.journal.as_mut(), &frame)
                .map_err(|source| DeviceError::Io { offset: 0, source })?;
            self.io.dev.flush()?;
        }
        self.flushes += 1;
        Ok(())
    }
}
