//! One ublk request against the backing device: the engine, or a pass-through.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use blockcopy::device::{BlockDevice, DeviceError};
use bow::model::{BowEngine, EngineErrorKind};
use bow::units::Sectors;
use bow_engine::order::DurableWrites;
use bow_engine::{Engine, EngineError, IoOutcome, UserIo};
use bytes::Bytes;

/// The engine's ordering writes (backups, then block 0) made durable without writing out the
/// user writes buffered in the page cache since the last flush: each contiguous run of blocks is
/// written into the page cache and written back on its own (`sync_file_range`, waited for),
/// and the last run goes through a second descriptor opened `O_DSYNC`, whose write returns
/// after writing back its own range and flushing the device's cache (the kernel's
/// `generic_write_sync`: a ranged `fsync`). That one flush covers the runs written back before
/// it. An `fdatasync` would instead write out the whole device's dirty pages first (every user
/// write since the last flush) and then flush.
///
/// The user writes of a batch (plain, not durable) go through the page cache, contiguous ones
/// in one `pwritev`; opened with [`RangeSyncWrites::open_direct`] on Linux, directly
/// ([`crate::direct`]).
///
/// Open it on the device the engine serves (the same page cache: one inode per block device).
#[derive(Debug)]
pub struct RangeSyncWrites {
    file: File,
    dsync: File,
    #[cfg(target_os = "linux")]
    direct: Option<crate::direct::DirectWriter>,
}

impl RangeSyncWrites {
    /// Opens `path` twice, read-write and read-write `O_DSYNC`; user writes go through the
    /// page cache (the default of `bow-ublk serve`).
    pub fn open(path: &Path) -> std::io::Result<RangeSyncWrites> {
        let open = |flags| std::fs::OpenOptions::new().write(true).custom_flags(flags).open(path);
        Ok(RangeSyncWrites {
            file: open(0)?,
            dsync: open(libc::O_DSYNC)?,
            #[cfg(target_os = "linux")]
            direct: None,
        })
    }

    /// Opens `path` as [`RangeSyncWrites::open`] does, and on Linux a third time `O_DIRECT`
    /// for the user writes (`serve --direct-writes`; when the device or file system refuses,
    /// they go through the page cache).
    pub fn open_direct(path: &Path) -> std::io::Result<RangeSyncWrites> {
        #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
        let mut writes = RangeSyncWrites::open(path)?;
        #[cfg(target_os = "linux")]
        {
            writes.direct = crate::direct::DirectWriter::open(path);
        }
        Ok(writes)
    }

