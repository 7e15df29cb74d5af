//! Filesystem ioctls: `FITRIM`, `FIFREEZE`/`FITHAW`, `FS_IOC_FIEMAP`, `FS_IOC_GETFSMAP`,
//! `F2FS_IOC_SET_PIN_FILE`, and `statvfs`.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::errno::Errno;

use crate::error::ErrorKind;
use crate::units::{Bytes, DevId};

/// `struct fstrim_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// `struct fiemap` (the extent array follows).
#[repr(C)]
#[allow(dead_code)] // layout only: accessed through offset_of!
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[allow(dead_code)] // layout only
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fsmap`.
#[repr(C)]
#[allow(dead_code)] // layout only
struct Fsmap {
    fmr_device: u32,
    fmr_flags: u32,
    fmr_physical: u64,
    fmr_owner: u64,
    fmr_offset: u64,
    fmr_length: u64,
    fmr_reserved: [u64; 3],
}

/// `struct fsmap_head` (records follow).
#[repr(C)]
#[allow(dead_code)] // layout only
struct FsmapHead {
    fmh_iflags: u32,
    fmh_oflags: u32,
    fmh_count: u32,
    fmh_entries: u32,
    fmh_reserved: [u64; 6],
    fmh_keys: [Fsmap; 2],
}

// Each ioctl declared once.
// FITRIM = _IOWR('X', 121, struct fstrim_range).
nix::ioctl_readwrite!(fitrim_ioctl, b'X', 121, FstrimRange);
// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap); the buffer extends past the header.
nix::ioctl_readwrite_bad!(
    fiemap_ioctl,
    nix::request_code_readwrite!(b'f', 11, size_of::<Fiemap>()),
    Fiemap
);
// FS_IOC_GETFSMAP = _IOWR('X', 59, struct fsmap_head); records follow the header.
nix::ioctl_readwrite_bad!(
    getfsmap_ioctl,
    nix::request_code_readwrite!(b'X', 59, size_of::<FsmapHead>()),
    FsmapHead
);
// F2FS_IOC_SET_PIN_FILE = _IOW(0xf5, 13, __u32).
nix::ioctl_write_ptr!(f2fs_set_pin_file, 0xf5, 13, u32);
// FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int); the argument is unused.
nix::ioctl_readwrite!(fifreeze_ioctl, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw_ioctl, b'X', 120, libc::c_int);

/// A filesystem request failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// An ioctl or system call failed.
    #[error("{op}: {errno}")]
    Os {
        /// The call.
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// A file extent cannot be addressed on the raw device (see [`check_extent`]).
    #[error("extent at file offset {logical} cannot be mapped: {reason}")]
    UnmappableExtent {
        /// File offset of the extent.
        logical: u64,
        /// Why.
        reason: &'static str,
    },
    /// A kernel reply was inconsistent.
    #[error("{op}: malformed reply: {what}")]
    BadReply {
        /// The call.
        op: &'static str,
        /// What was wrong.
        what: &'static str,
    },
}

impl FsError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Os { errno, .. } => ErrorKind::from_errno(*errno),
            Self::UnmappableExtent { .. } => ErrorKind::Unsupported,
            Self::BadReply { .. } => ErrorKind::Corrupt,
        }
    }
}

fn os(op: &'static str) -> impl FnOnce(Errno) -> FsError {
    move |errno| FsError::Os { op, errno }
}

// ---------------------------------------------------------------------------------------------
// FITRIM

/// `FITRIM` on the filesystem containing `dir` (any open file or directory on it): discards
/// free space in `[start, start + len)` in free extents of at least `min_len`. Returns the bytes
/// the filesystem reports trimmed.
pub fn fitrim(fs: impl AsFd, start: Bytes, len: Bytes, min_len: Bytes) -> Result<Bytes, FsError> {
    let mut range = FstrimRange { start: start.get(), len: len.get(), minlen: min_len.get() };
    // SAFETY: the fd is borrowed for the call; `range` is a valid fstrim_range the kernel reads
    // and writes.
    unsafe { fitrim_ioctl(fs.as_fd().as_raw_fd(), &mut range) }.map_err(os("FITRIM"))?;
    Ok(Bytes::new(range.len))
}

/// `FITRIM` over the whole filesystem.
pub fn fitrim_all(fs: impl AsFd) -> Result<Bytes, FsError> {
    fitrim(fs, Bytes::new(0), Bytes::new(u64::MAX), Bytes::new(0))
}

// ---------------------------------------------------------------------------------------------
// FIFREEZE / FITHAW

/// `FIFREEZE` on the filesystem containing `fs` (an open file or directory on it): writes back
/// everything, makes the filesystem consistent on disk (ext4 flushes its journal and writes its
/// super block) and blocks new writes until [`thaw`]. `EBUSY` when it is already frozen.
pub fn freeze(fs: impl AsFd) -> Result<(), FsError> {
    let mut unused: libc::c_int = 0;
    // SAFETY: the fd is borrowed for the call; the kernel ignores the int argument.
    unsafe { fifreeze_ioctl(fs.as_fd().as_raw_fd(), &mut unused) }.map_err(os("FIFREEZE"))?;
    Ok(())
}

/// `FITHAW`: lets writes through again (ext4 writes its super block on thaw). `EINVAL` when the
/// filesystem is not frozen.
pub fn thaw(fs: impl AsFd) -> Result<(), FsError> {
    let mut unused: libc::c_int = 0;
    // SAFETY: the fd is borrowed for the call; the kernel ignores the int argument.
    unsafe { fithaw_ioctl(fs.as_fd().as_raw_fd(), &mut unused) }.map_err(os("FITHAW"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// FIEMAP

/// Extent flags (`FIEMAP_EXTENT_*`, `include/uapi/linux/fiemap.h`).
pub mod extent_flags {
    /// Last extent of the file.
    pub const LAST: u32 = 0x1;
    /// Location unknown.
    pub const UNKNOWN: u32 = 0x2;
    /// Delayed allocation (no location yet).
    pub const DELALLOC: u32 = 0x4;
    /// Data is encoded (compressed...).
    pub const ENCODED: u32 = 0x8;
    /// Data is encrypted.
    pub const DATA_ENCRYPTED: u32 = 0x80;
    /// Location not block aligned.
    pub const NOT_ALIGNED: u32 = 0x100;
    /// Data is inline in metadata.
    pub const DATA_INLINE: u32 = 0x200;
    /// Data is packed in a tail block.
    pub const DATA_TAIL: u32 = 0x400;
    /// Allocated but not written (reads return zeros through the filesystem).
    pub const UNWRITTEN: u32 = 0x800;
    /// Merged by the filesystem for reporting.
    pub const MERGED: u32 = 0x1000;
    /// Shared with another file (reflink).
    pub const SHARED: u32 = 0x2000;
}

/// `FIEMAP_FLAG_SYNC`: write back dirty data before mapping.
const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// One file extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: Bytes,
    /// Offset on the filesystem's device.
    pub physical: Bytes,
    /// Length.
    pub length: Bytes,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// Whether an extent can be used as a raw-device range (for a dm table over a file): its
/// location must be known, stable, exclusive to this file and sector aligned. Unwritten
/// (fallocated) extents are fine: the device sees their blocks directly.
pub fn check_extent(e: &Extent) -> Result<(), FsError> {
    use extent_flags::*;
    let reject = [
        (UNKNOWN, "location unknown"),
        (DELALLOC, "delayed allocation"),
        (ENCODED, "data is encoded"),
        (DATA_ENCRYPTED, "data is encrypted"),
        (NOT_ALIGNED, "not block aligned"),
        (DATA_INLINE, "data is inline"),
        (DATA_TAIL, "data is in a tail block"),
        (SHARED, "shared with another file"),
    ];
    let logical = e.logical.get();
    if let Some((_, reason)) = reject.iter().find(|(f, _)| e.flags & f != 0) {
        return Err(FsError::UnmappableExtent { logical, reason });
    }
    if e.physical.get() == 0 {
        // f2fs reports physical 0 for unpinned fallocated files.
        return Err(FsError::UnmappableExtent { logical, reason: "physical address 0" });
    }
    if e.physical.get() % 512 != 0 || e.length.get() % 512 != 0 || e.length.get() == 0 {
        return Err(FsError::UnmappableExtent { logical, reason: "not sector aligned" });
    }
    Ok(())
}

const FIEMAP_BATCH: usize = 256;

/// `FS_IOC_FIEMAP` over the whole file, in batches; with `sync`, dirty data is written back
/// first (`FIEMAP_FLAG_SYNC`) so delayed allocations get their final location.
pub fn fiemap(file: impl AsFd, sync: bool) -> Result<Vec<Extent>, FsError> {
    let head = size_of::<Fiemap>();
    let ext = size_of::<FiemapExtent>();
    let mut out: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    loop {
        let mut words = vec![0u64; (head + FIEMAP_BATCH * ext) / 8];
        put32(&mut words, offset_of!(Fiemap, fm_flags), if sync { FIEMAP_FLAG_SYNC } else { 0 });
        put64(&mut words, offset_of!(Fiemap, fm_start), start);
        put64(&mut words, offset_of!(Fiemap, fm_length), u64::MAX - start);
        let count = u32::try_from(FIEMAP_BATCH).unwrap_or(u32::MAX);
        put32(&mut words, offset_of!(Fiemap, fm_extent_count), count);
        let ptr = words.as_mut_ptr().cast::<Fiemap>();
        // SAFETY: `words` is an 8-byte-aligned zeroed buffer holding a fiemap header and
        // `fm_extent_count` extents, exclusively borrowed for the call; the fd is borrowed.
        unsafe { fiemap_ioctl(file.as_fd().as_raw_fd(), ptr) }.map_err(os("FS_IOC_FIEMAP"))?;
        let mapped = get32(&words, offset_of!(Fiemap, fm_mapped_extents));
        let mapped = usize::try_from(mapped).unwrap_or(usize::MAX);
        if mapped > FIEMAP_BATCH {
            return Err(FsError::BadReply { op: "FS_IOC_FIEMAP", what: "too many extents" });
        }
        if mapped == 0 {
            return Ok(out);
        }
        let mut last = false;
        for i in 0..mapped {
            let at = head + i * ext;
            let e = Extent {
                logical: Bytes::new(get64(&words, at + offset_of!(FiemapExtent, fe_logical))),
                physical: Bytes::new(get64(&words, at + offset_of!(FiemapExtent, fe_physical))),
                length: Bytes::new(get64(&words, at + offset_of!(FiemapExtent, fe_length))),
                flags: get32(&words, at + offset_of!(FiemapExtent, fe_flags)),
            };
            last |= e.flags & extent_flags::LAST != 0;
            out.push(e);
        }
        let end = out.last().map_or(start, |e| e.logical.get().saturating_add(e.length.get()));
        if last || end <= start {
            return Ok(out);
        }
        start = end;
    }
}

/// The file's extents, each checked by [`check_extent`]: what a dm-linear table over the file
/// needs. Writes back dirty data first.
pub fn mappable_extents(file: impl AsFd) -> Result<Vec<Extent>, FsError> {
    let extents = fiemap(file, true)?;
    for e in &extents {
        check_extent(e)?;
    }
    Ok(extents)
}

#[cfg(test)]
fn bytes_of(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}
fn put32(words: &mut [u64], at: usize, v: u32) {
    let w = &mut words[at / 8];
    let mut b = w.to_ne_bytes();
    b[at % 8..at % 8 + 4].copy_from_slice(&v.to_ne_bytes());
    *w = u64::from_ne_bytes(b);
}
fn put64(words: &mut [u64], at: usize, v: u64) {
    debug_assert_eq!(at % 8, 0);
    words[at / 8] = v;
}
fn get32(words: &[u64], at: usize) -> u32 {
    let b = words[at / 8].to_ne_bytes();
    let mut out = [0u8; 4];
    out.copy_from_slice(&b[at % 8..at % 8 + 4]);
    u32::from_ne_bytes(out)
}
fn get64(words: &[u64], at: usize) -> u64 {
    debug_assert_eq!(at % 8, 0);
    words[at / 8]
}

// ---------------------------------------------------------------------------------------------
// GETFSMAP

/// `FMR_OF_SPECIAL_OWNER`: `fmr_owner` is one of the `FMR_OWN_*` codes.
pub const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
/// `FMR_OF_LAST`: the last record of the whole map.
pub const FMR_OF_LAST: u32 = 0x20;
/// `FMR_OWN_FREE` = `FMR_OWNER(0, 1)`: free space.
pub const FMR_OWN_FREE: u64 = 1;

/// One `GETFSMAP` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsmapRecord {
    /// Device holding the extent (`new_encode_dev` encoding).
    pub device: u32,
    /// `FMR_OF_*` flags.
    pub flags: u32,
    /// Offset on the device.
    pub physical: Bytes,
    /// Owner: an inode number, or an `FMR_OWN_*` code with `FMR_OF_SPECIAL_OWNER`.
    pub owner: u64,
    /// Offset in the owner.
    pub offset: Bytes,
    /// Length.
    pub length: Bytes,
}

impl FsmapRecord {
    /// Free space.
    pub fn is_free(&self) -> bool {
        self.flags & FMR_OF_SPECIAL_OWNER != 0 && self.owner == FMR_OWN_FREE
    }
    /// The device as a [`DevId`].
    pub fn device_id(&self) -> Option<DevId> {
        DevId::from_kernel(self.device.into()).ok()
    }
}

const FSMAP_BATCH: usize = 512;

/// `FS_IOC_GETFSMAP` over the whole filesystem containing `fs` (ext4, xfs), following the
/// kernel's continuation protocol: after each batch the last record is copied into the low key
/// (`fmh_keys[0]`) and the call repeated, until a record has `FMR_OF_LAST` or none come back.
pub fn getfsmap(fs: impl AsFd) -> Result<Vec<FsmapRecord>, FsError> {
    getfsmap_batched(fs, FSMAP_BATCH)
}

/// [`getfsmap`] asking for at most `batch` (≥ 1) records per call.
pub fn getfsmap_batched(fs: impl AsFd, batch: usize) -> Result<Vec<FsmapRecord>, FsError> {
    let batch = batch.clamp(1, 1 << 16);
    let head = size_of::<FsmapHead>();
    let rec = size_of::<Fsmap>();
    let keys = offset_of!(FsmapHead, fmh_keys);
    let mut words = vec![0u64; (head + batch * rec) / 8];
    // High key: all ones (everything).
    let hi = keys + rec;
    put32(&mut words, hi + offset_of!(Fsmap, fmr_device), u32::MAX);
    put32(&mut words, hi + offset_of!(Fsmap, fmr_flags), u32::MAX);
    for f in [
        offset_of!(Fsmap, fmr_physical),
        offset_of!(Fsmap, fmr_owner),
        offset_of!(Fsmap, fmr_offset),
    ] {
        put64(&mut words, hi + f, u64::MAX);
    }
    let count = u32::try_from(batch).unwrap_or(u32::MAX);
    let mut out = Vec::new();
    loop {
        put32(&mut words, offset_of!(FsmapHead, fmh_count), count);
        put32(&mut words, offset_of!(FsmapHead, fmh_entries), 0);
        let ptr = words.as_mut_ptr().cast::<FsmapHead>();
        // SAFETY: `words` is an 8-byte-aligned buffer holding an fsmap_head and `fmh_count`
        // records, exclusively borrowed for the call; the fd is borrowed.
        unsafe { getfsmap_ioctl(fs.as_fd().as_raw_fd(), ptr) }.map_err(os("FS_IOC_GETFSMAP"))?;
        let n = usize::try_from(get32(&words, offset_of!(FsmapHead, fmh_entries)))
            .unwrap_or(usize::MAX);
        if n > batch {
            return Err(FsError::BadReply { op: "FS_IOC_GETFSMAP", what: "too many records" });
        }
        if n == 0 {
            return Ok(out);
        }
        let mut last = None;
        for i in 0..n {
            let at = head + i * rec;
            let r = FsmapRecord {
                device: get32(&words, at + offset_of!(Fsmap, fmr_device)),
                flags: get32(&words, at + offset_of!(Fsmap, fmr_flags)),
                physical: Bytes::new(get64(&words, at + offset_of!(Fsmap, fmr_physical))),
                owner: get64(&words, at + offset_of!(Fsmap, fmr_owner)),
                offset: Bytes::new(get64(&words, at + offset_of!(Fsmap, fmr_offset))),
                length: Bytes::new(get64(&words, at + offset_of!(Fsmap, fmr_length))),
            };
            out.push(r);
            last = Some(at);
        }
        let Some(last_at) = last else { return Ok(out) };
        if get32(&words, last_at + offset_of!(Fsmap, fmr_flags)) & FMR_OF_LAST != 0 {
            return Ok(out);
        }
        // Continuation: low key := last record returned.
        let copy: Vec<u64> = words[last_at / 8..(last_at + rec) / 8].to_vec();
        words[keys / 8..(keys + rec) / 8].copy_from_slice(&copy);
    }
}

/// The free extents of the filesystem containing `fs`, as (offset, length) on its device.
pub fn free_extents(fs: impl AsFd) -> Result<Vec<(Bytes, Bytes)>, FsError> {
    Ok(getfsmap(fs)?
        .into_iter()
        .filter(FsmapRecord::is_free)
        .map(|r| (r.physical, r.length))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// f2fs pin, statvfs

/// `F2FS_IOC_SET_PIN_FILE`: pins (or unpins) an f2fs file's blocks so the cleaner never moves
/// them; needed before `fallocate` for a file whose extents are mapped by dm.
pub fn f2fs_pin_file(file: impl AsFd, pin: bool) -> Result<(), FsError> {
    let v: u32 = pin.into();
    // SAFETY: the fd is borrowed for the call; `v` is a valid u32 the kernel reads.
    unsafe { f2fs_set_pin_file(file.as_fd().as_raw_fd(), &v) }
        .map_err(os("F2FS_IOC_SET_PIN_FILE"))?;
    Ok(())
}

/// Space of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Fragment size (`f_frsize`), the unit of the counts.
    pub block_size: Bytes,
    /// Total size.
    pub total: Bytes,
    /// Free, including space reserved for root.
    pub free: Bytes,
    /// Free for unprivileged users (`f_bavail`), what vold checks.
    pub available: Bytes,
}

/// `statvfs(path)`, with products computed in 64 bits and checked.
pub fn statvfs(path: &Path) -> Result<FsSpace, FsError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(os("statvfs"))?;
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on 32-bit targets
    let frsize = u64::from(s.fragment_size());
    let mul = |n: u64| {
        n.checked_mul(frsize)
            .map(Bytes::new)
            .ok_or(FsError::BadReply { op: "statvfs", what: "size overflows" })
    };
    Ok(FsSpace {
        block_size: Bytes::new(frsize),
        total: mul(s.blocks())?,
        free: mul(s.blocks_free())?,
        available: mul(s.blocks_available())?,
    })
}

#[cfg(test)]
mod tests {
    use super::extent_flags::*;
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<FstrimRange>(), 24);
        assert_eq!(size_of::<Fiemap>(), 32);
        assert_eq!(size_of::<FiemapExtent>(), 56);
        assert_eq!(size_of::<Fsmap>(), 64);
        assert_eq!(size_of::<FsmapHead>(), 192);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn request_codes_match_the_kernel() {
        // (dir << 30) | (size << 16) | (type << 8) | nr, dir 3 = read|write, 1 = write.
        assert_eq!(nix::request_code_readwrite!(b'X', 121, size_of::<FstrimRange>()), 0xc018_5879);
        assert_eq!(nix::request_code_readwrite!(b'f', 11, size_of::<Fiemap>()), 0xc020_660b);
        assert_eq!(nix::request_code_readwrite!(b'X', 59, size_of::<FsmapHead>()), 0xc0c0_583b);
        assert_eq!(nix::request_code_write!(0xf5, 13, size_of::<u32>()), 0x4004_f50d);
    }

    fn ext(flags: u32) -> Extent {
        Extent {
            logical: Bytes::new(0),
            physical: Bytes::new(1 << 20),
            length: Bytes::new(4096),
            flags,
        }
    }

    #[test]
    fn fiemap_flag_policy() {
        for ok in [0, LAST, UNWRITTEN, UNWRITTEN | LAST, MERGED] {
            assert!(check_extent(&ext(ok)).is_ok(), "{ok:#x}");
        }
        for bad in [
            UNKNOWN,
            DELALLOC,
            ENCODED,
            DATA_ENCRYPTED,
            NOT_ALIGNED,
            DATA_INLINE,
            DATA_TAIL,
            SHARED,
        ] {
            let e = check_extent(&ext(bad | LAST)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{bad:#x}");
        }
        let mut zero = ext(0);
        zero.physical = Bytes::new(0);
        assert!(check_extent(&zero).is_err());
        let mut odd = ext(0);
        odd.length = Bytes::new(100);
        assert!(check_extent(&odd).is_err());
    }

    #[test]
    fn word_accessors_round_trip() {
        let mut w = vec![0u64; 4];
        put32(&mut w, 4, 0xdead_beef);
        put32(&mut w, 8, 7);
        put64(&mut w, 16, 42);
        assert_eq!(get32(&w, 4), 0xdead_beef);
        assert_eq!(get32(&w, 0), 0);
        assert_eq!(get32(&w, 8), 7);
        assert_eq!(get64(&w, 16), 42);
        assert_eq!(bytes_of(&w).len(), 32);
    }

    #[test]
    fn fiemap_of_a_host_file_reports_its_data() {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 64 * 1024]).unwrap();
        match fiemap(f.as_file(), true) {
            Ok(extents) => {
                let total: u64 = extents.iter().map(|e| e.length.get()).sum();
                assert!(total >= 64 * 1024, "{extents:?}");
                assert!(extents.last().unwrap().flags & LAST != 0);
            }
            // Some host filesystems (overlayfs, tmpfs) have no FIEMAP.
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
        }
    }
}
