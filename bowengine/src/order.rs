//! The write order of a batch, enforced by proof tokens.
//!
//! A batch stages three kinds of writes: backup data (copies of old contents, saved log
//! sectors), the log (block 0, the newest in-memory log sector) and the user's writes. Its
//! journal frame ([`crate::journal`]: what the batch was asked to do, no data) comes first:
//!
//! 0. the journal frame appended → [`Journaled`] (or the engine keeps no journal);
//! 1. every backup data write, then one flush → [`BackupsDurable`];
//! 2. block 0 (the log whose entries point at those backups), then one flush → [`LogDurable`];
//! 3. the user writes (no flush of ours; the user's own flushes follow as they come).
//!
//! Steps 1 and 2 go through the engine's [`DurableWrites`] when it has one (the server's makes
//! only the step's own blocks durable, not every user write buffered since the last flush),
//! else through the device's writes and one device flush each.
//!
//! So at any crash point either a log entry is absent and its source has not been overwritten,
//! or the entry is durable and so is the copy it points at (dm-bow-format.md §4.7, with many
//! backups sharing the two flushes instead of two flushes per backup). Block 0 is one block
//! write, never torn (the crash model's atomic unit). Each step takes the previous step's token
//! by value and the tokens have private constructors, so skipping or reordering a step does not
//! compile. A batch with no backup and no log change has nothing to make durable:
//! `LogDurable::nothing_staged` only exists for it.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;

use blockcopy::device::{BlockDevice, DeviceError};
use bytes::Bytes;

/// Proof that the batch's journal frame is in the journal (so a restarted server replays it
/// before looking at what the batch left on the device), or that the engine keeps no journal.
#[derive(Debug)]
pub struct Journaled(());

/// Where the engine appends its journal frames: a file on a tmpfs in the server (appended
/// through a shared mapping, bow-ublk's `MappedJournal`; never synced: it must survive the
/// process, not the machine), a buffer in tests. Every frame is appended before its batch
/// touches the device, so a replay rebuilds every decision and the whole write trace. (Until
/// the journal was mapped, frames of batches that changed no decision were held in memory to
/// save a `write()` each, and a server that died lost them from its rebuilt trace.)
pub struct JournalSink {
    out: Box<dyn Write + Send>,
}

impl JournalSink {
    /// A sink over `out`.
    pub fn new(out: Box<dyn Write + Send>) -> JournalSink {
        JournalSink { out }
    }
}

impl fmt::Debug for JournalSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JournalSink")
    }
}

/// Step 0: appends `frame` to the journal, if one is kept.
pub(crate) fn append_journal(
    sink: Option<&mut JournalSink>,
    frame: &[u8],
) -> std::io::Result<Journaled> {
    if let Some(s) = sink {
        s.out.write_all(frame)?;
        s.out.flush()?;
    }
    Ok(Journaled(()))
}

/// Writes made durable on their own: when [`DurableWrites::write_durable`] returns, every one
/// of `writes` is durable, and nothing else had to be written for it. The server's version
/// (bow-ublk's `RangeSyncWrites`) writes back only these ranges and then flushes the device,
/// instead of an `fdatasync` that also writes out every user write buffered since the last
/// flush. Without one, the engine writes through [`BlockDevice::write_at`] and then calls
/// [`BlockDevice::flush`] (the same guarantee, at the price of flushing everything).
pub trait DurableWrites: Send + fmt::Debug {
    /// Writes each `(byte offset, bytes)` and returns once all of them are durable.
    fn write_durable(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError>;

    /// A hint before a batch is planned: it will read `len` bytes at byte `offset` (the old
    /// contents it backs up), so the device may start reading them now, all of the batch's
    /// reads at once instead of one after another. Nothing by default.
    fn will_read(&self, _offset: u64, _len: u64) {}

    /// Writes the batch's user writes (plainly: not durable), in order, if this writer offers
    /// it: `None` leaves them to the engine, one [`BlockDevice::write_at`] each. The server's
    /// writes each run of contiguous ones with one vectored write (a drain of held writes in
    /// device order is mostly such runs). `read`: the byte ranges (offset, length) the batch
    /// read to copy them, whose old contents now sit in the device's page cache (a writer
    /// that bypasses the cache must drop them first).
    fn write_plain(
        &self,
        _writes: &[(u64, &[u8])],
        _read: &[(u64, u64)],
    ) -> Option<Result<(), DeviceError>> {
        None
    }

    /// `Some(bytes written so far)` while [`DurableWrites::write_plain`] writes to the device
    /// directly, bypassing its page cache; `None` when it does not (what the server reports;
    /// the guarantees are the same either way).
    fn direct_writes(&self) -> Option<u64> {
        None
    }
}

/// Proof that every staged backup write of the batch is durable.
#[derive(Debug)]
pub struct BackupsDurable(());

/// Proof that the log sector referring to the batch's backups is durable.
#[derive(Debug)]
pub struct LogDurable(());

/// A deliberately broken ordering, for the tests that show the crash suite catches it. Only in
/// test builds and under the cargo feature `fault` (the VM crash suite's broken servers);
/// production builds never enable it.
#[cfg(any(test, feature = "fault"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// User writes issued before the flush that makes their backups durable.
    UserWriteBeforeFlush,
    /// The log written before (and flushed with) the backup data it points at.
    LogBeforeData,
}

