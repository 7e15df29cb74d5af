//! Bodies of the fuzz targets (fuzz/), shared with the unit tests that run them over many
//! random inputs so the properties are checked without libFuzzer too.

use super::{restore, validate, CorruptLogPolicy, RestoreOptions};
use crate::device::{BlockDevice, DeviceError, MemDevice};
use crate::format::LogSector;

/// The largest device image built from one input.
pub const MAX_IMAGE: usize = 256 << 10;

/// A device that must never be written: any write or flush panics (the fuzzer reports it).
#[derive(Debug)]
pub struct NoWriteDevice(pub MemDevice);

impl BlockDevice for NoWriteDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        panic!("write at offset {offset} from a read-only operation")
    }
    fn flush(&self) -> Result<(), DeviceError> {
        panic!("flush from a read-only operation")
    }
}

/// `parse_log_sector`: parsing arbitrary bytes never panics, and whatever parses re-encodes to
/// something that parses the same.
pub fn parse_log_sector(data: &[u8]) {
    if let Ok(sector) = LogSector::parse(data) {
        let again = LogSector::parse(&sector.encode()).expect("re-encoded sector parses");
        assert_eq!(again, sector);
    }
}

/// The device image for an input: the bytes, padded with zeros to a multiple of 4096 (at
/// least one block), at most [`MAX_IMAGE`].
pub fn image(data: &[u8]) -> Vec<u8> {
    let mut img = data[..data.len().min(MAX_IMAGE)].to_vec();
    let len = img.len().div_ceil(4096).max(1) * 4096;
    img.resize(len, 0);
    img
}

/// `validate_log`: validation, the walk and a dry-run restore of any image never write and
/// never panic; a log that fails validation is never written by a `Refuse` restore either.
pub fn validate_log(data: &[u8]) {
    let dev = NoWriteDevice(MemDevice::from_bytes(image(data)));
    let validated = validate(&dev);
    let _ = super::walk(&dev, true, &mut |_| {});
    for policy in [CorruptLogPolicy::RollForward, CorruptLogPolicy::Refuse] {
        let opts = RestoreOptions { policy, dry_run: true, ..RestoreOptions::default() };
        let _ = restore(&dev, &opts, &mut |_| {});
    }
    if validated.is_err() {
        let opts = RestoreOptions { policy: CorruptLogPolicy::Refuse, ..RestoreOptions::default() };
        let _ = restore(&dev, &opts, &mut |_| {});
    }
}
