//! How the model touches the underlying device: dm-bufio for copies and the log, direct bios for
//! user I/O, in the kernel's order of writes and flushes (dm-bow-format.md §4.7).

use std::collections::HashMap;

use super::worker::{read_sources, WorkerIo};
use crate::device::{BlockDevice, DeviceError};
use crate::units::BlockSize;

/// Whether the model moves data or only tracks ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataMode {
    /// Every copy, log write and user write goes to the device (byte-exact with the kernel).
    #[default]
    Full,
    /// No data moves: the range map, the log bookkeeping and the I/O counters behave exactly as
    /// in `Full`, but nothing is read or written and checksums are 0. For the space dry run on
    /// devices too large to hold.
    RangesOnly,
}

/// How dm-bufio's cache is modelled (dm-bow-format.md §10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufioModel {
    /// Every bufio read goes to the device: the behaviour a correct implementation has, and
    /// the kernel's whenever the cached buffer was evicted (the default).
    #[default]
    Uncached,
    /// The kernel's worst case: buffers are never evicted, so a bufio read of a block that was
    /// read or written through bufio before returns that old copy even if a direct (user) write
    /// changed the block since. Only the SECTOR0_CURRENT block can be affected: its relocation
    /// and the commit copy may use stale block-0 contents.
    NeverEvict,
}

/// Counters of what the model asked of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct IoStats {
    /// Blocks read through bufio (sources of copies).
    pub bufio_read_blocks: u64,
    /// Blocks written through bufio (copies and log sectors).
    pub bufio_write_blocks: u64,
    /// Cache flushes issued by the model (`dm_bufio_write_dirty_buffers` and user flushes).
    pub flushes: u64,
    /// Writes of block 0 (one per log entry added, two per rollover).
    pub log_writes: u64,
    /// Bytes of user writes passed to the device.
    pub user_write_bytes: u64,
    /// Bytes of user reads.
    pub user_read_bytes: u64,
}

/// A device that has a size and no data: for [`DataMode::RangesOnly`], where the model never
/// reads or writes. Any I/O fails.
#[derive(Debug, Clone, Copy)]
pub struct SizeOnlyDevice {
    size: u64,
}

impl SizeOnlyDevice {
    /// A device of `size` bytes that holds nothing.
    pub fn new(size: u64) -> SizeOnlyDevice {
        SizeOnlyDevice { size }
    }
}

impl BlockDevice for SizeOnlyDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), DeviceError> {
        Err(DeviceError::Injected("size-only device holds no data"))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), DeviceError> {
        Err(DeviceError::Injected("size-only device holds no data"))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Io<D> {
    pub(crate) dev: D,
    bs: BlockSize,
    pub(crate) mode: DataMode,
    bufio: BufioModel,
    cache: HashMap<u64, Vec<u8>>,
    pub(crate) stats: IoStats,
}

impl<D: BlockDevice> Io<D> {
    pub(crate) fn new(dev: D, bs: BlockSize, mode: DataMode, bufio: BufioModel) -> Io<D> {
        Io { dev, bs, mode, bufio, cache: HashMap::new(), stats: IoStats::default() }
    }

    fn offset(&self, block: u64) -> Result<u64, DeviceError> {
        self.bs.offset_of_block(block).ok_or(DeviceError::OutOfRange {
            offset: u64::MAX,
            len: self.bs.as_usize(),
            size: self.dev.size(),
        })
    }

    fn bufio_read(&mut self, block: u64) -> Result<Vec<u8>, DeviceError> {
        self.stats.bufio_read_blocks += 1;
        if self.bufio == BufioModel::NeverEvict {
            if let Some(b) = self.cache.get(&block) {
                return Ok(b.clone());
            }
        }
        let mut buf = vec![0u8; self.bs.as_usize()];
        self.dev.read_at(&mut buf, self.offset(block)?)?;
        if self.bufio == BufioModel::NeverEvict {
            self.cache.insert(block, buf.clone());
        }
        Ok(buf)
    }

    fn bufio_write(&mut self, block: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.stats.bufio_write_blocks += 1;
        self.dev.write_at(data, self.offset(block)?)?;
        if self.bufio == BufioModel::NeverEvict {
            self.cache.insert(block, data.to_vec());
        }
        Ok(())
    }

    /// A user write submitted to the underlying device (no flush, bypasses bufio).
    pub(crate) fn direct_write(&mut self, sector: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.stats.user_write_bytes += u64::try_from(data.len()).unwrap_or(u64::MAX);
        if self.mode == DataMode::RangesOnly || data.is_empty() {
            return Ok(());
        }
        self.dev.write_at(data, sector * crate::units::SECTOR_SIZE)
    }

    /// Counts a user write of `len` bytes without data (ranges-only mode).
    pub(crate) fn count_write(&mut self, len: u64) {
        self.stats.user_write_bytes += len;
    }

    /// A user read from the underlying device. Ranges-only mode returns zeros.
    pub(crate) fn direct_read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.stats.user_read_bytes += u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.mode == DataMode::RangesOnly {
            buf.fill(0);
            return Ok(());
        }
        self.dev.read_at(buf, sector * crate::units::SECTOR_SIZE)
    }

    pub(crate) fn flush(&mut self) -> Result<(), DeviceError> {
        self.stats.flushes += 1;
        if self.mode == DataMode::RangesOnly {
            return Ok(());
        }
        self.dev.flush()
    }
}

impl<D: BlockDevice> WorkerIo for Io<D> {
    /// `copy_data`: bufio-read each source block (folding it into the CRC when `seed` is
    /// given), bufio-new the destination, then `dm_bufio_write_dirty_buffers`: all writes, then
    /// one flush. Returns the checksum (0 when not requested).
    fn copy_blocks(
        &mut self,
        src: u64,
        dst: u64,
        blocks: u64,
        seed: Option<u64>,
    ) -> Result<u32, DeviceError> {
        if self.mode == DataMode::RangesOnly {
            self.stats.bufio_read_blocks += blocks;
            self.stats.bufio_write_blocks += blocks;
            self.stats.flushes += 1;
            return Ok(0);
        }
        let (copies, checksum) = read_sources(src, blocks, seed, |b| self.bufio_read(b))?;
        for (i, data) in (0u64..).zip(copies.iter()) {
            self.bufio_write(dst + i, data)?;
        }
        self.flush()?;
        Ok(checksum)
    }

    /// The log write of `add_log_entry`: block 0 through bufio, then the flush.
    fn write_log(&mut self, log: &[u8]) -> Result<(), DeviceError> {
        self.stats.log_writes += 1;
        if self.mode == DataMode::RangesOnly {
            self.stats.bufio_write_blocks += 1;
            self.stats.flushes += 1;
            return Ok(());
        }
        self.bufio_write(0, log)?;
        self.flush()
    }
}
