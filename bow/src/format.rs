//! The on-disk dm-bow log, header version 1.0 (dm-bow-format.md §4, vold-checkpoint.md §5.2).
//!
//! Block 0 of the underlying device holds one *log sector*: a 28-byte header followed by 24-byte
//! entries. All fields are little-endian (the kernel stores CPU order; every Android target is
//! little-endian). Positions are 512-byte sectors, sizes are bytes.
//!
//! ```text
//! header  0 magic u32 | 4 header_version u16 | 6 header_size u16 | 8 block_size u32
//!        12 count u32 | 16 sequence u32      | 20 sector0 u64
//! entry   0 source u64 | 8 dest u64 | 16 size u32 | 20 checksum u32
//! ```

use crate::units::{max_entries, BlockSize, Sectors};

/// "BOW\0": an active log the kernel wrote.
pub const MAGIC_BOW: u32 = 0x0057_4f42;
/// "WOB\0": a log vold (or we) started to restore; restore resumes without validation.
pub const MAGIC_WOB: u32 = 0x0042_4f57;
/// Header version 1.0 as the kernel writes it (bytes `00 01`).
pub const HEADER_VERSION_1_0: u16 = 0x0100;
/// `sizeof(struct log_sector)` with a 64-bit `sector_t`.
pub const HEADER_SIZE_V1_0: u16 = 28;
/// `sizeof(struct log_entry)`.
pub const ENTRY_SIZE: usize = 24;
pub(crate) const ENTRY_SIZE_U32: u32 = 24;
const HEADER_LEN: usize = 28;

/// Which magic a log sector carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Magic {
    /// Written by the kernel: the log is whole and may be validated.
    Bow,
    /// Written by a restorer: a restore was interrupted and resumes from here.
    Wob,
}

impl Magic {
    /// The little-endian `u32` stored at offset 0.
    pub fn value(self) -> u32 {
        match self {
            Magic::Bow => MAGIC_BOW,
            Magic::Wob => MAGIC_WOB,
        }
    }

    /// Recognises a stored value.
    pub fn from_value(value: u32) -> Option<Magic> {
        match value {
            MAGIC_BOW => Some(Magic::Bow),
            MAGIC_WOB => Some(Magic::Wob),
            _ => None,
        }
    }
}

/// Why a log sector or entry was rejected. Parsing never panics; every malformed input is one
/// of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The buffer is shorter than the header, or not one block long.
    #[error("log sector buffer is {len} bytes, expected {expected}")]
    BufferSize { len: usize, expected: usize },
    /// Neither "BOW" nor "WOB" at offset 0: no checkpoint log on this device.
    #[error("no dm-bow log (magic {0:#010x})")]
    NoMagic(u32),
    /// `block_size` is not a power of two in 512..=4096.
    #[error("invalid block size {0}")]
    BlockSize(u32),
    /// `header_size` is below 28 or above the block size.
    #[error("invalid header size {header_size} for block size {block_size}")]
    HeaderSize { header_size: u16, block_size: u32 },
    /// `count` is 0 or more entries than fit in the block.
    #[error("log sector count {count} out of range 1..={max}")]
    Count { count: u32, max: u32 },
    /// An entry's size is zero or not a multiple of the block size.
    #[error(
        "entry {index}: size {size} is not a non-zero multiple of the block size {block_size}"
    )]
    EntrySize { index: u32, size: u32, block_size: u32 },
    /// An entry's source or destination does not start on a block boundary.
    #[error("entry {index}: sector {sector} is not aligned to the block size {block_size}")]
    Misaligned { index: u32, sector: u64, block_size: u32 },
    /// Sector arithmetic of an entry overflows 64 bits.
    #[error("entry {index}: sector range overflows")]
    Overflow { index: u32 },
}

/// The 28-byte log sector header (`struct log_sector` without its entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogHeader {
    pub magic: Magic,
    /// 0x0100 from the kernel; not checked on read (vold does not check it either).
    pub header_version: u16,
    /// Offset of the first entry; 28 from the kernel.
    pub header_size: u16,
    pub block_size: u32,
    /// Valid entries in this log sector; only this is authoritative (stale entries may follow).
    pub count: u32,
    /// 0 for the first log sector, +1 for every rollover.
    pub sequence: u32,
    /// Where the live contents of logical block 0 are during the checkpoint (SECTOR0_CURRENT).
    pub sector0: Sectors,
}

impl LogHeader {
    /// A fresh version-1.0 header as the kernel's `prepare_log` fills it.
    pub fn new(block_size: BlockSize, sequence: u32, sector0: Sectors) -> LogHeader {
        LogHeader {
            magic: Magic::Bow,
            header_version: HEADER_VERSION_1_0,
            header_size: HEADER_SIZE_V1_0,
            block_size: block_size.bytes(),
            count: 0,
            sequence,
            sector0,
        }
    }

