//! Reader for dm-log-writes logs (kernel `drivers/md/dm-log-writes.c`,
//! `Documentation/admin-guide/device-mapper/log-writes.rst`), and a replay helper.
//!
//! Layout of the log device, all integers little-endian, `S` = the super block's `sectorsize`
//! (the data device's logical block size):
//! * byte 0: `struct log_write_super { le64 magic; le64 version; le64 nr_entries;
//!   le32 sectorsize; }`, magic `0x6a736677736872`, version 1. The kernel rewrites it after every
//!   FUA or mark entry, and adds a final mark `dm-log-writes-end` when the target is destroyed,
//!   so `nr_entries` is exact once the device has been removed.
//! * from byte `S` on, entries back to back: one `S`-byte header block holding
//!   `struct log_write_entry { le64 sector; le64 nr_sectors; le64 flags; le64 data_len; }`
//!   (a mark's label, `data_len` bytes, follows the struct in the same block), then — except for
//!   discards and marks — `nr_sectors * S` bytes of written data. `sector` and `nr_sectors` are
//!   in units of `S`.

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::error::ErrorKind;

/// `WRITE_LOG_MAGIC`.
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
pub const LOG_VERSION: u64 = 1;
/// Size of `struct log_write_super` (unpadded: 3 × 8 + 4).
pub const SUPER_SIZE: usize = 28;
/// Size of `struct log_write_entry`.
pub const ENTRY_SIZE: usize = 32;

/// Entry flags (`LOG_*_FLAG`).
pub mod flags {
    /// A flush (`REQ_PREFLUSH`): everything logged before it was on stable storage.
    pub const FLUSH: u64 = 1 << 0;
    /// A FUA write.
    pub const FUA: u64 = 1 << 1;
    /// A discard.
    pub const DISCARD: u64 = 1 << 2;
    /// A userspace mark (`dmsetup message <dev> 0 mark <label>`).
    pub const MARK: u64 = 1 << 3;
    /// A metadata write (`REQ_META`).
    pub const METADATA: u64 = 1 << 4;
}

/// A log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading the log failed.
    #[error("reading the log: {0}")]
    Io(#[from] io::Error),
    /// The super block is not a dm-log-writes super block.
    #[error("not a dm-log-writes log (magic {0:#x})")]
    BadMagic(u64),
    /// Unknown format version.
    #[error("unsupported log version {0}")]
    BadVersion(u64),
    /// Sector size not a power of two in 512..=65536.
    #[error("bad sector size {0}")]
    BadSectorSize(u32),
    /// An entry does not make sense.
    #[error("entry {index}: {what}")]
    BadEntry {
        /// Entry index.
        index: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Replay was asked to stop at a mark that is not in the log.
    #[error("mark {0:?} not found")]
    MarkNotFound(String),
    /// Replay was asked to stop at an entry past the end of the log.
    #[error("entry {0} not in the log")]
    EntryNotFound(u64),
}

impl LogError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io(e) => ErrorKind::from_io(e),
            Self::MarkNotFound(_) | Self::EntryNotFound(_) => ErrorKind::NotFound,
            _ => ErrorKind::Corrupt,
        }
    }
}

/// The log's super block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSuper {
    /// Entries in the log.
    pub nr_entries: u64,
    /// Unit of the log and of entry sectors.
    pub sector_size: u32,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log (0-based).
    pub index: u64,
    /// First sector written (units of `sector_size`).
    pub sector: u64,
    /// Sectors written or discarded.
    pub nr_sectors: u64,
    /// `LOG_*_FLAG` bits.
    pub flags: u64,
    /// Length of the entry's private data (a mark's label).
    pub data_len: u64,
    /// The label, for marks.
    pub mark: Option<String>,
    /// Byte offset of the written data in the log (for writes).
    pub data_offset: u64,
}

impl LogEntry {
    /// A write carrying data (not a discard, mark or empty flush).
    pub fn is_data_write(&self) -> bool {
        self.flags & (flags::DISCARD | flags::MARK) == 0 && self.nr_sectors > 0
    }
    /// A flush.
    pub fn is_flush(&self) -> bool {
        self.flags & flags::FLUSH != 0
    }
    /// A FUA write.
    pub fn is_fua(&self) -> bool {
        self.flags & flags::FUA != 0
    }
    /// A discard.
    pub fn is_discard(&self) -> bool {
        self.flags & flags::DISCARD != 0
    }
}