    /// Starts (`wait` false) or waits for (`wait` true) the write-back of one range.
    #[cfg(target_os = "linux")]
    fn sync_range(&self, offset: u64, len: usize, wait: bool) -> Result<(), DeviceError> {
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        let io = |source| DeviceError::Io { offset, source };
        let off = libc::off64_t::try_from(offset)
            .map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
        let n = libc::off64_t::try_from(len)
            .map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a plain system call on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, n, flags) };
        if rc != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl DurableWrites for RangeSyncWrites {
    fn write_durable(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        // Contiguous blocks as one write each (FarEnd carves a batch's copies downwards, so a
        // batch's backups are mostly one run).
        let mut sorted: Vec<(u64, &[u8])> = writes.to_vec();
        sorted.sort_by_key(|(offset, _)| *offset);
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (offset, data) in sorted {
            match runs.last_mut() {
                Some((start, run))
                    if u64::try_from(run.len()).ok().and_then(|l| start.checked_add(l))
                        == Some(offset) =>
                {
                    run.extend_from_slice(data);
                }
                _ => runs.push((offset, data.to_vec())),
            }
        }
        let Some((last, rest)) = runs.split_last() else {
            return Ok(());
        };
        #[cfg(target_os = "linux")]
        {
            for (offset, run) in rest {
                self.file
                    .write_all_at(run, *offset)
                    .map_err(|source| DeviceError::Io { offset: *offset, source })?;
                self.sync_range(*offset, run.len(), false)?;
            }
            for (offset, run) in rest {
                self.sync_range(*offset, run.len(), true)?;
            }
        }
        // Bionic's libc crate has no sync_file_range: each run is a ranged fsync of its own
        // (one device flush per run instead of per batch; still none of the user's writes).
        #[cfg(not(target_os = "linux"))]
        for (offset, run) in rest {
            self.dsync
                .write_all_at(run, *offset)
                .map_err(|source| DeviceError::Io { offset: *offset, source })?;
        }
        self.dsync
            .write_all_at(&last.1, last.0)
            .map_err(|source| DeviceError::Io { offset: last.0, source })
    }

    /// Directly when opened so ([`crate::direct`]), except the writes over blocks the batch
    /// read to copy them; else through the page cache: each run of writes that follow one another on the
    /// device (in the order given) as one `pwritev` of up to `IOV_MAX` parts; a short write
    /// finishes part by part. The blocks a batch copied sit in the page cache, and a direct
    /// write over cached pages must drop them first, which io_uring does in a worker thread,
    /// one write at a time: with every batch direct, first touches at queue depth 16 fell from
    /// 0.53–0.64x of the pass-through to 0.45–0.52x.
    fn write_plain(
        &self,
        writes: &[(u64, &[u8])],
        read: &[(u64, u64)],
    ) -> Option<Result<(), DeviceError>> {
        #[cfg(target_os = "linux")]
        if let Some(direct) = self.direct.as_ref().filter(|d| d.in_use()) {
            return Some(direct.write(&self.file, writes, read));
        }
        #[cfg(not(target_os = "linux"))]
        let _ = read;
        let mut i = 0;
        while i < writes.len() {
            let start = writes[i].0;
            let mut end = start;
            let mut j = i;
            while j < writes.len() && j - i < IOV_MAX && writes[j].0 == end {
                end += writes[j].1.len() as u64;
                j += 1;
            }
            if let Err(e) = write_run(&self.file, start, &writes[i..j]) {
                return Some(Err(e));
            }
            i = j;
        }
        Some(Ok(()))
    }

    fn direct_writes(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        return self.direct.as_ref().filter(|d| d.in_use()).map(crate::direct::DirectWriter::bytes);
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// `POSIX_FADV_WILLNEED`: the kernel starts reading the range into the page cache (the
    /// engine's buffered reads then wait for it instead of reading one block at a time).
    fn will_read(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor we own; no memory is passed. A hint:
        // its failure changes nothing but speed.
        let _ = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, n, libc::POSIX_FADV_WILLNEED)
        };
    }
}

/// The most parts one `pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// `parts`, which follow one another on the device from byte `start`, in one vectored write.
fn write_run(file: &File, start: u64, parts: &[(u64, &[u8])]) -> Result<(), DeviceError> {
    let io = |offset, source| DeviceError::Io { offset, source };
    let total: usize = parts.iter().map(|(_, d)| d.len()).sum();
    let slices: Vec<std::io::IoSlice<'_>> =
        parts.iter().map(|(_, d)| std::io::IoSlice::new(d)).collect();
    let at = libc::off_t::try_from(start)
        .map_err(|_| io(start, std::io::ErrorKind::InvalidInput.into()))?;
    let mut done = nix::sys::uio::pwritev(file, &slices, at)
        .map_err(|e| io(start, std::io::Error::from(e)))?;
    if done == total {
        return Ok(());
    }
    // Short: the rest of each part on its own.
    for (offset, data) in parts {
        if done >= data.len() {
            done -= data.len();
            continue;
        }
        let from = *offset + done as u64;
        file.write_all_at(&data[done..], from).map_err(|source| io(from, source))?;
        done = 0;
    }
    Ok(())
}

/// What the device is served through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Every request straight to the device: the baseline the engine is measured against.
    Passthrough,
    /// The backup-on-write engine (TRIM state at start).
    Engine,
}

