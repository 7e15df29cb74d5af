//! The op journal: every input the engine's decisions depend on, so that a restarted server
//! can rebuild the engine exactly (docs/userspace-bow.md, "Resuming after a crash").
//!
//! The engine's decisions (range map, allocator, log positions, counters) depend only on the
//! order of the writes and discards (position and length) and state changes it was given, not
//! on their data; placement is deterministic. So a journal of those, replayed through the same
//! code with no device I/O, gives back the dead server's state. It lives on a tmpfs: it must
//! outlive the server's process, not the machine (after a power cut the checkpoint is restored
//! at the next boot anyway), so it is appended with plain `write()`s and never synced.
//!
//! Format (version 1, integers little-endian), close to the estimator's trace format
//! (docs/estimate.md) but appendable and readable when cut short:
//!
//! * a 32-byte header: magic `BOWJRNL1`, `u32` block size, `u64` device size in bytes, `u8`
//!   allocator (0 far end, 1 dm-bow), 7 reserved zero bytes, `u32` CRC-32 of the 28 bytes
//!   before it;
//! * frames, each `u32` payload length, the payload, `u32` CRC-32 of the payload. A payload is
//!   an op byte and its operands:
//!   * `0x01` batch: LEB128 I/O count, then per I/O a kind byte (`0x01` write, `0x02` discard),
//!     the start sector as a zigzag LEB128 delta from the end of the previous I/O of the frame
//!     (the first from 0) and the length in bytes as LEB128;
//!   * `0x02` state change: the target state's value (1 CHECKPOINT, 2 COMMITTED);
//!   * `0x03` flush (changes nothing; kept so that the replay rebuilds the write trace).
//!
//! A frame is appended before its batch issues anything. A process killed inside that `write()`
//! leaves a short last frame (the page cache keeps a correct prefix): its batch never started,
//! and the reader drops it. A whole frame that does not check out is damage, refused anywhere.
//!
//! A zero payload length (no frame has an empty payload) ends the journal: a journal appended
//! through a memory mapping (bow-ublk's) is a file grown ahead of its contents, zero after the
//! last frame, and such a writer stores each frame's length after the rest of it, so a process
//! killed inside an append leaves a zero length there too. What follows is dropped.

use crate::engine::Allocator;
use bow::units::{BlockSize, Sectors, SECTOR_SIZE};

/// The magic at byte 0.
pub const MAGIC: [u8; 8] = *b"BOWJRNL1";
/// Bytes in the header.
pub const HEADER_BYTES: usize = 32;

const OP_BATCH: u8 = 0x01;
const OP_STATE: u8 = 0x02;
const OP_FLUSH: u8 = 0x03;
const KIND_WRITE: u8 = 0x01;
const KIND_DISCARD: u8 = 0x02;
/// The largest payload a reader accepts (a batch of a few thousand I/Os is far below it).
const MAX_PAYLOAD: u32 = 16 << 20;

/// Why a journal could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("not an engine journal (no {:?} header)", String::from_utf8_lossy(&MAGIC))]
    NotAJournal,
    #[error("the journal's header is damaged (checksum)")]
    HeaderChecksum,
    #[error(
        "the journal is for another engine: block size {block_size}, device {device_bytes} bytes, \
         allocator {allocator:?}; this one has {want_block_size}, {want_device_bytes}, \
         {want_allocator:?}"
    )]
    OtherEngine {
        block_size: u32,
        device_bytes: u64,
        allocator: Allocator,
        want_block_size: u32,
        want_device_bytes: u64,
        want_allocator: Allocator,
    },
    #[error("journal frame at byte {offset} is damaged and is not the last one: {what}")]
    Corrupt { offset: usize, what: &'static str },
}

/// One I/O of a batch as journaled: no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalIo {
    Write { sector: Sectors, len: u64 },
    Discard { sector: Sectors, len: u64 },
}

