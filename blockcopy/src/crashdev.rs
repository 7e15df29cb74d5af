//! A crash-injecting block device (CrashMonkey's model).
//!
//! [`CrashDevice`] wraps a base image and records every write and flush. Reads see every write
//! issued so far (what a running system sees). A *crash state* is what the disk may hold after a
//! power cut: everything made durable by the last completed flush, plus an **arbitrary subset**
//! of the writes issued since that flush (a disk cache may persist them in any order, or not at
//! all).
//!
//! Atomicity: writes are split into aligned *units* of `atomic_unit` bytes (the block size); a
//! unit lands whole or not at all, but the units of one multi-unit write land independently.
//! dm-bow relies on exactly this: a log-sector write (one block) is never torn (§4.7), while a
//! multi-block copy may be half done at a crash — which is safe because its flush comes before
//! the log entry that refers to it. Two kept writes to the same unit are applied in issue order.
//!
//! Crash points: the history is cut into *epochs*, each the writes between two flushes (the
//! last epoch may end without one). A crash anywhere inside epoch `k` — before its flush, or
//! after any of its writes — leaves the durable image of the epoch's start plus a subset of a
//! prefix of the epoch's writes, so enumerating, per epoch, subsets of its writes covers every
//! crash point; [`Epoch::standard_states`] picks: none kept, all kept (the state right after the
//! flush), every prefix (a crash right after each write, nothing reordered), every
//! "all but one", and random subsets.

use std::sync::Mutex;

use crate::device::{BlockDevice, DeviceError};

/// One recorded operation, for traces and ordering checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEvent {
    /// `write_at(offset, len)`.
    Write { offset: u64, len: usize },
    /// `flush()`.
    Flush,
    /// `read_at(offset, len)`.
    Read { offset: u64, len: usize },
}

/// One atomic unit of a write issued since the epoch's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    /// Byte offset.
    pub offset: u64,
    /// The bytes (at most one unit, never crossing a unit boundary).
    pub data: Vec<u8>,
    /// Index of the write in [`CrashDevice::events`] this unit belongs to.
    pub event: usize,
}

/// Which pending writes survive a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// None: only the durable image.
    None,
    /// All of them (same as a crash right after the flush).
    All,
    /// The first `n`, in issue order (a crash right after the `n`-th unit, nothing reordered).
    Prefix(usize),
    /// All but the `i`-th.
    AllBut(usize),
    /// Those whose flag is set.
    Mask(Vec<bool>),
}

impl Keep {
    fn keeps(&self, i: usize) -> bool {
        match self {
            Keep::None => false,
            Keep::All => true,
            Keep::Prefix(n) => i < *n,
            Keep::AllBut(j) => i != *j,
            Keep::Mask(m) => m.get(i).copied().unwrap_or(false),
        }
    }
}

#[derive(Debug)]
struct Inner {
    base: Vec<u8>,
    current: Vec<u8>,
    events: Vec<IoEvent>,
    writes: Vec<(usize, u64, Vec<u8>)>,
}

/// The crash-injecting device. See the module documentation.
#[derive(Debug)]
pub struct CrashDevice {
    inner: Mutex<Inner>,
    size: u64,
    unit: usize,
}

