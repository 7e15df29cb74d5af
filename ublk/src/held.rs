//! The held-writes file, `<state dir>/<dev id>.held`: the writes the server has completed to
//! the kernel but not yet given to the engine ([`crate::writeback`]).
//!
//! The kernel reissues only the requests a dead server had taken and not completed
//! (`UBLK_F_USER_RECOVERY_REISSUE`); a write completed from memory is never issued again. So
//! every held write is stored here before its completion, and a restarted server drains what
//! it finds before it serves anything. Like the op journal ([`crate::journal`]) the file lives
//! on a tmpfs and is never synced: it must outlive the process, not the machine (a power cut
//! may lose writes no flush covered; that is what the device's volatile write cache declares).
//!
//! Layout (little endian), in a file of fixed size mapped shared:
//!
//! ```text
//! 0   magic "BOWHELD2"
//! 8   epoch: u64          bumped by every clear
//! 16  data: u64           where the records' data begins (a multiple of 4 KiB)
//! 24  zero: u64
//! 32  record headers, back to back:
//!       0  seal: u64      a mix of the record's epoch, sector and length, stored last
//!       8  length: u32    data bytes (whole 4 KiB blocks, at least one)
//!       12 zero: u32
//!       16 epoch: u64     the file's epoch when the record was stored
//!       24 sector: u64    where the write goes, in 512-byte sectors
//! data  the records' data, back to back in record order
//! ```
//!
//! The data lies apart from the headers so that every record's data is 4 KiB-aligned: with
//! `serve --direct-writes` the engine writes it to the device straight from the mapping with
//! `O_DIRECT` (`crate::direct`). The records of the current epoch, up to the first one whose
//! epoch differs or whose seal does not match, are the held writes in order. A clear stores a new epoch (one aligned
//! store), so the old records end the list without being erased. A process killed inside an
//! append leaves the seal slot as it was (zero, an older epoch's seal, or older data), which
//! does not match the new record: that write was not completed, so the kernel reissues it. A
//! process's stores all reach the page cache when it dies (only a power cut loses them, and
//! then the file is gone with the tmpfs), so a seal stored last, after a compiler fence, is
//! enough; the data carries no checksum (a CRC-32 of each 4 KiB cost a measurable part of a
//! held write under emulation).
//!
//! The first layout (magic "BOWHELD1", headers and data interleaved, data at 16 + 32) is still
//! read, so a server restarted from a newer binary drains what an older one held; such a file
//! then takes no more writes ([`HeldFile::reopen`]).
//!
//! An append returns the stored data as shared [`Bytes`], a view of the mapping: the engine
//! writes the held write to the device from there, so a held write is copied once on its way
//! in (from the ublk buffer into the file) and once on its way out (into the device's page
//! cache), as many times as a pass-through's write. A view is never written under: appends go
//! past every record handed out, and a clear, after which appends reuse the space, finds no
//! view alive (the engine has dropped its batch) or retires the file (see [`HeldFile::clear`]).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::journal::{self, JournalFileError};

const MAGIC: &[u8; 8] = b"BOWHELD2";
/// The first layout's magic: read, never written.
const MAGIC_V1: &[u8; 8] = b"BOWHELD1";
const HEADER_BYTES: usize = 32;
/// The first layout's header.
const HEADER_BYTES_V1: usize = 16;
const RECORD_HEADER_BYTES: usize = 32;
const BLOCK: usize = 4096;

/// One held write: where (512-byte sectors) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldWrite {
    pub sector: u64,
    pub data: Bytes,
}

/// Where held writes are stored before they complete.
pub trait HeldLog: Send + std::fmt::Debug {
    /// Stores one write after those stored since the last clear, and returns the stored data
    /// (shared, not copied again). An error means it was not stored: the caller must not
    /// complete the write before the engine has it.
    fn append(&mut self, sector: u64, data: &[u8]) -> std::io::Result<Bytes>;
    /// Forgets every stored write (the engine has them all).
    fn clear(&mut self);
}

/// The data bytes a file needs for a hold limit of `limit` bytes and requests of at most
/// `request` bytes: a full hold plus one more request.
pub fn capacity(limit: usize, request: usize) -> usize {
    limit + request
}

