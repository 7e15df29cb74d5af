//! The daemon's side of issue 11: the estimator's inputs (docs/estimate.md, "The daemon's
//! inputs"), the reservation, and learning (docs/state-machine.md, "Learning").
//!
//! - **Free space**: GETFSMAP where the filesystem answers it (ext4), else statvfs
//!   (`f_bavail × f_frsize`: f2fs, tmpfs, others).
//! - **History**: what past checkpoints on this device consumed, from the state store.
//! - **Backend**: the one the daemon chose for the device (`auto` resolved); `test-null` is
//!   estimated as `bow` (block) or `f2fs` (fs) so the path can be driven without a kernel target.
//! - **Headroom**: `monitor.action_free_bytes`, under which the health monitor ends the
//!   checkpoint.
//! - **The trace**: a descriptor the caller opened; it must be a regular file, read from offset 0
//!   with `pread` (the caller's offset is not moved), at most [`MAX_TRACE_BYTES`].

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use backends::DeviceSpec;
use checkpoint_estimate::{
    Backend as EstimateBackend, EstimateConfig, FreeExtent, FreeSpace, PastCheckpoint, Trace,
};

use crate::backend::Resolved;
use crate::config::CheckpointMethod;
use crate::error::ServiceError;

/// Longest trace accepted, in bytes: a trace holds at most 2^24 records (the reader's bound) of
/// at most 21 bytes each, so a valid one is smaller; a larger file is refused before reading.
pub const MAX_TRACE_BYTES: u64 = 512 << 20;

/// Most declared sizes in one request (each is one `long` in the parcel).
pub const MAX_DECLARED_SIZES: usize = 65_536;

/// Past checkpoints read from the store for the estimator's history.
pub const HISTORY_ROWS: usize = 1_000;

/// One checkpointed device with the backend the daemon chose for it.
#[derive(Clone, Debug)]
pub struct DeviceBackend {
    /// The device.
    pub spec: DeviceSpec,
    /// The backend object's name (`[[backend]]` name, `@<instance>` when it has several).
    pub backend_name: String,
    /// The resolved backend with its options.
    pub backend: Resolved,
    /// Why `auto` chose it; empty when configured explicitly.
    pub reason: String,
}

impl DeviceBackend {
    /// The estimator's method for this backend.
    pub fn estimate_backend(&self) -> EstimateBackend {
        match &self.backend {
            // The engine backs up as dm-bow does (its log, its free-space economy).
            Resolved::Bow(_) | Resolved::UserspaceBow { .. } => EstimateBackend::Bow,
            Resolved::Snapshot(_) => EstimateBackend::Snapshot,
            Resolved::F2fs(_) => EstimateBackend::F2fs,
            Resolved::TestNull(o) => match o.kind.unwrap_or(CheckpointMethod::Block) {
                CheckpointMethod::Block => EstimateBackend::Bow,
                CheckpointMethod::Fs => EstimateBackend::F2fs,
            },
        }
    }

    /// The estimator's parameters for this backend: the documented defaults, the snapshot's
    /// chunk size, and `headroom_bytes`.
    pub fn estimate_config(&self, headroom_bytes: u64) -> EstimateConfig {
        let mut config = EstimateConfig { headroom_bytes, ..EstimateConfig::default() };
        if let Resolved::Snapshot(o) = &self.backend {
            config.snapshot_chunk_bytes = u64::from(o.chunk_kib) * 1024;
        }
        config
    }

    /// The block size the estimator works in: dm-bow's (4096 with `block_size_4096`, else the
    /// device's logical block size), the filesystem's otherwise.
    fn block_size(&self, fs_block: u64) -> Result<u32, ServiceError> {
        let fs_block = u32::try_from(fs_block).map_err(|_| {
            ServiceError::Space(format!(
                "{}: filesystem block size {fs_block} is too large",
                self.spec.mount_point.display()
            ))
        })?;
        Ok(match &self.backend {
            Resolved::Bow(o) if o.block_size_4096 => 4096,
            Resolved::UserspaceBow { .. } => 4096,
            Resolved::Bow(_) => File::open(&self.spec.raw)
                .ok()
                .and_then(|f| blockdev::blk::logical_block_size(&f).ok())
                .unwrap_or(fs_block.min(4096)),
            Resolved::TestNull(_) if self.estimate_backend() == EstimateBackend::Bow => {
                fs_block.min(4096)
            }
            _ => fs_block,
        })
    }
}

