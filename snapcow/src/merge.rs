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
    /// Copy only the first `limit` exceptions (in store order) and stop before the commit
    /// point: the store stays valid and a later merge finishes the job. A test hook, as
    /// vold's `restoreCheckpointPart`: an interrupted merge on demand.
    pub limit: Option<u64>,
    /// The COW file's length when the snapshot was armed, if the file has grown since (a
    /// backend that extends the store while it is in use): the blocks past it were free space
    /// then, so saved chunks of them are left out (see [`merge`]). `None`: the whole file was
    /// the COW file from the start.
    pub armed_len: Option<u64>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            queue_depth: 8,
            max_io_bytes: 1 << 20,
            dry_run: false,
            limit: None,
            armed_len: None,
        }
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
    /// [`MergeOptions::limit`] stopped the merge before the commit point: the store is still
    /// valid (and `bytes_copied` counts only the copies made).
    pub limit_reached: bool,
    /// Exceptions left out because their origin chunk lies in the COW file past the store or
    /// in its growth since arming (see [`merge`]): blocks whose old content means nothing.
    pub skipped_in_cow_file: u64,
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
    // Sector alignment first: a misaligned map is refused whatever the store holds.
    block_size(raw.size(), cow_extents, SECTOR_BYTES)?;
    let Some(store) = read_store(&cow)? else {
        return Ok(MergeReport::default());
    };
    store.check_origin(raw.size())?;
    let total = u64::try_from(store.exceptions.len()).unwrap_or(u64::MAX);
    let limited = opts.limit.is_some_and(|n| n < total);
    // Where the store ends is judged on the whole store, and so are hazards, so a limited
    // run skips and refuses exactly what a whole one would.
    let store_end = store_end(&cow, &store);
    let (mut plan, skipped) = plan(raw.size(), &cow, &store, store_end, opts.armed_len)?;
    let hazards = plan.hazards(Layout::SameDevice);
    if !hazards.is_empty() {
        return Err(MergeError::Hazard { blocks: hazards.blocks, block_size: plan.block_size() });
    }
    if let (true, Some(n)) = (limited, opts.limit) {
        let mut part = store.clone();
        part.exceptions.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        plan = self::plan(raw.size(), &cow, &part, store_end, opts.armed_len)?.0;
    }
    let report = MergeReport {
        had_store: true,
        exceptions: total,
        bytes_copied: plan.bytes(),
        chunk_bytes: store.chunk_bytes(),
        limit_reached: limited,
        skipped_in_cow_file: skipped,
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
    let commit = || {
        if limited {
            return Ok(());
        }
        cow.write_at(&vec![0u8; usize::try_from(header_len).unwrap_or(4096)], 0)
    };
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

/// Whether every extent starts and ends on a chunk boundary of the raw device. If not, an origin
/// chunk straddles the COW file's edge, and a write to its part outside the file makes the
/// kernel save the whole chunk, part of the COW file included; [`merge`] then refuses (the
/// copy would overwrite the store it reads). A backend should place the COW file on
/// chunk-aligned extents (a chunk size equal to the file system's block size guarantees it) and
/// check this before creating the snapshot.
pub fn extents_chunk_aligned(extents: &[Extent], chunk_bytes: u64) -> bool {
    chunk_bytes > 0
        && extents.iter().all(|e| {
            e.physical % chunk_bytes == 0 && e.physical.saturating_add(e.len) % chunk_bytes == 0
        })
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

/// The end of what the merge reads in the COW file (bytes from its start): the header, the
/// metadata areas up to the last one and the saved chunks (`CowStore::used_bytes`), capped at
/// the file's length. The kernel never wrote past it in this store.
fn store_end<D: BlockDevice + ?Sized>(cow: &ExtentDevice<'_, D>, store: &CowStore) -> u64 {
    let areas_end = store
        .chunk()
        .area_location(store.last_area)
        .and_then(|c| c.checked_add(1))
        .and_then(|c| c.checked_mul(store.chunk_bytes()))
        .unwrap_or(u64::MAX);
    store.used_bytes().max(areas_end).min(cow.size())
}

/// The copies: every exception's origin chunk (clipped to the device's end) ← its COW chunk,
/// translated through the extent map, with the store (the COW file up to `store_end`)
/// protected; and how many exceptions were left out.
///
/// An exception whose origin chunk lies wholly in a part of the COW file whose old content
/// means nothing is left out. In the image being restored (the one of arming time), those
/// blocks were either the COW file's own (checkpointd's, removed after the rollback) or, for a
/// store grown since (`armed_len`), free space. Two such parts:
/// - past the store (`store_end`): the kernel never stored anything there, so the file system
///   writing them during the boot damaged nothing the merge reads;
/// - the file's growth (past `armed_len`): the file system wrote those blocks while they were
///   free (a file written and deleted during the boot), before the growth made them the
///   store's; the kernel stored chunks there only after.
///
/// Restoring them would write into the file the merge reads. Any other exception inside the
/// store is kept and refused as a hazard: the boot may have overwritten the store.
fn plan<D: BlockDevice + ?Sized>(
    raw_size: u64,
    cow: &ExtentDevice<'_, D>,
    store: &CowStore,
    store_end: u64,
    armed_len: Option<u64>,
) -> Result<(CopyPlan, u64), MergeError> {
    let cb = store.chunk_bytes();
    let bs = block_size(raw_size, cow.extents(), cb)?;
    let meaningless = store_end.min(armed_len.unwrap_or(u64::MAX));
    let left_out = cow.physical_ranges(meaningless, cow.size() - meaningless)?;
    let is_left_out = |at: u64, len: u64| {
        left_out.iter().any(|&(start, n)| start <= at && at.saturating_add(len) <= start + n)
    };
    let mut copies = Vec::with_capacity(store.exceptions.len());
    let mut skipped = 0u64;
    for e in &store.exceptions {
        // `check_origin` and the parser bound both chunk numbers by device sizes.
        let target = e.old_chunk * cb;
        let len = cb.min(raw_size - target);
        if is_left_out(target, len) {
            skipped += 1;
            continue;
        }
        let mut at = target;
        for (physical, n) in cow.physical_ranges(e.new_chunk * cb, len)? {
            copies.push(BlockCopy { target: at / bs, source: physical / bs, blocks: n / bs });
            at += n;
        }
    }
    let protected = cow
        .physical_ranges(0, store_end)?
        .into_iter()
        .map(|(physical, n)| BlockRange { start: physical / bs, blocks: n.div_ceil(bs) });
    Ok((CopyPlan::new(bs, copies)?.protect(protected)?, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ErrorKind as CowKind;
    use crate::writer::KernelStore;
    use blockcopy::crashdev::{report_count, CrashDevice, IoEvent, XorShift};
    use blockcopy::device::MemDevice;

    const KIB: u64 = 1024;

    /// Where the COW file's header lies on the raw device.
    const HEADER_AT: u64 = 208 * KIB;

    /// A 256 KiB "file system" whose COW file (96 KiB) lies in three extents out of order,
    /// aligned to 16 KiB (the largest chunk the tests use).
    fn extents() -> Vec<Extent> {
        vec![
            Extent { logical: 0, physical: HEADER_AT, len: 32 * KIB },
            Extent { logical: 32 * KIB, physical: 96 * KIB, len: 16 * KIB },
            Extent { logical: 48 * KIB, physical: 144 * KIB, len: 48 * KIB },
        ]
    }

    fn in_cow(offset: u64) -> bool {
        extents().iter().any(|e| (e.physical..e.physical + e.len).contains(&offset))
    }

    struct Scenario {
        /// The raw device before the snapshot.
        before: Vec<u8>,
        /// The raw device with the snapshot's store after the writes.
        after: Vec<u8>,
        /// What a merge must leave: `before` outside the COW file, the store with its header
        /// block zeroed inside it.
        want: Vec<u8>,
        exceptions: usize,
    }

    /// Takes a snapshot with `chunk_sectors`, then makes `writes` random writes of up to 3
    /// KiB outside the COW file through dm-snapshot's copy-on-write.
    fn scenario(chunk_sectors: u32, writes: usize, seed: u64, raw_bytes: u64) -> Scenario {
        let mut rng = XorShift::new(seed);
        let before: Vec<u8> =
            (0..raw_bytes).map(|_| u8::try_from(rng.below(256)).unwrap()).collect();
        let raw = MemDevice::from_bytes(before.clone());
        let cow = ExtentDevice::new(&raw, &extents()).unwrap();
        let mut store = KernelStore::create(&cow, chunk_sectors).unwrap();
        let mut before = before;
        // The kernel's store writes changed the COW file; the origin "before" is the rest.
        before.copy_from_slice(&raw.snapshot());
        let cow_chunks = 96 * KIB / (u64::from(chunk_sectors) * 512);
        for _ in 0..writes {
            // Stop before the store could fill up: a write of up to 3 KiB touches at most
            // `3 KiB / chunk + 2` chunks, and one more may be skipped for an area.
            let cb = u64::from(chunk_sectors) * 512;
            if store.next_free() + (3 * KIB).div_ceil(cb) + 3 > cow_chunks {
                break;
            }
            let len = 1 + rng.below(3 * KIB);
            let offset = rng.below(raw_bytes - len);
            if (offset..offset + len).any(in_cow) {
                continue;
            }
            let data = vec![u8::try_from(rng.below(256)).unwrap(); usize::try_from(len).unwrap()];
            store.origin_write(&raw, &cow, offset, &data).unwrap();
        }
        let after = raw.snapshot();
        let mut want = before.clone();
        for (i, b) in want.iter_mut().enumerate() {
            let i = u64::try_from(i).unwrap();
            if in_cow(i) {
                *b = after[usize::try_from(i).unwrap()];
            }
        }
        let header = usize::try_from(HEADER_AT).unwrap();
        let header_len = usize::try_from((u64::from(chunk_sectors) * 512).min(4096)).unwrap();
        want[header..header + header_len].fill(0);
        Scenario { before, after, want, exceptions: store.exceptions().len() }
    }

    /// Appends an exception for `old_chunk` to the store in `raw`'s COW file (4 KiB chunks,
    /// its records all in area 0), saved in the store's next free chunk: returned, as the
    /// file's chunk index.
    fn append_exception(raw: &MemDevice, old_chunk: u64) -> u64 {
        let cow = ExtentDevice::new(raw, &extents()).unwrap();
        let store = read_store(&cow).unwrap().unwrap();
        let free = store.used_bytes() / 4096;
        let mut records = store.exceptions.clone();
        records.push(crate::format::Exception { old_chunk, new_chunk: free });
        let area = store.chunk().area_location(0).unwrap() * 4096;
        for (i, r) in records.iter().enumerate() {
            cow.write_at(&r.encode(), area + u64::try_from(i * 16).unwrap()).unwrap();
        }
        free
    }

    fn run(raw: &impl BlockDevice) -> Result<MergeReport, MergeError> {
        let opts = MergeOptions { queue_depth: 3, max_io_bytes: 8 * 1024, ..Default::default() };
        merge(raw, &extents(), &opts, &mut |_, _| {})
    }

    #[test]
    fn merge_restores_the_pre_snapshot_image_and_a_rerun_does_nothing() {
        for (chunk_sectors, seed) in [(8, 1), (1, 2), (32, 3), (2, 4)] {
            let s = scenario(chunk_sectors, 40, seed, 256 * KIB);
            assert!(s.exceptions > 0);
            assert!(s.after != s.before);
            let raw = MemDevice::from_bytes(s.after.clone());
            let mut last = (0, 0);
            let opts = MergeOptions::default();
            let report = merge(&raw, &extents(), &opts, &mut |d, t| last = (d, t)).unwrap();
            let cb = u64::from(chunk_sectors) * 512;
            assert_eq!(
                report,
                MergeReport {
                    had_store: true,
                    exceptions: u64::try_from(s.exceptions).unwrap(),
                    bytes_copied: u64::try_from(s.exceptions).unwrap() * cb,
                    chunk_bytes: cb,
                    limit_reached: false,
                    skipped_in_cow_file: 0,
                }
            );
            assert_eq!(last, (report.bytes_copied, report.bytes_copied));
            assert!(raw.snapshot() == s.want, "chunk {chunk_sectors} sectors");
            let again = run(&raw).unwrap();
            assert_eq!(again, MergeReport::default());
            assert!(!again.had_store);
            assert!(raw.snapshot() == s.want);
        }
    }

    #[test]
    fn a_limited_merge_stops_before_the_commit_point_and_a_rerun_finishes() {
        let s = scenario(8, 40, 21, 256 * KIB);
        let raw = MemDevice::from_bytes(s.after.clone());
        let opts = MergeOptions { limit: Some(3), ..Default::default() };
        let part = merge(&raw, &extents(), &opts, &mut |_, _| {}).unwrap();
        assert!(part.limit_reached);
        assert_eq!(part.bytes_copied, 3 * 4096, "three 4 KiB chunks");
        let mid = raw.snapshot();
        assert!(mid != s.after && mid != s.want, "some chunks copied, not all");
        // The store is still valid: a whole merge finishes the job.
        let rest = run(&raw).unwrap();
        assert!(rest.had_store && !rest.limit_reached);
        assert_eq!(rest.exceptions, u64::try_from(s.exceptions).unwrap());
        assert!(raw.snapshot() == s.want);
        // A limit at or above the store's size is a whole merge.
        let raw = MemDevice::from_bytes(s.after);
        let opts = MergeOptions { limit: Some(10_000), ..Default::default() };
        let whole = merge(&raw, &extents(), &opts, &mut |_, _| {}).unwrap();
        assert!(!whole.limit_reached);
        assert!(raw.snapshot() == s.want);
    }

    #[test]
    fn chunk_alignment_of_extents() {
        assert!(extents_chunk_aligned(&extents(), 16 * KIB));
        assert!(!extents_chunk_aligned(&extents(), 32 * KIB), "96 KiB is not a 32 KiB multiple");
        let odd = [Extent { logical: 0, physical: 4 * KIB, len: 8 * KIB }];
        assert!(extents_chunk_aligned(&odd, 4 * KIB));
        assert!(!extents_chunk_aligned(&odd, 8 * KIB));
    }

    #[test]
    fn a_partial_last_chunk_is_restored_up_to_the_device_end() {
        // 16 KiB chunks on a device of 252 KiB: the last chunk (240..256 KiB) is partial.
        let before: Vec<u8> = (0..252 * 1024).map(|i| u8::try_from(i % 241).unwrap()).collect();
        let raw = MemDevice::from_bytes(before);
        let cow = ExtentDevice::new(&raw, &extents()).unwrap();
        let mut store = KernelStore::create(&cow, 32).unwrap();
        let before = raw.snapshot();
        store.origin_write(&raw, &cow, 250 * KIB, &[0xEE; 1024]).unwrap();
        store.origin_write(&raw, &cow, 10, &[0xDD; 100]).unwrap();
        assert_eq!(store.exceptions().len(), 2);
        let report = run(&raw).unwrap();
        assert_eq!(report.bytes_copied, 16 * KIB + 12 * KIB, "a whole chunk and 12 KiB");
        let now = raw.snapshot();
        let outside_cow = |v: &[u8]| -> Vec<u8> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| !in_cow(u64::try_from(*i).unwrap()))
                .map(|(_, b)| *b)
                .collect()
        };
        assert!(outside_cow(&now) == outside_cow(&before));
    }

    #[test]
    fn a_crash_at_any_write_then_a_rerun_restores_the_pre_snapshot_image() {
        let mut states = 0;
        for (chunk_sectors, seed) in [(8, 11), (2, 12)] {
            let s = scenario(chunk_sectors, 25, seed, 256 * KIB);
            let raw = CrashDevice::new(s.after.clone(), 512);
            run(&raw).unwrap();
            assert!(raw.current() == s.want);
            raw.for_each_epoch(|epoch| {
                for keep in epoch.standard_states(64, 16, seed) {
                    let crashed = MemDevice::from_bytes(epoch.image(&keep));
                    run(&crashed).unwrap();
                    assert!(crashed.snapshot() == s.want, "epoch {} {keep:?}", epoch.index);
                    states += 1;
                }
            });
        }
        report_count(&format!("snapcow merge crash states tested: {states}"));
        assert!(states > 200, "only {states} crash states");
    }

    #[test]
    fn a_store_saving_its_own_blocks_is_refused_without_writing() {
        let s = scenario(8, 10, 5, 256 * KIB);
        let raw = MemDevice::from_bytes(s.after);
        // An exception for origin chunk 25 (100..104 KiB), inside the COW's second extent:
        // the file's chunk 9 (extent 2 starts at file offset 32 KiB), which the store uses. A
        // merge would overwrite the store while reading it.
        let free = append_exception(&raw, 25);
        assert!(free > 9, "the store reaches the file's chunk 9");
        let image = raw.snapshot();
        let crash = CrashDevice::new(image, 512);
        let err = run(&crash).unwrap_err();
        assert!(matches!(err, MergeError::Hazard { blocks, .. } if blocks > 0), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(crash.write_count(), 0);
        assert!(crash.events().iter().all(|e| !matches!(e, IoEvent::Flush)));
    }

    #[test]
    fn a_chunk_of_the_cow_file_past_the_store_is_left_out_and_the_rest_restored() {
        let s = scenario(8, 10, 5, 256 * KIB);
        let raw = MemDevice::from_bytes(s.after.clone());
        let cow = ExtentDevice::new(&raw, &extents()).unwrap();
        // The file system wrote origin chunk 46 (184..188 KiB) during the boot: the last 4 KiB
        // of the COW file (file offset 92 KiB in extent 3), which the store never reached.
        let free = append_exception(&raw, 46);
        assert!(free < 23, "the store must end before the file's last chunk");
        // Area 0 is the file's chunk 1. The saved "old content" and what the boot left there
        // differ.
        let area = 4096;
        cow.write_at(&[0xAB; 4096], free * 4096).unwrap();
        let boot_wrote = [0xCD; 4096];
        raw.write_at(&boot_wrote, 184 * KIB).unwrap();
        let mut want = s.want.clone();
        let tail = usize::try_from(184 * KIB).unwrap();
        want[tail..tail + 4096].copy_from_slice(&boot_wrote);
        // The saved chunk lies in the COW file, whose bytes a merge leaves as they are.
        let saved = usize::try_from(144 * KIB + (free - 12) * 4096).unwrap();
        want[saved..saved + 4096].fill(0xAB);
        let area_at = usize::try_from(HEADER_AT + area).unwrap();
        want[area_at..area_at + 4096].copy_from_slice(&raw.snapshot()[area_at..area_at + 4096]);

        let report = run(&raw).unwrap();
        assert_eq!(report.skipped_in_cow_file, 1);
        assert_eq!(report.exceptions, u64::try_from(s.exceptions + 1).unwrap());
        assert_eq!(report.bytes_copied, u64::try_from(s.exceptions).unwrap() * 4096);
        assert!(raw.snapshot() == want, "everything else restored, the tail chunk untouched");
        assert_eq!(run(&raw).unwrap(), MergeReport::default(), "committed");
    }

    #[test]
    fn a_chunk_of_a_grown_store_written_while_it_was_free_is_left_out_even_inside_the_store() {
        // Armed with the first 48 KiB of the file (extents 1 and 2); extent 3 (physical 144 KiB
        // on) came with a growth. Origin chunk 36 (144..148 KiB) is the file's chunk 12: the
        // boot wrote it while it was free space, and the store now holds a saved chunk there.
        let s = scenario(8, 16, 5, 256 * KIB);
        let raw = MemDevice::from_bytes(s.after.clone());
        let free = append_exception(&raw, 36);
        assert!((14..24).contains(&free), "the store reaches past file chunk 12: {free}");
        let image = raw.snapshot();
        let with = |armed_len| {
            let dev = MemDevice::from_bytes(image.clone());
            let opts = MergeOptions { armed_len, ..MergeOptions::default() };
            merge(&dev, &extents(), &opts, &mut |_, _| {}).map(|r| (r, dev.snapshot()))
        };
        // Taken for the file's own from the start, it is inside the store: refused.
        assert!(matches!(with(None), Err(MergeError::Hazard { .. })));
        assert!(matches!(with(Some(96 * KIB)), Err(MergeError::Hazard { .. })));
        let (report, after) = with(Some(48 * KIB)).unwrap();
        assert_eq!(report.skipped_in_cow_file, 1);
        assert_eq!(report.bytes_copied, u64::try_from(s.exceptions).unwrap() * 4096);
        // Everything else restored; the COW file as the merge found it, header zeroed.
        let mut want = image.clone();
        for (i, b) in want.iter_mut().enumerate() {
            if !in_cow(u64::try_from(i).unwrap()) {
                *b = s.before[i];
            }
        }
        let header = usize::try_from(HEADER_AT).unwrap();
        want[header..header + 4096].fill(0);
        assert!(after == want);
    }

    #[test]
    fn no_store_invalidated_stores_dry_runs_and_bad_maps_write_nothing() {
        // No store: the COW file is zero.
        let raw = CrashDevice::new(vec![0x11; 256 * 1024], 512);
        let zero = CrashDevice::new(
            {
                let mut img = vec![0x11u8; 256 * 1024];
                for e in extents() {
                    let at = usize::try_from(e.physical).unwrap();
                    img[at..at + usize::try_from(e.len).unwrap()].fill(0);
                }
                img
            },
            512,
        );
        assert_eq!(run(&zero).unwrap(), MergeReport::default());
        // Garbage where the header should be is an error, not "no store".
        let err = run(&raw).unwrap_err();
        assert!(matches!(err, MergeError::Store(CowError::BadMagic(0x1111_1111))));
        assert_eq!(err.kind(), ErrorKind::Corrupt);

        // An invalidated store (the snapshot overflowed).
        let s = scenario(8, 10, 6, 256 * KIB);
        let mem = MemDevice::from_bytes(s.after.clone());
        let cow = ExtentDevice::new(&mem, &extents()).unwrap();
        let mut h = [0u8; 16];
        cow.read_at(&mut h, 0).unwrap();
        h[4..8].fill(0);
        cow.write_at(&h, 0).unwrap();
        let invalid = CrashDevice::new(mem.snapshot(), 512);
        let err = run(&invalid).unwrap_err();
        assert!(matches!(err, MergeError::Store(CowError::Invalidated)));
        assert_eq!(err.kind(), ErrorKind::Invalidated);

        // A dry run reports the store and writes nothing.
        let dry = CrashDevice::new(s.after.clone(), 512);
        let opts = MergeOptions { dry_run: true, ..MergeOptions::default() };
        let report = merge(&dry, &extents(), &opts, &mut |_, _| {}).unwrap();
        assert!(report.had_store && report.exceptions == u64::try_from(s.exceptions).unwrap());

        // Extent maps the raw device cannot hold, or not 512-aligned.
        let bad = [Extent { logical: 0, physical: 250 * KIB, len: 16 * KIB }];
        let err = merge(&dry, &bad, &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, MergeError::Extents(ExtentError::OutOfDevice { .. })));
        let odd = [Extent { logical: 0, physical: HEADER_AT + 512, len: 40 * KIB + 100 }];
        let err = merge(&dry, &odd, &MergeOptions::default(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, MergeError::Unaligned), "{err:?}");

        for dev in [&raw, &zero, &invalid, &dry] {
            assert_eq!(dev.write_count(), 0);
        }
        assert_eq!(CowKind::Io, CowError::Device(DeviceError::Injected("x")).kind());
    }
}
