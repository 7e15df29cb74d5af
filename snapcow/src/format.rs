//! The on-disk format of dm-snapshot's persistent exception store, and a strict parser.
//!
//! Source of truth: the Linux kernel's `drivers/md/dm-snap-persistent.c` (`struct disk_header`,
//! `struct disk_exception`, `area_location`, `read_header`, `insert_exceptions`,
//! `read_exceptions`, `persistent_read_metadata`, `persistent_usage`); docs/snapcow.md
//! describes it section by section. In short, with `C` = chunk size in bytes:
//!
//! * chunk 0 is the header: four little-endian `u32`s `magic` ("SnAp", 0x70416e53), `valid`,
//!   `version` (1) and `chunk_size` (in 512-byte sectors); the rest of the chunk is zero;
//! * metadata area `a` is chunk `1 + a * (C/16 + 1)`: `C/16` records of two little-endian
//!   `u64`s `old_chunk` (origin chunk) and `new_chunk` (COW chunk holding its old data),
//!   followed by the `C/16` data chunks the area describes;
//! * reading stops at the first record whose `new_chunk` is 0; an area without one is full and
//!   the next area follows.
//!
//! The parser checks more than the kernel (which trusts the store it wrote): every chunk
//! number inside the device and off the metadata, no origin chunk or COW chunk named twice.
//! Hostile input costs at most one pass over the store's areas and memory proportional to the
//! records; it never panics.

use blockcopy::device::{BlockDevice, DeviceError};

/// "SnAp" read as a little-endian `u32` (`SNAP_MAGIC`).
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// The only on-disk version (`SNAPSHOT_DISK_VERSION`).
pub const DISK_VERSION: u32 = 1;
/// Bytes per sector, the unit of the header's chunk size.
pub const SECTOR_BYTES: u64 = 512;
/// Size of `struct disk_header`.
pub const HEADER_BYTES: usize = 16;
/// Size of `struct disk_exception`.
pub const EXCEPTION_BYTES: usize = 16;
/// The largest chunk size the kernel accepts, in sectors: a power of two at most
/// `INT_MAX >> SECTOR_SHIFT` (`dm_exception_store_set_chunk_size`), i.e. 2^21 sectors (1 GiB).
pub const MAX_CHUNK_SECTORS: u32 = 1 << 21;

/// A chunk size: a power of two from 1 to [`MAX_CHUNK_SECTORS`] sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSize(u32);

impl ChunkSize {
    /// Validates a chunk size in sectors as `dm_exception_store_set_chunk_size` does (power of
    /// two, not too high). The kernel also requires a multiple of the devices' logical block
    /// sizes, which an offline reader cannot know; the merge checks its own alignment.
    pub fn from_sectors(sectors: u32) -> Option<ChunkSize> {
        (sectors.is_power_of_two() && sectors <= MAX_CHUNK_SECTORS).then_some(ChunkSize(sectors))
    }

    /// The size in sectors.
    pub fn sectors(self) -> u32 {
        self.0
    }

    /// The size in bytes (at most 1 GiB).
    pub fn bytes(self) -> u64 {
        u64::from(self.0) * SECTOR_BYTES
    }

    /// Records per metadata area (`exceptions_per_area`).
    pub fn exceptions_per_area(self) -> u64 {
        self.bytes() / 16
    }

    /// The chunk holding metadata area `area` (`area_location`), or `None` on overflow.
    pub fn area_location(self, area: u64) -> Option<u64> {
        area.checked_mul(self.exceptions_per_area() + 1)?.checked_add(1)
    }

    /// Whether `chunk` is the header or a metadata area.
    pub fn is_metadata(self, chunk: u64) -> bool {
        chunk == 0 || (chunk - 1) % (self.exceptions_per_area() + 1) == 0
    }
}

/// `struct disk_header`: the first 16 bytes of chunk 0, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskHeader {
    pub magic: u32,
    /// 0 once the kernel invalidated the snapshot (it overflowed or an I/O failed).
    pub valid: u32,
    pub version: u32,
    /// In 512-byte sectors.
    pub chunk_size: u32,
}

impl DiskHeader {
    /// The header of a valid store with `chunk` (as `write_header` writes it).
    pub fn new(chunk: ChunkSize) -> DiskHeader {
        DiskHeader {
            magic: SNAP_MAGIC,
            valid: 1,
            version: DISK_VERSION,
            chunk_size: chunk.sectors(),
        }
    }

