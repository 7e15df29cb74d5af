//! Block-device ioctls (`include/uapi/linux/fs.h`): size, discard, buffer flush, block sizes.

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;

use crate::error::ErrorKind;
use crate::units::Bytes;

const BLK_TYPE: u8 = 0x12;

// Each ioctl declared once.
// BLKGETSIZE64 = _IOR(0x12, 114, size_t): device size in bytes.
nix::ioctl_read!(blk_getsize64, BLK_TYPE, 114, u64);
// BLKFLSBUF = _IO(0x12, 97): write back and drop the buffer cache of the device.
nix::ioctl_none!(blk_flsbuf, BLK_TYPE, 97);
// BLKDISCARD = _IO(0x12, 119), argument u64[2] = {offset, length} in bytes.
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(BLK_TYPE, 119), [u64; 2]);
// BLKSSZGET = _IO(0x12, 104), argument int*: logical block size.
nix::ioctl_read_bad!(blk_sszget, nix::request_code_none!(BLK_TYPE, 104), libc::c_int);
// BLKPBSZGET = _IO(0x12, 123), argument unsigned int*: physical block size.
nix::ioctl_read_bad!(blk_pbszget, nix::request_code_none!(BLK_TYPE, 123), libc::c_uint);

/// A block-device ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {errno}")]
pub struct BlkError {
    /// The ioctl.
    pub op: &'static str,
    /// The kernel's errno.
    pub errno: Errno,
}

impl BlkError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::from_errno(self.errno)
    }
}

fn err(op: &'static str) -> impl FnOnce(Errno) -> BlkError {
    move |errno| BlkError { op, errno }
}

/// `BLKGETSIZE64`: the device's size.
pub fn size(dev: impl AsFd) -> Result<Bytes, BlkError> {
    let mut v: u64 = 0;
    // SAFETY: the fd is borrowed for the call; `v` is a valid u64 the kernel writes.
    unsafe { blk_getsize64(dev.as_fd().as_raw_fd(), &mut v) }.map_err(err("BLKGETSIZE64"))?;
    Ok(Bytes::new(v))
}

/// `BLKDISCARD`: discards `[offset, offset + len)` (both multiples of the logical block size).
pub fn discard(dev: impl AsFd, offset: Bytes, len: Bytes) -> Result<(), BlkError> {
    let range = [offset.get(), len.get()];
    // SAFETY: the fd is borrowed for the call; `range` is a valid u64[2] the kernel reads.
    unsafe { blk_discard(dev.as_fd().as_raw_fd(), &range) }.map_err(err("BLKDISCARD"))?;
    Ok(())
}

/// `BLKFLSBUF`: writes back and invalidates the device's buffer cache.
pub fn flush_buffers(dev: impl AsFd) -> Result<(), BlkError> {
    // SAFETY: the fd is borrowed for the call; the ioctl takes no argument.
    unsafe { blk_flsbuf(dev.as_fd().as_raw_fd()) }.map_err(err("BLKFLSBUF"))?;
    Ok(())
}

/// `BLKSSZGET`: logical block size in bytes.
pub fn logical_block_size(dev: impl AsFd) -> Result<u32, BlkError> {
    let mut v: libc::c_int = 0;
    // SAFETY: the fd is borrowed for the call; `v` is a valid int the kernel writes.
    unsafe { blk_sszget(dev.as_fd().as_raw_fd(), &mut v) }.map_err(err("BLKSSZGET"))?;
    u32::try_from(v).map_err(|_| BlkError { op: "BLKSSZGET", errno: Errno::ERANGE })
}

/// `BLKPBSZGET`: physical block size in bytes.
pub fn physical_block_size(dev: impl AsFd) -> Result<u32, BlkError> {
    let mut v: libc::c_uint = 0;
    // SAFETY: the fd is borrowed for the call; `v` is a valid unsigned int the kernel writes.
    unsafe { blk_pbszget(dev.as_fd().as_raw_fd(), &mut v) }.map_err(err("BLKPBSZGET"))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn request_codes_match_the_kernel() {
        // _IOR(0x12, 114, size_t) = (2 << 30) | (8 << 16) | (0x12 << 8) | 114.
        assert_eq!(nix::request_code_read!(0x12, 114, 8), 0x8008_1272);
        assert_eq!(nix::request_code_none!(0x12, 119), 0x1277);
        assert_eq!(nix::request_code_none!(0x12, 97), 0x1261);
        assert_eq!(nix::request_code_none!(0x12, 104), 0x1268);
        assert_eq!(nix::request_code_none!(0x12, 123), 0x127b);
    }

    #[test]
    fn ioctls_on_a_regular_file_fail_with_enotty() {
        let f = tempfile::tempfile().unwrap();
        let e = super::size(&f).unwrap_err();
        assert_eq!(e.errno, nix::errno::Errno::ENOTTY);
        assert_eq!(e.kind(), crate::error::ErrorKind::Unsupported);
    }
}