/// The free space and geometry of a mounted device, as the estimator takes them.
#[derive(Debug)]
pub struct Measured {
    /// Free extents (GETFSMAP) or a free byte count (statvfs).
    pub free: FreeSpace,
    /// The device's size: the raw block device's, else the filesystem's.
    pub device_size: u64,
    /// The estimator's block size.
    pub block_size: u32,
}

/// The size of `device` as the estimator sees it (see [`measure`]), without reading a free map
/// (learning needs only this, at commit).
pub fn device_size(device: &DeviceBackend) -> Result<u64, ServiceError> {
    geometry(device).map(|g| g.device_size)
}

/// `BLKGETSIZE64` of the raw device, when it is a block device that can be opened.
fn raw_device_size(device: &DeviceBackend) -> Option<u64> {
    File::open(&device.spec.raw)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| is_block_device(&m)))
        .and_then(|f| blockdev::blk::size(&f).ok())
        .map(|b| b.get())
}

struct Geometry {
    space: blockdev::fs::FsSpace,
    block_size: u32,
    /// Whether the size is the raw block device's.
    raw: bool,
    device_size: u64,
}

/// statvfs, the block size, and the device's size: the raw block device's, else the
/// filesystem's, in whole blocks.
fn geometry(device: &DeviceBackend) -> Result<Geometry, ServiceError> {
    let mount = &device.spec.mount_point;
    let space = blockdev::fs::statvfs(mount)
        .map_err(|e| ServiceError::Space(format!("statvfs {}: {e}", mount.display())))?;
    let block_size = device.block_size(space.block_size.get())?;
    let raw_size = raw_device_size(device);
    let size = raw_size.unwrap_or(space.total.get());
    // The estimator wants a whole number of blocks.
    let device_size = size - size % u64::from(block_size);
    Ok(Geometry { space, block_size, raw: raw_size.is_some(), device_size })
}

/// Measures `device` now: GETFSMAP's free map where the filesystem has it, statvfs otherwise.
pub fn measure(device: &DeviceBackend) -> Result<Measured, ServiceError> {
    let mount = &device.spec.mount_point;
    let Geometry { space, block_size, raw, device_size } = geometry(device)?;
    // GETFSMAP reports extents on the filesystem's own device; used only with that device's
    // size (the raw device's), never against a filesystem total.
    let map = if raw {
        File::open(mount).ok().and_then(|dir| blockdev::fs::free_extents(&dir).ok())
    } else {
        None
    };
    let free = match map {
        Some(extents) => FreeSpace::Map(
            extents
                .into_iter()
                .map(|(offset, len)| FreeExtent { offset: offset.get(), len: len.get() })
                .collect(),
        ),
        None => FreeSpace::Bytes(space.available.get()),
    };
    Ok(Measured { free, device_size, block_size })
}

/// Counts a held reservation of `bytes` (with its extents on the device, when known) as free:
/// it is handed over to the backend when the checkpoint starts (docs/backends.md,
/// "Reservation"), so the space it holds is there for the backups. On a free map without the
/// reservation's extents the map is left as it is (the estimate is then conservative).
pub fn count_reservation(free: FreeSpace, bytes: u64, extents: &[(u64, u64)]) -> FreeSpace {
    match free {
        FreeSpace::Bytes(n) => FreeSpace::Bytes(n.saturating_add(bytes)),
        FreeSpace::Map(mut map) => {
            map.extend(extents.iter().map(|&(offset, len)| FreeExtent { offset, len }));
            FreeSpace::Map(map)
        }
    }
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

/// Reads a trace from a descriptor the caller opened: a regular file of at most
/// [`MAX_TRACE_BYTES`], from offset 0 (pread: the caller's offset is left alone, and a pipe or
/// socket, which could block a binder thread forever, is refused).
pub fn read_trace(fd: OwnedFd) -> Result<Trace, ServiceError> {
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| ServiceError::InvalidArgument(format!("Trace: cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(ServiceError::InvalidArgument(
            "Trace must be a regular file (not a pipe, socket or device)".to_owned(),
        ));
    }
    if meta.len() > MAX_TRACE_BYTES {
        return Err(ServiceError::InvalidArgument(format!(
            "Trace is {} bytes, more than the {MAX_TRACE_BYTES} allowed",
            meta.len()
        )));
    }
    let reader = PositionalReader { file: &file, offset: 0, end: meta.len() };
    Trace::read_from(BufReader::with_capacity(1 << 16, reader)).map_err(ServiceError::Estimate)
}

/// Reads `file` with pread from `offset` up to `end` (the size at open: a file that grows
/// meanwhile is not read further).
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
    end: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Declared sizes as the estimator takes them: each at least 0, at most
