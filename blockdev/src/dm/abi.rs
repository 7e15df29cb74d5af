//! The device-mapper ioctl ABI (`include/uapi/linux/dm-ioctl.h`), declared once.
//!
//! The structs below mirror the kernel's layout and exist for `size_of`/`offset_of`; every
//! field is read and written through [`IoctlBuf`]'s byte accessors at those offsets, so no reply
//! is ever reinterpreted through a pointer cast. The only `unsafe` is the ioctl call itself and
//! the byte view of the 8-byte-aligned buffer.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `DM_IOCTL`, the ioctl type byte.
pub(crate) const DM_IOCTL_TYPE: u8 = 0xfd;
/// `DM_NAME_LEN`.
pub(crate) const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`.
pub(crate) const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`.
pub(crate) const DM_MAX_TYPE_NAME: usize = 16;
/// The interface major version this code speaks. We send minor 0 (the kernel accepts any
/// request whose minor is not newer than its own) and read the kernel's version back.
pub(crate) const DM_VERSION_MAJOR: u32 = 4;

/// `struct dm_ioctl`.
#[repr(C)]
#[allow(dead_code)] // layout only: accessed through offset_of!
pub(crate) struct DmIoctl {
    pub version: [u32; 3],
    pub data_size: u32,
    pub data_start: u32,
    pub target_count: u32,
    pub open_count: i32,
    pub flags: u32,
    pub event_nr: u32,
    pub padding: u32,
    pub dev: u64,
    pub name: [u8; DM_NAME_LEN],
    pub uuid: [u8; DM_UUID_LEN],
    pub data: [u8; 7],
}

/// `struct dm_target_spec` (the parameter string follows it).
#[repr(C)]
#[allow(dead_code)] // layout only
pub(crate) struct DmTargetSpec {
    pub sector_start: u64,
    pub length: u64,
    pub status: i32,
    pub next: u32,
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

/// `struct dm_target_deps` (`u64 dev[count]` follows).
#[repr(C)]
#[allow(dead_code)] // layout only
pub(crate) struct DmTargetDeps {
    pub count: u32,
    pub padding: u32,
}

/// `struct dm_name_list` (`char name[]` starts at offset 12, inside the trailing padding).
#[repr(C)]
#[allow(dead_code)] // layout only
pub(crate) struct DmNameList {
    pub dev: u64,
    pub next: u32,
}
/// Offset of `dm_name_list.name`.
pub(crate) const NAME_LIST_NAME: usize = offset_of!(DmNameList, next) + 4;

/// `struct dm_target_versions` (`char name[]` follows at offset 16).
#[repr(C)]
#[allow(dead_code)] // layout only
pub(crate) struct DmTargetVersions {
    pub next: u32,
    pub version: [u32; 3],
}

/// `struct dm_target_msg` (`char message[]` follows at offset 8).
#[repr(C)]
#[allow(dead_code)] // layout only
pub(crate) struct DmTargetMsg {
    pub sector: u64,
}

// Flags (dm-ioctl.h).
pub(crate) const DM_READONLY_FLAG: u32 = 1 << 0;
pub(crate) const DM_SUSPEND_FLAG: u32 = 1 << 1;
pub(crate) const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
pub(crate) const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
pub(crate) const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
pub(crate) const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
pub(crate) const DM_NOFLUSH_FLAG: u32 = 1 << 11;
pub(crate) const DM_QUERY_INACTIVE_TABLE_FLAG: u32 = 1 << 12;
pub(crate) const DM_UUID_FLAG: u32 = 1 << 14;
pub(crate) const DM_DATA_OUT_FLAG: u32 = 1 << 16;
pub(crate) const DM_NAME_LIST_FLAG_HAS_UUID: u32 = 1;

/// Command numbers (`enum` in dm-ioctl.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum DmCmd {
    Version = 0,
    ListDevices = 2,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
    TableClear = 10,
    TableDeps = 11,
    TableStatus = 12,
    ListVersions = 13,
    TargetMsg = 14,
    GetTargetVersion = 17,
}

/// `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
pub(crate) const fn request_code(cmd: DmCmd) -> nix::sys::ioctl::ioctl_num_type {
    nix::request_code_readwrite!(DM_IOCTL_TYPE, cmd as u8, size_of::<DmIoctl>())
}