impl CrashDevice {
    /// Wraps `image` (its contents are durable); writes tear at `atomic_unit` boundaries.
    pub fn new(image: Vec<u8>, atomic_unit: usize) -> CrashDevice {
        let size = u64::try_from(image.len()).unwrap_or(u64::MAX);
        CrashDevice {
            inner: Mutex::new(Inner {
                current: image.clone(),
                base: image,
                events: Vec::new(),
                writes: Vec::new(),
            }),
            size,
            unit: atomic_unit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every operation so far, in order.
    pub fn events(&self) -> Vec<IoEvent> {
        self.lock().events.clone()
    }

    /// Forgets the recorded reads (keeps writes and flushes), to keep long runs small.
    pub fn events_without_reads(&self) -> Vec<IoEvent> {
        self.lock().events.iter().copied().filter(|e| !matches!(e, IoEvent::Read { .. })).collect()
    }

    /// What reads return now: the base with every write applied.
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Number of writes recorded.
    pub fn write_count(&self) -> usize {
        self.lock().writes.len()
    }

    /// Walks the whole history epoch by epoch (see the module documentation).
    pub fn for_each_epoch(&self, mut f: impl FnMut(&Epoch<'_>)) {
        let inner = self.lock();
        let mut durable = inner.base.clone();
        let mut pending: Vec<PendingWrite> = Vec::new();
        let mut w = 0usize;
        let mut index = 0usize;
        for (i, ev) in inner.events.iter().enumerate() {
            match ev {
                IoEvent::Write { .. } => {
                    if let Some((event, offset, data)) = inner.writes.get(w) {
                        debug_assert_eq!(*event, i);
                        split_units(*offset, data, self.unit, *event, &mut pending);
                    }
                    w += 1;
                }
                IoEvent::Flush => {
                    f(&Epoch {
                        index,
                        ends_with_flush: true,
                        durable: &durable,
                        pending: &pending,
                    });
                    for p in pending.drain(..) {
                        apply(&mut durable, p.offset, &p.data);
                    }
                    index += 1;
                }
                IoEvent::Read { .. } => {}
            }
        }
        f(&Epoch { index, ends_with_flush: false, durable: &durable, pending: &pending });
    }

    /// The crash image of the present moment: durable contents plus `keep` of the writes
    /// since the last flush.
    pub fn crash_image(&self, keep: &Keep) -> Vec<u8> {
        let mut out = None;
        self.for_each_epoch(|e| {
            if !e.ends_with_flush {
                out = Some(e.image(keep));
            }
        });
        out.unwrap_or_default()
    }
}

fn split_units(offset: u64, data: &[u8], unit: usize, event: usize, out: &mut Vec<PendingWrite>) {
    let unit64 = u64::try_from(unit).unwrap_or(u64::MAX);
    let mut at = 0usize;
    while at < data.len() {
        let off = offset + u64::try_from(at).unwrap_or(u64::MAX);
        let to_boundary = usize::try_from(unit64 - off % unit64).unwrap_or(unit);
        let n = to_boundary.min(data.len() - at);
        out.push(PendingWrite { offset: off, data: data[at..at + n].to_vec(), event });
        at += n;
    }
}

fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    if let Some(dst) = image.get_mut(at..at.saturating_add(data.len())) {
        dst.copy_from_slice(data);
    }
}

/// The writes between two flushes and the durable image before them.
#[derive(Debug)]
pub struct Epoch<'a> {
    /// Flushes completed before this epoch.
    pub index: usize,
    /// Whether the epoch ends with a flush (the last one may not).
    pub ends_with_flush: bool,
    durable: &'a [u8],
    pending: &'a [PendingWrite],
}

impl Epoch<'_> {
    /// The durable image at the epoch's start.
    pub fn durable(&self) -> &[u8] {
        self.durable
    }

    /// The units written in this epoch, in issue order.
    pub fn pending(&self) -> &[PendingWrite] {
        self.pending
    }

    /// The disk after a crash in this epoch that kept `keep` of its writes.
    pub fn image(&self, keep: &Keep) -> Vec<u8> {
        let mut img = self.durable.to_vec();
        for (i, p) in self.pending.iter().enumerate() {
            if keep.keeps(i) {
                apply(&mut img, p.offset, &p.data);
            }
        }
        img
    }

