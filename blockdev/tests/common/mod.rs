//! Helpers shared by the VM tests of this crate (guest side).
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use blockdev::loopdev::{LoopDevice, LoopOptions};
use testbench::Failed;

/// Modules every blockdev VM test loads.
pub const MODULES: &[&str] = &["loop", "dm-mod"];

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// A zeroed, 4096-aligned buffer for O_DIRECT I/O.
pub struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Self { buf, off, len }
    }
    pub fn filled(len: usize, seed: u8) -> Self {
        let mut a = Self::new(len);
        for (i, b) in a.as_mut().iter_mut().enumerate() {
            *b = seed ^ u8::try_from(i % 251).unwrap_or(0);
        }
        a
    }
    pub fn as_ref(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Opens a block device (or file) with O_DIRECT.
pub fn open_direct(path: &Path, write: bool) -> Result<File, Failed> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {} O_DIRECT: {e}", path.display()).into())
}

/// Reads `len` bytes at `offset` with O_DIRECT.
pub fn read_direct(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, Failed> {
    let f = open_direct(path, false)?;
    let mut a = Aligned::new(len);
    f.read_exact_at(a.as_mut(), offset)?;
    Ok(a.as_ref().to_vec())
}

/// Writes `data` at `offset` with O_DIRECT (data length a multiple of 512).
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) -> Result<(), Failed> {
    let f = open_direct(path, true)?;
    let mut a = Aligned::new(data.len());
    a.as_mut().copy_from_slice(data);
    f.write_all_at(a.as_ref(), offset)?;
    Ok(())
}

/// Writes with O_DIRECT, returning the OS error (to check errnos).
pub fn try_write_direct(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    let mut a = Aligned::new(data.len());
    a.as_mut().copy_from_slice(data);
    f.write_all_at(a.as_ref(), offset)
}

/// A sparse backing file under /dev/shm of `size` bytes, attached to a loop device.
pub fn loop_file(name: &str, size: u64, opts: &LoopOptions) -> Result<(File, LoopDevice), Failed> {
    let path = Path::new("/dev/shm").join(name);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(size)?;
    let dev = LoopDevice::attach(&file, opts)?;
    Ok((file, dev))
}

/// A 4 KiB test pattern.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed ^ u8::try_from(i % 251).unwrap_or(0)).collect()
}
