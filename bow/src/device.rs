//! The one I/O abstraction of this crate: a block device read and written at byte offsets.
//!
//! Everything that touches a disk — the engine model, the restore, the space dry-run — is
//! generic over [`BlockDevice`], so every algorithm runs in memory in tests and on a real device
//! or image file in production. Methods take `&self` so a restore can keep several I/Os in
//! flight from several threads; implementations synchronise internally.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
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

fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    let end = u64::try_from(len).ok().and_then(|l| offset.checked_add(l));
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

fn index(offset: u64) -> usize {
    // Offsets were range-checked against an in-memory buffer, so they fit in usize.
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// A device in memory. Writes are durable at once (see the crash-injecting device in tests for
/// a device that forgets unflushed writes).
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

/// A block device node or an image file, through positioned reads and writes.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
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
        FileDevice::from_file(file)
    }

    /// Opens `path` read-only: writes fail (for inspection and dry runs).
    pub fn open_read_only(path: &Path) -> Result<FileDevice, DeviceError> {
        let file = File::open(path).map_err(|source| DeviceError::Io { offset: 0, source })?;
        FileDevice::from_file(file)
    }

    /// Wraps an open file.
    pub fn from_file(mut file: File) -> Result<FileDevice, DeviceError> {
        use std::io::{Seek, SeekFrom};
        let size =
            file.seek(SeekFrom::End(0)).map_err(|source| DeviceError::Io { offset: 0, source })?;
        Ok(FileDevice { file, size })
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        check_range(offset, buf.len(), self.size)?;
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
}