    /// Decodes the first 28 bytes without any range checks beyond the magic (vold reads the
    /// "original header" this way before anything else).
    pub fn decode(buf: &[u8]) -> Result<LogHeader, FormatError> {
        let h: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FormatError::BufferSize { len: buf.len(), expected: HEADER_LEN })?;
        let magic_value = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let magic = Magic::from_value(magic_value).ok_or(FormatError::NoMagic(magic_value))?;
        Ok(LogHeader {
            magic,
            header_version: u16::from_le_bytes([h[4], h[5]]),
            header_size: u16::from_le_bytes([h[6], h[7]]),
            block_size: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            count: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
            sequence: u32::from_le_bytes([h[16], h[17], h[18], h[19]]),
            sector0: Sectors(u64::from_le_bytes([
                h[20], h[21], h[22], h[23], h[24], h[25], h[26], h[27],
            ])),
        })
    }

    /// Writes the 28 header bytes at the start of `buf`; the rest of `buf` is left as it is
    /// (the kernel rewrites its in-memory block, so stale entries survive a rollover).
    pub fn encode_into(&self, buf: &mut [u8]) {
        buf[0..4].copy_from_slice(&self.magic.value().to_le_bytes());
        buf[4..6].copy_from_slice(&self.header_version.to_le_bytes());
        buf[6..8].copy_from_slice(&self.header_size.to_le_bytes());
        buf[8..12].copy_from_slice(&self.block_size.to_le_bytes());
        buf[12..16].copy_from_slice(&self.count.to_le_bytes());
        buf[16..20].copy_from_slice(&self.sequence.to_le_bytes());
        buf[20..28].copy_from_slice(&self.sector0.0.to_le_bytes());
    }

    /// The validated block size.
    pub fn checked_block_size(&self) -> Result<BlockSize, FormatError> {
        BlockSize::new(self.block_size).ok_or(FormatError::BlockSize(self.block_size))
    }
}

/// One backup record (`struct log_entry`): `size` bytes that belong at `source` are saved at
/// `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct LogEntry {
    pub source: Sectors,
    pub dest: Sectors,
    pub size: u32,
    /// CRC of the saved data seeded with the source block index; 0 = not checked.
    pub checksum: u32,
}

impl LogEntry {
    /// Decodes 24 bytes.
    pub fn decode(b: &[u8; ENTRY_SIZE]) -> LogEntry {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        LogEntry {
            source: Sectors(u64_at(0)),
            dest: Sectors(u64_at(8)),
            size: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            checksum: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
        }
    }

    /// Encodes into 24 bytes.
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0u8; ENTRY_SIZE];
        out[0..8].copy_from_slice(&self.source.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.dest.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.size.to_le_bytes());
        out[20..24].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Checks the entry against the block size: whole blocks, block-aligned, no overflow.
    /// Returns the number of blocks it covers.
    pub fn check(&self, index: u32, block_size: BlockSize) -> Result<u32, FormatError> {
        let bs = block_size.bytes();
        let blocks = block_size.blocks_in(self.size).ok_or(FormatError::EntrySize {
            index,
            size: self.size,
            block_size: bs,
        })?;
        for sector in [self.source, self.dest] {
            if block_size.block_of_sector(sector).is_none() {
                return Err(FormatError::Misaligned { index, sector: sector.0, block_size: bs });
            }
            let len = u64::from(self.size) / crate::units::SECTOR_SIZE;
            sector
                .0
                .checked_add(len)
                .and_then(|end| Sectors(end).to_bytes())
                .ok_or(FormatError::Overflow { index })?;
        }
        Ok(blocks)
    }
}

/// A whole log sector: header plus its `count` valid entries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogSector {
    pub header: LogHeader,
    pub entries: Vec<LogEntry>,
}

impl LogSector {
    /// Parses one block read from "sector 0" with every check vold makes (and the ones vold
    /// misses, vold-checkpoint.md §5.5): magic, block size in range and equal to the buffer,
    /// `28 ≤ header_size ≤ block_size`, `1 ≤ count ≤ max`, and each entry whole, aligned and
    /// free of overflow.
    pub fn parse(buf: &[u8]) -> Result<LogSector, FormatError> {
        let header = LogHeader::decode(buf)?;
        let block_size = header.checked_block_size()?;
        if buf.len() != block_size.as_usize() {
            return Err(FormatError::BufferSize {
                len: buf.len(),
                expected: block_size.as_usize(),
            });
        }
        if header.header_size < HEADER_SIZE_V1_0
            || u32::from(header.header_size) > header.block_size
        {
            return Err(FormatError::HeaderSize {
                header_size: header.header_size,
                block_size: header.block_size,
            });
        }
        let max = max_entries(header.block_size, header.header_size);
        if header.count == 0 || header.count > max {
            return Err(FormatError::Count { count: header.count, max });
        }
        let start = usize::from(header.header_size);
        let mut entries = Vec::with_capacity(header.count as usize);
        for index in 0..header.count {
            let at = start + index as usize * ENTRY_SIZE;
            let raw: &[u8; ENTRY_SIZE] = buf[at..at + ENTRY_SIZE].try_into().map_err(|_| {
                FormatError::BufferSize { len: buf.len(), expected: at + ENTRY_SIZE }
            })?;
            let entry = LogEntry::decode(raw);
            entry.check(index, block_size)?;
            entries.push(entry);
        }
        Ok(LogSector { header, entries })
    }