/// Where the data of a file holding `data` bytes begins: after room for one header per block
/// (each record holds at least one), on a 4 KiB boundary.
fn data_start(data: usize) -> usize {
    (HEADER_BYTES + (data / BLOCK + 1) * RECORD_HEADER_BYTES).next_multiple_of(BLOCK)
}

/// Device `dev_id`'s held-writes file.
pub fn path(state_dir: &Path, dev_id: u32) -> PathBuf {
    state_dir.join(format!("{dev_id}.held"))
}

/// Reads the held writes out of a file's bytes (see the module's documentation), in either
/// layout. Anything that is not this format holds nothing: the file is only ever written by
/// this module.
pub fn parse(bytes: &[u8]) -> Vec<HeldWrite> {
    records(bytes).map(|(writes, _)| writes).unwrap_or_default()
}

/// Where a file of the current layout goes on: its data's start (from its header), and the
/// places of the next record's header and data.
#[derive(Debug, Clone, Copy)]
struct Tail {
    data_start: usize,
    next_header: usize,
    next_data: usize,
}

/// The held writes and where the file goes on (`None` for the first layout, whose file takes
/// no more records); `None` for a file of neither layout.
fn records(bytes: &[u8]) -> Option<(Vec<HeldWrite>, Option<Tail>)> {
    let magic = bytes.get(..8)?;
    let epoch = le_u64(bytes, 8)?;
    let v1 = magic == MAGIC_V1;
    if !v1 && magic != MAGIC {
        return None;
    }
    // Record i's header at `at`, its data at `data` (v1: right after the header).
    let (mut at, mut data) = if v1 {
        (HEADER_BYTES_V1, HEADER_BYTES_V1 + RECORD_HEADER_BYTES)
    } else {
        let start = usize::try_from(le_u64(bytes, 16)?).ok()?;
        if start % BLOCK != 0 || start < HEADER_BYTES {
            return None;
        }
        (HEADER_BYTES, start)
    };
    let data_start = data;
    let index_end = if v1 { usize::MAX } else { data_start };
    let mut held = Vec::new();
    while let (true, Some(sealed), Some(len), Some(rec_epoch), Some(sector)) = (
        at + RECORD_HEADER_BYTES <= index_end,
        le_u64(bytes, at),
        le_u32(bytes, at + 8),
        le_u64(bytes, at + 16),
        le_u64(bytes, at + 24),
    ) {
        if rec_epoch != epoch || sealed != seal(epoch, sector, len) {
            break;
        }
        let Ok(len) = usize::try_from(len) else { break };
        if len == 0 || len % BLOCK != 0 {
            break;
        }
        let Some(body) = data.checked_add(len).and_then(|end| bytes.get(data..end)) else {
            break;
        };
        held.push(HeldWrite { sector, data: Bytes::copy_from_slice(body) });
        if v1 {
            at = data + len;
            data = at + RECORD_HEADER_BYTES;
        } else {
            at += RECORD_HEADER_BYTES;
            data += len;
        }
    }
    Some((held, (!v1).then_some(Tail { data_start, next_header: at, next_data: data })))
}