/// One journaled step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A batch's writes and discards, in submission order.
    Batch(Vec<JournalIo>),
    /// A state change asked for (the value of the target state).
    State(u8),
    /// A user flush.
    Flush,
}

/// A journal read back: its entries, and where each one's frame ends (the bytes to keep when
/// the journal is cut after it).
#[derive(Debug, Default)]
pub struct ReadJournal {
    pub entries: Vec<Entry>,
    /// `ends[i]`: the byte offset just past entry `i`'s frame.
    pub ends: Vec<usize>,
    /// Bytes after the last whole frame that were dropped (0 if none): a torn last frame, or
    /// what follows a zero length (a mapped journal's unwritten rest, an append cut short).
    pub torn_tail: usize,
}

/// The journal header for an engine.
pub fn header(block_size: BlockSize, device_bytes: u64, allocator: Allocator) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_BYTES);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&block_size.bytes().to_le_bytes());
    b.extend_from_slice(&device_bytes.to_le_bytes());
    b.push(allocator_code(allocator));
    b.extend_from_slice(&[0; 7]);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn allocator_code(a: Allocator) -> u8 {
    match a {
        Allocator::FarEnd => 0,
        Allocator::DmBow => 1,
    }
}

/// The frame of `entry`, ready to append.
pub fn frame(entry: &Entry) -> Vec<u8> {
    // Length, payload, CRC in one buffer sized up front (a batch's record is at most a kind
    // byte and two 10-byte LEB128 numbers per I/O): the frame is built for every batch.
    let ios = match entry {
        Entry::Batch(ios) => ios.len(),
        Entry::State(_) | Entry::Flush => 0,
    };
    let mut f = Vec::with_capacity(4 + 1 + 10 + 21 * ios + 4);
    f.extend_from_slice(&[0; 4]);
    match entry {
        Entry::Batch(ios) => {
            f.push(OP_BATCH);
            put_leb(&mut f, ios.len() as u64);
            let mut cursor = 0u64;
            for io in ios {
                let (kind, sector, len) = match *io {
                    JournalIo::Write { sector, len } => (KIND_WRITE, sector.0, len),
                    JournalIo::Discard { sector, len } => (KIND_DISCARD, sector.0, len),
                };
                f.push(kind);
                put_leb(&mut f, zigzag(sector.wrapping_sub(cursor)));
                put_leb(&mut f, len);
                cursor = sector.wrapping_add(len / SECTOR_SIZE);
            }
        }
        Entry::State(to) => {
            f.push(OP_STATE);
            put_leb(&mut f, u64::from(*to));
        }
        Entry::Flush => f.push(OP_FLUSH),
    }
    let payload = f.len() - 4;
    f[..4].copy_from_slice(&u32::try_from(payload).unwrap_or(u32::MAX).to_le_bytes());
    let crc = crc32fast::hash(&f[4..]);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Reads a journal written for an engine of `block_size`, `device_bytes` and `allocator`.
pub fn read(
    bytes: &[u8],
    block_size: BlockSize,
    device_bytes: u64,
    allocator: Allocator,
) -> Result<ReadJournal, JournalError> {
    let head = bytes.get(..HEADER_BYTES).ok_or(JournalError::NotAJournal)?;
    if head[..8] != MAGIC {
        return Err(JournalError::NotAJournal);
    }
    if le32(&head[28..32]) != crc32fast::hash(&head[..28]) {
        return Err(JournalError::HeaderChecksum);
    }
    let (bs, dev) = (le32(&head[8..12]), le64(&head[12..20]));
    let alloc = match head[20] {
        0 => Some(Allocator::FarEnd),
        1 => Some(Allocator::DmBow),
        _ => None,
    };
    if bs != block_size.bytes() || dev != device_bytes || alloc != Some(allocator) {
        return Err(JournalError::OtherEngine {
            block_size: bs,
            device_bytes: dev,
            allocator: alloc.unwrap_or(allocator),
            want_block_size: block_size.bytes(),
            want_device_bytes: device_bytes,
            want_allocator: allocator,
        });
    }
    let mut out = ReadJournal::default();
    let mut at = HEADER_BYTES;
    while at < bytes.len() {
        if bytes.get(at..at + 4).is_some_and(|len| len == [0; 4]) {
            out.torn_tail = bytes.len() - at;
            break;
        }
        match read_frame(bytes, at) {
            Ok((entry, end)) => {
                out.entries.push(entry);
                out.ends.push(end);
                at = end;
            }
            // A frame cut short by the process's death: only ever the last one.
            Err(FrameError::Short) => {
                out.torn_tail = bytes.len() - at;
                break;
            }
            Err(FrameError::Bad(what)) => {
                return Err(JournalError::Corrupt { offset: at, what });
            }
        }
    }
    Ok(out)
}

enum FrameError {
    /// The frame runs past the end of the bytes.
    Short,
    /// A whole frame that does not check out. A write cut short by the process's death leaves a
    /// correct prefix, never a whole frame with wrong bytes, so this is damage even at the end.
    Bad(&'static str),
}

fn read_frame(bytes: &[u8], at: usize) -> Result<(Entry, usize), FrameError> {
    let len_bytes = bytes.get(at..at + 4).ok_or(FrameError::Short)?;
    let len = le32(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(FrameError::Bad("payload length too large"));
    }
    let len = len as usize;
    let end = at + 4 + len + 4;
    let payload = bytes.get(at + 4..at + 4 + len).ok_or(FrameError::Short)?;
    let crc = bytes.get(at + 4 + len..end).ok_or(FrameError::Short)?;
    if le32(crc) != crc32fast::hash(payload) {
        return Err(FrameError::Bad("checksum"));
    }
    let entry = parse_payload(payload).ok_or(FrameError::Bad("malformed payload"))?;
    Ok((entry, end))
}

fn parse_payload(p: &[u8]) -> Option<Entry> {
    let (&op, mut rest) = p.split_first()?;
    let entry = match op {
        OP_BATCH => {
            let count = get_leb(&mut rest)?;
            let mut ios = Vec::new();
            let mut cursor = 0u64;
            for _ in 0..count {
                let (&kind, r) = rest.split_first()?;
                rest = r;
                let sector = cursor.wrapping_add(unzigzag(get_leb(&mut rest)?));
                let len = get_leb(&mut rest)?;
                cursor = sector.wrapping_add(len / SECTOR_SIZE);
                ios.push(match kind {
                    KIND_WRITE => JournalIo::Write { sector: Sectors(sector), len },
                    KIND_DISCARD => JournalIo::Discard { sector: Sectors(sector), len },
                    _ => return None,
                });
            }
            Entry::Batch(ios)
        }
        OP_STATE => Entry::State(u8::try_from(get_leb(&mut rest)?).ok()?),
        OP_FLUSH => Entry::Flush,
        _ => return None,
    };
    rest.is_empty().then_some(entry)
}

/// Zigzag of a two's-complement difference: small backward steps stay small.
fn zigzag(delta: u64) -> u64 {
    (delta << 1) ^ 0u64.wrapping_sub(delta >> 63)
}

fn unzigzag(v: u64) -> u64 {
    (v >> 1) ^ 0u64.wrapping_sub(v & 1)
}

fn put_leb(b: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

fn get_leb(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, r) = rest.split_first()?;
        *rest = r;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::Batch(vec![JournalIo::Discard { sector: Sectors(800), len: 1 << 20 }]),
            Entry::State(1),
            Entry::Batch(vec![
                JournalIo::Write { sector: Sectors(8), len: 4096 },
                JournalIo::Write { sector: Sectors(0), len: 8192 },
                JournalIo::Discard { sector: Sectors(4000), len: 4096 },
                // Misaligned I/O is journaled as given (the replay refuses it the same way).
                JournalIo::Write { sector: Sectors(3), len: 100 },
            ]),
            Entry::Flush,
            Entry::State(2),
        ]
    }

    fn journal(entries: &[Entry]) -> Vec<u8> {
        let mut b = header(BlockSize::B4096, 8 << 20, Allocator::FarEnd);
        for e in entries {
            b.extend(frame(e));
        }
        b
    }

    #[test]
    fn entries_round_trip_and_a_torn_tail_is_dropped_at_every_cut() {
        let entries = sample();
        let bytes = journal(&entries);
        let read_all = |b: &[u8]| read(b, BlockSize::B4096, 8 << 20, Allocator::FarEnd);
        let all = read_all(&bytes).unwrap();
        assert_eq!(all.entries, entries);
        assert_eq!(all.torn_tail, 0);
        assert_eq!(*all.ends.last().unwrap(), bytes.len());
        // A process killed inside the write() of any frame: every whole frame before the cut.
        for cut in HEADER_BYTES..bytes.len() {
            let r = read_all(&bytes[..cut]).unwrap();
            let whole = all.ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(r.entries, entries[..whole], "cut at {cut}");
            assert_eq!(r.torn_tail, cut - all.ends[..whole].last().copied().unwrap_or(32));
        }
    }

    /// A mapped journal: zero after the last frame, and an append killed before its length
    /// store leaves a zero length followed by (part of) its body. Both end the journal there.
    #[test]
    fn a_zero_length_ends_the_journal_whatever_follows() {
        let entries = sample();
        let bytes = journal(&entries);
        let all = read(&bytes, BlockSize::B4096, 8 << 20, Allocator::FarEnd).unwrap();
        for (whole, &end) in all.ends.iter().enumerate() {
            let next = all.ends.get(whole + 1).copied().unwrap_or(bytes.len());
            let mut b = bytes[..end].to_vec();
            // The next frame's body without its length, then the file's zero rest.
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(bytes.get(end + 4..next).unwrap_or_default());
            b.resize(b.len() + 4096, 0);
            let r = read(&b, BlockSize::B4096, 8 << 20, Allocator::FarEnd).unwrap();
            assert_eq!(r.entries, entries[..=whole]);
            assert_eq!(r.ends, all.ends[..=whole]);
            assert_eq!(r.torn_tail, b.len() - end);
        }
    }

    #[test]
    fn damage_before_the_last_frame_and_another_engine_are_refused() {
        let bytes = journal(&sample());
        let all = read(&bytes, BlockSize::B4096, 8 << 20, Allocator::FarEnd).unwrap();
        let mut bad = bytes.clone();
        bad[all.ends[0] + 5] ^= 1; // inside the second frame's payload
        assert!(matches!(
            read(&bad, BlockSize::B4096, 8 << 20, Allocator::FarEnd),
            Err(JournalError::Corrupt { .. })
        ));
        // Even in the last frame: a torn write leaves a short frame, not wrong bytes.
        let mut last = bytes.clone();
        let n = last.len();
        last[n - 6] ^= 1;
        assert!(matches!(
            read(&last, BlockSize::B4096, 8 << 20, Allocator::FarEnd),
            Err(JournalError::Corrupt { .. })
        ));
        assert!(matches!(
            read(&bytes, BlockSize::B4096, 8 << 20, Allocator::DmBow),
            Err(JournalError::OtherEngine { .. })
        ));
        assert!(matches!(
            read(&bytes, BlockSize::B512, 8 << 20, Allocator::FarEnd),
            Err(JournalError::OtherEngine { .. })
        ));
        let mut head = bytes;
        head[13] ^= 1;
        assert_eq!(
            read(&head, BlockSize::B4096, 8 << 20, Allocator::FarEnd).unwrap_err(),
            JournalError::HeaderChecksum
        );
        assert_eq!(
            read(b"CPDTRACE", BlockSize::B4096, 8 << 20, Allocator::FarEnd).unwrap_err(),
            JournalError::NotAJournal
        );
    }
}
