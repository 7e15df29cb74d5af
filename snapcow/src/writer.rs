//! A writer of persistent COW stores laid out exactly as the kernel lays them out, for tests
//! (this crate's and the daemon's): a fresh store as `persistent_read_metadata` creates it
//! (header, zeroed area 0), exceptions allocated and committed as
//! `persistent_prepare_exception` / `persistent_commit_exception` do (next free chunk, skipping
//! metadata areas; a full area makes the next one zeroed), and invalidation as
//! `persistent_drop_snapshot` writes it.
//!
//! [`KernelStore::origin_write`] plays dm-snapshot's copy-on-write: before an origin chunk is
//! first overwritten, its old data is saved in the store.

use std::collections::BTreeSet;

use blockcopy::device::{BlockDevice, DeviceError};

use crate::format::{ChunkSize, DiskHeader, Exception, EXCEPTION_BYTES};

/// Why the writer failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// An I/O failed.
    #[error("I/O failed: {0}")]
    Device(#[from] DeviceError),
    /// The chunk size is not one the kernel accepts.
    #[error("invalid chunk size of {0} sectors")]
    ChunkSize(u32),
    /// The COW device is full (the kernel would invalidate the snapshot: -ENOSPC).
    #[error("the COW device is full")]
    NoSpace,
    /// The origin chunk already has an exception.
    #[error("origin chunk {0} already has an exception")]
    Duplicate(u64),
    /// The data given for a chunk is not one chunk long.
    #[error("chunk data of {got} bytes, expected {expected}")]
    ChunkData { got: usize, expected: u64 },
}

/// A store being written, with the kernel's allocation state (`struct pstore`).
#[derive(Debug, Clone)]
pub struct KernelStore {
    chunk: ChunkSize,
    /// Chunks on the COW device.
    chunks: u64,
    next_free: u64,
    current_area: u64,
    /// The current area's records, as in memory (`ps->area`).
    area: Vec<Exception>,
    exceptions: Vec<Exception>,
    saved: BTreeSet<u64>,
    valid: bool,
}

impl KernelStore {
    /// Creates a fresh store on `cow` (header, then area 0 zeroed; each write flushed).
    pub fn create<D: BlockDevice + ?Sized>(
        cow: &D,
        chunk_sectors: u32,
    ) -> Result<KernelStore, WriterError> {
        let chunk =
            ChunkSize::from_sectors(chunk_sectors).ok_or(WriterError::ChunkSize(chunk_sectors))?;
        let chunks = cow.size() / chunk.bytes();
        if chunks < 2 {
            return Err(WriterError::NoSpace);
        }
        let store = KernelStore {
            chunk,
            chunks,
            next_free: 2,
            current_area: 0,
            area: Vec::new(),
            exceptions: Vec::new(),
            saved: BTreeSet::new(),
            valid: true,
        };
        store.write_header(cow)?;
        store.write_chunk(cow, 1, &[])?;
        Ok(store)
    }

    /// The exceptions committed so far, in commit order.
    pub fn exceptions(&self) -> &[Exception] {
        &self.exceptions
    }

    /// The next COW chunk the kernel would allocate (`next_free`).
    pub fn next_free(&self) -> u64 {
        self.next_free
    }

    /// The chunk size.
    pub fn chunk(&self) -> ChunkSize {
        self.chunk
    }

    /// Saves `data` (one chunk) as the old contents of origin chunk `old_chunk`: allocates the
    /// next free COW chunk, writes the data there, flushes, then commits the record (the area
    /// rewritten, zeroing the next area first when this one is full), flushed. Returns the COW
    /// chunk.
    pub fn add_exception<D: BlockDevice + ?Sized>(
        &mut self,
        cow: &D,
        old_chunk: u64,
        data: &[u8],
    ) -> Result<u64, WriterError> {
        if u64::try_from(data.len()).ok() != Some(self.chunk.bytes()) {
            return Err(WriterError::ChunkData { got: data.len(), expected: self.chunk.bytes() });
        }
        if self.saved.contains(&old_chunk) {
            return Err(WriterError::Duplicate(old_chunk));
        }
        // persistent_prepare_exception: room for the chunk, then the next free one, skipping
        // a metadata area.
        if self.next_free >= self.chunks {
            return Err(WriterError::NoSpace);
        }
        let new_chunk = self.next_free;
        self.next_free += 1;
        if self.next_free % (self.chunk.exceptions_per_area() + 1) == 1 {
            self.next_free += 1;
        }
        cow.write_at(data, self.offset(new_chunk))?;
        cow.flush()?;
        // persistent_commit_exception.
        let e = Exception { old_chunk, new_chunk };
        self.area.push(e);
        self.exceptions.push(e);
        self.saved.insert(old_chunk);
        let full = u64::try_from(self.area.len()).ok() == Some(self.chunk.exceptions_per_area());
        if full {
            let next = self.area_location(self.current_area + 1);
            if next >= self.chunks {
                // zero_disk_area fails past the end: the kernel invalidates the store.
                self.invalidate(cow)?;
                return Err(WriterError::NoSpace);
            }
            self.write_chunk(cow, next, &[])?;
        }
        let here = self.area_location(self.current_area);
        self.write_chunk(cow, here, &self.area)?;
        cow.flush()?;
        if full {
            self.current_area += 1;
            self.area.clear();
        }
        Ok(new_chunk)
    }