    /// Decodes the fields (no checks).
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> DiskHeader {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        DiskHeader { magic: word(0), valid: word(4), version: word(8), chunk_size: word(12) }
    }

    /// Encodes the fields.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        for (i, v) in
            [self.magic, self.valid, self.version, self.chunk_size].into_iter().enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// `struct disk_exception`: origin chunk `old_chunk`'s data at the snapshot's creation is in
/// COW chunk `new_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Exception {
    pub old_chunk: u64,
    pub new_chunk: u64,
}

impl Exception {
    /// Decodes a 16-byte record.
    pub fn decode(bytes: &[u8; EXCEPTION_BYTES]) -> Exception {
        let mut old = [0u8; 8];
        let mut new = [0u8; 8];
        old.copy_from_slice(&bytes[..8]);
        new.copy_from_slice(&bytes[8..]);
        Exception { old_chunk: u64::from_le_bytes(old), new_chunk: u64::from_le_bytes(new) }
    }

    /// Encodes a 16-byte record.
    pub fn encode(&self) -> [u8; EXCEPTION_BYTES] {
        let mut out = [0u8; EXCEPTION_BYTES];
        out[..8].copy_from_slice(&self.old_chunk.to_le_bytes());
        out[8..].copy_from_slice(&self.new_chunk.to_le_bytes());
        out
    }
}

/// Broad classes of [`CowError`] that callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device failed an I/O.
    Io,
    /// The store is malformed.
    Corrupt,
    /// The store is valid but from an on-disk version this code (and the kernel) cannot read.
    Unsupported,
    /// The kernel invalidated the snapshot: the data cannot be rolled back.
    Invalidated,
}

/// Why a COW store cannot be read. Every variant but `Device` is a property of the bytes.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A read failed.
    #[error("COW device I/O failed: {0}")]
    Device(#[from] DeviceError),
    /// The device is too small for a header and the first metadata area.
    #[error(
        "the COW device of {size} bytes is too small for a store of {chunk_bytes}-byte chunks"
    )]
    TooSmall { size: u64, chunk_bytes: u64 },
    /// The magic is neither "SnAp" nor 0 (the kernel: "Invalid or corrupt snapshot").
    #[error("bad magic {0:#010x} in the COW header")]
    BadMagic(u32),
    /// The header's chunk size is not a power of two or is too high.
    #[error("invalid chunk size of {0} sectors in the COW header")]
    ChunkSize(u32),
    /// An on-disk version other than 1.
    #[error("unsupported COW store version {0}")]
    Version(u32),
    /// `valid` is 0: the kernel invalidated the snapshot (it overflowed, or an I/O failed), and
    /// stopped saving old data: the origin cannot be rolled back.
    #[error("the snapshot was invalidated (it overflowed or failed an I/O): its data cannot be rolled back")]
    Invalidated,
    /// A full metadata area is followed by one past the end of the device.
    #[error(
        "metadata area {area} (chunk {chunk}) lies past the end of the device's {chunks} chunks"
    )]
    Truncated { area: u64, chunk: u64, chunks: u64 },
    /// A record's COW chunk is outside the device.
    #[error(
        "area {area} record {index}: COW chunk {new_chunk} is outside the device's {chunks} chunks"
    )]
    NewChunkOutOfRange { area: u64, index: u64, new_chunk: u64, chunks: u64 },
    /// A record's COW chunk is the header or a metadata area.
    #[error("area {area} record {index}: COW chunk {new_chunk} is a metadata chunk")]
    NewChunkIsMetadata { area: u64, index: u64, new_chunk: u64 },
    /// Two records save the same origin chunk (the kernel never writes this; see
    /// docs/snapcow.md for what it would do).
    #[error("origin chunk {0} is saved twice")]
    DuplicateOldChunk(u64),
    /// Two records point at the same COW chunk.
    #[error("COW chunk {0} holds two exceptions")]
    DuplicateNewChunk(u64),
    /// A record's origin chunk is outside the origin (checked by [`CowStore::check_origin`]).
    #[error("origin chunk {old_chunk} is outside the origin's {chunks} chunks")]
    OldChunkOutOfRange { old_chunk: u64, chunks: u64 },
}

impl CowError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CowError::Device(_) => ErrorKind::Io,
            CowError::Version(_) => ErrorKind::Unsupported,
            CowError::Invalidated => ErrorKind::Invalidated,
            _ => ErrorKind::Corrupt,
        }
    }
}