/// The writes a batch has planned, not yet issued. Reads during planning see them.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    /// Backup data (block index, block), in planning order.
    backups: Vec<(u64, Vec<u8>)>,
    /// The newest block 0, if the log changed.
    log: Option<Vec<u8>>,
    /// User writes (byte offset, bytes), in submission order.
    user: Vec<(u64, Bytes)>,
    /// The newest staged contents of each block (any kind), for reads during planning.
    overlay: HashMap<u64, Vec<u8>>,
    /// Byte ranges (offset, length) whose old contents the batch read to copy them: they now
    /// sit in the device's page cache ([`DurableWrites::write_plain`]).
    read: Vec<(u64, u64)>,
}

impl Staged {
    pub(crate) fn is_empty(&self) -> bool {
        self.backups.is_empty() && self.log.is_none() && self.user.is_empty()
    }

    pub(crate) fn backup_blocks(&self) -> usize {
        self.backups.len()
    }

    /// Reads block `block` (`buf` is one block) as the device will hold it after the batch.
    pub(crate) fn read_block(
        &self,
        dev: &impl BlockDevice,
        block: u64,
        buf: &mut [u8],
        block_bytes: u64,
    ) -> Result<(), DeviceError> {
        match self.overlay.get(&block) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => dev.read_at(buf, block * block_bytes),
        }
    }

    /// A decisions-only replay: a backup the batch would write, without its data (only
    /// counted; nothing reads it).
    pub(crate) fn count_backup(&mut self, block: u64) {
        self.backups.push((block, Vec::new()));
    }

    /// A decisions-only replay's commit: what the batch would have issued, nothing issued.
    pub(crate) fn replay_commit(self) -> IssuedCounts {
        let logged = !self.backups.is_empty() || self.log.is_some();
        IssuedCounts {
            backup_writes: self.backups.len(),
            user_writes: self.user.len(),
            flushes: if logged { 2 } else { 0 },
        }
    }

    /// The batch read `len` bytes at byte `offset` to copy them.
    pub(crate) fn note_read(&mut self, offset: u64, len: u64) {
        self.read.push((offset, len));
    }

    pub(crate) fn stage_backup(&mut self, block: u64, data: Vec<u8>) {
        self.overlay.insert(block, data.clone());
        self.backups.push((block, data));
    }

    pub(crate) fn stage_log(&mut self, block0: &[u8]) {
        self.overlay.insert(0, block0.to_vec());
        self.log = Some(block0.to_vec());
    }

    /// A user write of whole blocks at byte `offset`. `read_later`: whether planning may still
    /// read these blocks in this batch, so reads must see them. Only a write redirected to
    /// SECTOR0_CURRENT can be: every other user write leaves its blocks CHANGED (or the state
    /// takes no copies), and a CHANGED block is never a copy's source, so most user writes skip
    /// the overlay's copy.
    pub(crate) fn stage_user(
        &mut self,
        offset: u64,
        data: Bytes,
        block_bytes: usize,
        read_later: bool,
    ) {
        if read_later {
            let bb = u64::try_from(block_bytes).unwrap_or(u64::MAX);
            for (i, chunk) in (0u64..).zip(data.chunks(block_bytes)) {
                self.overlay.insert(offset / bb + i, chunk.to_vec());
            }
        }
        self.user.push((offset, data));
    }

    /// Issues the staged writes in the documented order. `fault` breaks it (tests only).
    /// Needs the batch's journal frame appended first.
    pub(crate) fn commit(
        self,
        dev: &impl BlockDevice,
        durable: Option<&dyn DurableWrites>,
        journaled: Journaled,
        #[cfg(any(test, feature = "fault"))] fault: Option<Fault>,
    ) -> Result<IssuedCounts, DeviceError> {
        let Staged { backups, log, user, read, .. } = self;
        let mut counts = IssuedCounts::default();
        #[cfg(any(test, feature = "fault"))]
        if let Some(f) = fault {
            return commit_broken(dev, f, backups, log, user);
        }
        let log_durable = if backups.is_empty() && log.is_none() {
            LogDurable::nothing_staged(journaled)
        } else {
            counts.flushes += 2;
            counts.backup_writes = backups.len();
            let backups_durable = write_backups(dev, durable, journaled, &backups)?;
            match log {
                Some(block0) => write_log(dev, durable, backups_durable, &block0)?,
                // Backups without a log change cannot happen (every copy is logged); the
                // flush above still makes them durable before the user writes.
                None => LogDurable(()),
            }
        };
        counts.user_writes = user.len();
        release_user_writes(dev, durable, log_durable, &user, &read)?;
        Ok(counts)
    }
}

