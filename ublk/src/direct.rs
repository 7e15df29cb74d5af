//! A batch's user writes straight to the device (`bow-ublk serve --direct-writes`; not the
//! default, docs/userspace-bow.md "Direct writes"): `O_DIRECT`, all of them submitted through
//! one io_uring and waited for together.
//!
//! Written through the page cache, a batch costs one `pwritev` per run of contiguous blocks
//! (6–14 µs each under emulation), a copy of every block into the page cache, and later the
//! flush's write-back of those pages. Here the blocks go from where they are held (the
//! held-writes file's pages: [`crate::held`] keeps each record's data 4 KiB-aligned) to the
//! device, with one `io_uring_enter` per [`RING_ENTRIES`] runs. Data that is not aligned (a
//! write the engine took without holding it) is copied once into an aligned buffer. Writes
//! over blocks the batch read to copy them go through the page cache: those pages are cached,
//! and a direct write over cached pages is punted to an io_uring worker that drops them first.
//!
//! What stays the same: the writes are *plain* (not durable; the flush that follows makes them
//! so, as before), they land in the order given (two writes to the same block are never in
//! flight together: an overlap waits for what is in flight first), and the page cache stays
//! coherent (the kernel writes back and drops cached pages of the range around each direct
//! write; the engine's own reads and ordering writes go through the cache).
//!
//! A device that refuses direct I/O (`EINVAL`: its logical block is larger than 4 KiB, or a
//! file system without `O_DIRECT`) is written through the page cache from then on; nothing is
//! lost, the refused writes are simply written again that way. So is a direct write that fails
//! otherwise: a device that really failed it fails the flush after it, as a failed write-back
//! does, and a passing error (which no caller could act on) costs nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use blockcopy::device::DeviceError;
use io_uring::{opcode, types, IoUring};

/// Offsets, lengths and memory of direct writes are multiples of this: the largest logical
/// block a device is likely to have, so no device refuses them for alignment.
pub const ALIGN: usize = 4096;
/// Submission queue entries: writes (runs) in flight at once.
const RING_ENTRIES: u32 = 256;
/// The most blocks one vectored write takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The device opened `O_DIRECT`, and the ring its writes are submitted through.
pub struct DirectWriter {
    file: File,
    ring: Mutex<IoUring>,
    /// The device refused direct writes once: every write goes through the page cache.
    refused: AtomicBool,
    /// Bytes written directly (completed), since opened.
    bytes: AtomicU64,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("file", &self.file)
            .field("refused", &self.refused)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// One submitted write: a run of blocks contiguous on the device.
struct Run {
    offset: u64,
    /// The iovecs' memory: the caller's slices, or the bounce buffers of `bounce`.
    iov: Vec<libc::iovec>,
    len: usize,
}

/// One 4 KiB block at a 4 KiB-aligned address: a bounce buffer's unit.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedBlock([u8; ALIGN]);

/// A 4 KiB-aligned copy of whole blocks whose memory is not aligned (contiguous: an aligned
/// block's size is its alignment).
fn bounce_copy(data: &[u8]) -> Vec<AlignedBlock> {
    let mut blocks = vec![AlignedBlock([0; ALIGN]); data.len() / ALIGN];
    for (block, chunk) in blocks.iter_mut().zip(data.chunks_exact(ALIGN)) {
        block.0.copy_from_slice(chunk);
    }
    blocks
}

impl DirectWriter {
    /// Opens `path` `O_DIRECT` with a ring of its own; `None` if either is not to be had (the
    /// caller writes through the page cache).
    pub fn open(path: &Path) -> Option<DirectWriter> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let ring = IoUring::new(RING_ENTRIES).ok()?;
        Some(DirectWriter {
            file,
            ring: Mutex::new(ring),
            refused: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        })
    }

