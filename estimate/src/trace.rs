//! The compact write trace: what an update's boots send to the block device, in the order sent.
//!
//! Our own format, version 1, documented byte for byte in docs/estimate.md ("The trace
//! format"). In short, all integers little-endian:
//!
//! * a 32-byte header: magic `CPDTRACE`, `u32` version (1), `u32` block size (the traced
//!   device's logical block size, every record is a multiple of it), `u64` device size in
//!   bytes, `u32` reserved (0), `u32` CRC-32 of the 28 bytes before it;
//! * records, each an op byte (`0x01` write, `0x02` discard, `0x03` flush; a write may add
//!   `0x10` FUA and `0x20` preflush) and, for writes and discards, the start as a zigzag LEB128
//!   delta from the end of the previous write or discard, then the length in 512-byte sectors
//!   as LEB128;
//! * a trailer: op byte `0x00`, `u64` record count, `u32` CRC-32 of every byte before it.
//!
//! Sequential I/O costs 3 bytes a record (delta 0, short length); a dm-log-writes capture,
//! which carries the written data, is thousands of times larger. The reader is strict:
//! non-minimal LEB128, unknown op bits, records outside the device or off the block size, a
//! wrong count or checksum, and bytes after the trailer are all refused, so one trace has
//! exactly one encoding and round-trips byte for byte.

use std::io::{self, BufReader, Read, Write};

use bow::units::{Sectors, SECTOR_SIZE};

use crate::error::EstimateError;

/// The magic at byte 0.
pub const MAGIC: [u8; 8] = *b"CPDTRACE";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Bytes in the header (its checksum included).
pub const HEADER_BYTES: usize = 32;
/// The most records a trace may hold: bounds the reader's memory (16 Mi records, ~400 MB in
/// memory; 64 GiB of 4 KiB writes).
pub const MAX_RECORDS: u64 = 1 << 24;

/// Op byte values (docs/estimate.md).
mod op {
    pub const END: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const DISCARD: u8 = 0x02;
    pub const FLUSH: u8 = 0x03;
    pub const KIND_MASK: u8 = 0x0f;
    pub const FUA: u8 = 0x10;
    pub const PREFLUSH: u8 = 0x20;
}

/// One I/O of the trace. Positions and lengths are in 512-byte sectors of the traced device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// A write of `len` sectors at `start`.
    Write {
        /// First sector.
        start: Sectors,
        /// Length (at least one block).
        len: Sectors,
        /// Forced unit access: the write was durable when it completed.
        fua: bool,
        /// The write carried a cache flush before it (`REQ_PREFLUSH`).
        preflush: bool,
    },
    /// A discard of `len` sectors at `start`.
    Discard {
        /// First sector.
        start: Sectors,
        /// Length (at least one block).
        len: Sectors,
    },
    /// An empty cache flush.
    Flush,
}

impl Record {
    /// A plain write (no FUA, no preflush).
    pub fn write(start: u64, len: u64) -> Record {
        Record::Write { start: Sectors(start), len: Sectors(len), fua: false, preflush: false }
    }

    /// A discard.
    pub fn discard(start: u64, len: u64) -> Record {
        Record::Discard { start: Sectors(start), len: Sectors(len) }
    }

    /// The extent of a write or discard, as (start, length) in sectors.
    pub fn extent(&self) -> Option<(Sectors, Sectors)> {
        match *self {
            Record::Write { start, len, .. } | Record::Discard { start, len } => Some((start, len)),
            Record::Flush => None,
        }
    }
}

/// A validated write trace of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    device_size: u64,
    block_size: u32,
    records: Vec<Record>,
}

