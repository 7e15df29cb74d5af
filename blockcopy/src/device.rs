//! The one I/O abstraction of the pure crates: a block device read and written at byte offsets.
//!
//! Everything that touches a disk — the dm-bow engine model and restore, the copy engine, the
//! dm-snapshot merge — is generic over [`BlockDevice`], so every algorithm runs in memory in
//! tests and on a real device or image file in production. Methods take `&self` so a restore can keep several I/Os in
//! flight from several threads; implementations synchronise internally.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Why an I/O on a [`BlockDevice`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The range `[offset, offset + len)` is not inside the device.
    #[error("I/O at offset {offset} length {len} is outside the device of {size} bytes")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    /// The underlying file or device failed.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The range `[offset, offset + len)` of an [`crate::ExtentDevice`] is not covered by its
    /// extent map (a hole).
    #[error("I/O at offset {offset} length {len} falls in a hole of the extent map")]
    Unmapped { offset: u64, len: usize },
    /// A fault injected by a test device (crash simulation).
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

/// A block device addressed in bytes.
pub trait BlockDevice: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    /// Writes all of `buf` at `offset`. Not durable until [`BlockDevice::flush`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Makes every completed write durable (a cache flush, `fdatasync`).
    fn flush(&self) -> Result<(), DeviceError>;
}

#[inline]
fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    let end = u64::try_from(len).ok().and_then(|l| offset.checked_add(l));
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

#[inline]
fn index(offset: u64) -> usize {
    // Offsets were range-checked against an in-memory buffer, so they fit in usize.
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// A device in memory. Writes are durable at once (see [`crate::crashdev`] for a device that
/// forgets unflushed writes).
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: usize) -> MemDevice {
        MemDevice { data: RwLock::new(vec![0; size]) }
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemDevice {
        MemDevice { data: RwLock::new(bytes) }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        let len = self.data.read().unwrap_or_else(|e| e.into_inner()).len();
        u64::try_from(len).unwrap_or(u64::MAX)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), u64::try_from(data.len()).unwrap_or(u64::MAX))?;
        let at = index(offset);
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), u64::try_from(data.len()).unwrap_or(u64::MAX))?;
        let at = index(offset);
        data[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The alignment of buffer addresses, lengths and offsets that direct reads need: 4096 covers
/// devices with 512-byte and 4 KiB logical blocks.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A block device node or an image file, through positioned reads and writes.
///
/// Writes always go through the page cache (one `fdatasync` per flush lets the block layer
/// sort and merge them). Reads may bypass it ([`FileDevice::with_direct_reads`]): a restore
/// reads each saved copy once, so caching them only costs a copy and memory.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// A second descriptor opened with `O_DIRECT`, used for aligned reads.
    direct: Option<File>,
    path: Option<PathBuf>,
    size: u64,
}

impl FileDevice {
    /// Opens `path` read-write. The size is taken by seeking to the end, which works for block
    /// devices and regular files alike.
    pub fn open(path: &Path) -> Result<FileDevice, DeviceError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DeviceError::Io { offset: 0, source })?;
        Ok(FileDevice { path: Some(path.to_owned()), ..FileDevice::from_file(file)? })
    }

    /// Opens `path` read-only: writes fail (for inspection and dry runs).
    pub fn open_read_only(path: &Path) -> Result<FileDevice, DeviceError> {
        let file = File::open(path).map_err(|source| DeviceError::Io { offset: 0, source })?;
        Ok(FileDevice { path: Some(path.to_owned()), ..FileDevice::from_file(file)? })
    }

    /// Wraps an open file.
    pub fn from_file(mut file: File) -> Result<FileDevice, DeviceError> {
        use std::io::{Seek, SeekFrom};
        let size =
            file.seek(SeekFrom::End(0)).map_err(|source| DeviceError::Io { offset: 0, source })?;
        Ok(FileDevice { file, direct: None, path: None, size })
    }

    /// Reads whose buffer address, length and offset are multiples of [`DIRECT_IO_ALIGN`] (see
    /// [`IoBuf`]) bypass the page cache from now on. Where the file system refuses `O_DIRECT`
    /// (tmpfs) or the device was not opened by path, reads stay buffered:
    /// [`FileDevice::direct_reads`] says which. Writes stay buffered either way; a direct read
    /// of a block with unflushed buffered writes sees them (the kernel writes the range back
    /// before reading it directly).
    #[must_use]
    pub fn with_direct_reads(mut self) -> FileDevice {
        if let Some(path) = &self.path {
            self.direct =
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
        }
        self
    }

    /// Whether aligned reads bypass the page cache.
    pub fn direct_reads(&self) -> bool {
        self.direct.is_some()
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        check_range(offset, buf.len(), self.size)?;
        if let Some(direct) = &self.direct {
            let aligned = (buf.as_ptr() as usize) % DIRECT_IO_ALIGN == 0
                && buf.len() % DIRECT_IO_ALIGN == 0
                && offset % DIRECT_IO_ALIGN as u64 == 0;
            // A refused direct read (a device whose logical blocks are larger than the
            // alignment, a short read at the end of a file) is retried through the cache.
            if aligned && direct.read_exact_at(buf, offset).is_ok() {
                return Ok(());
            }
        }
        self.file.read_exact_at(buf, offset).map_err(|source| DeviceError::Io { offset, source })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        check_range(offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset).map_err(|source| DeviceError::Io { offset, source })
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file.sync_data().map_err(|source| DeviceError::Io { offset: 0, source })
    }
}