// Each device-mapper ioctl, declared once. They all pass a `struct dm_ioctl` header at the start
// of a larger buffer whose total length is in `data_size`.
nix::ioctl_readwrite_bad!(dm_version, request_code(DmCmd::Version), DmIoctl);
nix::ioctl_readwrite_bad!(dm_list_devices, request_code(DmCmd::ListDevices), DmIoctl);
nix::ioctl_readwrite_bad!(dm_dev_create, request_code(DmCmd::DevCreate), DmIoctl);
nix::ioctl_readwrite_bad!(dm_dev_remove, request_code(DmCmd::DevRemove), DmIoctl);
nix::ioctl_readwrite_bad!(dm_dev_suspend, request_code(DmCmd::DevSuspend), DmIoctl);
nix::ioctl_readwrite_bad!(dm_dev_status, request_code(DmCmd::DevStatus), DmIoctl);
nix::ioctl_readwrite_bad!(dm_table_load, request_code(DmCmd::TableLoad), DmIoctl);
nix::ioctl_readwrite_bad!(dm_table_clear, request_code(DmCmd::TableClear), DmIoctl);
nix::ioctl_readwrite_bad!(dm_table_deps, request_code(DmCmd::TableDeps), DmIoctl);
nix::ioctl_readwrite_bad!(dm_table_status, request_code(DmCmd::TableStatus), DmIoctl);
nix::ioctl_readwrite_bad!(dm_list_versions, request_code(DmCmd::ListVersions), DmIoctl);
nix::ioctl_readwrite_bad!(dm_target_msg, request_code(DmCmd::TargetMsg), DmIoctl);
nix::ioctl_readwrite_bad!(dm_get_target_version, request_code(DmCmd::GetTargetVersion), DmIoctl);

/// Header field offsets.
pub(crate) mod off {
    use super::*;
    pub const VERSION: usize = offset_of!(DmIoctl, version);
    pub const DATA_SIZE: usize = offset_of!(DmIoctl, data_size);
    pub const DATA_START: usize = offset_of!(DmIoctl, data_start);
    pub const TARGET_COUNT: usize = offset_of!(DmIoctl, target_count);
    pub const OPEN_COUNT: usize = offset_of!(DmIoctl, open_count);
    pub const FLAGS: usize = offset_of!(DmIoctl, flags);
    pub const EVENT_NR: usize = offset_of!(DmIoctl, event_nr);
    pub const DEV: usize = offset_of!(DmIoctl, dev);
    pub const NAME: usize = offset_of!(DmIoctl, name);
    pub const UUID: usize = offset_of!(DmIoctl, uuid);
}

/// Size of the header; also where our payload starts (it is a multiple of 8).
pub(crate) const HEADER_SIZE: usize = size_of::<DmIoctl>();
/// Size of `struct dm_target_spec`.
pub(crate) const SPEC_SIZE: usize = size_of::<DmTargetSpec>();

/// Rounds up to the 8-byte alignment the kernel uses between records (`align_ptr`).
pub(crate) const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// An 8-byte-aligned ioctl buffer: a `struct dm_ioctl` header followed by the payload.
#[derive(Debug, Clone)]
pub(crate) struct IoctlBuf {
    words: Vec<u64>,
}

impl IoctlBuf {
    /// A zeroed buffer of at least `len` bytes (rounded up to 8), with the header initialised:
    /// version, `data_size` = the buffer length, `data_start` = the header size.
    pub(crate) fn new(len: usize) -> Self {
        let len = align8(len.max(HEADER_SIZE));
        let mut buf = Self { words: vec![0; len / 8] };
        buf.put_u32(off::VERSION, DM_VERSION_MAJOR);
        buf.put_u32(off::DATA_SIZE, u32::try_from(len).unwrap_or(u32::MAX));
        buf.put_u32(off::DATA_START, u32::try_from(HEADER_SIZE).unwrap_or(u32::MAX));
        buf
    }

    pub(crate) fn len(&self) -> usize {
        self.words.len() * 8
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec<u64> owns `len * 8` initialised bytes; u8 has no alignment or validity
        // requirements, and the returned slice borrows `self`, so it cannot outlive the storage.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len()) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `bytes`; the mutable borrow of `self` makes the view exclusive, and any
        // byte pattern is a valid u64.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), len) }
    }

    pub(crate) fn put_u32(&mut self, at: usize, v: u32) {
        self.bytes_mut()[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    pub(crate) fn put_u64(&mut self, at: usize, v: u64) {
        self.bytes_mut()[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    /// Reads a u32; `None` if out of bounds.
    pub(crate) fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.bytes().get(at..at.checked_add(4)?)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    }
    /// Reads a u64; `None` if out of bounds.
    pub(crate) fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.bytes().get(at..at.checked_add(8)?)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }
    /// Writes `s` and a NUL at `at`; the caller has checked the length against the field.
    pub(crate) fn put_cstr(&mut self, at: usize, s: &str) {
        let b = self.bytes_mut();
        b[at..at + s.len()].copy_from_slice(s.as_bytes());
        b[at + s.len()] = 0;
    }
    /// Reads a NUL-terminated string starting at `at` and ending before `limit`.
    pub(crate) fn cstr_at(&self, at: usize, limit: usize) -> Option<String> {
        let b = self.bytes().get(at..limit.min(self.len()))?;
        let end = b.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&b[..end]).into_owned())
    }