/// One request, as the ublk descriptor gives it (positions in 512-byte sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        sector: u64,
        sectors: u32,
    },
    Write {
        sector: u64,
        sectors: u32,
    },
    Flush,
    Discard {
        sector: u64,
        sectors: u32,
    },
    /// Anything else (write-zeroes and zoned operations are not advertised).
    Unsupported {
        op: u32,
    },
}

/// The served device: a pass-through or the engine over `D`.
#[derive(Debug)]
pub enum Target<D: BlockDevice> {
    Passthrough(D),
    // Boxed: the engine's state is large, the pass-through's a file handle.
    Engine(Box<Engine<D>>),
}

impl<D: BlockDevice> Target<D> {
    /// Size in bytes the ublk device shows (the engine's whole blocks).
    pub fn size(&self) -> u64 {
        match self {
            Target::Passthrough(d) => d.size(),
            Target::Engine(e) => e.device().size() / 4096 * 4096,
        }
    }

    /// Whether any of `reqs` is a write the engine must back up first: such a round pays two
    /// ordering flushes, which more requests gathered into it would share. Never for the
    /// pass-through.
    pub fn needs_ordering_flushes<'r>(&self, reqs: impl IntoIterator<Item = &'r Request>) -> bool {
        let Target::Engine(e) = self else { return false };
        reqs.into_iter().any(|req| match *req {
            Request::Write { sector, sectors } => {
                e.needs_backup(Sectors(sector), u64::from(sectors) * 512)
            }
            _ => false,
        })
    }

    /// Carries out `req` with `buf` as the request's data buffer (read into, written from).
    /// Returns the bytes done, or the errno the kernel completes the request with.
    pub fn handle(&mut self, req: Request, buf: &mut [u8]) -> Result<u32, i32> {
        let data = |sectors: u32| -> Result<usize, i32> {
            let len = usize::try_from(u64::from(sectors) * 512).map_err(|_| libc::EINVAL)?;
            if len > buf.len() {
                return Err(libc::EINVAL);
            }
            Ok(len)
        };
        match (self, req) {
            (_, Request::Unsupported { .. }) => Err(libc::EOPNOTSUPP),
            (Target::Passthrough(d), Request::Read { sector, sectors }) => {
                let len = data(sectors)?;
                d.read_at(&mut buf[..len], sector * 512).map_err(|_| libc::EIO)?;
                Ok(sectors * 512)
            }
            (Target::Passthrough(d), Request::Write { sector, sectors }) => {
                let len = data(sectors)?;
                passthrough_write(d, sector, &buf[..len])
            }
            (Target::Passthrough(d), Request::Flush) => {
                d.flush().map_err(|_| libc::EIO)?;
                Ok(0)
            }
            // BlockDevice has no discard; a discard is advice, and dropping it loses nothing.
            (Target::Passthrough(_), Request::Discard { .. }) => Ok(0),
            (Target::Engine(e), Request::Read { sector, sectors }) => {
                let len = data(sectors)?;
                e.read(Sectors(sector), &mut buf[..len]).map_err(|err| errno(&err))?;
                Ok(sectors * 512)
            }
            (Target::Engine(e), Request::Write { sector, sectors }) => {
                let len = data(sectors)?;
                let io = UserIo::Write {
                    sector: Sectors(sector),
                    data: Bytes::copy_from_slice(&buf[..len]),
                };
                one(e, io)?;
                Ok(sectors * 512)
            }
            (Target::Engine(e), Request::Discard { sector, sectors }) => {
                let io = UserIo::Discard { sector: Sectors(sector), len: u64::from(sectors) * 512 };
                one(e, io)?;
                Ok(0)
            }
            (Target::Engine(e), Request::Flush) => {
                e.flush().map_err(|err| errno(&err))?;
                Ok(0)
            }
        }
    }
}

