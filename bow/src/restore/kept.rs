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
use crate::device::{BlockDevice, DeviceError, IoBuf};

/// Largest single read of a merged range (a sequential range is read whole: splitting it into
/// reads in flight together was slower on the development disk).
pub(super) const READ_CHUNK: u64 = 4 << 20;

/// Physical blocks read into one buffer: the union of some block ranges, sorted and merged,
/// each merged range read in pieces of at most `READ_CHUNK`.
#[derive(Debug)]
pub(super) struct MergedRead {
    /// (first block, blocks, offset in `buf`), sorted by first block, disjoint.
    ranges: Vec<(u64, u64, usize)>,
    buf: IoBuf,
}

impl MergedRead {
    /// Reads the union of the `[start, end)` block ranges into `buf` (reused when large enough).
    pub(super) fn read(
        dev: &impl BlockDevice,
        spans: impl Iterator<Item = (u64, u64)>,
        block_size: u64,
        mut buf: IoBuf,
    ) -> Result<MergedRead, DeviceError> {
        let mut spans: Vec<(u64, u64)> = spans.collect();
        spans.sort_unstable();
        let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
        let mut len = 0usize;
        let bytes = |blocks: u64| usize::try_from(blocks * block_size).unwrap_or(usize::MAX);
        for (s, e) in spans {
            match ranges.last_mut() {
                Some(last) if s <= last.0 + last.1 => {
                    let end = last.0 + last.1;
                    if e > end {
                        len += bytes(e - end);
                        last.1 = e - last.0;
                    }
                }
                _ => {
                    ranges.push((s, e - s, len));
                    len += bytes(e - s);
                }
            }
        }
        buf.set_len(len);
        let chunk = usize::try_from(READ_CHUNK.max(block_size)).unwrap_or(usize::MAX);
        let mut rest: &mut [u8] = buf.as_mut_slice();
        for &(first, blocks, _) in &ranges {
            let (mine, tail) = rest.split_at_mut(bytes(blocks));
            rest = tail;
            let mut pos = first * block_size;
            for piece in mine.chunks_mut(chunk) {
                dev.read_at(piece, pos)?;
                pos += piece.len() as u64;
            }
        }
        Ok(MergedRead { ranges, buf })
    }

    /// The bytes of physical blocks `[first, first + blocks)`, if one merged range holds them.
    pub(super) fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]> {
        let i = self.ranges.partition_point(|r| r.0 <= first).checked_sub(1)?;
        let (start, len, offset) = self.ranges[i];
        if first.checked_add(blocks)? > start + len {
            return None;
        }
        let from = offset + usize::try_from((first - start) * block_size).ok()?;
        let bytes = usize::try_from(blocks * block_size).ok()?;
        self.buf.as_slice().get(from..from.checked_add(bytes)?)
    }

    /// The buffer, to reuse.
    pub(super) fn into_buf(self) -> IoBuf {
        self.buf
    }

    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }
}

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
        self.ranges
            .extend(read.ranges.iter().map(|&(first, _, _)| KeptRange { first, read: index }));
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
    fn merged_reads_and_kept_lookups() {
        // 64 blocks of 16 bytes; byte i holds i % 251.
        let bytes: Vec<u8> = (0..64 * 16).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let dev = MemDevice::from_bytes(bytes.clone());
        let at = |b: u64| usize::try_from(b * 16).unwrap();
        let block = |b: u64, n: u64| &bytes[at(b)..at(b + n)];
        // Overlapping and touching spans merge; a gap does not.
        let spans = [(20, 21), (10, 12), (11, 12), (12, 13)].into_iter();
        let read = MergedRead::read(&dev, spans, 16, IoBuf::default()).unwrap();
        assert_eq!(read.len(), 4 * 16, "blocks 10..13 and 20, each once");
        assert_eq!(read.get(10, 3, 16).unwrap(), block(10, 3));
        assert_eq!(read.get(20, 1, 16).unwrap(), block(20, 1));
        assert!(read.get(12, 2, 16).is_none(), "13 was not read");
        assert!(read.get(9, 1, 16).is_none());
        assert!(read.get(u64::MAX, 2, 16).is_none());

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