/// Reads a log from any `Read + Seek` (a log device, a file, a buffer).
#[derive(Debug)]
pub struct LogReader<R> {
    inner: R,
    /// Length of the log (device or file), bounding every entry.
    len: u64,
    sup: LogSuper,
    next_offset: u64,
    next_index: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl<R: Read + Seek> LogReader<R> {
    /// Reads and checks the super block.
    pub fn new(mut inner: R) -> Result<Self, LogError> {
        let mut b = [0u8; SUPER_SIZE];
        inner.seek(SeekFrom::Start(0))?;
        inner.read_exact(&mut b)?;
        let magic = le64(&b, 0);
        if magic != LOG_MAGIC {
            return Err(LogError::BadMagic(magic));
        }
        let version = le64(&b, 8);
        if version != LOG_VERSION {
            return Err(LogError::BadVersion(version));
        }
        let nr_entries = le64(&b, 16);
        let sector_size = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(LogError::BadSectorSize(sector_size));
        }
        let sup = LogSuper { nr_entries, sector_size };
        let len = inner.seek(SeekFrom::End(0))?;
        Ok(Self { inner, len, sup, next_offset: sector_size.into(), next_index: 0 })
    }

    /// The super block.
    pub fn super_block(&self) -> LogSuper {
        self.sup
    }

    /// The next entry, or `None` after `nr_entries`.
    pub fn next_entry(&mut self) -> Result<Option<LogEntry>, LogError> {
        if self.next_index >= self.sup.nr_entries {
            return Ok(None);
        }
        let index = self.next_index;
        let s = u64::from(self.sup.sector_size);
        let block_len = usize::try_from(self.sup.sector_size)
            .map_err(|_| LogError::BadSectorSize(self.sup.sector_size))?;
        let mut block = vec![0u8; block_len];
        self.inner.seek(SeekFrom::Start(self.next_offset))?;
        self.inner.read_exact(&mut block)?;
        let sector = le64(&block, 0);
        let nr_sectors = le64(&block, 8);
        let fl = le64(&block, 16);
        let data_len = le64(&block, 24);
        let bad = |what| LogError::BadEntry { index, what };
        let mark = if fl & flags::MARK != 0 {
            let len = usize::try_from(data_len).map_err(|_| bad("mark length"))?;
            let text =
                block.get(ENTRY_SIZE..ENTRY_SIZE + len).ok_or(bad("mark longer than a sector"))?;
            Some(String::from_utf8_lossy(text).into_owned())
        } else {
            None
        };
        let data_offset = self.next_offset + s;
        let data_bytes = if fl & (flags::DISCARD | flags::MARK) != 0 {
            0
        } else {
            nr_sectors.checked_mul(s).ok_or(bad("length overflows"))?
        };
        let end = data_offset.checked_add(data_bytes).ok_or(bad("length overflows"))?;
        if end > self.len {
            return Err(bad("extends beyond the end of the log"));
        }
        self.next_offset = end;
        self.next_index += 1;
        Ok(Some(LogEntry { index, sector, nr_sectors, flags: fl, data_len, mark, data_offset }))
    }

    /// Reads all remaining entries.
    pub fn entries(&mut self) -> Result<Vec<LogEntry>, LogError> {
        let mut out = Vec::new();
        while let Some(e) = self.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    /// The data written by a write entry.
    pub fn read_data(&mut self, entry: &LogEntry) -> Result<Vec<u8>, LogError> {
        if !entry.is_data_write() {
            return Ok(Vec::new());
        }
        let bad = |what| LogError::BadEntry { index: entry.index, what };
        let len = entry
            .nr_sectors
            .checked_mul(self.sup.sector_size.into())
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(bad("length overflows"))?;
        let mut data = vec![0u8; len];
        self.inner.seek(SeekFrom::Start(entry.data_offset))?;
        self.inner.read_exact(&mut data)?;
        Ok(data)
    }
}

/// Counts of a log's entries by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSummary {
    /// Entries with data.
    pub writes: u64,
    /// Entries with the flush flag (empty flushes and flush+data writes).
    pub flushes: u64,
    /// FUA entries.
    pub fua: u64,
    /// Discards.
    pub discards: u64,
    /// Mark labels in order.
    pub marks: Vec<String>,
}