impl<D: BlockDevice> Target<D> {
    /// Carries out the writes, discards and flushes of one queue round together: the engine
    /// plans every write and discard in order as one batch (their backups share two flushes
    /// and one block-0 write), commits it, then runs one flush if any was asked (a flush covers
    /// the writes completed before it was issued; these were not, so flushing after them is
    /// more than enough). Reads are not batched ([`Target::handle`]). One result per request,
    /// in order.
    pub fn handle_batch(&mut self, reqs: Vec<(Request, Bytes)>) -> Vec<Result<u32, i32>> {
        self.handle_batch_timed(reqs, &mut BatchTimes::default())
    }

    /// [`Target::handle_batch`], adding to `times` where the time went (the pass-through
    /// has no planning).
    pub fn handle_batch_timed(
        &mut self,
        reqs: Vec<(Request, Bytes)>,
        times: &mut BatchTimes,
    ) -> Vec<Result<u32, i32>> {
        let Target::Engine(e) = self else {
            return reqs
                .into_iter()
                .map(|(req, data)| {
                    let started = Instant::now();
                    let done = match (&*self, req) {
                        (Target::Passthrough(d), Request::Write { sector, sectors }) => {
                            let len =
                                usize::try_from(u64::from(sectors) * 512).unwrap_or(usize::MAX);
                            let data = data.get(..len).ok_or(libc::EINVAL)?;
                            passthrough_write(d, sector, data)
                        }
                        (_, Request::Read { .. }) => Err(libc::EINVAL),
                        _ => self.handle(req, &mut []),
                    };
                    let took = nanos(started.elapsed());
                    *times += match req {
                        Request::Flush => BatchTimes { flush_ns: took, ..BatchTimes::default() },
                        _ => BatchTimes { write_ns: took, ..BatchTimes::default() },
                    };
                    done
                })
                .collect();
        };
        let mut results = vec![Err(libc::EIO); reqs.len()];
        let mut ios = Vec::new();
        let mut slots = Vec::new();
        let mut flushes = Vec::new();
        for (i, (req, data)) in reqs.into_iter().enumerate() {
            match req {
                Request::Write { sector, sectors } => {
                    let len = usize::try_from(u64::from(sectors) * 512).unwrap_or(usize::MAX);
                    if len > data.len() {
                        results[i] = Err(libc::EINVAL);
                        continue;
                    }
                    let mut data = data;
                    data.truncate(len);
                    ios.push(UserIo::Write { sector: Sectors(sector), data });
                    slots.push((i, sectors * 512));
                }
                Request::Discard { sector, sectors } => {
                    let len = u64::from(sectors) * 512;
                    ios.push(UserIo::Discard { sector: Sectors(sector), len });
                    slots.push((i, 0));
                }
                Request::Flush => flushes.push(i),
                Request::Read { .. } => results[i] = Err(libc::EINVAL),
                Request::Unsupported { .. } => results[i] = Err(libc::EOPNOTSUPP),
            }
        }
        if !ios.is_empty() {
            let started = Instant::now();
            let planned = e.submit(ios);
            let committing = Instant::now();
            let report = planned.and_then(|batch| batch.commit());
            *times += BatchTimes {
                plan_ns: nanos(committing - started),
                write_ns: nanos(committing.elapsed()),
                flush_ns: 0,
            };
            match report {
                Ok(report) => {
                    for ((i, done), r) in slots.into_iter().zip(report.results) {
                        results[i] = r.map(|_| done).map_err(|err| errno(&err));
                    }
                }
                Err(err) => {
                    for (i, _) in slots {
                        results[i] = Err(errno(&err));
                    }
                }
            }
        }
        if !flushes.is_empty() {
            let started = Instant::now();
            let flushed = e.flush().map(|()| 0).map_err(|err| errno(&err));
            *times += BatchTimes { flush_ns: nanos(started.elapsed()), ..BatchTimes::default() };
            for i in flushes {
                results[i] = flushed;
            }
        }
        results
    }
}