/// [`MAX_DECLARED_SIZES`] of them.
pub fn declared_sizes(sizes: &[i64]) -> Result<Vec<u64>, ServiceError> {
    if sizes.len() > MAX_DECLARED_SIZES {
        return Err(ServiceError::InvalidArgument(format!(
            "{} declared sizes, more than the {MAX_DECLARED_SIZES} allowed",
            sizes.len()
        )));
    }
    sizes
        .iter()
        .map(|&s| {
            u64::try_from(s).map_err(|_| {
                ServiceError::InvalidArgument(format!("Declared size {s} is negative"))
            })
        })
        .collect()
}

/// The estimator's history from the store's consumption rows: this mount point's, with a
/// backend name the estimator knows (rows of other backends are kept for the report only).
pub fn past_checkpoints(rows: &[policy::Consumption], mount_point: &Path) -> Vec<PastCheckpoint> {
    rows.iter()
        .filter(|r| Path::new(&r.mount_point) == mount_point)
        .filter_map(|r| {
            Some(PastCheckpoint {
                backend: r.backend.parse().ok()?,
                device_size: r.device_size,
                actual_bytes: r.actual_bytes,
                estimated_bytes: r.estimated_bytes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    fn sample_trace() -> Vec<u8> {
        let records = vec![checkpoint_estimate::Record::write(8, 8)];
        let trace = Trace::from_records(1 << 20, 4096, records).expect("valid trace");
        let mut bytes = Vec::new();
        trace.write_to(&mut bytes).expect("written");
        bytes
    }

    #[test]
    fn a_trace_is_read_from_offset_0_without_moving_the_callers_offset() {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(&sample_trace()).expect("write");
        let end = file.stream_position().expect("position");
        let fd = OwnedFd::from(file.try_clone().expect("dup"));
        let trace = read_trace(fd).expect("parsed");
        assert_eq!(trace.device_size(), 1 << 20);
        assert_eq!(file.stream_position().expect("position"), end);
    }

    #[test]
    fn a_pipe_is_refused_unread() {
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        match read_trace(read) {
            Err(ServiceError::InvalidArgument(m)) => assert!(m.contains("regular file"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_damaged_trace_is_an_estimate_error() {
        let mut bytes = sample_trace();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(&bytes).expect("write");
        match read_trace(OwnedFd::from(file)) {
            Err(ServiceError::Estimate(e)) => {
                assert_eq!(e.kind(), checkpoint_estimate::ErrorKind::Corrupt, "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_held_reservation_counts_as_free() {
        assert_eq!(count_reservation(FreeSpace::Bytes(10), 5, &[]), FreeSpace::Bytes(15));
        let map = FreeSpace::Map(vec![FreeExtent { offset: 0, len: 4096 }]);
        assert_eq!(
            count_reservation(map.clone(), 8192, &[(8192, 8192)]),
            FreeSpace::Map(vec![
                FreeExtent { offset: 0, len: 4096 },
                FreeExtent { offset: 8192, len: 8192 }
            ])
        );
        // Without its extents a map cannot place it: unchanged.
        assert_eq!(count_reservation(map.clone(), 8192, &[]), map);
    }

    #[test]
    fn declared_sizes_must_not_be_negative() {
        assert_eq!(declared_sizes(&[0, 5]).expect("fine"), vec![0, 5]);
        match declared_sizes(&[5, -1]) {
            Err(ServiceError::InvalidArgument(m)) => assert_eq!(m, "Declared size -1 is negative"),
            other => panic!("{other:?}"),
        }
        assert!(declared_sizes(&vec![1; MAX_DECLARED_SIZES + 1]).is_err());
    }

    #[test]
    fn history_is_this_mount_points_and_known_backends() {
        let row = |mount: &str, backend: &str| policy::Consumption {
            id: 1,
            at_ms: 0,
            history_id: None,
            outcome: "committed".into(),
            mount_point: mount.into(),
            backend: backend.into(),
            device_size: 1 << 30,
            actual_bytes: 7,
            estimated_bytes: Some(9),
            predicted_bytes: None,
        };
        let rows = [row("/data", "bow"), row("/cache", "bow"), row("/data", "newfangled")];
        let past = past_checkpoints(&rows, Path::new("/data"));
        assert_eq!(past.len(), 1);
        assert_eq!((past[0].backend, past[0].actual_bytes), (EstimateBackend::Bow, 7));
        assert_eq!(past[0].estimated_bytes, Some(9));
    }
}
