//! The dm-bow checksum (dm-bow-format.md §4.4).
//!
//! The kernel uses `crc32_le`: the reflected CRC-32 polynomial 0xEDB88320 with **no** initial
//! or final inversion, seeded with the source block index and carried block by block. The
//! standard (zlib) CRC-32 inverts on the way in and out, so the kernel's value over `data` with
//! seed `s` is `zlib_crc32(data, s ^ !0) ^ !0`; `crc32fast` computes the zlib form with SIMD.

/// A running dm-bow checksum: seed it with the source block index, feed it the saved data.
#[derive(Debug, Clone)]
pub struct BowCrc(crc32fast::Hasher);

impl BowCrc {
    /// Starts a checksum with the kernel's seed (the source block index, truncated to 32 bits).
    pub fn new(seed: u32) -> BowCrc {
        BowCrc(crc32fast::Hasher::new_with_initial(!seed))
    }

    /// Folds more data in (the kernel folds one block at a time; the result is the same).
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The checksum as the kernel stores it in a log entry.
    pub fn finish(self) -> u32 {
        !self.0.finalize()
    }
}

/// The kernel's `crc32_le(seed, data)`.
pub fn bow_crc(seed: u32, data: &[u8]) -> u32 {
    let mut crc = BowCrc::new(seed);
    crc.update(data);
    crc.finish()
}

/// The seed of an entry's checksum: the source block index, truncated to 32 bits as the kernel
/// and vold do (`(u32)(source / (block_size / 512))`).
#[allow(clippy::cast_possible_truncation)] // Truncation is the on-disk contract here.
pub fn seed_for(source_block: u64) -> u32 {
    source_block as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bit-at-a-time implementation written from the definition, to check the fast one.
    fn reference(mut crc: u32, data: &[u8]) -> u32 {
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        crc
    }

    #[test]
    fn worked_example_checksums() {
        // dm-bow-format.md §9: original block 0 = 4096 × 0xAA, block 3 = 4096 × 0x33.
        assert_eq!(bow_crc(0, &[0xAA; 4096]), 0x92A0_B82D);
        assert_eq!(bow_crc(3, &[0x33; 4096]), 0x8CCE_4E66);
    }

    #[test]
    fn matches_bitwise_reference_and_carries_across_blocks() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13).to_le_bytes()[0]).collect();
        for seed in [0, 1, 3, 0xFFFF_FFFF, 123_456] {
            assert_eq!(bow_crc(seed, &data), reference(seed, &data));
            let mut split = BowCrc::new(seed);
            split.update(&data[..4096]);
            split.update(&data[4096..]);
            assert_eq!(split.finish(), reference(seed, &data));
        }
    }

    #[test]
    fn zero_block_with_seed_zero_is_zero() {
        // §4.4: an all-zero block with seed 0 yields 0, i.e. "unchecked".
        assert_eq!(bow_crc(0, &[0; 4096]), 0);
    }

    #[test]
    fn seed_truncates_to_32_bits() {
        assert_eq!(seed_for(3), 3);
        assert_eq!(seed_for((1 << 32) + 5), 5);
    }
}