/// A valid store, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowStore {
    /// Chunk size in 512-byte sectors (validated: a power of two, at most 2^21).
    pub chunk_sectors: u32,
    /// The exceptions in on-disk order (area by area, record by record).
    pub exceptions: Vec<Exception>,
    /// The index of the last metadata area read (the one not full; `current_area`).
    pub last_area: u64,
    /// Whole chunks on the COW device.
    pub device_chunks: u64,
}

impl CowStore {
    /// The chunk size.
    pub fn chunk(&self) -> ChunkSize {
        ChunkSize(self.chunk_sectors)
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk().bytes()
    }

    /// Bytes of the COW device the store occupies: the kernel's "sectors allocated" of the
    /// status line (`persistent_usage`: the next free chunk, found as `read_exceptions` does —
    /// one past the highest COW chunk used, at least 2, skipping a metadata chunk — times the
    /// chunk size).
    pub fn used_bytes(&self) -> u64 {
        let stride = self.chunk().exceptions_per_area() + 1;
        let highest = self.exceptions.iter().map(|e| e.new_chunk).max().unwrap_or(0);
        let mut next_free = highest.saturating_add(1).max(2);
        if next_free % stride == 1 {
            next_free = next_free.saturating_add(1);
        }
        next_free.saturating_mul(self.chunk_bytes())
    }

    /// Bytes of metadata: the header and the areas up to the last one (`persistent_usage`).
    pub fn metadata_bytes(&self) -> u64 {
        self.last_area.saturating_add(2).saturating_mul(self.chunk_bytes())
    }

    /// Checks that every origin chunk lies inside an origin of `origin_bytes` bytes (a partial
    /// last chunk counts).
    pub fn check_origin(&self, origin_bytes: u64) -> Result<(), CowError> {
        let chunks = origin_bytes.div_ceil(self.chunk_bytes());
        match self.exceptions.iter().find(|e| e.old_chunk >= chunks) {
            Some(e) => Err(CowError::OldChunkOutOfRange { old_chunk: e.old_chunk, chunks }),
            None => Ok(()),
        }
    }
}

/// Bytes of a metadata area read at once (areas can be up to 1 GiB).
const AREA_PIECE: u64 = 64 << 10;

/// Reads the store on `cow`. `Ok(None)`: no store (the magic is 0, which the kernel takes as a
/// fresh COW device, whatever the rest holds).
///
/// Checks, in the kernel's order: magic, chunk size, version, `valid`; then every record (see
/// the module documentation). Writes nothing.
pub fn read_store<D: BlockDevice + ?Sized>(cow: &D) -> Result<Option<CowStore>, CowError> {
    let size = cow.size();
    let mut head = [0u8; HEADER_BYTES];
    if size < HEADER_BYTES as u64 {
        return Err(CowError::TooSmall { size, chunk_bytes: 0 });
    }
    cow.read_at(&mut head, 0)?;
    let header = DiskHeader::decode(&head);
    if header.magic == 0 {
        return Ok(None);
    }
    if header.magic != SNAP_MAGIC {
        return Err(CowError::BadMagic(header.magic));
    }
    let chunk =
        ChunkSize::from_sectors(header.chunk_size).ok_or(CowError::ChunkSize(header.chunk_size))?;
    if header.version != DISK_VERSION {
        return Err(CowError::Version(header.version));
    }
    if header.valid == 0 {
        return Err(CowError::Invalidated);
    }
    let chunk_bytes = chunk.bytes();
    let chunks = size / chunk_bytes;
    if chunks < 2 {
        return Err(CowError::TooSmall { size, chunk_bytes });
    }
    let per_area = chunk.exceptions_per_area();
    let mut exceptions: Vec<Exception> = Vec::new();
    let piece_len = usize::try_from(AREA_PIECE.min(chunk_bytes)).unwrap_or(usize::MAX);
    let mut piece = vec![0u8; piece_len];
    let mut area = 0u64;
    'areas: loop {
        let location = chunk.area_location(area).filter(|&c| c < chunks);
        let Some(location) = location else {
            let chunk = chunk.area_location(area).unwrap_or(u64::MAX);
            return Err(CowError::Truncated { area, chunk, chunks });
        };
        let start = location * chunk_bytes;
        let mut index = 0u64;
        let mut offset = 0u64;
        while offset < chunk_bytes {
            cow.read_at(&mut piece, start + offset)?;
            offset += AREA_PIECE.min(chunk_bytes);
            for record in piece.chunks_exact(EXCEPTION_BYTES) {
                let mut bytes = [0u8; EXCEPTION_BYTES];
                bytes.copy_from_slice(record);
                let e = Exception::decode(&bytes);
                if e.new_chunk == 0 {
                    break 'areas;
                }
                if e.new_chunk >= chunks {
                    let new_chunk = e.new_chunk;
                    return Err(CowError::NewChunkOutOfRange { area, index, new_chunk, chunks });
                }
                if chunk.is_metadata(e.new_chunk) {
                    let new_chunk = e.new_chunk;
                    return Err(CowError::NewChunkIsMetadata { area, index, new_chunk });
                }
                exceptions.push(e);
                index += 1;
            }
        }
        debug_assert_eq!(index, per_area);
        area += 1;
    }
    check_duplicates(&exceptions)?;
    Ok(Some(CowStore {
        chunk_sectors: chunk.sectors(),
        exceptions,
        last_area: area,
        device_chunks: chunks,
    }))
}