/// Where a target's batches spent their time, in nanoseconds (a pass-through plans nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchTimes {
    /// The engine's planning: the range map, the log, the backups' reads.
    pub plan_ns: u64,
    /// Writing: the engine's commit (journal frame, ordered backup, log and user writes), or a
    /// pass-through's writes.
    pub write_ns: u64,
    /// The user's flushes.
    pub flush_ns: u64,
}

impl std::ops::AddAssign for BatchTimes {
    fn add_assign(&mut self, other: BatchTimes) {
        self.plan_ns = self.plan_ns.saturating_add(other.plan_ns);
        self.write_ns = self.write_ns.saturating_add(other.write_ns);
        self.flush_ns = self.flush_ns.saturating_add(other.flush_ns);
    }
}

/// `d` in whole nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A pass-through write of `data` at `sector`.
fn passthrough_write<D: BlockDevice>(d: &D, sector: u64, data: &[u8]) -> Result<u32, i32> {
    d.write_at(data, sector * 512).map_err(|_| libc::EIO)?;
    u32::try_from(data.len()).map_err(|_| libc::EINVAL)
}

/// One I/O as a batch of its own: planned, then committed in the crash-safe order.
fn one<D: BlockDevice>(e: &mut Engine<D>, io: UserIo) -> Result<IoOutcome, i32> {
    let batch = e.submit(vec![io]).map_err(|err| errno(&err))?;
    let mut report = batch.commit().map_err(|err| errno(&err))?;
    match report.results.pop() {
        Some(r) => r.map_err(|err| errno(&err)),
        None => Err(libc::EIO),
    }
}

