//! A small producer of dm-bow logs, for tests, fuzz seeds and the restore benchmark.
//!
//! It follows the kernel's rules that matter to a restore (dm-bow-format.md §3–§4): the
//! checkpoint start saves block 0 twice (SECTOR0_CURRENT, then the entry-0 backup), the first
//! overwrite of an unchanged or backup block copies it to the head of the free list and logs
//! it, free blocks are written without a copy, block-0 writes go to SECTOR0_CURRENT (itself
//! relocated with checksum 0 when the file system reuses its block), and a full log sector is
//! saved as entry 0 of the next one. It is not the engine model (`bow::model` is): no range
//! tree, no discards, and a simpler free list (a queue of blocks in allocation order).

use std::collections::{HashMap, HashSet, VecDeque};

use crate::crc::{seed_for, BowCrc};
use crate::device::{BlockDevice, DeviceError};
use crate::format::{write_entry, LogEntry, LogHeader};
use crate::units::{BlockSize, Sectors};

/// Why the producer could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The free list is empty (the kernel's ENOSPC).
    #[error("no free block left")]
    NoSpace,
    /// A write outside the device.
    #[error("block {0} is outside the device")]
    OutOfRange(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Changed,
    Backup,
    Sector0Current,
}

/// Writes a dm-bow log onto a device while applying block writes to it.
#[derive(Debug)]
pub struct LogWriter<'a, D: BlockDevice> {
    dev: &'a D,
    bs: BlockSize,
    blocks: u64,
    log: Vec<u8>,
    header: LogHeader,
    free: VecDeque<u64>,
    free_set: HashSet<u64>,
    state: HashMap<u64, State>,
    /// The live block 0 location.
    sector0: u64,
}

impl<'a, D: BlockDevice> LogWriter<'a, D> {
    /// Enters the checkpoint: `free` lists the blocks free at checkpoint start, in the order the
    /// kernel would hand them out (block 0 and duplicates are ignored).
    pub fn start(dev: &'a D, bs: BlockSize, free: &[u64]) -> Result<Self, SynthError> {
        let blocks = dev.size() / u64::from(bs.bytes());
        let mut seen = HashSet::new();
        let free: VecDeque<u64> =
            free.iter().copied().filter(|&b| b != 0 && b < blocks && seen.insert(b)).collect();
        let free_set = free.iter().copied().collect();
        let mut w = LogWriter {
            dev,
            bs,
            blocks,
            log: vec![0; bs.as_usize()],
            header: LogHeader::new(bs, 0, Sectors(0)),
            free,
            free_set,
            state: HashMap::new(),
            sector0: 0,
        };
        let current = w.alloc()?;
        w.copy(0, current, 1, None)?;
        w.sector0 = current;
        w.state.insert(current, State::Sector0Current);
        let backup = w.alloc()?;
        let crc = w.copy(0, backup, 1, Some(0))?;
        w.add_entry(0, backup, 1, crc)?;
        w.state.insert(backup, State::Backup);
        Ok(w)
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.bs
    }

    /// Where logical block 0 lives now.
    pub fn sector0_block(&self) -> u64 {
        self.sector0
    }

    /// The current log sector's sequence number.
    pub fn sequence(&self) -> u32 {
        self.header.sequence
    }

    /// Blocks still free.
    pub fn free_blocks(&self) -> usize {
        self.free_set.len()
    }

    /// Writes `data` (a whole number of blocks) at block `start`, the way a write through the
    /// dm-bow device would land.
    pub fn write(&mut self, start: u64, data: &[u8]) -> Result<(), SynthError> {
        let bs = self.bs.as_usize();
        let n = u64::try_from(data.len() / bs).unwrap_or(u64::MAX);
        if start.checked_add(n).is_none_or(|end| end > self.blocks) {
            return Err(SynthError::OutOfRange(start));
        }
        let mut i = 0;
        while i < n {
            let block = start + i;
            let chunk = &data[usize::try_from(i).unwrap_or(usize::MAX) * bs..];
            if block == 0 {
                let at = self.sector0;
                self.put(at, &chunk[..bs])?;
                i += 1;
                continue;
            }
            // A piece: consecutive blocks of the same kind.
            let kind = self.kind(block);
            let mut len = 1;
            while i + len < n && start + i + len != 0 && self.kind(start + i + len) == kind {
                len += 1;
            }
            match kind {
                Kind::Free | Kind::Changed => {
                    for b in block..block + len {
                        self.free_set.remove(&b);
                        self.state.insert(b, State::Changed);
                    }
                }
                Kind::Saved(state) => {
                    len = self.backup(block, len, state)?;
                }
            }
            let bytes = usize::try_from(len).unwrap_or(usize::MAX) * bs;
            self.put(block, &chunk[..bytes])?;
            i += len;
        }
        Ok(())
    }

