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
pub(super) use blockcopy::merged::{MergedRead, READ_CHUNK};

/// A merged range of a kept read.
#[derive(Debug, Clone, Copy)]
struct KeptRange {
    first: u64,
    read: usize,
}

/// Kept saved copies, looked up by physical block.
#[derive(Debug, Default)]
pub(super) struct KeptCopies {
    /// Sorted by `first` once [`KeptCopies::seal`] ran.
    ranges: Vec<KeptRange>,
    reads: Vec<MergedRead>,
}

impl KeptCopies {
    /// Keeps a read.
    pub(super) fn add(&mut self, read: MergedRead) {
        let index = self.reads.len();
        self.ranges.extend(read.ranges().map(|(first, _)| KeptRange { first, read: index }));
        self.reads.push(read);
    }

    /// Sorts the ranges for lookups.
    pub(super) fn seal(&mut self) {
        self.ranges.sort_unstable_by_key(|r| r.first);
    }

    /// Bytes held.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.reads.iter().map(MergedRead::len).sum()
    }

    /// The kept bytes of physical blocks `[first, first + blocks)`, if one kept range holds
    /// them all. (Ranges of different reads may overlap; only the one starting last at or
    /// before `first` is tried, and a miss just means a read from the device.)
    pub(super) fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]> {
        let i = self.ranges.partition_point(|r| r.first <= first).checked_sub(1)?;
        self.reads[self.ranges[i].read].get(first, blocks, block_size)
    }
}

/// The apply engine writes kept copies from memory.
impl blockcopy::Preloaded for KeptCopies {
    fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]> {
        KeptCopies::get(self, first, blocks, block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, DeviceError, IoBuf, MemDevice};
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
    fn kept_lookups_use_the_read_starting_last() {
        // 64 blocks of 16 bytes; byte i holds i % 251. (MergedRead itself: blockcopy.)
        let bytes: Vec<u8> = (0..64 * 16).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let dev = MemDevice::from_bytes(bytes.clone());
        let at = |b: u64| usize::try_from(b * 16).unwrap();
        let block = |b: u64, n: u64| &bytes[at(b)..at(b + n)];
        let spans = [(20, 21), (10, 12), (11, 12), (12, 13)].into_iter();
        let read = MergedRead::read(&dev, spans, 16, IoBuf::default()).unwrap();

        let mut kept = KeptCopies::default();
        kept.add(read);
        let other = MergedRead::read(&dev, [(13, 15)].into_iter(), 16, IoBuf::default()).unwrap();
        kept.add(other);
        kept.seal();
        assert_eq!(kept.bytes(), 6 * 16);
        assert_eq!(kept.get(11, 2, 16).unwrap(), block(11, 2));
        assert_eq!(kept.get(14, 1, 16).unwrap(), block(14, 1));
        assert!(kept.get(12, 2, 16).is_none(), "spans two reads");
        assert!(kept.get(15, 1, 16).is_none());
        assert!(KeptCopies::default().get(0, 1, 16).is_none());
    }
}