/// The errno a failed engine call completes its request with (the kernel target's choices).
pub fn errno(err: &EngineError) -> i32 {
    match err.kind() {
        EngineErrorKind::Invalid => libc::EINVAL,
        EngineErrorKind::NoSpace => libc::ENOSPC,
        EngineErrorKind::NotSupported => libc::EOPNOTSUPP,
        EngineErrorKind::Io => libc::EIO,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use blockcopy::device::MemDevice;
    use bow::model::BowState;
    use bow::restore::{restore, RestoreOptions};
    use bow::units::BlockSize;
    use bow_engine::EngineConfig;

    use super::*;

    const BLOCK: usize = 4096;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed ^ u8::try_from(i % 253).unwrap_or(0)).collect()
    }

    fn image(blocks: usize) -> Vec<u8> {
        (0..blocks).flat_map(|b| pattern(u8::try_from(b % 200).unwrap_or(0), BLOCK)).collect()
    }

    #[test]
    fn passthrough_reads_what_was_written_and_refuses_what_it_does_not_serve() {
        let mut t = Target::Passthrough(MemDevice::new(16 * BLOCK));
        let mut buf = pattern(7, 2 * BLOCK);
        assert_eq!(t.handle(Request::Write { sector: 8, sectors: 16 }, &mut buf), Ok(8192));
        assert_eq!(t.handle(Request::Flush, &mut buf), Ok(0));
        let mut back = vec![0; 2 * BLOCK];
        assert_eq!(t.handle(Request::Read { sector: 8, sectors: 16 }, &mut back), Ok(8192));
        assert_eq!(back, pattern(7, 2 * BLOCK));
        assert_eq!(t.handle(Request::Unsupported { op: 5 }, &mut back), Err(libc::EOPNOTSUPP));
        // A request larger than its buffer, or past the end, fails without touching anything.
        assert_eq!(
            t.handle(Request::Read { sector: 0, sectors: 24 }, &mut back),
            Err(libc::EINVAL)
        );
        assert_eq!(
            t.handle(Request::Write { sector: 120, sectors: 16 }, &mut back),
            Err(libc::EIO)
        );
    }

    #[test]
    fn engine_target_backs_up_and_the_log_restores_the_checkpoint_image() {
        let blocks = 64;
        let before = image(blocks);
        let engine =
            Engine::new(MemDevice::from_bytes(before.clone()), EngineConfig::new(BlockSize::B4096));
        let mut t = Target::Engine(Box::new(engine));
        assert_eq!(t.size(), u64::try_from(blocks * BLOCK).unwrap());
        // TRIM: the second half is free (a FITRIM), then the checkpoint starts.
        let mut none = Vec::new();
        let half = u32::try_from(blocks / 2 * BLOCK / 512).unwrap();
        assert_eq!(
            t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut none),
            Ok(0)
        );
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        // Writes to used blocks (block 0 included) and to free ones, reads see the new data.
        for (block, seed) in [(0u64, 1u8), (3, 2), (40, 3), (3, 4)] {
            let mut buf = pattern(seed, BLOCK);
            assert_eq!(
                t.handle(Request::Write { sector: block * 8, sectors: 8 }, &mut buf),
                Ok(4096)
            );
            let mut back = vec![0; BLOCK];
            assert_eq!(
                t.handle(Request::Read { sector: block * 8, sectors: 8 }, &mut back),
                Ok(4096)
            );
            assert_eq!(back, pattern(seed, BLOCK), "block {block}");
        }
        assert_eq!(t.handle(Request::Flush, &mut none), Ok(0));
        let Target::Engine(e) = t else { unreachable!() };
        assert!(e.stats().backups >= 2, "{:?}", e.stats());
        let dev = (*e).into_device();
        restores_used_half(&dev, &before);
    }

    /// A round's requests with their data shared, as [`Target::handle_batch`] takes them.
    pub(crate) fn shared(reqs: Vec<(Request, Vec<u8>)>) -> Vec<(Request, Bytes)> {
        reqs.into_iter().map(|(req, data)| (req, data.into())).collect()
    }

    /// Restores `dev` and checks the blocks in use at checkpoint start (the first half of
    /// `before`; the second half was discarded before the checkpoint) came back.
    pub(crate) fn restores_used_half(dev: &impl BlockDevice, before: &[u8]) {
        restore(dev, &RestoreOptions::default(), &mut |_| {}).unwrap();
        let mut after = vec![0; before.len()];
        dev.read_at(&mut after, 0).unwrap();
        let used = before.len() / 2;
        assert!(after[..used] == before[..used], "the blocks in use at checkpoint start differ");
    }

    #[test]
    fn a_queue_round_is_one_engine_batch_and_restores_exactly() {
        let blocks = 64;
        let before = image(blocks);
        let engine =
            Engine::new(MemDevice::from_bytes(before.clone()), EngineConfig::new(BlockSize::B4096));
        let mut t = Target::Engine(Box::new(engine));
        let half = u32::try_from(blocks / 2 * BLOCK / 512).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        let flushes_before = e.stats().flushes;
        // Sixteen overwrites of blocks in use, a discard, a flush and a bad request, one round.
        let mut reqs: Vec<(Request, Vec<u8>)> = (1..17u8)
            .map(|b| (Request::Write { sector: u64::from(b) * 8, sectors: 8 }, pattern(b, BLOCK)))
            .collect();
        reqs.push((Request::Flush, Vec::new()));
        reqs.push((Request::Write { sector: 0, sectors: 16 }, vec![0; BLOCK]));
        reqs.push((Request::Discard { sector: 40 * 8, sectors: 8 }, Vec::new()));
        let results = t.handle_batch(shared(reqs));
        assert!(results[..16].iter().all(|r| *r == Ok(4096)), "{results:?}");
        assert_eq!(results[16..], [Ok(0), Err(libc::EINVAL), Ok(0)]);
        let Target::Engine(e) = t else { unreachable!() };
        // Two ordering flushes for all sixteen backups, and the one asked for.
        assert_eq!(e.stats().flushes - flushes_before, 3, "{:?}", e.stats());
        // The TRIM discard's batch and this round's (the checkpoint start is not a batch).
        assert_eq!(e.stats().batches, 2, "{:?}", e.stats());
        let dev = (*e).into_device();
        for b in 1..17u8 {
            let mut back = vec![0; BLOCK];
            dev.read_at(&mut back, u64::from(b) * 4096).unwrap();
            assert_eq!(back, pattern(b, BLOCK), "block {b} before the restore");
        }
        restores_used_half(&dev, &before);
    }

    #[test]
    fn range_synced_ordering_writes_land_and_the_log_restores_exactly() {
        use blockcopy::device::FileDevice;
        let blocks = 64;
        let before = image(blocks);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().write_all_at(&before, 0).unwrap();
        // Scattered runs and one contiguous run, written back and made durable together. With
        // direct writes: the rounds' rewrites and free-space writes go directly, the first
        // touches (over copied blocks) through the page cache.
        let writes = RangeSyncWrites::open_direct(tmp.path()).unwrap();
        let (a, b, c) = (pattern(11, BLOCK), pattern(12, 2 * BLOCK), pattern(13, BLOCK));
        writes
            .write_durable(&[(40 * 4096, &a), (20 * 4096, &b), (22 * 4096, &c), (0, &a)])
            .unwrap();
        let dev = FileDevice::open(tmp.path()).unwrap();
        for (block, want) in
            [(40u64, &a[..]), (20, &b[..BLOCK]), (21, &b[BLOCK..]), (22, &c), (0, &a)]
        {
            let mut back = vec![0; BLOCK];
            dev.read_at(&mut back, block * 4096).unwrap();
            assert_eq!(back, want, "block {block}");
        }
        dev.write_at(&before, 0).unwrap();
        // The engine with them: a round of first touches, rewrites and free-space writes.
        let mut engine = Engine::new(dev, EngineConfig::new(BlockSize::B4096));
        engine.set_durable_writes(Box::new(writes));
        let mut t = Target::Engine(Box::new(engine));
        let half = u32::try_from(blocks / 2 * BLOCK / 512).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        for round in 0..3u8 {
            let reqs: Vec<(Request, Vec<u8>)> = [0u64, 2, 3, 9, 17, 30, 33, 34]
                .iter()
                .map(|b| {
                    let seed = round * 40 + u8::try_from(*b).unwrap();
                    (Request::Write { sector: b * 8, sectors: 8 }, pattern(seed, BLOCK))
                })
                .collect();
            let results = t.handle_batch(shared(reqs));
            assert!(results.iter().all(|r| *r == Ok(4096)), "{results:?}");
        }
        let mut back = vec![0; BLOCK];
        assert_eq!(t.handle(Request::Read { sector: 9 * 8, sectors: 8 }, &mut back), Ok(4096));
        assert_eq!(back, pattern(2 * 40 + 9, BLOCK));
        let Target::Engine(e) = t else { unreachable!() };
        assert!(e.stats().backups >= 6, "{:?}", e.stats());
        // Rounds 2 and 3 rewrite the blocks round 1 copied (CHANGED, nothing copied): those
        // at least went directly.
        if cfg!(target_os = "linux") {
            let direct = e.direct_writes();
            assert!(direct.is_some_and(|b| b >= 2 * 6 * 4096), "direct bytes {direct:?}");
        }
        let dev = (*e).into_device();
        restores_used_half(&dev, &before);
    }

    /// Runs of contiguous writes (one longer than `IOV_MAX` parts), a gap, and the same block
    /// written twice in a row: every byte lands, the later write last; directly (the host's
    /// /tmp takes `O_DIRECT`), and through the page cache (a writer without direct writes, or
    /// a batch that copied blocks).
    #[test]
    fn plain_writes_land_in_runs_and_in_order() {
        let linux = cfg!(target_os = "linux");
        for (direct, copied) in [(true, false), (true, true), (false, false)] {
            let blocks = 1200u64;
            let tmp = tempfile::NamedTempFile::new().unwrap();
            tmp.as_file().set_len(blocks * 4096).unwrap();
            let writes = if direct {
                RangeSyncWrites::open_direct(tmp.path()).unwrap()
            } else {
                RangeSyncWrites::open(tmp.path()).unwrap()
            };
            assert_eq!(writes.direct_writes(), (direct && linux).then_some(0));
            let data: Vec<Vec<u8>> =
                (0..blocks).map(|b| pattern(u8::try_from(b % 251).unwrap(), BLOCK)).collect();
            let mut list: Vec<(u64, &[u8])> = (0..1100u64)
                .map(|b| (b * 4096, data[usize::try_from(b).unwrap()].as_slice()))
                .collect();
            list.push((1150 * 4096, &data[7]));
            list.push((1151 * 4096, &data[8]));
            list.push((1151 * 4096, &data[9]));
            // A batch that copied blocks 0..600 (and one past the end): those go through the
            // page cache, the rest directly.
            let read: &[(u64, u64)] =
                if copied { &[(0, 600 * 4096), (5000 * 4096, 4096)] } else { &[] };
            writes.write_plain(&list, read).unwrap().unwrap();
            let direct_bytes = if copied { 503 * 4096 } else { 1103 * 4096 };
            assert_eq!(writes.direct_writes(), (direct && linux).then_some(direct_bytes));
            let dev = blockcopy::device::FileDevice::open(tmp.path()).unwrap();
            let mut back = vec![0; BLOCK];
            for b in [0u64, 1, 1023, 1024, 1099] {
                dev.read_at(&mut back, b * 4096).unwrap();
                assert!(back == data[usize::try_from(b).unwrap()], "block {b}, direct {direct}");
            }
            dev.read_at(&mut back, 1100 * 4096).unwrap();
            assert!(back.iter().all(|&x| x == 0), "block 1100 was never written");
            dev.read_at(&mut back, 1150 * 4096).unwrap();
            assert!(back == data[7]);
            dev.read_at(&mut back, 1151 * 4096).unwrap();
            assert!(back == data[9], "the later write to block 1151 lands last");
        }
    }

    #[test]
    fn only_writes_that_need_a_backup_ask_for_ordering_flushes() {
        let blocks = 64;
        let engine =
            Engine::new(MemDevice::from_bytes(image(blocks)), EngineConfig::new(BlockSize::B4096));
        let mut t = Target::Engine(Box::new(engine));
        let w = |block: u64| Request::Write { sector: block * 8, sectors: 8 };
        let half = u32::try_from(blocks / 2 * BLOCK / 512).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        // TRIM state: nothing is backed up.
        assert!(!t.needs_ordering_flushes(&[w(3)]));
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        assert!(t.needs_ordering_flushes(&[w(40), w(3)]), "a block in use");
        assert!(t.needs_ordering_flushes(&[w(0)]), "block 0");
        assert!(!t.needs_ordering_flushes(&[w(40), Request::Flush]), "free space");
        let mut buf = pattern(1, BLOCK);
        t.handle(w(3), &mut buf).unwrap();
        assert!(!t.needs_ordering_flushes(&[w(3)]), "CHANGED now");
        // Two blocks, the second still in use.
        assert!(t.needs_ordering_flushes(&[Request::Write { sector: 3 * 8, sectors: 16 }]));
        let pass = Target::Passthrough(MemDevice::new(16 * BLOCK));
        assert!(!pass.needs_ordering_flushes(&[w(3)]));
    }

    #[test]
    fn engine_errors_map_to_the_kernel_errnos() {
        let mut t = Target::Engine(Box::new(Engine::new(
            MemDevice::new(8 * BLOCK),
            EngineConfig::new(BlockSize::B4096),
        )));
        let Target::Engine(e) = &mut t else { unreachable!() };
        // No free space recorded: the checkpoint cannot even place its copies of block 0.
        assert!(e.set_state(BowState::Checkpoint).is_err());
        let mut buf = vec![0; 512];
        // Half a block: the engine refuses what the block layer would never send it.
        assert_eq!(t.handle(Request::Write { sector: 0, sectors: 1 }, &mut buf), Err(libc::EINVAL));
    }
}