    /// dm-snapshot's copy-on-write for a write of `data` at byte `offset` of `origin`: every
    /// origin chunk the write touches and that has no exception yet gets its current contents
    /// saved first; then the write goes to the origin (not flushed). The origin's last chunk may
    /// be partial: its missing tail is saved as zeros.
    pub fn origin_write<O, D>(
        &mut self,
        origin: &O,
        cow: &D,
        offset: u64,
        data: &[u8],
    ) -> Result<(), WriterError>
    where
        O: BlockDevice + ?Sized,
        D: BlockDevice + ?Sized,
    {
        let cb = self.chunk.bytes();
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / cb;
        let last = (offset.saturating_add(len) - 1) / cb;
        let mut old = vec![0u8; usize::try_from(cb).unwrap_or(usize::MAX)];
        for chunk in first..=last {
            if self.saved.contains(&chunk) {
                continue;
            }
            let start = chunk * cb;
            let n = cb.min(origin.size().saturating_sub(start));
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            old.fill(0);
            origin.read_at(&mut old[..n], start)?;
            self.add_exception(cow, chunk, &old)?;
        }
        origin.write_at(data, offset)?;
        Ok(())
    }

    /// Marks the store invalid on disk (`persistent_drop_snapshot`), as the kernel does when
    /// the snapshot overflows.
    pub fn invalidate<D: BlockDevice + ?Sized>(&mut self, cow: &D) -> Result<(), WriterError> {
        self.valid = false;
        self.write_header(cow)?;
        cow.flush()?;
        Ok(())
    }

    fn area_location(&self, area: u64) -> u64 {
        self.chunk.area_location(area).unwrap_or(u64::MAX)
    }

    fn offset(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(self.chunk.bytes())
    }

    /// Writes chunk 0: the header, the rest zero.
    fn write_header<D: BlockDevice + ?Sized>(&self, cow: &D) -> Result<(), WriterError> {
        let mut header = DiskHeader::new(self.chunk);
        header.valid = u32::from(self.valid);
        let mut buf = self.zero_chunk();
        buf[..header.encode().len()].copy_from_slice(&header.encode());
        cow.write_at(&buf, 0)?;
        Ok(())
    }

    /// Writes a metadata chunk holding `records`, the rest zero.
    fn write_chunk<D: BlockDevice + ?Sized>(
        &self,
        cow: &D,
        chunk: u64,
        records: &[Exception],
    ) -> Result<(), WriterError> {
        let mut buf = self.zero_chunk();
        for (slot, e) in buf.chunks_exact_mut(EXCEPTION_BYTES).zip(records) {
            slot.copy_from_slice(&e.encode());
        }
        cow.write_at(&buf, self.offset(chunk))?;
        Ok(())
    }

    fn zero_chunk(&self) -> Vec<u8> {
        vec![0u8; usize::try_from(self.chunk.bytes()).unwrap_or(usize::MAX)]
    }
}

/// A store image of `cow_bytes` bytes holding one exception per `(old_chunk, data)`, in that
/// order, written as the kernel writes it.
pub fn store_image(
    chunk_sectors: u32,
    cow_bytes: usize,
    exceptions: &[(u64, Vec<u8>)],
) -> Result<Vec<u8>, WriterError> {
    let cow = blockcopy::device::MemDevice::new(cow_bytes);
    let mut store = KernelStore::create(&cow, chunk_sectors)?;
    for (old_chunk, data) in exceptions {
        store.add_exception(&cow, *old_chunk, data)?;
    }
    Ok(cow.snapshot())
}
