//! Reading many block ranges at once: the union of the ranges, sorted and merged, read into one
//! aligned buffer, then looked up by block.
//!
//! Used by the copy engine for the copies it reads from the source device (sorted by source, a
//! group's ranges are read in one go), and by the dm-bow validation for its checksum batches
//! (whose buffers the restore may keep and hand back to the engine as [`crate::Preloaded`]
//! data).

use crate::device::{BlockDevice, DeviceError, IoBuf};

/// Largest single read of a merged range (a sequential range is read whole: splitting it into
/// reads in flight together was slower on the development disk).
pub const READ_CHUNK: u64 = 4 << 20;

/// Blocks read into one buffer: the union of some block ranges, sorted and merged, each merged
/// range read in pieces of at most [`READ_CHUNK`] bytes.
#[derive(Debug)]
pub struct MergedRead {
    /// (first block, blocks, offset in `buf`), sorted by first block, disjoint.
    ranges: Vec<(u64, u64, usize)>,
    buf: IoBuf,
}

impl MergedRead {
    /// Reads the union of the `[start, end)` block ranges into `buf` (reused when large enough).
    /// Empty ranges (`end <= start`) are ignored.
    pub fn read<B: BlockDevice + ?Sized>(
        dev: &B,
        spans: impl Iterator<Item = (u64, u64)>,
        block_size: u64,
        mut buf: IoBuf,
    ) -> Result<MergedRead, DeviceError> {
        let mut spans: Vec<(u64, u64)> = spans.filter(|(s, e)| e > s).collect();
        spans.sort_unstable();
        let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
        let mut len = 0usize;
        let bytes =
            |blocks: u64| usize::try_from(blocks.saturating_mul(block_size)).unwrap_or(usize::MAX);
        for (s, e) in spans {
            match ranges.last_mut() {
                Some(last) if s <= last.0 + last.1 => {
                    let end = last.0 + last.1;
                    if e > end {
                        len = len.saturating_add(bytes(e - end));
                        last.1 = e - last.0;
                    }
                }
                _ => {
                    ranges.push((s, e - s, len));
                    len = len.saturating_add(bytes(e - s));
                }
            }
        }
        buf.set_len(len);
        let chunk = usize::try_from(READ_CHUNK.max(block_size)).unwrap_or(usize::MAX);
        let mut rest: &mut [u8] = buf.as_mut_slice();
        for &(first, blocks, _) in &ranges {
            let (mine, tail) = rest.split_at_mut(bytes(blocks));
            rest = tail;
            let mut pos = first.saturating_mul(block_size);
            for piece in mine.chunks_mut(chunk) {
                dev.read_at(piece, pos)?;
                pos = pos.saturating_add(u64::try_from(piece.len()).unwrap_or(u64::MAX));
            }
        }
        Ok(MergedRead { ranges, buf })
    }

    /// The bytes of blocks `[first, first + blocks)`, if one merged range holds them.
    #[inline]
    pub fn get(&self, first: u64, blocks: u64, block_size: u64) -> Option<&[u8]> {
        let i = self.ranges.partition_point(|r| r.0 <= first).checked_sub(1)?;
        let (start, len, offset) = self.ranges[i];
        if first.checked_add(blocks)? > start + len {
            return None;
        }
        let from = offset + usize::try_from((first - start).checked_mul(block_size)?).ok()?;
        let bytes = usize::try_from(blocks.checked_mul(block_size)?).ok()?;
        self.buf.as_slice().get(from..from.checked_add(bytes)?)
    }

    /// The merged ranges read, as (first block, blocks), sorted and disjoint.
    #[inline]
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|&(first, blocks, _)| (first, blocks))
    }

    /// The buffer, to reuse.
    pub fn into_buf(self) -> IoBuf {
        self.buf
    }

    /// Bytes held.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    #[test]
    fn overlapping_and_touching_spans_merge_and_gaps_do_not() {
        // 64 blocks of 16 bytes; byte i holds i % 251.
        let bytes: Vec<u8> = (0..64 * 16).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let dev = MemDevice::from_bytes(bytes.clone());
        let at = |b: u64| usize::try_from(b * 16).unwrap();
        let block = |b: u64, n: u64| &bytes[at(b)..at(b + n)];
        let spans = [(20, 21), (10, 12), (11, 12), (12, 13), (30, 30)].into_iter();
        let read = MergedRead::read(&dev, spans, 16, IoBuf::default()).unwrap();
        assert_eq!(read.len(), 4 * 16, "blocks 10..13 and 20, each once; the empty span ignored");
        assert_eq!(read.ranges().collect::<Vec<_>>(), vec![(10, 3), (20, 1)]);
        assert_eq!(read.get(10, 3, 16).unwrap(), block(10, 3));
        assert_eq!(read.get(20, 1, 16).unwrap(), block(20, 1));
        assert!(read.get(12, 2, 16).is_none(), "13 was not read");
        assert!(read.get(9, 1, 16).is_none());
        assert!(read.get(u64::MAX, 2, 16).is_none());
        let buf = read.into_buf();
        assert_eq!(buf.len(), 4 * 16);
    }

    #[test]
    fn long_ranges_are_read_in_pieces_and_errors_surface() {
        let size = usize::try_from(READ_CHUNK).unwrap() * 2 + 4096;
        let bytes: Vec<u8> = (0..size).map(|i| u8::try_from(i % 253).unwrap()).collect();
        let dev = MemDevice::from_bytes(bytes.clone());
        let blocks = u64::try_from(size / 4096).unwrap();
        let read = MergedRead::read(&dev, [(0, blocks)].into_iter(), 4096, IoBuf::default());
        assert!(read.unwrap().get(0, blocks, 4096).unwrap() == bytes.as_slice());
        let past = MergedRead::read(&dev, [(blocks, blocks + 1)].into_iter(), 4096, IoBuf::new(0));
        assert!(matches!(past, Err(DeviceError::OutOfRange { .. })));
    }
}
