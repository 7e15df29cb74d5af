//! A file seen through its extents: a [`BlockDevice`] whose logical byte range is mapped, piece
//! by piece, onto an underlying device (what FIEMAP reports for a file on that device).
//!
//! The offline dm-snapshot merge reads the COW store — a file on the origin's own file system —
//! this way, through the raw device, before that file system is mounted.

use crate::device::{BlockDevice, DeviceError};

/// One extent: `len` bytes at offset `logical` of the file live at offset `physical` of the
/// underlying device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// Why an extent map was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    /// An extent of zero bytes.
    #[error("extent {index} is empty")]
    Empty { index: usize },
    /// An extent whose end does not fit in 64 bits.
    #[error("extent {index} overflows 64-bit offsets")]
    Overflow { index: usize },
    /// An extent reaching past the end of the underlying device.
    #[error("extent {index} ends at byte {end}, past the device's {size} bytes")]
    OutOfDevice { index: usize, end: u64, size: u64 },
    /// Two extents map the same logical bytes.
    #[error("two extents map logical byte {offset}")]
    LogicalOverlap { offset: u64 },
    /// Two extents map onto the same bytes of the underlying device.
    #[error("two extents map onto device byte {offset}")]
    PhysicalOverlap { offset: u64 },
    /// An extent not aligned to the alignment the caller needs.
    #[error("extent {index} is not aligned to {align} bytes")]
    Unaligned { index: usize, align: u64 },
}

/// Checks an extent map against a device of `device_size` bytes and returns it sorted by
/// logical offset: every extent non-empty and inside the device, no logical or physical
/// overlap. Holes in the logical range are allowed (I/O there fails).
pub fn validate_extents(extents: &[Extent], device_size: u64) -> Result<Vec<Extent>, ExtentError> {
    for (index, e) in extents.iter().enumerate() {
        if e.len == 0 {
            return Err(ExtentError::Empty { index });
        }
        let (Some(_), Some(end)) = (e.logical.checked_add(e.len), e.physical.checked_add(e.len))
        else {
            return Err(ExtentError::Overflow { index });
        };
        if end > device_size {
            return Err(ExtentError::OutOfDevice { index, end, size: device_size });
        }
    }
    let mut sorted = extents.to_vec();
    sorted.sort_unstable_by_key(|e| e.physical);
    for w in sorted.windows(2) {
        if w[1].physical < w[0].physical + w[0].len {
            return Err(ExtentError::PhysicalOverlap { offset: w[1].physical });
        }
    }
    sorted.sort_unstable_by_key(|e| e.logical);
    for w in sorted.windows(2) {
        if w[1].logical < w[0].logical + w[0].len {
            return Err(ExtentError::LogicalOverlap { offset: w[1].logical });
        }
    }
    Ok(sorted)
}

/// A logical device made of extents of `dev`. Its size is the end of the last extent.
#[derive(Debug)]
pub struct ExtentDevice<'a, D: BlockDevice + ?Sized> {
    dev: &'a D,
    /// Sorted by logical offset, disjoint on both sides.
    extents: Vec<Extent>,
    size: u64,
}

impl<'a, D: BlockDevice + ?Sized> ExtentDevice<'a, D> {
    /// Maps `extents` (any order) onto `dev`, after [`validate_extents`].
    pub fn new(dev: &'a D, extents: &[Extent]) -> Result<Self, ExtentError> {
        let extents = validate_extents(extents, dev.size())?;
        let size = extents.last().map_or(0, |e| e.logical + e.len);
        Ok(ExtentDevice { dev, extents, size })
    }