/// Summarises entries.
pub fn summarize(entries: &[LogEntry]) -> LogSummary {
    let mut s = LogSummary::default();
    for e in entries {
        if e.is_data_write() {
            s.writes += 1;
        }
        if e.is_flush() {
            s.flushes += 1;
        }
        if e.is_fua() {
            s.fua += 1;
        }
        if e.is_discard() {
            s.discards += 1;
        }
        if let Some(m) = &e.mark {
            s.marks.push(m.clone());
        }
    }
    s
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Entries applied (writes and discards).
    pub applied: u64,
    /// Entries read.
    pub entries: u64,
}

/// Where [`replay`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayUntil<'a> {
    /// Apply the whole log.
    End,
    /// Stop after the mark with this label (an error if there is none).
    Mark(&'a str),
    /// Stop after the entry with this index (e.g. each flush point in turn).
    Entry(u64),
}

/// Replays the log onto `dev` from the start up to `until` (inclusive). Writes are written at
/// `sector * sector_size`; discards are written as zeros (what a discard on a zeroing device
/// leaves). The caller flushes `dev`.
pub fn replay<R: Read + Seek, W: Write + Seek>(
    log: &mut LogReader<R>,
    dev: &mut W,
    until: ReplayUntil<'_>,
) -> Result<ReplayStats, LogError> {
    let s = u64::from(log.super_block().sector_size);
    let mut stats = ReplayStats::default();
    while let Some(e) = log.next_entry()? {
        stats.entries += 1;
        let bad = |what| LogError::BadEntry { index: e.index, what };
        let at = e.sector.checked_mul(s).ok_or(bad("sector overflows"))?;
        if e.is_data_write() {
            let data = log.read_data(&e)?;
            dev.seek(SeekFrom::Start(at))?;
            dev.write_all(&data)?;
            stats.applied += 1;
        } else if e.is_discard() {
            let len = e.nr_sectors.checked_mul(s).ok_or(bad("length overflows"))?;
            let zeros = vec![0u8; 1 << 20];
            dev.seek(SeekFrom::Start(at))?;
            let mut left = len;
            while left > 0 {
                let n = left.min(1 << 20);
                let n_usize = usize::try_from(n).map_err(|_| bad("length overflows"))?;
                dev.write_all(&zeros[..n_usize])?;
                left -= n;
            }
            stats.applied += 1;
        }
        let stop = match until {
            ReplayUntil::End => false,
            ReplayUntil::Mark(want) => e.mark.as_deref() == Some(want),
            ReplayUntil::Entry(i) => e.index == i,
        };
        if stop {
            return Ok(stats);
        }
    }
    match until {
        ReplayUntil::End => Ok(stats),
        ReplayUntil::Mark(m) => Err(LogError::MarkNotFound(m.to_owned())),
        ReplayUntil::Entry(i) => Err(LogError::EntryNotFound(i)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A test-only writer producing the kernel's layout, to exercise the reader independently
    /// of the captured fixture.
    pub(crate) struct TestLogWriter {
        pub buf: Vec<u8>,
        pub s: usize,
        pub n: u64,
    }

    impl TestLogWriter {
        pub fn new(s: usize) -> Self {
            Self { buf: vec![0; s], s, n: 0 }
        }
        fn header(&mut self, sector: u64, nr: u64, fl: u64, data_len: u64, mark: &[u8]) {
            let mut block = vec![0u8; self.s];
            block[0..8].copy_from_slice(&sector.to_le_bytes());
            block[8..16].copy_from_slice(&nr.to_le_bytes());
            block[16..24].copy_from_slice(&fl.to_le_bytes());
            block[24..32].copy_from_slice(&data_len.to_le_bytes());
            block[32..32 + mark.len()].copy_from_slice(mark);
            self.buf.extend_from_slice(&block);
            self.n += 1;
        }
        pub fn write(&mut self, sector: u64, data: &[u8], fl: u64) {
            let nr = u64::try_from(data.len() / self.s).unwrap();
            self.header(sector, nr, fl, 0, &[]);
            self.buf.extend_from_slice(data);
        }
        pub fn flush(&mut self) {
            self.header(0, 0, flags::FLUSH, 0, &[]);
        }
        pub fn discard(&mut self, sector: u64, nr: u64) {
            self.header(sector, nr, flags::DISCARD, 0, &[]);
        }
        pub fn mark(&mut self, label: &str) {
            self.header(0, 0, flags::MARK, u64::try_from(label.len()).unwrap(), label.as_bytes());
        }
        pub fn finish(mut self) -> Vec<u8> {
            self.buf[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
            self.buf[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
            self.buf[16..24].copy_from_slice(&self.n.to_le_bytes());
            let s = u32::try_from(self.s).unwrap();
            self.buf[24..28].copy_from_slice(&s.to_le_bytes());
            self.buf
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = TestLogWriter::new(512);
        w.write(8, &[0xaa; 1024], 0);
        w.write(2, &[0xbb; 512], flags::METADATA);
        w.flush();
        w.mark("one");
        w.discard(8, 1);
        w.write(3, &[0xcc; 512], flags::FUA);
        w.mark("two");
        w.finish()
    }

    #[test]
    fn reads_entries_in_order_with_marks_and_data() {
        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        assert_eq!(r.super_block(), LogSuper { nr_entries: 7, sector_size: 512 });
        let entries = r.entries().unwrap();
        assert_eq!(entries.len(), 7);
        assert_eq!(entries[0].sector, 8);
        assert_eq!(entries[0].nr_sectors, 2);
        assert_eq!(r.read_data(&entries[0]).unwrap(), vec![0xaa; 1024]);
        assert_eq!(r.read_data(&entries[5]).unwrap(), vec![0xcc; 512]);
        let s = summarize(&entries);
        assert_eq!(s.writes, 3);
        assert_eq!(s.flushes, 1);
        assert_eq!(s.fua, 1);
        assert_eq!(s.discards, 1);
        assert_eq!(s.marks, vec!["one".to_owned(), "two".to_owned()]);
        assert!(entries[1].flags & flags::METADATA != 0);
    }

    #[test]
    fn replay_stops_at_the_mark() {
        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        let mut dev = Cursor::new(vec![0x11u8; 16 * 512]);
        let st = replay(&mut r, &mut dev, ReplayUntil::Mark("one")).unwrap();
        assert_eq!(st, ReplayStats { applied: 2, entries: 4 });
        let d = dev.into_inner();
        assert_eq!(&d[8 * 512..10 * 512], &[0xaa; 1024][..]);
        assert_eq!(&d[2 * 512..3 * 512], &[0xbb; 512][..]);
        assert_eq!(&d[3 * 512..4 * 512], &[0x11; 512][..], "after the mark: not applied");

        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        let mut dev = Cursor::new(vec![0x11u8; 16 * 512]);
        replay(&mut r, &mut dev, ReplayUntil::End).unwrap();
        let d = dev.into_inner();
        assert_eq!(&d[8 * 512..9 * 512], &[0; 512][..], "discarded");
        assert_eq!(&d[3 * 512..4 * 512], &[0xcc; 512][..]);

        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        let mut dev = Cursor::new(vec![0u8; 16 * 512]);
        let e = replay(&mut r, &mut dev, ReplayUntil::Mark("nope")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);

        // Stop at the flush (entry 2): both writes before it applied, nothing after.
        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        let mut dev = Cursor::new(vec![0u8; 16 * 512]);
        let st = replay(&mut r, &mut dev, ReplayUntil::Entry(2)).unwrap();
        assert_eq!(st, ReplayStats { applied: 2, entries: 3 });
        let mut r = LogReader::new(Cursor::new(sample())).unwrap();
        assert!(replay(&mut r, &mut dev, ReplayUntil::Entry(99)).is_err());
    }

    proptest::proptest! {
        /// Any bytes after a valid super block: entries or an error, never a panic.
        #[test]
        fn reader_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096), n in 0u64..64) {
            let mut b = TestLogWriter::new(512).finish();
            b[16..24].copy_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&body);
            if let Ok(mut r) = LogReader::new(Cursor::new(b)) {
                while let Ok(Some(e)) = r.next_entry() {
                    let _ = r.read_data(&e);
                }
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(LogReader::new(Cursor::new(vec![0u8; 512])), Err(LogError::BadMagic(0))));
        let mut b = sample();
        b[24..28].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(LogReader::new(Cursor::new(b)), Err(LogError::BadSectorSize(100))));
        // Truncated log: an I/O error, not a panic.
        let mut b = sample();
        b.truncate(2000);
        let mut r = LogReader::new(Cursor::new(b)).unwrap();
        assert!(r.entries().is_err());
    }
}