/// What a commit issued.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IssuedCounts {
    pub(crate) backup_writes: usize,
    pub(crate) user_writes: usize,
    pub(crate) flushes: usize,
}

impl LogDurable {
    /// For a batch that staged no backup and no log change: nothing needs to be durable first.
    fn nothing_staged(_journaled: Journaled) -> LogDurable {
        LogDurable(())
    }
}

/// Writes `writes` and makes them durable: through `durable` when the engine has one, else
/// each through the device and then one flush of the device.
fn write_and_flush(
    dev: &impl BlockDevice,
    durable: Option<&dyn DurableWrites>,
    writes: &[(u64, &[u8])],
) -> Result<(), DeviceError> {
    if let Some(d) = durable {
        return d.write_durable(writes);
    }
    for (offset, data) in writes {
        dev.write_at(data, *offset)?;
    }
    dev.flush()
}

/// Step 1: the backup data, then one flush. Needs the journal frame appended.
fn write_backups(
    dev: &impl BlockDevice,
    durable: Option<&dyn DurableWrites>,
    _journaled: Journaled,
    backups: &[(u64, Vec<u8>)],
) -> Result<BackupsDurable, DeviceError> {
    let writes: Vec<(u64, &[u8])> = backups
        .iter()
        .map(|(block, data)| {
            let bytes = u64::try_from(data.len()).unwrap_or(u64::MAX);
            (block * bytes, data.as_slice())
        })
        .collect();
    write_and_flush(dev, durable, &writes)?;
    Ok(BackupsDurable(()))
}

/// Step 2: block 0, then one flush. Needs the backups durable.
fn write_log(
    dev: &impl BlockDevice,
    durable: Option<&dyn DurableWrites>,
    _backups: BackupsDurable,
    block0: &[u8],
) -> Result<LogDurable, DeviceError> {
    write_and_flush(dev, durable, &[(0, block0)])?;
    Ok(LogDurable(()))
}

/// Step 3: the user writes. Needs the log durable.
fn release_user_writes(
    dev: &impl BlockDevice,
    durable: Option<&dyn DurableWrites>,
    _log: LogDurable,
    user: &[(u64, Bytes)],
    read: &[(u64, u64)],
) -> Result<(), DeviceError> {
    if let Some(d) = durable {
        let writes: Vec<(u64, &[u8])> = user.iter().map(|(o, d)| (*o, d.as_ref())).collect();
        if let Some(done) = d.write_plain(&writes, read) {
            return done;
        }
    }
    for (offset, data) in user {
        dev.write_at(data, *offset)?;
    }
    Ok(())
}

/// The broken orders of [`Fault`], bypassing the tokens on purpose.
#[cfg(any(test, feature = "fault"))]
fn commit_broken(
    dev: &impl BlockDevice,
    fault: Fault,
    backups: Vec<(u64, Vec<u8>)>,
    log: Option<Vec<u8>>,
    user: Vec<(u64, Bytes)>,
) -> Result<IssuedCounts, DeviceError> {
    let counts = IssuedCounts { backup_writes: backups.len(), user_writes: user.len(), flushes: 2 };
    let user: Vec<(u64, Vec<u8>)> = user.into_iter().map(|(at, d)| (at, d.to_vec())).collect();
    let write_all = |list: &[(u64, Vec<u8>)], block: bool| -> Result<(), DeviceError> {
        for (at, data) in list {
            let bytes = u64::try_from(data.len()).unwrap_or(u64::MAX);
            dev.write_at(data, if block { at * bytes } else { *at })?;
        }
        Ok(())
    };
    match fault {
        Fault::UserWriteBeforeFlush => {
            write_all(&backups, true)?;
            write_all(&user, false)?;
            dev.flush()?;
            if let Some(l) = &log {
                dev.write_at(l, 0)?;
            }
            dev.flush()?;
        }
        Fault::LogBeforeData => {
            if let Some(l) = &log {
                dev.write_at(l, 0)?;
            }
            write_all(&backups, true)?;
            dev.flush()?;
            write_all(&user, false)?;
            dev.flush()?;
        }
    }
    Ok(counts)
}