    /// Bytes written directly so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether direct writes are still used (not refused by the device).
    pub fn in_use(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Writes each `(byte offset, bytes)` in order: contiguous ones as one run, runs
    /// submitted together and waited for. `buffered` is the caller's page-cache file (the
    /// same device): writes that are not whole aligned blocks, those over `read` (the byte
    /// ranges, offset and length, the batch read to copy them: cached pages), and everything
    /// once the device refused direct I/O go through it, after any direct write in flight that
    /// they overlap.
    pub fn write(
        &self,
        buffered: &File,
        writes: &[(u64, &[u8])],
        read: &[(u64, u64)],
    ) -> Result<(), DeviceError> {
        // A batch's copies are disjoint, so the nearest start decides an overlap.
        let read: BTreeMap<u64, u64> =
            read.iter().map(|&(offset, len)| (offset, offset.saturating_add(len))).collect();
        let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pending = Pending::default();
        for &(offset, data) in writes {
            let end = offset + data.len() as u64;
            let aligned = offset % ALIGN as u64 == 0 && data.len() % ALIGN == 0 && !data.is_empty();
            if !aligned || !self.in_use() || overlaps(&read, offset, end) {
                // In order: a direct write in flight to the same bytes lands first. (A later
                // direct write over this one is ordered by the kernel: it writes back the
                // cached pages of its range before it writes.)
                if pending.overlaps(offset, end) {
                    self.complete(&mut ring, buffered, &mut pending)?;
                }
                buffered
                    .write_all_at(data, offset)
                    .map_err(|source| DeviceError::Io { offset, source })?;
                continue;
            }
            if pending.overlaps(offset, end) || pending.runs.len() == RING_ENTRIES as usize {
                self.complete(&mut ring, buffered, &mut pending)?;
            }
            pending.add(offset, data);
        }
        self.complete(&mut ring, buffered, &mut pending)
    }

    /// Submits the pending runs, waits for all of them, and empties `pending`. A run that
    /// failed is written again through the page cache (if the device refused it, `EINVAL` or
    /// `EOPNOTSUPP`, so is everything after it); a short one has its rest written that way.
    fn complete(
        &self,
        ring: &mut IoUring,
        buffered: &File,
        pending: &mut Pending,
    ) -> Result<(), DeviceError> {
        if pending.runs.is_empty() {
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        for (i, run) in pending.runs.iter().enumerate() {
            let iovs = u32::try_from(run.iov.len()).expect("at most IOV_MAX parts");
            let entry = opcode::Writev::new(fd, run.iov.as_ptr(), iovs)
                .offset(run.offset)
                .build()
                .user_data(i as u64);
            // SAFETY: the iovecs and the memory they point at (the caller's slices, or
            // `pending`'s bounce buffers) outlive the write: this function waits for every
            // submitted entry before it returns, and aborts the process if it cannot.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                unreachable!("at most RING_ENTRIES runs are pending");
            }
        }
        let submitted = pending.runs.len();
        let mut results: Vec<Option<i32>> = vec![None; submitted];
        let mut reaped = 0;
        while reaped < submitted {
            match ring.submit_and_wait(submitted - reaped) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Writes may be in flight from memory this function would free or hand back.
                    eprintln!("bow-ublk: io_uring failed with writes in flight ({e}); aborting");
                    std::process::abort();
                }
            }
            for cqe in ring.completion() {
                let i = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                if let Some(slot) = results.get_mut(i) {
                    if slot.replace(cqe.result()).is_none() {
                        reaped += 1;
                    }
                }
            }
        }
        for (run, res) in pending.runs.iter().zip(results) {
            let res = res.unwrap_or(-libc::EIO);
            let done = if res < 0 {
                // Refused (alignment, a file system without direct I/O): never again. Any
                // other error is the page cache's to meet too: a device that really failed
                // fails the flush after it, as a failed write-back does.
                let refused = res == -libc::EINVAL || res == -libc::EOPNOTSUPP;
                if refused && !self.refused.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "bow-ublk: the device refused a direct write ({}); writing through the \
                         page cache from now on",
                        std::io::Error::from_raw_os_error(-res)
                    );
                }
                0
            } else {
                let done = usize::try_from(res).unwrap_or(0);
                self.bytes.fetch_add(done as u64, Ordering::Relaxed);
                done
            };
            if done < run.len {
                write_rest(buffered, run, done)?;
            }
        }
        pending.clear();
        Ok(())
    }
}

/// Writes `run` from byte `done` on through the page cache.
fn write_rest(buffered: &File, run: &Run, mut done: usize) -> Result<(), DeviceError> {
    let mut at = run.offset;
    for iov in &run.iov {
        // SAFETY: each iovec describes a live slice (see `complete`).
        let part = unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) };
        if done < part.len() {
            let from = at + done as u64;
            buffered
                .write_all_at(&part[done..], from)
                .map_err(|source| DeviceError::Io { offset: from, source })?;
            done = 0;
        } else {
            done -= part.len();
        }
        at += part.len() as u64;
    }
    Ok(())
}

/// Runs not yet submitted, and what they cover.
#[derive(Default)]
struct Pending {
    runs: Vec<Run>,
    /// Covered byte ranges, start to end (merged runs share one entry).
    covered: BTreeMap<u64, u64>,
    /// Aligned copies the iovecs point into (a Vec's heap buffer does not move with it).
    bounce: Vec<Vec<AlignedBlock>>,
}

/// Whether `[start, end)` overlaps a range of `ranges` (start to end, disjoint).
fn overlaps(ranges: &BTreeMap<u64, u64>, start: u64, end: u64) -> bool {
    ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start)
}