    /// Encodes into a fresh zeroed block, with `count` set from `entries`.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.header.block_size as usize];
        let mut header = self.header;
        header.count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        header.encode_into(&mut buf);
        let start = usize::from(header.header_size);
        for (i, e) in self.entries.iter().enumerate() {
            let at = start + i * ENTRY_SIZE;
            buf[at..at + ENTRY_SIZE].copy_from_slice(&e.encode());
        }
        buf
    }
}

/// Writes entry `index` of a log sector in place (the kernel's `add_log_entry`).
pub fn write_entry(buf: &mut [u8], header_size: u16, index: u32, entry: &LogEntry) {
    let at = usize::from(header_size) + index as usize * ENTRY_SIZE;
    buf[at..at + ENTRY_SIZE].copy_from_slice(&entry.encode());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block 0 of the worked example, dm-bow-format.md §9 (bytes 0x00–0x4B, rest zero).
    const WORKED_EXAMPLE_HEAD: [u8; 0x4C] = [
        0x42, 0x4f, 0x57, 0x00, 0x00, 0x01, 0x1c, 0x00, 0x00, 0x10, 0x00, 0x00, 0x02, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x58, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x10, 0x00, 0x00, 0x2d, 0xb8, 0xa0, 0x92, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x60, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x66, 0x4e, 0xce,
        0x8c,
    ];

    fn worked_example_block() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..WORKED_EXAMPLE_HEAD.len()].copy_from_slice(&WORKED_EXAMPLE_HEAD);
        b
    }

    fn worked_example_sector() -> LogSector {
        LogSector {
            header: LogHeader { count: 2, ..LogHeader::new(BlockSize::B4096, 0, Sectors(80)) },
            entries: vec![
                LogEntry {
                    source: Sectors(0),
                    dest: Sectors(88),
                    size: 4096,
                    checksum: 0x92A0_B82D,
                },
                LogEntry {
                    source: Sectors(24),
                    dest: Sectors(96),
                    size: 4096,
                    checksum: 0x8CCE_4E66,
                },
            ],
        }
    }

    #[test]
    fn worked_example_parses_and_encodes_byte_exact() {
        let block = worked_example_block();
        assert_eq!(LogSector::parse(&block).unwrap(), worked_example_sector());
        assert_eq!(worked_example_sector().encode(), block);
    }

    #[test]
    fn magic_bytes_and_values() {
        assert_eq!(MAGIC_BOW.to_le_bytes(), *b"BOW\0");
        assert_eq!(MAGIC_WOB.to_le_bytes(), *b"WOB\0");
        let mut block = worked_example_block();
        block[..4].copy_from_slice(b"WOB\0");
        assert_eq!(LogSector::parse(&block).unwrap().header.magic, Magic::Wob);
    }

    #[test]
    fn malformed_sectors_are_typed_errors() {
        let good = worked_example_block();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            LogSector::parse(&b).unwrap_err()
        };
        assert_eq!(with(&|b| b[0] = b'X'), FormatError::NoMagic(0x0057_4f58));
        assert_eq!(
            with(&|b| b[8..12].copy_from_slice(&3000u32.to_le_bytes())),
            FormatError::BlockSize(3000)
        );
        assert!(matches!(with(&|b| b.truncate(2048)), FormatError::BufferSize { .. }));
        assert!(matches!(with(&|b| b[6] = 27), FormatError::HeaderSize { .. }));
        assert!(matches!(
            with(&|b| b[6..8].copy_from_slice(&5000u16.to_le_bytes())),
            FormatError::HeaderSize { .. }
        ));
        assert_eq!(with(&|b| b[12] = 0), FormatError::Count { count: 0, max: 169 });
        assert_eq!(with(&|b| b[12] = 170), FormatError::Count { count: 170, max: 169 });
        // Entry 1 size 100: not whole blocks.
        assert!(matches!(
            with(&|b| b[0x44..0x48].copy_from_slice(&100u32.to_le_bytes())),
            FormatError::EntrySize { index: 1, .. }
        ));
        // Entry 1 source at sector 25: not aligned.
        assert!(matches!(with(&|b| b[0x34] = 25), FormatError::Misaligned { index: 1, .. }));
        // Entry 0 dest near u64::MAX: overflows.
        assert!(matches!(
            with(&|b| b[0x24..0x2c].copy_from_slice(&(u64::MAX - 7).to_le_bytes())),
            FormatError::Overflow { index: 0 }
        ));
        assert!(matches!(LogSector::parse(&[0u8; 10]), Err(FormatError::BufferSize { .. })));
    }

    #[test]
    fn parse_never_panics_on_garbage() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in [0usize, 1, 27, 28, 29, 512, 4096, 5000] {
            for _ in 0..200 {
                let mut buf = vec![0u8; len];
                for byte in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x.to_le_bytes()[0];
                }
                if len >= 4 {
                    buf[..4].copy_from_slice(b"BOW\0");
                }
                let _ = LogSector::parse(&buf);
            }
        }
    }
}