impl Trace {
    /// An empty trace of a device of `device_size` bytes whose logical block size is
    /// `block_size` (a power of two from 512 to 65536; the device size a non-zero multiple of
    /// it).
    pub fn new(device_size: u64, block_size: u32) -> Result<Trace, EstimateError> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(EstimateError::invalid(
                "trace block size",
                block_size.into(),
                "must be a power of two from 512 to 65536",
            ));
        }
        if device_size == 0 || device_size % u64::from(block_size) != 0 {
            return Err(EstimateError::invalid(
                "trace device size",
                device_size,
                "must be a non-zero multiple of the block size",
            ));
        }
        Ok(Trace { device_size, block_size, records: Vec::new() })
    }

    /// A trace holding `records`, each checked as [`Trace::push`] checks it.
    pub fn from_records(
        device_size: u64,
        block_size: u32,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Trace, EstimateError> {
        let mut t = Trace::new(device_size, block_size)?;
        for r in records {
            t.push(r)?;
        }
        Ok(t)
    }

    /// Appends a record: a write or discard must be non-empty, inside the device and a whole
    /// number of blocks; the trace holds at most [`MAX_RECORDS`].
    pub fn push(&mut self, record: Record) -> Result<(), EstimateError> {
        let index = self.records.len();
        if u64::try_from(index).map_or(true, |n| n >= MAX_RECORDS) {
            return Err(EstimateError::BadRecord {
                index,
                what: "more records than a trace holds",
            });
        }
        if let Some((start, len)) = record.extent() {
            let bad = |what| EstimateError::BadRecord { index, what };
            let unit = u64::from(self.block_size) / SECTOR_SIZE;
            if len.0 == 0 {
                return Err(bad("empty write or discard"));
            }
            if start.0 % unit != 0 || len.0 % unit != 0 {
                return Err(bad("not a whole number of the trace's blocks"));
            }
            let end = start.0.checked_add(len.0).ok_or(bad("extent overflows"))?;
            if end > self.device_sectors() {
                return Err(bad("extends past the end of the device"));
            }
        }
        self.records.push(record);
        Ok(())
    }

    /// Size of the traced device in bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// The traced device's logical block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The records, in the order they were issued.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    fn device_sectors(&self) -> u64 {
        self.device_size / SECTOR_SIZE
    }

    /// Refuses the trace unless it was captured on a device of `device_size` bytes.
    pub fn check_device(&self, device_size: u64) -> Result<(), EstimateError> {
        if self.device_size == device_size {
            Ok(())
        } else {
            Err(EstimateError::TraceDeviceSize { trace: self.device_size, device: device_size })
        }
    }

    /// Bytes written (writes only; a block written twice counts twice).
    pub fn written_bytes(&self) -> u64 {
        self.records
            .iter()
            .map(|r| match *r {
                Record::Write { len, .. } => len.0 * SECTOR_SIZE,
                _ => 0,
            })
            .sum()
    }

    /// Writes the trace in the format of docs/estimate.md.
    pub fn write_to<W: Write>(&self, mut out: W) -> Result<(), EstimateError> {
        let bytes = self.to_bytes();
        out.write_all(&bytes).map_err(EstimateError::Write)?;
        out.flush().map_err(EstimateError::Write)
    }

    /// The encoded trace.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES + self.records.len() * 4 + 13);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.device_size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let header_crc = crc32fast::hash(&b);
        b.extend_from_slice(&header_crc.to_le_bytes());
        let mut cursor = 0u64;
        for r in &self.records {
            match *r {
                Record::Write { start, len, fua, preflush } => {
                    let mut code = op::WRITE;
                    if fua {
                        code |= op::FUA;
                    }
                    if preflush {
                        code |= op::PREFLUSH;
                    }
                    b.push(code);
                    put_extent(&mut b, &mut cursor, start, len);
                }
                Record::Discard { start, len } => {
                    b.push(op::DISCARD);
                    put_extent(&mut b, &mut cursor, start, len);
                }
                Record::Flush => b.push(op::FLUSH),
            }
        }
        b.push(op::END);
        // usize → u64 cannot lose bits on any supported target.
        b.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a trace, checking everything (module documentation). Reads to the end of `input`.
    pub fn read_from<R: Read>(input: R) -> Result<Trace, EstimateError> {
        let mut r = CrcReader::new(input);
        let mut header = [0u8; HEADER_BYTES];
        r.exact(&mut header)?;
        let mut found = [0u8; 8];
        found.copy_from_slice(&header[0..8]);
        if found != MAGIC {
            return Err(EstimateError::NotATrace { found });
        }
        let stored = le32(&header[28..32]);
        let computed = crc32fast::hash(&header[..28]);
        if stored != computed {
            return Err(EstimateError::TraceChecksum { part: "header", stored, computed });
        }
        let version = le32(&header[8..12]);
        if version != VERSION {
            return Err(EstimateError::TraceVersion(version));
        }
        if le32(&header[24..28]) != 0 {
            return Err(EstimateError::TraceCorrupt {
                offset: 24,
                what: "reserved field not zero",
            });
        }
        let block_size = le32(&header[12..16]);
        let device_size = le64(&header[16..24]);
        let mut trace = Trace::new(device_size, block_size).map_err(|_| {
            EstimateError::TraceCorrupt { offset: 12, what: "bad block size or device size" }
        })?;
        let mut cursor = 0u64;
        loop {
            let at = r.offset;
            let code = r.byte()?;
            let record = match code & op::KIND_MASK {
                op::END if code == op::END => break,
                op::WRITE if code & !(op::KIND_MASK | op::FUA | op::PREFLUSH) == 0 => {
                    let (start, len) = r.extent(&mut cursor)?;
                    Record::Write {
                        start,
                        len,
                        fua: code & op::FUA != 0,
                        preflush: code & op::PREFLUSH != 0,
                    }
                }
                op::DISCARD if code == op::DISCARD => {
                    let (start, len) = r.extent(&mut cursor)?;
                    Record::Discard { start, len }
                }
                op::FLUSH if code == op::FLUSH => Record::Flush,
                _ => return Err(EstimateError::TraceCorrupt { offset: at, what: "unknown op" }),
            };
            trace.push(record)?;
        }
        let count_at = r.offset;
        let mut count = [0u8; 8];
        r.exact(&mut count)?;
        // usize → u64 cannot lose bits on any supported target.
        if le64(&count) != trace.records.len() as u64 {
            return Err(EstimateError::TraceCorrupt {
                offset: count_at,
                what: "record count does not match the records",
            });
        }
        let computed = r.crc.clone().finalize();
        let mut crc = [0u8; 4];
        r.exact(&mut crc)?;
        let stored = le32(&crc);
        if stored != computed {
            return Err(EstimateError::TraceChecksum { part: "trace", stored, computed });
        }
        let mut extra = [0u8; 1];
        match r.inner.read(&mut extra) {
            Ok(0) => Ok(trace),
            Ok(_) => Err(EstimateError::TraceCorrupt {
                offset: r.offset,
                what: "bytes after the trailer",
            }),
            Err(e) => Err(EstimateError::Io(e)),
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

fn put_extent(b: &mut Vec<u8>, cursor: &mut u64, start: Sectors, len: Sectors) {
    // Positions are below 2^55 sectors (a u64 of bytes / 512), so the wrapping difference read
    // as i64 is the true signed delta.
    let delta = i64::from_ne_bytes(start.0.wrapping_sub(*cursor).to_ne_bytes());
    put_varint(b, zigzag(delta));
    put_varint(b, len.0);
    *cursor = start.0 + len.0;
}

/// Small magnitudes of either sign to small numbers: 0, -1, 1, -2, … → 0, 1, 2, 3, …
fn zigzag(n: i64) -> u64 {
    u64::from_ne_bytes(((n << 1) ^ (n >> 63)).to_ne_bytes())
}

fn unzigzag(n: u64) -> i64 {
    i64::from_ne_bytes((n >> 1).to_ne_bytes()) ^ -i64::from(n & 1 == 1)
}

fn put_varint(b: &mut Vec<u8>, mut n: u64) {
    loop {
        let low = n.to_le_bytes()[0] & 0x7f;
        n >>= 7;
        if n == 0 {
            b.push(low);
            return;
        }
        b.push(low | 0x80);
    }
}

/// Reads through a buffer, counting bytes and folding them into the trace's CRC.
struct CrcReader<R> {
    inner: BufReader<R>,
    crc: crc32fast::Hasher,
    offset: u64,
}

impl<R: Read> CrcReader<R> {
    fn new(input: R) -> Self {
        CrcReader { inner: BufReader::new(input), crc: crc32fast::Hasher::new(), offset: 0 }
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), EstimateError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.crc.update(buf);
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(EstimateError::TraceTruncated { offset: self.offset })
            }
            Err(e) => Err(EstimateError::Io(e)),
        }
    }

    fn byte(&mut self) -> Result<u8, EstimateError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    /// A minimal LEB128 of at most 10 bytes that fits a u64.
    fn varint(&mut self) -> Result<u64, EstimateError> {
        let at = self.offset;
        let bad = |what| EstimateError::TraceCorrupt { offset: at, what };
        let mut value = 0u64;
        for i in 0..10u32 {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(bad("number larger than 64 bits"));
            }
            value |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(bad("number not minimally encoded"));
                }
                return Ok(value);
            }
        }
        Err(bad("number longer than 10 bytes"))
    }

    fn extent(&mut self, cursor: &mut u64) -> Result<(Sectors, Sectors), EstimateError> {
        let at = self.offset;
        let delta = unzigzag(self.varint()?);
        let len = self.varint()?;
        let start = cursor
            .checked_add_signed(delta)
            .ok_or(EstimateError::TraceCorrupt { offset: at, what: "start outside 0..2^64" })?;
        *cursor = start
            .checked_add(len)
            .ok_or(EstimateError::TraceCorrupt { offset: at, what: "extent overflows" })?;
        Ok((Sectors(start), Sectors(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn sample() -> Trace {
        Trace::from_records(
            64 * MIB,
            4096,
            [
                Record::write(8, 8),
                Record::write(16, 64),
                Record::Flush,
                Record::Write { start: Sectors(0), len: Sectors(8), fua: true, preflush: true },
                Record::discard(1024, 2048),
                Record::write(131_064, 8),
            ],
        )
        .unwrap()
    }

    /// The encoding of docs/estimate.md's worked example, byte for byte.
    #[test]
    fn golden_bytes_of_the_documented_example() {
        let t = Trace::from_records(
            MIB,
            4096,
            [
                Record::write(8, 8),
                Record::write(16, 8),
                Record::Flush,
                Record::Write { start: Sectors(0), len: Sectors(8), fua: true, preflush: false },
                Record::discard(256, 1024),
            ],
        )
        .unwrap();
        let b = t.to_bytes();
        let mut want: Vec<u8> = b"CPDTRACE".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0, 0x00, 0x10, 0, 0]);
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let hcrc = crc32fast::hash(&want);
        want.extend_from_slice(&hcrc.to_le_bytes());
        want.extend_from_slice(&[
            0x01, 0x10, 0x08, // write 8+8: delta +8 → zigzag 16, len 8
            0x01, 0x00, 0x08, // write 16+8: delta 0
            0x03, // flush
            0x11, 0x2f, 0x08, // FUA write 0+8: delta −24 → zigzag 47
            0x02, 0xf0, 0x03, 0x80, 0x08, // discard 256+1024: delta +248 → 496, len 1024
            0x00, 5, 0, 0, 0, 0, 0, 0, 0, // end, 5 records
        ]);
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(b, want);
        // The checksums docs/estimate.md prints.
        assert_eq!(&b[28..32], &[0x8e, 0xeb, 0xa5, 0x77]);
        assert_eq!(&b[56..60], &[0xc4, 0x47, 0x8a, 0xa3]);
        assert_eq!(b.len(), 60);
        assert_eq!(Trace::read_from(&want[..]).unwrap(), t);
    }

    #[test]
    fn sample_round_trips() {
        let t = sample();
        let mut out = Vec::new();
        t.write_to(&mut out).unwrap();
        assert_eq!(Trace::read_from(&out[..]).unwrap(), t);
        assert_eq!(t.written_bytes(), (8 + 64 + 8 + 8) * 512);
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = sample().to_bytes();
        for n in 0..b.len() {
            let e = Trace::read_from(&b[..n]).unwrap_err();
            assert!(matches!(e, EstimateError::TraceTruncated { .. }), "{n}: {e}");
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let b = sample().to_bytes();
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                let r = Trace::read_from(&c[..]);
                assert!(r.is_err(), "byte {i} bit {bit} accepted: {r:?}");
                assert_eq!(r.unwrap_err().kind(), ErrorKind::Corrupt, "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn trailing_bytes_and_other_magic_are_refused() {
        let mut b = sample().to_bytes();
        b.push(0);
        assert!(matches!(
            Trace::read_from(&b[..]),
            Err(EstimateError::TraceCorrupt { what: "bytes after the trailer", .. })
        ));
        let e = Trace::read_from(&b"not a trace at all, just some text"[..]).unwrap_err();
        assert!(matches!(e, EstimateError::NotATrace { .. }), "{e}");
        assert!(e.to_string().contains("not a checkpointd write trace"), "{e}");
    }

    /// A trace whose checksums are right but whose records lie outside the device.
    #[test]
    fn records_outside_the_device_are_refused_even_with_good_checksums() {
        let t = Trace::from_records(MIB, 512, [Record::write(2040, 8)]).unwrap();
        let mut b = t.to_bytes();
        // Make the device half as large and fix both checksums.
        b[16..24].copy_from_slice(&(MIB / 2).to_le_bytes());
        let h = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&h.to_le_bytes());
        let n = b.len();
        let c = crc32fast::hash(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&c.to_le_bytes());
        let e = Trace::read_from(&b[..]).unwrap_err();
        assert!(
            matches!(
                e,
                EstimateError::BadRecord { index: 0, what: "extends past the end of the device" }
            ),
            "{e}"
        );
    }

    #[test]
    fn non_minimal_numbers_are_refused() {
        let t = Trace::from_records(MIB, 512, [Record::write(0, 1)]).unwrap();
        let b = t.to_bytes();
        // Re-encode the length 1 as 0x81 0x00 and fix the checksum.
        let mut c = b[..HEADER_BYTES].to_vec();
        c.extend_from_slice(&[0x01, 0x00, 0x81, 0x00, 0x00, 1, 0, 0, 0, 0, 0, 0, 0]);
        let crc = crc32fast::hash(&c);
        c.extend_from_slice(&crc.to_le_bytes());
        let e = Trace::read_from(&c[..]).unwrap_err();
        assert!(matches!(
            e,
            EstimateError::TraceCorrupt { what: "number not minimally encoded", .. }
        ));
    }

    #[test]
    fn device_size_is_checked() {
        let t = sample();
        t.check_device(64 * MIB).unwrap();
        let e = t.check_device(32 * MIB).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongDevice);
        assert!(e.to_string().contains("67108864") && e.to_string().contains("33554432"), "{e}");
    }

    #[test]
    fn records_are_checked_on_push() {
        let mut t = Trace::new(MIB, 4096).unwrap();
        assert!(t.push(Record::write(0, 0)).is_err());
        assert!(t.push(Record::write(4, 8)).is_err(), "not on a 4 KiB boundary");
        assert!(t.push(Record::write(8, 4)).is_err(), "not whole blocks");
        assert!(t.push(Record::write(2040, 16)).is_err(), "past the end");
        assert!(t.push(Record::write(u64::MAX - 7, 8)).is_err());
        t.push(Record::write(2040, 8)).unwrap();
        assert!(Trace::new(MIB, 1000).is_err());
        assert!(Trace::new(MIB + 512, 4096).is_err());
        assert!(Trace::new(0, 512).is_err());
    }

    fn arb_record(sectors: u64) -> impl Strategy<Value = Record> {
        (0u8..3, 0..sectors, 1u64..64, any::<bool>(), any::<bool>()).prop_map(
            move |(kind, start, len, fua, preflush)| {
                let len = len.min(sectors - start);
                let start = Sectors(start);
                let len = Sectors(len);
                match kind {
                    0 => Record::Write { start, len, fua, preflush },
                    1 => Record::Discard { start, len },
                    _ => Record::Flush,
                }
            },
        )
    }

    proptest! {
        /// Any valid trace encodes and decodes to itself, and its encoding is canonical.
        #[test]
        fn round_trip(records in proptest::collection::vec(arb_record(1 << 21), 0..200)) {
            let t = Trace::from_records(1 << 30, 512, records).unwrap();
            let b = t.to_bytes();
            let back = Trace::read_from(&b[..]).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(back.to_bytes(), b);
        }

        /// Arbitrary bytes after a valid header: an error or a trace, never a panic.
        #[test]
        fn reader_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = Trace::new(MIB, 512).unwrap().to_bytes();
            b.truncate(HEADER_BYTES);
            b.extend_from_slice(&body);
            let _ = Trace::read_from(&b[..]);
        }
    }
}