    /// The extents, sorted by logical offset.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The underlying device.
    pub fn device(&self) -> &'a D {
        self.dev
    }

    /// The pieces of the underlying device that hold logical bytes `[logical, logical + len)`,
    /// in logical order, as (physical offset, length). Fails on a hole or past the end.
    pub fn physical_ranges(&self, logical: u64, len: u64) -> Result<Vec<(u64, u64)>, DeviceError> {
        let mut out = Vec::new();
        self.walk(logical, len, |physical, _, n| {
            out.push((physical, n));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f(physical, offset in the request, length)` for each piece of the request.
    fn walk(
        &self,
        logical: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, u64) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let req = usize::try_from(len).unwrap_or(usize::MAX);
        let end = logical
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(DeviceError::OutOfRange { offset: logical, len: req, size: self.size })?;
        let hole = DeviceError::Unmapped { offset: logical, len: req };
        let mut at = logical;
        let mut i = self.extents.partition_point(|e| e.logical + e.len <= at);
        while at < end {
            let e = self.extents.get(i).ok_or(DeviceError::Unmapped { offset: at, len: req })?;
            if e.logical > at {
                return Err(hole);
            }
            let n = (e.logical + e.len).min(end) - at;
            let done = usize::try_from(at - logical).unwrap_or(usize::MAX);
            f(e.physical + (at - e.logical), done, n)?;
            at += n;
            i += 1;
        }
        Ok(())
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for ExtentDevice<'_, D> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let dev = self.dev;
        self.walk(offset, len, |physical, at, n| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            dev.read_at(&mut buf[at..at + n], physical)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        // Check the whole range first, so a write into a hole writes nothing.
        self.walk(offset, len, |_, _, _| Ok(()))?;
        let dev = self.dev;
        self.walk(offset, len, |physical, at, n| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            dev.write_at(&buf[at..at + n], physical)
        })
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.dev.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    fn e(logical: u64, physical: u64, len: u64) -> Extent {
        Extent { logical, physical, len }
    }

    #[test]
    fn reads_and_writes_cross_extents_in_logical_order() {
        let raw = MemDevice::from_bytes((0..64u8).collect());
        // Logical 0..8 at 40, 8..24 at 8, 24..32 at 0 (given out of order).
        let dev = ExtentDevice::new(&raw, &[e(8, 8, 16), e(24, 0, 8), e(0, 40, 8)]).unwrap();
        assert_eq!(dev.size(), 32);
        let mut buf = [0u8; 12];
        dev.read_at(&mut buf, 4).unwrap();
        assert_eq!(buf, [44, 45, 46, 47, 8, 9, 10, 11, 12, 13, 14, 15]);
        let mut buf = [0u8; 10];
        dev.read_at(&mut buf, 20).unwrap();
        assert_eq!(buf, [20, 21, 22, 23, 0, 1, 2, 3, 4, 5]);
        dev.write_at(&[0xEE; 6], 5).unwrap();
        let img = raw.snapshot();
        assert_eq!(&img[45..48], &[0xEE; 3]);
        assert_eq!(&img[8..11], &[0xEE; 3]);
        assert_eq!(img[11], 11);
        assert_eq!(dev.physical_ranges(6, 20).unwrap(), vec![(46, 2), (8, 16), (0, 2)]);
        assert!(matches!(dev.read_at(&mut buf, 30), Err(DeviceError::OutOfRange { .. })));
        dev.flush().unwrap();
    }

    #[test]
    fn holes_fail_and_a_write_into_one_writes_nothing() {
        let raw = MemDevice::new(64);
        let dev = ExtentDevice::new(&raw, &[e(0, 0, 8), e(16, 32, 8)]).unwrap();
        let mut buf = [0u8; 4];
        assert!(matches!(dev.read_at(&mut buf, 10), Err(DeviceError::Unmapped { .. })));
        assert!(matches!(dev.write_at(&[9; 12], 4), Err(DeviceError::Unmapped { .. })));
        assert_eq!(raw.snapshot(), vec![0; 64], "nothing written");
        assert!(matches!(dev.physical_ranges(6, 4), Err(DeviceError::Unmapped { .. })));
    }

    #[test]
    fn bad_maps_are_refused() {
        let raw = MemDevice::new(64);
        let new = |x: &[Extent]| ExtentDevice::new(&raw, x).map(|_| ());
        assert_eq!(new(&[e(0, 0, 0)]), Err(ExtentError::Empty { index: 0 }));
        assert_eq!(
            new(&[e(0, 60, 8)]),
            Err(ExtentError::OutOfDevice { index: 0, end: 68, size: 64 })
        );
        assert_eq!(new(&[e(u64::MAX, 0, 8)]), Err(ExtentError::Overflow { index: 0 }));
        assert_eq!(new(&[e(0, 0, 8), e(4, 16, 8)]), Err(ExtentError::LogicalOverlap { offset: 4 }));
        assert_eq!(new(&[e(0, 0, 8), e(8, 4, 8)]), Err(ExtentError::PhysicalOverlap { offset: 4 }));
        assert_eq!(ExtentDevice::new(&raw, &[]).unwrap().size(), 0);
    }
}