impl Pending {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        overlaps(&self.covered, start, end)
    }

    /// Adds a write of whole aligned blocks (the caller checked): to the last run if it
    /// follows it on the device, else as a run of its own.
    fn add(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(offset % ALIGN as u64 == 0 && data.len() % ALIGN == 0);
        let base = if data.as_ptr() as usize % ALIGN == 0 {
            data.as_ptr()
        } else {
            let copy = bounce_copy(data);
            let p = copy.as_ptr().cast::<u8>();
            self.bounce.push(copy);
            p
        };
        let iov = libc::iovec { iov_base: base.cast_mut().cast(), iov_len: data.len() };
        let end = offset + data.len() as u64;
        if let Some(last) = self.runs.last_mut() {
            if last.offset + last.len as u64 == offset && last.iov.len() < IOV_MAX {
                last.iov.push(iov);
                last.len += data.len();
                if let Some(e) = self.covered.get_mut(&last.offset) {
                    *e = end;
                }
                return;
            }
        }
        self.runs.push(Run { offset, iov: vec![iov], len: data.len() });
        self.covered.insert(offset, end);
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.covered.clear();
        self.bounce.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from((seed * 31 + i as u64 * 7) % 251).unwrap()).collect()
    }

    /// `len` bytes at a 4 KiB-aligned address (inside `backing`).
    fn aligned(backing: &mut Vec<u8>, data: &[u8]) -> std::ops::Range<usize> {
        *backing = vec![0; data.len() + ALIGN];
        let skip = (ALIGN - backing.as_ptr() as usize % ALIGN) % ALIGN;
        backing[skip..skip + data.len()].copy_from_slice(data);
        skip..skip + data.len()
    }

    /// Aligned and unaligned memory, contiguous runs (one past `IOV_MAX`), a run split by a
    /// write that is not whole blocks, the same block twice and a range overwritten by a
    /// longer write, more runs than the ring holds: every byte is what the last write in
    /// order put there, directly and through the page cache alike.
    #[test]
    fn writes_land_in_order_whatever_their_alignment() {
        let blocks = 2048u64;
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(blocks * 4096).unwrap();
        let Some(direct) = DirectWriter::open(tmp.path()) else {
            panic!("no O_DIRECT or io_uring on the test machine's /tmp: this test needs both");
        };
        let buffered = std::fs::OpenOptions::new().write(true).open(tmp.path()).unwrap();
        let mut owned: Vec<(u64, Vec<u8>)> = Vec::new();
        // A long contiguous run, then scattered blocks (more runs than ring entries).
        for b in 0..1100u64 {
            owned.push((b * 4096, pattern(b, 4096)));
        }
        for i in 0..300u64 {
            owned.push(((1200 + 2 * i) * 4096, pattern(5000 + i, 4096)));
        }
        // Not whole blocks: a sector inside the long run, after it was written.
        owned.push((10 * 4096 + 512, pattern(9000, 512)));
        // The same block twice, and a two-block write over one of the scattered blocks.
        owned.push((1900 * 4096, pattern(9001, 4096)));
        owned.push((1900 * 4096, pattern(9002, 4096)));
        owned.push((1201 * 4096, pattern(9003, 8192)));
        let mut backing = Vec::new();
        let range = aligned(&mut backing, &pattern(9004, 8192));
        let mut list: Vec<(u64, &[u8])> = owned.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        list.push((1950 * 4096, &backing[range.clone()]));
        assert_eq!(backing[range.clone()].as_ptr() as usize % ALIGN, 0);

        let mut want = vec![0u8; usize::try_from(blocks * 4096).unwrap()];
        for (o, d) in &list {
            let o = usize::try_from(*o).unwrap();
            want[o..o + d.len()].copy_from_slice(d);
        }
        direct.write(&buffered, &list, &[]).unwrap();
        assert!(direct.in_use(), "the test file system took direct writes");
        let got = std::fs::read(tmp.path()).unwrap();
        assert!(got == want, "direct: the bytes differ from the writes in order");
    }

    #[test]
    fn a_device_that_refuses_direct_io_is_written_through_the_page_cache() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(64 * 4096).unwrap();
        let direct = DirectWriter::open(tmp.path()).unwrap();
        direct.refused.store(true, Ordering::Relaxed);
        let buffered = std::fs::OpenOptions::new().write(true).open(tmp.path()).unwrap();
        let a = pattern(1, 4096);
        let b = pattern(2, 8192);
        direct.write(&buffered, &[(4096, &a), (8 * 4096, &b), (4096, &b[..4096])], &[]).unwrap();
        let got = std::fs::read(tmp.path()).unwrap();
        assert!(got[4096..8192] == b[..4096]);
        assert!(got[8 * 4096..10 * 4096] == b[..]);
        assert!(got[..4096].iter().all(|&x| x == 0));
    }
}
