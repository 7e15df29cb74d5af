//! Units as newtypes: 512-byte [`Sectors`], [`Bytes`], and kernel device numbers ([`DevId`]).
//!
//! Conversions that can overflow or lose precision are checked and say so in their names.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::str::FromStr;

use crate::error::ErrorKind;

/// Size of the kernel's block-layer sector, the unit of every device-mapper table.
pub const SECTOR_SIZE: u64 = 512;

/// A count of 512-byte sectors (the kernel's `sector_t` unit): the pure `bow` crate's type, the
/// one `Sectors` of the project. Its `Display` is the plain number of table lines.
pub use bow::units::Sectors;

/// A count of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(u64);

/// A conversion between units failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The value does not fit the target unit.
    #[error("{0} overflows the target unit")]
    Overflow(u64),
    /// A byte count is not a whole number of sectors.
    #[error("{0} bytes is not a multiple of 512")]
    NotSectorAligned(u64),
    /// A device number does not fit the kernel's 12-bit major / 20-bit minor.
    #[error("device number {major}:{minor} is out of the kernel's range")]
    DevOutOfRange {
        /// Major number given.
        major: u64,
        /// Minor number given.
        minor: u64,
    },
    /// Text is not `major:minor`.
    #[error("{0:?} is not major:minor")]
    BadDevText(String),
    /// A path is not a block device.
    #[error("{0} is not a block device")]
    NotBlockDevice(String),
}

impl UnitError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

/// Sectors as bytes, or an error on overflow.
pub fn sectors_to_bytes(sectors: Sectors) -> Result<Bytes, UnitError> {
    sectors.to_bytes().map(Bytes).ok_or(UnitError::Overflow(sectors.get()))
}

