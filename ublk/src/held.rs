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
//! Layout (little endian), in a file of fixed size [`capacity`] mapped shared:
//!
//! ```text
//! 0   magic "BOWHELD1"
//! 8   epoch: u64          bumped by every clear
//! 16  records, back to back:
//!       0  seal: u64      a mix of the record's epoch, sector and length, stored last
//!       8  length: u32    data bytes (whole 4 KiB blocks, at least one)
//!       12 zero: u32
//!       16 epoch: u64     the file's epoch when the record was stored
//!       24 sector: u64    where the write goes, in 512-byte sectors
//!       32 data
//! ```
//!
//! The records of the current epoch, up to the first one whose epoch differs or whose seal
//! does not match, are the held writes in order. A clear stores a new epoch (one aligned
//! store), so the old records end the list without being erased. A process killed inside an
//! append leaves the seal slot as it was (zero, an older epoch's seal, or older data), which
//! does not match the new record: that write was not completed, so the kernel reissues it. A
//! process's stores all reach the page cache when it dies (only a power cut loses them, and
//! then the file is gone with the tmpfs), so a seal stored last, after a compiler fence, is
//! enough; the data carries no checksum (a CRC-32 of each 4 KiB cost a measurable part of a
//! held write under emulation).
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

const MAGIC: &[u8; 8] = b"BOWHELD1";
const HEADER_BYTES: usize = 16;
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

/// The file's size for a hold limit of `limit` bytes and requests of at most `request` bytes:
/// a full hold (every record one block) plus one more request.
pub fn capacity(limit: usize, request: usize) -> usize {
    let records = limit / BLOCK + 1;
    HEADER_BYTES + limit + request + records * RECORD_HEADER_BYTES
}

/// Device `dev_id`'s held-writes file.
pub fn path(state_dir: &Path, dev_id: u32) -> PathBuf {
    state_dir.join(format!("{dev_id}.held"))
}

/// Reads the held writes out of a file's bytes (see the module's documentation). Anything that
/// is not this format holds nothing: the file is only ever written by this module.
pub fn parse(bytes: &[u8]) -> Vec<HeldWrite> {
    let mut held = Vec::new();
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return held;
    }
    let Some(epoch) = le_u64(bytes, 8) else { return held };
    let mut at = HEADER_BYTES;
    while let (Some(sealed), Some(len), Some(rec_epoch), Some(sector)) =
        (le_u64(bytes, at), le_u32(bytes, at + 8), le_u64(bytes, at + 16), le_u64(bytes, at + 24))
    {
        if rec_epoch != epoch || sealed != seal(epoch, sector, len) {
            break;
        }
        let Ok(len) = usize::try_from(len) else { break };
        if len == 0 || len % BLOCK != 0 {
            break;
        }
        let end = at + RECORD_HEADER_BYTES + len;
        let Some(data) = bytes.get(at + RECORD_HEADER_BYTES..end) else { break };
        held.push(HeldWrite { sector, data: Bytes::copy_from_slice(data) });
        at = end;
    }
    held
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
    /// Where the next record goes. Every view handed out lies before it.
    end: usize,
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
    /// Creates device `dev_id`'s file fresh (an old one is replaced), empty, `size` bytes.
    pub fn create(
        state_dir: &Path,
        dev_id: u32,
        size: usize,
    ) -> Result<HeldFile, JournalFileError> {
        journal::create_state_dir(state_dir)?;
        let path = path(state_dir, dev_id);
        let file = journal::create_new(&path)?;
        let mut held = HeldFile::map(path, file, size)?;
        held.store_header();
        Ok(held)
    }

    /// Opens device `dev_id`'s file as a dead server left it: its held writes, and the file
    /// ready to go on (after them). A missing or foreign file is created fresh (holding none).
    pub fn reopen(
        state_dir: &Path,
        dev_id: u32,
        size: usize,
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
                return Ok((HeldFile::create(state_dir, dev_id, size)?, Vec::new()))
            }
            Err(e) => return Err(journal::io_error("opening", &path)(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(journal::io_error("reading", &path))?;
        if bytes.get(..8) != Some(&MAGIC[..]) {
            drop(file);
            return Ok((HeldFile::create(state_dir, dev_id, size)?, Vec::new()));
        }
        let writes = parse(&bytes);
        let epoch = le_u64(&bytes, 8).unwrap_or(0);
        let end =
            HEADER_BYTES + writes.iter().map(|w| RECORD_HEADER_BYTES + w.data.len()).sum::<usize>();
        let mut held = HeldFile::map(path, file, size.max(end))?;
        held.epoch = epoch;
        held.end = end;
        Ok((held, writes))
    }

    fn map(path: PathBuf, file: File, size: usize) -> Result<HeldFile, JournalFileError> {
        let size = size.max(HEADER_BYTES);
        file.set_len(size as u64).map_err(journal::io_error("sizing", &path))?;
        let ptr = journal::map_shared(&file, size, &path)?;
        Ok(HeldFile {
            path,
            _file: file,
            map: Arc::new(Mapping { ptr, size }),
            epoch: 0,
            end: HEADER_BYTES,
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
        header[8..].copy_from_slice(&self.epoch.to_le_bytes());
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
        let end = self
            .end
            .checked_add(RECORD_HEADER_BYTES + data.len())
            .filter(|&end| end <= self.map.size)
            .ok_or(std::io::ErrorKind::StorageFull)?;
        let mut head = [0u8; RECORD_HEADER_BYTES];
        head[8..12].copy_from_slice(&len.to_le_bytes());
        head[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        head[24..32].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: `self.end..end` lies inside the mapping (checked above) and past every view
        // handed out; `data` is not in it.
        unsafe {
            let at = self.map.ptr.as_ptr().add(self.end);
            std::ptr::copy_nonoverlapping(head[8..].as_ptr(), at.add(8), RECORD_HEADER_BYTES - 8);
            std::ptr::copy_nonoverlapping(data.as_ptr(), at.add(RECORD_HEADER_BYTES), data.len());
            // The seal last: a process killed before it leaves a record that does not match.
            compiler_fence(Ordering::Release);
            let sealed = seal(self.epoch, sector, len).to_le_bytes();
            std::ptr::write_unaligned(at.cast::<[u8; 8]>(), sealed);
        }
        let view = HeldView {
            map: Arc::clone(&self.map),
            start: self.end + RECORD_HEADER_BYTES,
            len: data.len(),
        };
        self.end = end;
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
        self.end = HEADER_BYTES;
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
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), size as u64);
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
        assert_eq!(at, base + HEADER_BYTES + RECORD_HEADER_BYTES, "a view into the mapping");
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
        let second = HEADER_BYTES + RECORD_HEADER_BYTES + BLOCK;
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