    fn kind(&self, block: u64) -> Kind {
        match self.state.get(&block) {
            Some(State::Changed) => Kind::Changed,
            Some(&s) => Kind::Saved(Some(s)),
            None if self.free_set.contains(&block) => Kind::Free,
            None => Kind::Saved(None),
        }
    }

    /// Backs up up to `len` blocks at `block` into one contiguous chunk from the head of the
    /// free list; returns how many were backed up.
    fn backup(&mut self, block: u64, len: u64, state: Option<State>) -> Result<u64, SynthError> {
        let first = self.alloc()?;
        let mut got = 1;
        while got < len && self.free.front() == Some(&(first + got)) {
            self.alloc()?;
            got += 1;
        }
        let is_sector0 = state == Some(State::Sector0Current);
        let crc = self.copy(block, first, got, (!is_sector0).then(|| seed_for(block)))?;
        let new_state = if is_sector0 { State::Sector0Current } else { State::Backup };
        for b in first..first + got {
            self.state.insert(b, new_state);
        }
        self.add_entry(block, first, got, crc)?;
        if is_sector0 {
            // Like the kernel, the on-disk header learns the new location at the next log write.
            self.sector0 = first;
        }
        for b in block..block + got {
            self.state.insert(b, State::Changed);
        }
        Ok(got)
    }

    fn sector_of(&self, block: u64) -> Sectors {
        Sectors(block * self.bs.sectors())
    }

    fn alloc(&mut self) -> Result<u64, SynthError> {
        while let Some(b) = self.free.pop_front() {
            if self.free_set.remove(&b) {
                return Ok(b);
            }
        }
        Err(SynthError::NoSpace)
    }

    fn put(&self, block: u64, data: &[u8]) -> Result<(), SynthError> {
        self.dev.write_at(data, block * u64::from(self.bs.bytes()))?;
        Ok(())
    }

    /// Copies `n` blocks, durable before returning; returns the CRC if a seed is given (else 0).
    fn copy(&self, from: u64, to: u64, n: u64, seed: Option<u32>) -> Result<u32, SynthError> {
        let bs = u64::from(self.bs.bytes());
        let mut buf = vec![0u8; usize::try_from(n * bs).unwrap_or(usize::MAX)];
        self.dev.read_at(&mut buf, from * bs)?;
        self.dev.write_at(&buf, to * bs)?;
        self.dev.flush()?;
        Ok(seed.map_or(0, |s| {
            let mut crc = BowCrc::new(s);
            crc.update(&buf);
            crc.finish()
        }))
    }

    fn add_entry(&mut self, source: u64, dest: u64, n: u64, crc: u32) -> Result<(), SynthError> {
        if self.header.count == self.bs.max_entries() {
            let saved = self.alloc()?;
            let crc0 = self.copy(0, saved, 1, Some(0))?;
            self.state.insert(saved, State::Backup);
            self.header.sequence += 1;
            self.header.count = 0;
            self.append(0, saved, 1, crc0)?;
        }
        self.append(source, dest, n, crc)
    }

    fn append(&mut self, source: u64, dest: u64, n: u64, crc: u32) -> Result<(), SynthError> {
        let entry = LogEntry {
            source: self.sector_of(source),
            dest: self.sector_of(dest),
            size: u32::try_from(n * u64::from(self.bs.bytes())).unwrap_or(u32::MAX),
            checksum: crc,
        };
        write_entry(&mut self.log, self.header.header_size, self.header.count, &entry);
        self.header.count += 1;
        self.write_log()
    }

    fn write_log(&mut self) -> Result<(), SynthError> {
        // The header carries the live block 0 location as of this write (after a relocation
        // of SECTOR0_CURRENT the kernel's entry write still has the old one, see `backup`).
        self.header.sector0 = self.sector_of(self.sector0);
        self.header.encode_into(&mut self.log);
        self.dev.write_at(&self.log, 0)?;
        self.dev.flush()?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    Changed,
    Saved(Option<State>),
}
