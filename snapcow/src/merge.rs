//! The offline merge: before the origin's file system is mounted, copy every saved chunk back
//! onto the origin, then invalidate the store.
//!
//! The COW store is a file on the origin's own file system, so the merge reads it through its
//! extents on the raw device ([`ExtentDevice`]) and writes the origin on that same device. The
//! plan (origin chunk ← its saved copy, translated to raw-device blocks) is applied by the copy
//! engine (`blockcopy::apply`): sorted, coalesced, several I/Os in flight, a flush, then the
//! commit point — the store's header zeroed through the extent map — and a flush.
//!
//! **Crash safety** (docs/snapcow.md): the engine refuses the plan if any origin chunk it
//! writes lies inside the COW file's extents (the whole file is protected: header, areas and
//! saved data). So until the header is zeroed, every byte the parse and the copies read is
//! unchanged, and a new run parses the same store and writes the same bytes. The header is
//! zeroed only after a flush made every copy durable; after it, a new run finds no store
//! (magic 0) and writes nothing.

use blockcopy::device::{BlockDevice, DeviceError};
use blockcopy::{
    ApplyError, ApplyOptions, BlockCopy, BlockRange, CopyPlan, Extent, ExtentDevice, ExtentError,
    Layout, PlanError,
};

use crate::format::{read_store, CowError, CowStore, SECTOR_BYTES};

/// Options of [`merge`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// I/Os in flight while copying; 0 counts as 1.
    pub queue_depth: usize,
    /// The largest single write, in bytes.
    pub max_io_bytes: usize,
    /// Parse and plan, write nothing (the report says what would be copied).
    pub dry_run: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { queue_depth: 8, max_io_bytes: 1 << 20, dry_run: false }
    }
}

/// What [`merge`] did (or, for a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MergeReport {
    /// Whether the COW file held a store at all (false: nothing to merge, nothing written).
    pub had_store: bool,
    /// Exceptions (saved chunks) in the store.
    pub exceptions: u64,
    /// Bytes copied onto the origin.
    pub bytes_copied: u64,
    /// The store's chunk size in bytes (0 without a store).
    pub chunk_bytes: u64,
}

/// Broad classes of [`MergeError`] that callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device failed an I/O.
    Io,
    /// The store, or the extent map given for it, is unusable; nothing was written.
    Corrupt,
    /// The kernel invalidated the snapshot: the data cannot be rolled back; nothing written.
    Invalidated,
    /// The store is valid but cannot be merged safely or is of an unknown version; nothing
    /// was written.
    Unsupported,
}

/// Why a merge failed. Only `Device` can leave a partial merge behind, and a new run finishes
/// it.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The extent map of the COW file is invalid for the raw device.
    #[error("invalid extent map of the COW file: {0}")]
    Extents(#[from] ExtentError),
    /// The extents or the raw device are not aligned to 512 bytes.
    #[error("the COW file's extents and the raw device must be aligned to 512 bytes")]
    Unaligned,
    /// The store cannot be read.
    #[error("{0}")]
    Store(#[from] CowError),
    /// The plan is invalid (an exception's bytes overflow 64-bit offsets).
    #[error("invalid merge plan: {0}")]
    Plan(#[from] PlanError),
    /// Some origin chunk to restore lies inside the COW file itself: merging would overwrite
    /// the store while reading it.
    #[error(
        "{blocks} blocks of {block_size} bytes that the merge would write lie inside the COW file"
    )]
    Hazard { blocks: u64, block_size: u64 },
    /// The copy engine refused the plan before writing (a copy outside the device; the plan
    /// is built inside it, so this only guards its invariants).
    #[error("the copy engine refused the merge plan: {0}")]
    Engine(ApplyError),
    /// A read, write or flush failed.
    #[error("device I/O failed: {0}")]
    Device(#[from] DeviceError),
}

impl MergeError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MergeError::Device(_) => ErrorKind::Io,
            MergeError::Store(e) => match e.kind() {
                crate::format::ErrorKind::Io => ErrorKind::Io,
                crate::format::ErrorKind::Corrupt => ErrorKind::Corrupt,
                crate::format::ErrorKind::Unsupported => ErrorKind::Unsupported,
                crate::format::ErrorKind::Invalidated => ErrorKind::Invalidated,
            },
            MergeError::Hazard { .. } => ErrorKind::Unsupported,
            MergeError::Extents(_)
            | MergeError::Unaligned
            | MergeError::Plan(_)
            | MergeError::Engine(_) => ErrorKind::Corrupt,
        }
    }
}