/// A byte buffer whose start is aligned to [`DIRECT_IO_ALIGN`], so reads into it can bypass
/// the page cache. Reusing one keeps its (already faulted-in) memory.
#[derive(Debug, Default)]
pub struct IoBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// An aligned buffer of `len` zero bytes.
    pub fn new(len: usize) -> IoBuf {
        let mut buf = IoBuf::default();
        buf.set_len(len);
        buf
    }

    /// Makes the buffer `len` bytes long, keeping the allocation when it is large enough. The
    /// contents are unspecified (old bytes or zeros): callers fill it by reading.
    #[inline]
    pub fn set_len(&mut self, len: usize) {
        // `start` stays right for `raw`: the allocation never moves without being replaced.
        let fits = self.raw.len() >= self.start.saturating_add(len);
        if !fits {
            self.raw = vec![0; len.saturating_add(DIRECT_IO_ALIGN)];
            self.start = self.raw.as_ptr().align_offset(DIRECT_IO_ALIGN);
        }
        self.len = len;
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(dev: &dyn BlockDevice) {
        assert_eq!(dev.size(), 8192);
        dev.write_at(&[7; 100], 4000).unwrap();
        let mut buf = [0u8; 100];
        dev.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [7; 100]);
        dev.flush().unwrap();
        assert!(matches!(dev.read_at(&mut buf, 8150), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(dev.write_at(&buf, u64::MAX - 3), Err(DeviceError::OutOfRange { .. })));
    }

    #[test]
    fn mem_device_reads_back_and_bounds_checks() {
        exercise(&MemDevice::new(8192));
    }

    #[test]
    fn file_device_reads_back_and_bounds_checks() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(8192).unwrap();
        exercise(&FileDevice::open(tmp.path()).unwrap());
    }

    #[test]
    fn direct_reads_see_buffered_writes_and_fall_back_when_unaligned() {
        // Where the file system refuses O_DIRECT (tmpfs) this checks the buffered fallback.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = FileDevice::open(tmp.path()).unwrap().with_direct_reads();
        println!("direct reads available: {}", dev.direct_reads());
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&pattern, 8192).unwrap();
        // Not flushed: the direct read must still see the write.
        let mut aligned = IoBuf::new(8192);
        assert_eq!(aligned.as_slice().as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        dev.read_at(aligned.as_mut_slice(), 8192).unwrap();
        assert_eq!(aligned.as_slice(), &pattern[..]);
        // Unaligned length and offset: buffered.
        let mut small = [0u8; 100];
        dev.read_at(&mut small, 8192 + 7).unwrap();
        assert_eq!(&small[..], &pattern[7..107]);
        // Reused buffers keep alignment and length.
        aligned.set_len(4096);
        assert_eq!(aligned.len(), 4096);
        assert_eq!(aligned.as_slice().as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        dev.read_at(aligned.as_mut_slice(), 12288).unwrap();
        assert_eq!(aligned.as_slice(), &pattern[4096..]);
        assert!(matches!(
            dev.read_at(aligned.as_mut_slice(), 1 << 20),
            Err(DeviceError::OutOfRange { .. })
        ));
    }
}