/// Refuses two records for one origin chunk or one COW chunk.
fn check_duplicates(exceptions: &[Exception]) -> Result<(), CowError> {
    let mut keys: Vec<u64> = exceptions.iter().map(|e| e.old_chunk).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(CowError::DuplicateOldChunk(w[0]));
    }
    keys = exceptions.iter().map(|e| e.new_chunk).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(CowError::DuplicateNewChunk(w[0]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{store_image, KernelStore};
    use blockcopy::device::MemDevice;
    use proptest::prelude::*;

    const CHUNK: u32 = 1; // 512-byte chunks: 32 records per area, areas every 33 chunks.

    #[test]
    fn header_and_record_layout_golden_bytes() {
        let h = DiskHeader::new(ChunkSize::from_sectors(8).unwrap());
        // "SnAp", valid 1, version 1, chunk 8 sectors: four little-endian u32s.
        let golden = [0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0];
        assert_eq!(h.encode(), golden);
        assert_eq!(&golden[..4], b"SnAp");
        assert_eq!(DiskHeader::decode(&golden), h);
        let e = Exception { old_chunk: 0x0102_0304_0506_0708, new_chunk: 2 };
        let golden = [8, 7, 6, 5, 4, 3, 2, 1, 2, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(e.encode(), golden);
        assert_eq!(Exception::decode(&golden), e);
    }

    #[test]
    fn chunk_sizes_and_area_locations_follow_the_kernel() {
        for bad in [0, 3, 6, 1 << 22, u32::MAX] {
            assert!(ChunkSize::from_sectors(bad).is_none(), "{bad}");
        }
        let c = ChunkSize::from_sectors(MAX_CHUNK_SECTORS).unwrap();
        assert_eq!(c.bytes(), 1 << 30);
        // 16 KiB chunks (the kernel's default 32 sectors): 1024 records per area.
        let c = ChunkSize::from_sectors(32).unwrap();
        assert_eq!(c.exceptions_per_area(), 1024);
        assert_eq!(c.area_location(0), Some(1));
        assert_eq!(c.area_location(1), Some(1026));
        assert_eq!(c.area_location(u64::MAX), None);
        assert!(c.is_metadata(0) && c.is_metadata(1) && c.is_metadata(1026));
        assert!(!c.is_metadata(2) && !c.is_metadata(1025) && !c.is_metadata(1027));
    }

    fn with_header(mut img: Vec<u8>, h: DiskHeader) -> Vec<u8> {
        img[..HEADER_BYTES].copy_from_slice(&h.encode());
        img
    }

    fn read(img: Vec<u8>) -> Result<Option<CowStore>, CowError> {
        read_store(&MemDevice::from_bytes(img))
    }

    fn chunk_of(b: u8) -> Vec<u8> {
        vec![b; 512]
    }

    #[test]
    fn fresh_zero_and_kernel_written_stores() {
        assert!(read(vec![0; 8192]).unwrap().is_none(), "all zeros: no store");
        // Magic 0 means a fresh device whatever follows (the kernel's new_snapshot).
        let mut img = vec![0xFF; 8192];
        img[..4].fill(0);
        assert!(read(img).unwrap().is_none());
        // A fresh store as the kernel creates it: no exceptions.
        let img = store_image(CHUNK, 64 * 512, &[]).unwrap();
        let store = read(img).unwrap().unwrap();
        assert_eq!(store.exceptions, vec![]);
        assert_eq!((store.chunk_sectors, store.last_area, store.device_chunks), (1, 0, 64));
        assert_eq!(store.used_bytes(), 2 * 512, "header and area 0");
        assert_eq!(store.metadata_bytes(), 2 * 512);
    }

    #[test]
    fn full_areas_continue_into_the_next_and_a_partial_one_ends_the_store() {
        // 40 exceptions: area 0 (chunk 1) full with COW chunks 2..=33, area 1 at chunk 34,
        // then chunks 35..=42.
        let list: Vec<(u64, Vec<u8>)> = (0..40).map(|i| (100 + i, chunk_of(1))).collect();
        let img = store_image(CHUNK, 128 * 512, &list).unwrap();
        let store = read(img.clone()).unwrap().unwrap();
        assert_eq!(store.exceptions.len(), 40);
        assert_eq!(store.exceptions[0], Exception { old_chunk: 100, new_chunk: 2 });
        assert_eq!(store.exceptions[31], Exception { old_chunk: 131, new_chunk: 33 });
        assert_eq!(store.exceptions[32], Exception { old_chunk: 132, new_chunk: 35 });
        assert_eq!(store.last_area, 1);
        assert_eq!(store.used_bytes(), 43 * 512);
        assert_eq!(store.metadata_bytes(), 3 * 512);
        // Records past the first new_chunk == 0 in an area are never read.
        let mut img = img;
        let slot = 34 * 512 + 9 * 16; // slot 8 (after the 8 records) stays zero
        img[slot..slot + 16].copy_from_slice(&Exception { old_chunk: 1, new_chunk: 99 }.encode());
        assert_eq!(read(img).unwrap().unwrap().exceptions.len(), 40);
        // Exactly one full area: the next (zeroed by the kernel) ends the store.
        let list: Vec<(u64, Vec<u8>)> = (0..32).map(|i| (i, chunk_of(2))).collect();
        let store = read(store_image(CHUNK, 64 * 512, &list).unwrap()).unwrap().unwrap();
        assert_eq!((store.exceptions.len(), store.last_area), (32, 1));
        assert_eq!(store.used_bytes(), 35 * 512, "chunk 34 is area 1: skipped");
    }

    #[test]
    fn header_errors_in_the_kernels_order() {
        let good = store_image(CHUNK, 64 * 512, &[(5, chunk_of(3))]).unwrap();
        let h = DiskHeader::decode(&good[..16].try_into().unwrap());
        let bad = |f: &dyn Fn(&mut DiskHeader)| {
            let mut h = h;
            f(&mut h);
            read(with_header(good.clone(), h)).unwrap_err()
        };
        assert!(matches!(bad(&|h| h.magic = 0x1234_5678), CowError::BadMagic(0x1234_5678)));
        assert!(matches!(bad(&|h| h.chunk_size = 3), CowError::ChunkSize(3)));
        assert!(matches!(bad(&|h| h.chunk_size = 0), CowError::ChunkSize(0)));
        assert!(matches!(bad(&|h| h.chunk_size = 1 << 22), CowError::ChunkSize(_)));
        assert!(matches!(bad(&|h| h.version = 2), CowError::Version(2)));
        let e = bad(&|h| h.valid = 0);
        assert!(matches!(e, CowError::Invalidated));
        assert_eq!(e.kind(), ErrorKind::Invalidated);
        // A bad chunk size is reported before a bad version, a bad version before `valid`.
        assert!(matches!(
            bad(&|h| {
                h.chunk_size = 5;
                h.version = 9
            }),
            CowError::ChunkSize(5)
        ));
        assert!(matches!(
            bad(&|h| {
                h.version = 9;
                h.valid = 0
            }),
            CowError::Version(9)
        ));
        // Any non-zero `valid` is valid, as for the kernel.
        assert!(read(with_header(good.clone(), DiskHeader { valid: 7, ..h })).is_ok());
        // Too small for the header, or for header and area 0.
        assert!(matches!(read(vec![0x53; 8]), Err(CowError::TooSmall { .. })));
        assert!(matches!(read(good[..512].to_vec()), Err(CowError::TooSmall { .. })));
        assert!(matches!(
            read(with_header(good.clone(), DiskHeader { chunk_size: 64, ..h })),
            Err(CowError::TooSmall { .. })
        ));
    }

    /// An image of `chunks` 512-byte chunks with a valid header and area 0 holding `records`.
    fn hand_made(chunks: usize, records: &[Exception]) -> Vec<u8> {
        let mut img = vec![0u8; chunks * 512];
        img[..16].copy_from_slice(&DiskHeader::new(ChunkSize::from_sectors(1).unwrap()).encode());
        for (i, r) in records.iter().enumerate() {
            img[512 + i * 16..512 + i * 16 + 16].copy_from_slice(&r.encode());
        }
        img
    }

    #[test]
    fn hostile_records_are_refused() {
        let e = |old_chunk, new_chunk| Exception { old_chunk, new_chunk };
        let err = |records: &[Exception]| read(hand_made(40, records)).unwrap_err();
        assert!(matches!(err(&[e(1, 40)]), CowError::NewChunkOutOfRange { new_chunk: 40, .. }));
        assert!(matches!(
            err(&[e(1, 2), e(2, u64::MAX)]),
            CowError::NewChunkOutOfRange { index: 1, .. }
        ));
        assert!(matches!(err(&[e(1, 1)]), CowError::NewChunkIsMetadata { new_chunk: 1, .. }));
        assert!(matches!(err(&[e(1, 34)]), CowError::NewChunkIsMetadata { new_chunk: 34, .. }));
        assert!(matches!(err(&[e(7, 2), e(7, 3)]), CowError::DuplicateOldChunk(7)));
        assert!(matches!(err(&[e(7, 2), e(8, 2)]), CowError::DuplicateNewChunk(2)));
        // A full area 0 whose successor (chunk 34) is past the end of a 34-chunk device.
        let full: Vec<Exception> = (0..32).map(|i| e(i, i + 2)).collect();
        assert!(matches!(
            read(hand_made(34, &full)),
            Err(CowError::Truncated { area: 1, chunk: 34, chunks: 34 })
        ));
        assert_eq!(read(hand_made(35, &full)).unwrap().unwrap().exceptions.len(), 32);
        assert_eq!(err(&[e(1, 40)]).kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn origin_bounds_count_a_partial_last_chunk() {
        let store =
            read(hand_made(40, &[Exception { old_chunk: 9, new_chunk: 2 }])).unwrap().unwrap();
        assert!(store.check_origin(10 * 512).is_ok());
        assert!(store.check_origin(9 * 512 + 1).is_ok(), "chunk 9 is partly inside");
        assert!(matches!(
            store.check_origin(9 * 512),
            Err(CowError::OldChunkOutOfRange { old_chunk: 9, chunks: 9 })
        ));
    }

    #[test]
    fn writer_and_parser_agree_on_allocation() {
        let cow = MemDevice::new(200 * 512);
        let mut w = KernelStore::create(&cow, CHUNK).unwrap();
        for i in 0..100 {
            w.add_exception(&cow, i * 3, &chunk_of(4)).unwrap();
            let store = read_store(&cow).unwrap().unwrap();
            assert_eq!(store.exceptions, w.exceptions());
            assert_eq!(store.used_bytes(), w.next_free() * 512, "after {} exceptions", i + 1);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read(bytes);
        }

        #[test]
        fn random_areas_behind_a_valid_header_never_panic(
            chunk_shift in 0u32..4,
            records in proptest::collection::vec((0u64..64, 0u64..80), 0..200),
            chunks in 2usize..80,
        ) {
            let sectors = 1u32 << chunk_shift;
            let cb = usize::try_from(sectors).unwrap() * 512;
            let mut img = vec![0u8; chunks * cb];
            img[..16].copy_from_slice(&DiskHeader::new(ChunkSize::from_sectors(sectors).unwrap()).encode());
            for (i, (old, new)) in records.iter().enumerate() {
                let at = cb + i * 16;
                if at + 16 <= img.len() {
                    let rec = Exception { old_chunk: *old, new_chunk: *new }.encode();
                    img[at..at + 16].copy_from_slice(&rec);
                }
            }
            if let Ok(Some(store)) = read(img) {
                let per_area = ChunkSize::from_sectors(sectors).unwrap();
                for e in &store.exceptions {
                    prop_assert!(e.new_chunk < store.device_chunks);
                    prop_assert!(!per_area.is_metadata(e.new_chunk));
                }
            }
        }
    }
}