/// The seal of a record: a value no record of another epoch, sector or length has, and that
/// stale bytes hold only by a 2^-64 chance.
fn seal(epoch: u64, sector: u64, len: u32) -> u64 {
    0x5EA1_B0B0_C0DE_F00D
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ sector.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(29)
        ^ u64::from(len).rotate_left(47)
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// The held-writes file, mapped shared (its pages are the tmpfs file's: what was stored
/// survives the process).
#[derive(Debug)]
pub struct HeldFile {
    path: PathBuf,
    // Kept open for the mapping's lifetime (not needed by it, but names what it maps).
    _file: File,
    /// Shared with the views handed out ([`HeldView`]): the last one unmaps it.
    map: Arc<Mapping>,
    epoch: u64,
    /// Where the records' data begins (4 KiB-aligned), and the headers end.
    data_start: usize,
    /// Where the next record's header goes.
    next_header: usize,
    /// Where the next record's data goes. Every view handed out lies before it.
    next_data: usize,
    /// A clear found views still alive: their bytes must not be written again, so the file
    /// takes no more writes (they are then not held; see [`HeldFile::clear`]).
    retired: bool,
}

/// A shared mapping of the held-writes file.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory. Its writer ([`HeldFile`], through `&mut self`) only
// stores bytes no [`HeldView`] covers (past `end`, or after a clear that found no view alive);
// views only read.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access is read-only, to bytes no one writes.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this value's own mapping; no view is left (each holds an Arc of it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

/// One stored write's data inside the mapping, the owner behind the [`Bytes`] an append
/// returns.
#[derive(Debug)]
struct HeldView {
    map: Arc<Mapping>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for HeldView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start..start + len` lies inside the mapping (checked by the append that
        // made the view), which lives as long as this Arc; nothing writes it while the view
        // lives (see Mapping's Send).
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl HeldFile {
    /// Creates device `dev_id`'s file fresh (an old one is replaced), empty, with room for
    /// `data` bytes of data ([`capacity`]).
    pub fn create(
        state_dir: &Path,
        dev_id: u32,
        data: usize,
    ) -> Result<HeldFile, JournalFileError> {
        journal::create_state_dir(state_dir)?;
        let path = path(state_dir, dev_id);
        let file = journal::create_new(&path)?;
        let start = data_start(data);
        let mut held = HeldFile::map(path, file, start + data, start)?;
        held.store_header();
        Ok(held)
    }

    /// Opens device `dev_id`'s file as a dead server left it: its held writes, and the file
    /// ready to go on (after them, in its own layout). A missing or foreign file is created
    /// fresh (holding none); so is a file of the first layout that holds none. One of the
    /// first layout that holds writes is kept until they are drained, but takes no more.
    pub fn reopen(
        state_dir: &Path,
        dev_id: u32,
        data: usize,
    ) -> Result<(HeldFile, Vec<HeldWrite>), JournalFileError> {
        let path = path(state_dir, dev_id);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((HeldFile::create(state_dir, dev_id, data)?, Vec::new()))
            }
            Err(e) => return Err(journal::io_error("opening", &path)(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(journal::io_error("reading", &path))?;
        let Some((writes, next)) = records(&bytes) else {
            drop(file);
            return Ok((HeldFile::create(state_dir, dev_id, data)?, Vec::new()));
        };
        let epoch = le_u64(&bytes, 8).unwrap_or(0);
        let Some(tail) = next else {
            if writes.is_empty() {
                drop(file);
                return Ok((HeldFile::create(state_dir, dev_id, data)?, Vec::new()));
            }
            // The first layout: mapped as it is (its epoch lies where a clear stores it), retired.
            let mut held = HeldFile::map(path, file, bytes.len(), HEADER_BYTES_V1)?;
            held.epoch = epoch;
            held.retired = true;
            return Ok((held, writes));
        };
        let size = bytes.len().max(tail.next_data);
        let mut held = HeldFile::map(path, file, size, tail.data_start)?;
        held.epoch = epoch;
        held.next_header = tail.next_header;
        held.next_data = tail.next_data;
        Ok((held, writes))
    }

    fn map(
        path: PathBuf,
        file: File,
        size: usize,
        data_start: usize,
    ) -> Result<HeldFile, JournalFileError> {
        let size = size.max(HEADER_BYTES);
        file.set_len(size as u64).map_err(journal::io_error("sizing", &path))?;
        let ptr = journal::map_shared(&file, size, &path)?;
        Ok(HeldFile {
            path,
            _file: file,
            map: Arc::new(Mapping { ptr, size }),
            epoch: 0,
            data_start,
            next_header: HEADER_BYTES,
            next_data: data_start,
            retired: false,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store_header(&mut self) {
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        header[16..24].copy_from_slice(&(self.data_start as u64).to_le_bytes());
        // SAFETY: the header lies inside the mapping (its size is at least HEADER_BYTES), and
        // no view covers it.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), self.map.ptr.as_ptr(), HEADER_BYTES);
        }
    }
}

impl HeldLog for HeldFile {
    fn append(&mut self, sector: u64, data: &[u8]) -> std::io::Result<Bytes> {
        if self.retired {
            return Err(std::io::Error::other("held-writes file retired: a view outlived a clear"));
        }
        let len = u32::try_from(data.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let header_end = self.next_header + RECORD_HEADER_BYTES;
        let data_end = self
            .next_data
            .checked_add(data.len())
            .filter(|&end| end <= self.map.size && header_end <= self.data_start)
            .ok_or(std::io::ErrorKind::StorageFull)?;
        let mut head = [0u8; RECORD_HEADER_BYTES];
        head[8..12].copy_from_slice(&len.to_le_bytes());
        head[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        head[24..32].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: the header's and the data's places lie inside the mapping (checked above),
        // the data's past every view handed out, the header's where no view reaches (views
        // cover data only); `data` is not in the mapping.
        unsafe {
            let base = self.map.ptr.as_ptr();
            let at = base.add(self.next_header);
            std::ptr::copy_nonoverlapping(head[8..].as_ptr(), at.add(8), RECORD_HEADER_BYTES - 8);
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(self.next_data), data.len());
            // The seal last: a process killed before it leaves a record that does not match.
            compiler_fence(Ordering::Release);
            let sealed = seal(self.epoch, sector, len).to_le_bytes();
            std::ptr::write_unaligned(at.cast::<[u8; 8]>(), sealed);
        }
        let view = HeldView { map: Arc::clone(&self.map), start: self.next_data, len: data.len() };
        self.next_header = header_end;
        self.next_data = data_end;
        Ok(Bytes::from_owner(view))
    }

    /// Forgets the stored writes; their space is reused. Every view of them must be gone by
    /// now (the engine drops a batch's data once it is written). If one is not (a batch the
    /// engine planned and never committed, after which it fails everything anyway), its bytes
    /// must never change: the file is retired, and later writes are not held.
    fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        // SAFETY: the epoch's 8 bytes at offset 8 lie inside the mapping, and are 8-aligned
        // (the mapping is page-aligned): one store, so a kill sees the old epoch or the new.
        // No view covers the header.
        unsafe { self.map.ptr.as_ptr().add(8).cast::<u64>().write_volatile(self.epoch.to_le()) };
        if Arc::strong_count(&self.map) > 1 {
            self.retired = true;
            eprintln!("bow-ublk: held writes outlived their drain; no more writes are held");
        }
        self.next_header = HEADER_BYTES;
        self.next_data = self.data_start;
    }
}

/// Held writes kept in memory only: the engine's host tests, and (feature `fault`) the server
/// broken on purpose, whose held writes a kill loses.
#[derive(Debug, Default)]
pub struct MemHeld {
    pub writes: Vec<HeldWrite>,
}

impl HeldLog for MemHeld {
    fn append(&mut self, sector: u64, data: &[u8]) -> std::io::Result<Bytes> {
        let data = Bytes::copy_from_slice(data);
        self.writes.push(HeldWrite { sector, data: data.clone() });
        Ok(data)
    }

    fn clear(&mut self) {
        self.writes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8, blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK).map(|i| seed ^ u8::try_from(i % 251).unwrap_or(0)).collect()
    }

    fn read_back(dir: &Path, id: u32) -> Vec<HeldWrite> {
        parse(&std::fs::read(path(dir, id)).unwrap())
    }

    #[test]
    fn appends_read_back_in_order_and_a_clear_forgets_them_without_erasing() {
        let dir = tempfile::tempdir().unwrap();
        let size = capacity(64 << 10, 16 << 10);
        let mut f = HeldFile::create(dir.path(), 2, size).unwrap();
        let file_len = (data_start(size) + size) as u64;
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), file_len);
        let writes = [(8u64, block(1, 1)), (800, block(2, 3)), (8, block(3, 1))];
        for (sector, data) in &writes {
            f.append(*sector, data).unwrap();
        }
        let want: Vec<HeldWrite> =
            writes.iter().map(|(s, d)| HeldWrite { sector: *s, data: d.clone().into() }).collect();
        assert_eq!(read_back(dir.path(), 2), want);
        // Cleared: nothing, though the old bytes are still there; a shorter record after it.
        f.clear();
        assert!(read_back(dir.path(), 2).is_empty());
        f.append(16, &block(4, 1)).unwrap();
        assert_eq!(read_back(dir.path(), 2), [HeldWrite { sector: 16, data: block(4, 1).into() }]);
        // Reopened as a dead server left it: the write, and the file goes on after it.
        drop(f);
        let (mut f, held) = HeldFile::reopen(dir.path(), 2, size).unwrap();
        assert_eq!(held, [HeldWrite { sector: 16, data: block(4, 1).into() }]);
        f.append(24, &block(5, 2)).unwrap();
        assert_eq!(read_back(dir.path(), 2).len(), 2);
        // Full: refused, nothing stored.
        let big = block(6, 16);
        while f.append(0, &big).is_ok() {}
        let n = read_back(dir.path(), 2).len();
        assert!(f.append(0, &big).is_err());
        assert_eq!(read_back(dir.path(), 2).len(), n);
        // No file: created fresh, nothing held.
        let (_, none) = HeldFile::reopen(dir.path(), 9, size).unwrap();
        assert!(none.is_empty());
    }

    /// An append hands back the stored bytes themselves (a view of the mapping, no copy). A
    /// clear while a view is alive retires the file: the view's bytes never change, and the
    /// file stores nothing more; a clear after the views are gone does not.
    #[test]
    fn an_append_returns_a_view_of_the_file_and_a_clear_under_a_live_view_retires_it() {
        let dir = tempfile::tempdir().unwrap();
        let size = capacity(64 << 10, 16 << 10);
        let mut f = HeldFile::create(dir.path(), 4, size).unwrap();
        let view = f.append(8, &block(1, 2)).unwrap();
        assert!(view == block(1, 2));
        let base = f.map.ptr.as_ptr() as usize;
        let at = view.as_ptr() as usize;
        assert_eq!(at, base + data_start(size), "a view into the mapping");
        // Every record's data 4 KiB-aligned in memory (direct writes take it as it is).
        let next = f.append(64, &block(7, 3)).unwrap();
        assert_eq!(next.as_ptr() as usize, at + 2 * BLOCK);
        assert_eq!(at % BLOCK, 0);
        drop(next);
        drop(view);
        f.clear();
        let view = f.append(16, &block(2, 1)).unwrap();
        assert!(view == block(2, 1), "the space is reused once the views are gone");
        f.clear();
        assert!(f.append(24, &block(3, 1)).is_err(), "retired: a view outlived the clear");
        assert!(view == block(2, 1), "and its bytes are as they were");
        assert!(read_back(dir.path(), 4).is_empty());
    }

    #[test]
    fn a_record_cut_short_or_damaged_ends_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let size = capacity(64 << 10, 16 << 10);
        let mut f = HeldFile::create(dir.path(), 1, size).unwrap();
        f.append(8, &block(1, 1)).unwrap();
        f.append(16, &block(2, 1)).unwrap();
        f.append(24, &block(3, 1)).unwrap();
        drop(f);
        let bytes = std::fs::read(path(dir.path(), 1)).unwrap();
        let second = HEADER_BYTES + RECORD_HEADER_BYTES;
        // A killed append: every byte of the second record's body stored, its seal not (zero,
        // or the seal of an older epoch's record at the same place).
        let mut torn = bytes.clone();
        torn[second..second + 8].fill(0);
        assert_eq!(parse(&torn).len(), 1);
        torn[second..second + 8]
            .copy_from_slice(&seal(0u64.wrapping_sub(1), 16, 4096).to_le_bytes());
        assert_eq!(parse(&torn).len(), 1);
        // A record of another epoch, sector or length than its seal says ends the list too.
        for at in [second + 16, second + 24, second + 8] {
            let mut stale = bytes.clone();
            stale[at] ^= 1;
            assert_eq!(parse(&stale).len(), 1, "byte {at}");
        }
        assert_eq!(parse(&bytes).len(), 3);
        assert!(parse(b"not a held file").is_empty());
    }

    /// A server SIGKILLed at random moments, appending and clearing (each round of appends
    /// ended by a clear, as drains do): what the file holds is always a prefix of the round its
    /// epoch names, never a record of another round or a damaged one.
    #[test]
    fn a_writer_killed_at_any_moment_leaves_a_prefix_of_its_round() {
        let dir = tempfile::tempdir().unwrap();
        let size = capacity(1 << 20, 16 << 10);
        // Round r, record i: block r*1000+i, its data a pattern of both, 1 to 3 blocks long.
        let record = |r: u64, i: u64| -> (u64, Vec<u8>) {
            let blocks = usize::try_from(1 + (r + i) % 3).unwrap();
            (8 * (r * 1000 + i), block(u8::try_from((r * 7 + i) % 256).unwrap(), blocks))
        };
        let per_round = |r: u64| 5 + (r * 13) % 40;
        let all: Vec<Vec<(u64, Vec<u8>)>> =
            (0..300u64).map(|r| (0..per_round(r)).map(|i| record(r, i)).collect()).collect();
        let run = |f: &mut HeldFile| {
            for round in &all {
                for (sector, data) in round {
                    f.append(*sector, data).unwrap();
                }
                f.clear();
            }
        };
        let spread = {
            let mut f = HeldFile::create(dir.path(), u32::MAX, size).unwrap();
            let t = std::time::Instant::now();
            run(&mut f);
            u64::try_from(t.elapsed().as_micros()).unwrap().max(100)
        };
        let (mut inside, mut empty) = (0, 0);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for trial in 0..40u32 {
            let mut f = HeldFile::create(dir.path(), trial, size).unwrap();
            crate::journal::kill_at_random(&mut seed, spread, || {
                run(&mut f);
                true
            });
            drop(f);
            let bytes = std::fs::read(path(dir.path(), trial)).unwrap();
            let round = le_u64(&bytes, 8).unwrap();
            let held = parse(&bytes);
            // Past the last round (the writer finished before the kill): nothing is held.
            let want = all.get(usize::try_from(round).unwrap()).map_or(&[][..], Vec::as_slice);
            assert!(held.len() <= want.len(), "trial {trial}: {} records", held.len());
            for (i, w) in held.iter().enumerate() {
                let (sector, data) = &want[i];
                assert!(w.sector == *sector && w.data == *data, "trial {trial}: record {i}");
            }
            if held.is_empty() {
                empty += 1;
            } else {
                inside += 1;
            }
        }
        println!("killed writers: {inside} inside a round, {empty} between rounds or at its start");
        assert!(inside >= 10, "too few kills landed inside a round: {inside}");
    }

    /// A file of the first layout (headers and data interleaved), as an older server left it:
    /// its writes are read back, the file takes no more, and once cleared (drained) the next
    /// reopen replaces it with a file of the current layout.
    #[test]
    fn a_file_of_the_first_layout_is_drained_and_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = 5u64;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC_V1);
        bytes.extend_from_slice(&epoch.to_le_bytes());
        let writes = [(8u64, block(1, 1)), (800, block(2, 2))];
        for (sector, data) in &writes {
            let len = u32::try_from(data.len()).unwrap();
            bytes.extend_from_slice(&seal(epoch, *sector, len).to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&[0; 4]);
            bytes.extend_from_slice(&epoch.to_le_bytes());
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(data);
        }
        bytes.resize(bytes.len() + 4 * BLOCK, 0);
        std::fs::write(path(dir.path(), 3), &bytes).unwrap();
        let size = capacity(64 << 10, 16 << 10);
        let (mut f, held) = HeldFile::reopen(dir.path(), 3, size).unwrap();
        let want: Vec<HeldWrite> =
            writes.iter().map(|(s, d)| HeldWrite { sector: *s, data: d.clone().into() }).collect();
        assert_eq!(held, want);
        assert!(f.append(16, &block(3, 1)).is_err(), "the old layout takes no more writes");
        assert_eq!(read_back(dir.path(), 3), want, "and keeps what it held");
        f.clear();
        assert!(read_back(dir.path(), 3).is_empty(), "cleared: nothing held");
        drop(f);
        let (mut f, held) = HeldFile::reopen(dir.path(), 3, size).unwrap();
        assert!(held.is_empty());
        f.append(16, &block(4, 1)).unwrap();
        let now = std::fs::read(path(dir.path(), 3)).unwrap();
        assert_eq!(&now[..8], MAGIC, "replaced by the current layout");
        assert_eq!(parse(&now), [HeldWrite { sector: 16, data: block(4, 1).into() }]);
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, path(dir.path(), 5)).unwrap();
        assert!(HeldFile::create(dir.path(), 5, 4096).is_err());
        assert!(HeldFile::reopen(dir.path(), 5, 4096).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }
}