/// Merges the store in the COW file (whose extents on `raw` are `cow_extents`) into the origin
/// (all of `raw`); see the module documentation. `progress(done, total)` counts bytes copied.
/// Nothing is written on any error but `Device`, nor without a store, nor in a dry run.
pub fn merge<D: BlockDevice + ?Sized>(
    raw: &D,
    cow_extents: &[Extent],
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport, MergeError> {
    let cow = ExtentDevice::new(raw, cow_extents)?;
    let Some(store) = read_store(&cow)? else {
        return Ok(MergeReport::default());
    };
    store.check_origin(raw.size())?;
    let plan = plan(raw.size(), &cow, &store)?;
    let hazards = plan.hazards(Layout::SameDevice);
    if !hazards.is_empty() {
        return Err(MergeError::Hazard { blocks: hazards.blocks, block_size: plan.block_size() });
    }
    let report = MergeReport {
        had_store: true,
        exceptions: u64::try_from(store.exceptions.len()).unwrap_or(u64::MAX),
        bytes_copied: plan.bytes(),
        chunk_bytes: store.chunk_bytes(),
    };
    if opts.dry_run {
        return Ok(report);
    }
    let options = ApplyOptions {
        queue_depth: opts.queue_depth,
        max_io_bytes: opts.max_io_bytes,
        layout: Layout::SameDevice,
        preloaded: None,
    };
    // The commit point: the header's first block zeroed (magic 0: no store). The kernel
    // rewrites the header and zeroes area 0 itself when it next creates a snapshot here.
    let header_len = store.chunk_bytes().min(4096);
    let commit = || cow.write_at(&vec![0u8; usize::try_from(header_len).unwrap_or(4096)], 0);
    let bs = plan.block_size();
    let mut report_bytes = |done: u64, total: u64| progress(done * bs, total * bs);
    blockcopy::apply(raw, raw, &plan, &options, commit, &mut report_bytes).map_err(
        |e| match e {
            ApplyError::Device(e) => MergeError::Device(e),
            ApplyError::Hazard(h) => MergeError::Hazard { blocks: h.blocks, block_size: bs },
            refused @ ApplyError::OutOfDevice { .. } => MergeError::Engine(refused),
        },
    )?;
    Ok(report)
}

/// The largest power of two, at most one chunk, that divides every extent field and the raw
/// device's size: the plan's block size.
fn block_size(raw_size: u64, extents: &[Extent], chunk_bytes: u64) -> Result<u64, MergeError> {
    let all = extents.iter().flat_map(|e| [e.logical, e.physical, e.len]).chain([raw_size]);
    let bits =
        all.fold(chunk_bytes, |acc, v| if v == 0 { acc } else { acc.min(1 << v.trailing_zeros()) });
    if bits < SECTOR_BYTES {
        return Err(MergeError::Unaligned);
    }
    Ok(bits)
}

/// The copies: every exception's origin chunk (clipped to the device's end) ← its COW chunk,
/// translated through the extent map; the whole COW file protected.
fn plan<D: BlockDevice + ?Sized>(
    raw_size: u64,
    cow: &ExtentDevice<'_, D>,
    store: &CowStore,
) -> Result<CopyPlan, MergeError> {
    let cb = store.chunk_bytes();
    let bs = block_size(raw_size, cow.extents(), cb)?;
    let mut copies = Vec::with_capacity(store.exceptions.len());
    for e in &store.exceptions {
        // `check_origin` and the parser bound both chunk numbers by device sizes.
        let target = e.old_chunk * cb;
        let len = cb.min(raw_size - target);
        let mut at = target;
        for (physical, n) in cow.physical_ranges(e.new_chunk * cb, len)? {
            copies.push(BlockCopy { target: at / bs, source: physical / bs, blocks: n / bs });
            at += n;
        }
    }
    let protected =
        cow.extents().iter().map(|x| BlockRange { start: x.physical / bs, blocks: x.len / bs });
    Ok(CopyPlan::new(bs, copies)?.protect(protected)?)
}