impl Bytes {
    /// Wraps a byte count.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }
    /// The raw count.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Whole sectors; an error if the count is not a multiple of 512.
    pub fn to_sectors_exact(self) -> Result<Sectors, UnitError> {
        if self.0 % SECTOR_SIZE == 0 {
            Ok(Sectors(self.0 / SECTOR_SIZE))
        } else {
            Err(UnitError::NotSectorAligned(self.0))
        }
    }
    /// Whole sectors, rounding down.
    pub const fn to_sectors_floor(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }
    /// The count as `usize` (for buffer sizes), or an error if it does not fit.
    pub fn to_usize(self) -> Result<usize, UnitError> {
        usize::try_from(self.0).map_err(|_| UnitError::Overflow(self.0))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A block device number as the kernel sees it: 12-bit major, 20-bit minor.
///
/// Three encodings meet at this boundary: `major:minor` text (device-mapper table lines),
/// the kernel's "new"/"huge" 32/64-bit encoding used in `struct dm_ioctl.dev`,
/// `dm_name_list.dev`, `dm_target_deps.dev[]` and `fsmap.fmr_device`
/// (`new_encode_dev` in `include/linux/kdev_t.h`), and the C library's `dev_t` from `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId {
    major: u32,
    minor: u32,
}

const MAJOR_LIMIT: u64 = 1 << 12;
const MINOR_LIMIT: u64 = 1 << 20;

impl DevId {
    /// A device number; an error if it does not fit the kernel's 12/20-bit split.
    pub fn new(major: u64, minor: u64) -> Result<Self, UnitError> {
        if major >= MAJOR_LIMIT || minor >= MINOR_LIMIT {
            return Err(UnitError::DevOutOfRange { major, minor });
        }
        let major = u32::try_from(major).map_err(|_| UnitError::DevOutOfRange { major, minor })?;
        let minor = u32::try_from(minor)
            .map_err(|_| UnitError::DevOutOfRange { major: major.into(), minor })?;
        Ok(Self { major, minor })
    }
    /// The major number.
    pub const fn major(self) -> u32 {
        self.major
    }
    /// The minor number.
    pub const fn minor(self) -> u32 {
        self.minor
    }
    /// The kernel's `huge_encode_dev` (= `new_encode_dev`): minor low byte in bits 0-7, major in
    /// bits 8-19, the rest of the minor in bits 20-31.
    pub const fn to_kernel(self) -> u64 {
        let minor = self.minor as u64;
        let major = self.major as u64;
        (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
    }
    /// Inverse of [`to_kernel`](Self::to_kernel) (`huge_decode_dev`); rejects bits above 31.
    pub fn from_kernel(v: u64) -> Result<Self, UnitError> {
        if v >> 32 != 0 {
            return Err(UnitError::DevOutOfRange { major: v >> 8, minor: v });
        }
        let major = (v & 0xfff00) >> 8;
        let minor = (v & 0xff) | ((v >> 12) & 0xfff00);
        Self::new(major, minor)
    }
    /// From the C library's `dev_t` (as found in `stat.st_rdev`).
    pub fn from_dev_t(dev: u64) -> Result<Self, UnitError> {
        Self::new(nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
    }
    /// To the C library's `dev_t` (for `mknod`).
    pub fn to_dev_t(self) -> u64 {
        nix::sys::stat::makedev(self.major.into(), self.minor.into())
    }
    /// The device number of the block device at `path` (following symlinks).
    pub fn of_path(path: &Path) -> Result<Self, std::io::Error> {
        let meta = std::fs::metadata(path)?;
        if !meta.file_type().is_block_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                UnitError::NotBlockDevice(path.display().to_string()),
            ));
        }
        Self::from_dev_t(meta.rdev()).map_err(std::io::Error::other)
    }
    /// The device number of an open block device.
    pub fn of_file(file: &File) -> Result<Self, std::io::Error> {
        let meta = file.metadata()?;
        if !meta.file_type().is_block_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                UnitError::NotBlockDevice("open file".to_owned()),
            ));
        }
        Self::from_dev_t(meta.rdev()).map_err(std::io::Error::other)
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevId {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnitError::BadDevText(s.to_owned());
        let (ma, mi) = s.split_once(':').ok_or_else(bad)?;
        let ma: u64 = ma.parse().map_err(|_| bad())?;
        let mi: u64 = mi.parse().map_err(|_| bad())?;
        Self::new(ma, mi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_encoding_matches_new_encode_dev() {
        // Worked by hand from include/linux/kdev_t.h:
        // new_encode_dev(MKDEV(254, 0)) = 254 << 8 = 0xfe00.
        assert_eq!(DevId::new(254, 0).unwrap().to_kernel(), 0xfe00);
        // (7, 3): 0x703.
        assert_eq!(DevId::new(7, 3).unwrap().to_kernel(), 0x703);
        // (259, 0x12345): low byte 0x45, major 0x103 << 8 = 0x10300, high minor 0x12300 << 12.
        let d = DevId::new(259, 0x12345).unwrap();
        assert_eq!(d.to_kernel(), 0x45 | 0x10300 | (0x12300 << 12));
        assert_eq!(DevId::from_kernel(d.to_kernel()).unwrap(), d);
        // Largest values round-trip.
        let max = DevId::new(4095, (1 << 20) - 1).unwrap();
        assert_eq!(max.to_kernel(), 0xffff_ffff);
        assert_eq!(DevId::from_kernel(0xffff_ffff).unwrap(), max);
        assert!(DevId::from_kernel(1 << 32).is_err());
        assert!(DevId::new(4096, 0).is_err());
    }

    #[test]
    fn dev_t_round_trip_uses_the_c_library_layout() {
        let d = DevId::new(259, 0x12345).unwrap();
        assert_eq!(DevId::from_dev_t(d.to_dev_t()).unwrap(), d);
    }

    #[test]
    fn dev_text_parses_and_prints() {
        let d: DevId = "254:17".parse().unwrap();
        assert_eq!((d.major(), d.minor()), (254, 17));
        assert_eq!(d.to_string(), "254:17");
        assert!("254".parse::<DevId>().is_err());
        assert!("a:b".parse::<DevId>().is_err());
    }

    #[test]
    fn one_sectors_type_with_the_plain_number_of_table_lines() {
        let s: Sectors = "42".parse().unwrap();
        assert_eq!(s, bow::units::Sectors(42));
        assert_eq!(s.to_string(), "42");
    }

    #[test]
    fn sector_byte_conversions_are_checked() {
        assert_eq!(sectors_to_bytes(Sectors::new(8)).unwrap(), Bytes::new(4096));
        assert!(sectors_to_bytes(Sectors::new(u64::MAX)).is_err());
        assert_eq!(Bytes::new(4096).to_sectors_exact().unwrap(), Sectors::new(8));
        assert!(Bytes::new(4097).to_sectors_exact().is_err());
        assert_eq!(Bytes::new(4097).to_sectors_floor(), Sectors::new(8));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn kernel_encoding_round_trips(major in 0u64..4096, minor in 0u64..(1 << 20)) {
            let d = DevId::new(major, minor).unwrap();
            prop_assert!(d.to_kernel() <= u64::from(u32::MAX));
            prop_assert_eq!(DevId::from_kernel(d.to_kernel()).unwrap(), d);
            prop_assert_eq!(d.to_string().parse::<DevId>().unwrap(), d);
        }
    }
}