    /// The crash states this crate's tests use for an epoch: none, all, every prefix, every
    /// "all but one" (up to `max_each` of each kind), and `random` random subsets drawn from
    /// `seed`. Duplicates (e.g. for an empty epoch) are removed.
    pub fn standard_states(&self, max_each: usize, random: usize, seed: u64) -> Vec<Keep> {
        let n = self.pending.len();
        let mut out = vec![Keep::None];
        if n == 0 {
            return out;
        }
        out.push(Keep::All);
        for p in 1..n.min(max_each + 1) {
            out.push(Keep::Prefix(p));
        }
        if n > 1 {
            for i in 0..n.min(max_each) {
                out.push(Keep::AllBut(i));
            }
        }
        if n > 2 {
            let mut rng = XorShift::new(
                seed ^ u64::try_from(self.index).unwrap_or(0).wrapping_mul(0x9E37_79B9),
            );
            for _ in 0..random {
                out.push(Keep::Mask((0..n).map(|_| rng.next() & 1 == 1).collect()));
            }
        }
        out
    }
}

/// A tiny deterministic generator (xorshift64*), so crash enumeration needs no extra crate.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeds the generator (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 { 0x2545_F491_4F6C_DD1D } else { seed })
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl BlockDevice for CrashDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let mut inner = self.lock();
        let at = range(offset, buf.len(), self.size)?;
        buf.copy_from_slice(&inner.current[at..at + buf.len()]);
        inner.events.push(IoEvent::Read { offset, len: buf.len() });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let mut inner = self.lock();
        let at = range(offset, buf.len(), self.size)?;
        inner.current[at..at + buf.len()].copy_from_slice(buf);
        let event = inner.events.len();
        inner.events.push(IoEvent::Write { offset, len: buf.len() });
        inner.writes.push((event, offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.lock().events.push(IoEvent::Flush);
        Ok(())
    }
}

fn range(offset: u64, len: usize, size: u64) -> Result<usize, DeviceError> {
    let end = u64::try_from(len).ok().and_then(|l| offset.checked_add(l));
    match end {
        Some(end) if end <= size => Ok(usize::try_from(offset).unwrap_or(usize::MAX)),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

/// The environment variable naming the file [`report_count`] appends to.
pub const COUNTS_FILE_ENV: &str = "CHECKPOINTD_TEST_COUNTS";

/// Prints a count a crash test measured and, when `CHECKPOINTD_TEST_COUNTS` names a file,
/// appends it there: `cargo xtask test` sets it and lists the counts in its summary, since
/// libtest hides what passing tests print.
pub fn report_count(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os(COUNTS_FILE_ENV) {
        use std::io::Write;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_can_be_lost_flushed_ones_cannot() {
        let dev = CrashDevice::new(vec![0; 4096], 512);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 1024], 512).unwrap();
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [2; 512]);
        let none = dev.crash_image(&Keep::None);
        assert_eq!(&none[..512], &[1; 512]);
        assert_eq!(&none[512..1536], &[0; 1024]);
        // The two-unit write tears at the unit boundary.
        let half = dev.crash_image(&Keep::Prefix(1));
        assert_eq!(&half[512..1024], &[2; 512]);
        assert_eq!(&half[1024..1536], &[0; 512]);
        assert_eq!(dev.crash_image(&Keep::All), dev.current());
    }

    #[test]
    fn epochs_cover_history() {
        let dev = CrashDevice::new(vec![0; 2048], 512);
        for i in 0..3u8 {
            dev.write_at(&[i + 1; 512], u64::from(i) * 512).unwrap();
            dev.flush().unwrap();
        }
        let mut seen = Vec::new();
        dev.for_each_epoch(|e| seen.push((e.index, e.ends_with_flush, e.pending().len())));
        assert_eq!(seen, vec![(0, true, 1), (1, true, 1), (2, true, 1), (3, false, 0)]);
    }

    #[test]
    fn same_unit_writes_apply_in_order() {
        let dev = CrashDevice::new(vec![0; 512], 512);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.write_at(&[2; 512], 0).unwrap();
        assert_eq!(dev.crash_image(&Keep::All), vec![2; 512]);
        assert_eq!(dev.crash_image(&Keep::AllBut(1)), vec![1; 512]);
        assert_eq!(dev.crash_image(&Keep::AllBut(0)), vec![2; 512]);
    }
}
