//! Saved copies that validation read and checked, kept in memory for the apply.
//!
//! Validation must read every saved copy before anything is written (to check its CRC). When
//! they fit in [`super::RestoreOptions::memory_budget`], the apply writes these very buffers
//! instead of reading the copies a second time: the device sees only the writes, and the bytes
//! written are exactly the bytes whose CRCs passed. Nothing writes to the device between
//! validation and apply, so a kept block equals the device's block at that address. A copy not
//! kept (over the budget, checksum 0, or split across two reads) is read from the device.

#[cfg(test)]
use super::validate::validate_keeping;
use crate::device::IoBuf;

/// A physically contiguous range of kept blocks.
#[derive(Debug, Clone, Copy)]
struct KeptRange {
    first: u64,
    blocks: u64,
    buf: usize,
    offset: usize,
}

/// Kept saved copies, looked up by physical block.
#[derive(Debug, Default)]
pub(super) struct KeptCopies {
    /// Sorted by `first` once [`KeptCopies::seal`] ran.
    ranges: Vec<KeptRange>,
    bufs: Vec<IoBuf>,
    bytes: usize,
}

impl KeptCopies {
    /// Keeps `buf`, which holds the physical `ranges` as (first block, blocks, byte offset).
    pub(super) fn add(&mut self, ranges: &[(u64, u64, usize)], buf: IoBuf) {
        let index = self.bufs.len();
        self.bytes += buf.len();
        self.bufs.push(buf);
        self.ranges.extend(ranges.iter().map(|&(first, blocks, offset)| KeptRange {
            first,
            blocks,
            buf: index,
            offset,
        }));
    }

    /// Sorts the ranges for lookups.
    pub(super) fn seal(&mut self) {
        self.ranges.sort_unstable_by_key(|r| r.first);
    }

    /// Bytes held.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The kept bytes of physical blocks `[first, first + blocks)`, if one kept range holds
    /// them all. (Ranges of different reads may overlap; only the one starting last at or
    /// before `first` is tried, and a miss just means a read from the device.)
    pub(super) fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]> {
        let i = self.ranges.partition_point(|r| r.first <= first).checked_sub(1)?;
        let r = self.ranges[i];
        if first.checked_add(blocks)? > r.first + r.blocks {
            return None;
        }
        let from = r.offset + usize::try_from((first - r.first) * block_size).ok()?;
        let len = usize::try_from(blocks * block_size).ok()?;
        self.bufs[r.buf].as_slice().get(from..from.checked_add(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, DeviceError, MemDevice};
    use crate::restore::synth::LogWriter;
    use crate::restore::{restore, validate, RestoreOptions, RestoreOutcome};
    use crate::units::BlockSize;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts the bytes read.
    struct Counting {
        inner: MemDevice,
        read: AtomicU64,
    }

    impl BlockDevice for Counting {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            self.inner.flush()
        }
    }

    /// A checkpointed 1 MiB image: 40 blocks overwritten, some twice, and block 0.
    fn checkpointed() -> Vec<u8> {
        let bs = 4096;
        let image: Vec<u8> =
            (0..256 * bs).map(|i| u8::try_from(i * 7 / bs % 251).unwrap()).collect();
        let dev = MemDevice::from_bytes(image);
        let free: Vec<u64> = (128..256).collect();
        let mut w = LogWriter::start(&dev, BlockSize::B4096, &free).unwrap();
        for round in 0..2u8 {
            for b in (1..80).step_by(2) {
                w.write(b, &vec![0xA0 + round; bs]).unwrap();
            }
        }
        w.write(0, &vec![0x55; bs]).unwrap();
        dev.snapshot()
    }

    #[test]
    fn kept_copies_equal_the_device_and_save_the_second_read() {
        let image = checkpointed();
        let dev = MemDevice::from_bytes(image.clone());
        let (log, kept) = validate_keeping(&dev, 4, usize::MAX, &mut |_| {}).unwrap();
        assert!(kept.bytes() >= 40 * 4096, "kept {} bytes", kept.bytes());
        let mut hits = 0;
        for c in &log.plan.copies {
            if let Some(data) = kept.get(c.source, c.blocks, 4096) {
                let mut want = vec![0u8; data.len()];
                dev.read_at(&mut want, c.source * 4096).unwrap();
                assert!(data == want.as_slice(), "kept copy of block {} differs", c.source);
                hits += 1;
            }
        }
        assert_eq!(hits, log.plan.copies.len(), "every checked copy is kept");
        // A budget smaller than one read keeps nothing.
        let (_, none) = validate_keeping(&dev, 4, 4096, &mut |_| {}).unwrap();
        assert_eq!(none.bytes(), 0);

        // Restoring with and without the budget: the same bytes, fewer bytes read.
        let mut results = Vec::new();
        for budget in [0, RestoreOptions::default().memory_budget] {
            let dev =
                Counting { inner: MemDevice::from_bytes(image.clone()), read: AtomicU64::new(0) };
            let opts = RestoreOptions { memory_budget: budget, ..RestoreOptions::default() };
            let report = restore(&dev, &opts, &mut |_| {}).unwrap();
            assert!(matches!(report.outcome, RestoreOutcome::Restored { .. }));
            assert!(validate(&dev.inner).is_err(), "no log left");
            results.push((dev.inner.snapshot(), dev.read.load(Ordering::Relaxed)));
        }
        assert!(results[0].0 == results[1].0, "same bytes with and without kept copies");
        let saved = results[0].1 - results[1].1;
        assert!(saved >= 40 * 4096, "read {} vs {} bytes", results[0].1, results[1].1);
    }

    #[test]
    fn lookups_hit_inside_one_range_and_miss_across_or_outside() {
        let mut kept = KeptCopies::default();
        let mut a = IoBuf::new(3 * 16);
        a.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = u8::try_from(i).unwrap());
        // Blocks 10..12 at offset 0, block 20 at offset 32 (block size 16).
        kept.add(&[(10, 2, 0), (20, 1, 32)], a);
        let mut b = IoBuf::new(16);
        b.as_mut_slice().fill(0xEE);
        kept.add(&[(12, 1, 0)], b);
        kept.seal();
        assert_eq!(kept.bytes(), 64);
        assert_eq!(kept.get(11, 1, 16).unwrap(), &(16u8..32).collect::<Vec<_>>()[..]);
        assert_eq!(kept.get(20, 1, 16).unwrap()[0], 32);
        assert_eq!(kept.get(12, 1, 16).unwrap(), &[0xEE; 16][..]);
        assert!(kept.get(11, 2, 16).is_none(), "spans two reads");
        assert!(kept.get(9, 1, 16).is_none());
        assert!(kept.get(13, 1, 16).is_none());
        assert!(kept.get(u64::MAX, 2, 16).is_none());
        assert!(KeptCopies::default().get(0, 1, 16).is_none());
    }
}
