//! Loop devices: attach a file with `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE` (Linux 5.8+), detach
//! with `LOOP_CLR_FD` (`include/uapi/linux/loop.h`).

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::ErrorKind;
use crate::units::{Bytes, DevId};

/// The loop control node.
pub const LOOP_CONTROL: &str = "/dev/loop-control";
/// Where loop device nodes live.
#[cfg(target_os = "android")]
const LOOP_DIR: &str = "/dev/block";
#[cfg(not(target_os = "android"))]
const LOOP_DIR: &str = "/dev";

/// Attempts at the GET_FREE/CONFIGURE pair.
const ATTACH_ATTEMPTS: u32 = 10;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[allow(dead_code)] // fields are read by the kernel
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[allow(dead_code)] // fields are read by the kernel
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// Each ioctl declared once. The loop ioctls are plain numbers, not _IO* encodings.
// LOOP_CTL_GET_FREE = 0x4C82: returns a free loop number (allocating one if needed).
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
// LOOP_CONFIGURE = 0x4C0A: binds a file and sets status in one step.
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
// LOOP_CLR_FD = 0x4C01: unbinds (or, when still open elsewhere, sets autoclear).
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

/// A loop operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// Opening the control node or a loop node failed.
    #[error("open {path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path}: {errno}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The node.
        path: PathBuf,
        /// The kernel's errno.
        errno: Errno,
    },
    /// An option was refused before reaching the kernel.
    #[error("invalid loop option: {0}")]
    InvalidOption(&'static str),
}

impl LoopError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Open { source, .. } => ErrorKind::from_io(source),
            Self::Ioctl { errno, .. } => ErrorKind::from_errno(*errno),
            Self::InvalidOption(_) => ErrorKind::Invalid,
        }
    }
}

/// How to attach a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopOptions {
    /// Read-only device (`LO_FLAGS_READ_ONLY`).
    pub read_only: bool,
    /// Detach automatically when the last opener closes it (`LO_FLAGS_AUTOCLEAR`).
    pub autoclear: bool,
    /// Bypass the page cache of the backing file (`LO_FLAGS_DIRECT_IO`).
    pub direct_io: bool,
    /// Logical block size (512..=4096, power of two); kernel default 512.
    pub block_size: Option<u32>,
    /// Start of the mapped range in the file.
    pub offset: Bytes,
    /// Length of the mapped range (`None`: to the end of the file).
    pub size_limit: Option<Bytes>,
}

/// An attached loop device. Dropping it does not detach; call [`LoopDevice::detach`] (or use
/// `autoclear`).
#[derive(Debug)]
pub struct LoopDevice {
    file: File,
    path: PathBuf,
    number: u32,
    dev: DevId,
}

impl LoopDevice {
    /// Attaches `backing` (opened read-write unless `opts.read_only`).
    ///
    /// Race: between `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` another process may bind the
    /// same free loop device; `LOOP_CONFIGURE` then fails with `EBUSY`. We ask for a new free
    /// number and retry, at most 10 times.
    pub fn attach(backing: &File, opts: &LoopOptions) -> Result<Self, LoopError> {
        if let Some(bs) = opts.block_size {
            if !(512..=4096).contains(&bs) || !bs.is_power_of_two() {
                return Err(LoopError::InvalidOption("block size must be 512..=4096, power of 2"));
            }
        }
        let fd = u32::try_from(backing.as_fd().as_raw_fd())
            .map_err(|_| LoopError::InvalidOption("bad backing descriptor"))?;
        let mut flags = 0;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.autoclear {
            flags |= LO_FLAGS_AUTOCLEAR;
        }
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let config = LoopConfig {
            fd,
            block_size: opts.block_size.unwrap_or(0),
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: opts.offset.get(),
                lo_sizelimit: opts.size_limit.map_or(0, Bytes::get),
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let control_path = Path::new(LOOP_CONTROL);
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(control_path)
            .map_err(|source| LoopError::Open { path: control_path.to_owned(), source })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // SAFETY: the control fd is open for the duration of the call; no argument.
            let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(|errno| {
                LoopError::Ioctl { op: "LOOP_CTL_GET_FREE", path: control_path.to_owned(), errno }
            })?;
            let number = u32::try_from(n).map_err(|_| LoopError::Ioctl {
                op: "LOOP_CTL_GET_FREE",
                path: control_path.to_owned(),
                errno: Errno::ERANGE,
            })?;
            let path = Path::new(LOOP_DIR).join(format!("loop{number}"));
            let file = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(&path)
                .map_err(|source| LoopError::Open { path: path.clone(), source })?;
            // SAFETY: both fds are open for the call; `config` is a valid loop_config the
            // kernel only reads.
            match unsafe { loop_configure(file.as_raw_fd(), &config) } {
                Ok(_) => {
                    let dev = DevId::of_file(&file)
                        .map_err(|source| LoopError::Open { path: path.clone(), source })?;
                    return Ok(Self { file, path, number, dev });
                }
                Err(Errno::EBUSY) if attempt < ATTACH_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(errno) => return Err(LoopError::Ioctl { op: "LOOP_CONFIGURE", path, errno }),
            }
        }
    }

    /// The node path (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The loop number N.
    pub fn number(&self) -> u32 {
        self.number
    }
    /// The device number (for table lines).
    pub fn dev(&self) -> DevId {
        self.dev
    }
    /// The open device.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Unbinds the backing file. If the device is still open elsewhere the kernel defers this
    /// to the last close (autoclear).
    pub fn detach(self) -> Result<(), LoopError> {
        // SAFETY: the loop fd is open for the call; no argument.
        unsafe { loop_clr_fd(self.file.as_raw_fd()) }.map_err(|errno| LoopError::Ioctl {
            op: "LOOP_CLR_FD",
            path: self.path.clone(),
            errno,
        })?;
        Ok(())
    }
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        // loop_info64: 5*8 + 4*4 + 64 + 64 + 32 + 2*8 = 232; loop_config: 4 + 4 + 232 + 64.
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
    }

    #[test]
    fn bad_block_size_is_refused_before_the_kernel() {
        let f = tempfile::tempfile().unwrap();
        let opts = LoopOptions { block_size: Some(1000), ..LoopOptions::default() };
        let e = LoopDevice::attach(&f, &opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }
}
