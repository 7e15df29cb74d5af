//! Units of the dm-bow log: 512-byte sectors, and the log's block size.
//!
//! The log stores positions in 512-byte sectors and sizes in bytes; everything the engine does
//! happens in whole blocks of `block_size` bytes. Conversions are checked: a value that does not
//! fit, or does not fall on a block boundary, is an error, never a silent truncation.

use std::fmt;

/// Bytes in one sector, the unit of `source`, `dest` and `sector0` in the log.
pub const SECTOR_SIZE: u64 = 512;

/// A position or length in 512-byte sectors: the one `Sectors` of the project (`blockdev`
/// re-exports it for device-mapper tables, where `Display` is the plain number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Sectors(pub u64);

impl Sectors {
    /// `n` sectors.
    pub const fn new(n: u64) -> Self {
        Sectors(n)
    }

    /// The count.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The byte offset of this sector, or `None` on overflow.
    pub fn to_bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Sectors) -> Option<Sectors> {
        self.0.checked_add(other.0).map(Sectors)
    }

    /// `self - other`, or `None` below zero.
    pub fn checked_sub(self, other: Sectors) -> Option<Sectors> {
        self.0.checked_sub(other.0).map(Sectors)
    }
}

/// The plain number, as device-mapper table lines and the log's inspection print it.
impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Sectors {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Sectors)
    }
}

/// The dm-bow block size: a power of two from 512 to 4096 bytes (dm-bow-format.md §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// 4096 bytes, what Android forces for dm-default-key v2 devices.
    pub const B4096: BlockSize = BlockSize(4096);
    /// 512 bytes, the smallest size the kernel accepts.
    pub const B512: BlockSize = BlockSize(512);

    /// Validates a block size as the kernel's constructor does: power of two, 512..=4096.
    pub fn new(bytes: u32) -> Option<BlockSize> {
        (bytes.is_power_of_two() && (512..=4096).contains(&bytes)).then_some(BlockSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes as a `usize` (always fits: at most 4096).
    pub fn as_usize(self) -> usize {
        // The constructor bounds the value to 4096, which fits every usize.
        self.0 as usize
    }

    /// Sectors per block (1 to 8).
    pub fn sectors(self) -> u64 {
        u64::from(self.0) / SECTOR_SIZE
    }

    /// The block index that holds `sector`, if the sector is the first of a block.
    pub fn block_of_sector(self, sector: Sectors) -> Option<u64> {
        (sector.0 % self.sectors() == 0).then(|| sector.0 / self.sectors())
    }

    /// The first sector of block `block`, or `None` on overflow.
    pub fn sector_of_block(self, block: u64) -> Option<Sectors> {
        block.checked_mul(self.sectors()).map(Sectors)
    }

    /// The byte offset of block `block`, or `None` on overflow.
    pub fn offset_of_block(self, block: u64) -> Option<u64> {
        block.checked_mul(u64::from(self.0))
    }

    /// How many whole blocks `bytes` is, if it is a non-zero multiple of the block size.
    pub fn blocks_in(self, bytes: u32) -> Option<u32> {
        (bytes != 0 && bytes % self.0 == 0).then(|| bytes / self.0)
    }

    /// The most log entries one log sector of this size holds: ⌊(block_size − 28) / 24⌋
    /// (dm-bow-format.md §4.3: 512 → 20, 1024 → 41, 2048 → 84, 4096 → 169).
    pub fn max_entries(self) -> u32 {
        max_entries(self.0, crate::format::HEADER_SIZE_V1_0)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// Entries that fit in a log sector of `block_size` bytes whose entries start at `header_size`.
pub fn max_entries(block_size: u32, header_size: u16) -> u32 {
    block_size.saturating_sub(u32::from(header_size)) / crate::format::ENTRY_SIZE_U32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_accepts_only_kernel_values() {
        for ok in [512, 1024, 2048, 4096] {
            assert_eq!(BlockSize::new(ok).map(BlockSize::bytes), Some(ok));
        }
        for bad in [0, 256, 511, 513, 3000, 8192, u32::MAX] {
            assert_eq!(BlockSize::new(bad), None, "{bad}");
        }
    }

    #[test]
    fn max_entries_match_the_spec_table() {
        let got: Vec<u32> = [512, 1024, 2048, 4096]
            .iter()
            .map(|&b| BlockSize::new(b).unwrap().max_entries())
            .collect();
        assert_eq!(got, vec![20, 41, 84, 169]);
    }

    #[test]
    fn sector_block_conversions_are_checked() {
        let bs = BlockSize::B4096;
        assert_eq!(bs.block_of_sector(Sectors(24)), Some(3));
        assert_eq!(bs.block_of_sector(Sectors(25)), None);
        assert_eq!(bs.sector_of_block(3), Some(Sectors(24)));
        assert_eq!(bs.sector_of_block(u64::MAX), None);
        assert_eq!(bs.blocks_in(8192), Some(2));
        assert_eq!(bs.blocks_in(0), None);
        assert_eq!(bs.blocks_in(4097), None);
        assert_eq!(Sectors(u64::MAX).to_bytes(), None);
    }
}