    pub(crate) fn header_u32(&self, at: usize) -> u32 {
        self.u32_at(at).unwrap_or(0)
    }
    pub(crate) fn flags(&self) -> u32 {
        self.header_u32(off::FLAGS)
    }
    pub(crate) fn set_flags(&mut self, flags: u32) {
        self.put_u32(off::FLAGS, flags);
    }
    /// `data_start`, clamped to the buffer.
    pub(crate) fn data_start(&self) -> usize {
        usize::try_from(self.header_u32(off::DATA_START)).unwrap_or(usize::MAX).min(self.len())
    }
    /// `data_size`, clamped to the buffer (the kernel copies back at most `data_size` bytes).
    pub(crate) fn data_size(&self) -> usize {
        usize::try_from(self.header_u32(off::DATA_SIZE)).unwrap_or(usize::MAX).min(self.len())
    }

    /// Runs one device-mapper command on the control node.
    pub(crate) fn ioctl(&mut self, control: BorrowedFd<'_>, cmd: DmCmd) -> Result<(), Errno> {
        // The kernel reads `data_size` bytes from the header's address and writes back at most as
        // many; `data_size` never exceeds our length (set in `new`, never raised).
        debug_assert!(self.data_size() <= self.len());
        let fd = control.as_raw_fd();
        let ptr = self.words.as_mut_ptr().cast::<DmIoctl>();
        // SAFETY: `ptr` points to an 8-byte-aligned, initialised buffer of `self.len()` bytes,
        // at least `size_of::<DmIoctl>()`, that we exclusively borrow for the call; the header's
        // `data_size` bounds what the kernel reads and writes; `fd` is a live borrowed fd.
        let res = unsafe {
            match cmd {
                DmCmd::Version => dm_version(fd, ptr),
                DmCmd::ListDevices => dm_list_devices(fd, ptr),
                DmCmd::DevCreate => dm_dev_create(fd, ptr),
                DmCmd::DevRemove => dm_dev_remove(fd, ptr),
                DmCmd::DevSuspend => dm_dev_suspend(fd, ptr),
                DmCmd::DevStatus => dm_dev_status(fd, ptr),
                DmCmd::TableLoad => dm_table_load(fd, ptr),
                DmCmd::TableClear => dm_table_clear(fd, ptr),
                DmCmd::TableDeps => dm_table_deps(fd, ptr),
                DmCmd::TableStatus => dm_table_status(fd, ptr),
                DmCmd::ListVersions => dm_list_versions(fd, ptr),
                DmCmd::TargetMsg => dm_target_msg(fd, ptr),
                DmCmd::GetTargetVersion => dm_get_target_version(fd, ptr),
            }
        };
        res.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        // Summed by hand from dm-ioctl.h: 3*4 + 6*4 + 4 (padding) + 8 + 128 + 129 + 7.
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
        // 8 + 8 + 4 + 4 + 16.
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(size_of::<DmTargetDeps>(), 8);
        assert_eq!(size_of::<DmNameList>(), 16);
        assert_eq!(NAME_LIST_NAME, 12);
        assert_eq!(size_of::<DmTargetVersions>(), 16);
        assert_eq!(size_of::<DmTargetMsg>(), 8);
        assert_eq!(HEADER_SIZE % 8, 0);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))] // ioctl_num_type is c_ulong here
    fn request_codes_match_iowr_arithmetic() {
        // _IOWR(type, nr, size) = (3 << 30) | (size << 16) | (type << 8) | nr, size = 312 = 0x138.
        let base: u64 = (3 << 30) | (312 << 16) | (0xfd << 8);
        assert_eq!(base, 0xc138_fd00);
        let cases = [
            (DmCmd::Version, 0),
            (DmCmd::ListDevices, 2),
            (DmCmd::DevCreate, 3),
            (DmCmd::DevRemove, 4),
            (DmCmd::DevSuspend, 6),
            (DmCmd::DevStatus, 7),
            (DmCmd::TableLoad, 9),
            (DmCmd::TableClear, 10),
            (DmCmd::TableDeps, 11),
            (DmCmd::TableStatus, 12),
            (DmCmd::ListVersions, 13),
            (DmCmd::TargetMsg, 14),
            (DmCmd::GetTargetVersion, 17),
        ];
        for (cmd, nr) in cases {
            assert_eq!(request_code(cmd), base | nr, "{cmd:?}");
        }
    }

    #[test]
    fn buffer_header_is_initialised() {
        let b = IoctlBuf::new(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.u32_at(off::VERSION), Some(4));
        assert_eq!(b.data_size(), 1000);
        assert_eq!(b.data_start(), 312);
        assert_eq!(IoctlBuf::new(1).len(), 312);
        assert_eq!(align8(313), 320);
    }
}
