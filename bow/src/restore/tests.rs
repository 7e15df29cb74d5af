//! Restore tests: the worked example, produced logs with rollovers and relocations, equality
//! with vold's replay, crash-and-rerun at every write, limits, policies, dry runs, hostile logs.
#![allow(clippy::cast_possible_truncation)] // Small test sizes and indices.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::fuzzing::{self, NoWriteDevice};
use super::synth::{LogWriter, SynthError};
use super::*;
use crate::crc::bow_crc;
use crate::device::{BlockDevice, DeviceError, MemDevice};
use crate::format::{LogEntry, LogHeader, LogSector, MAGIC_WOB};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[3]).collect()
    }
}

fn quiet() -> impl FnMut(Progress) {
    |_| {}
}

fn opts() -> RestoreOptions {
    RestoreOptions { queue_depth: 4, max_io_bytes: 8192, ..RestoreOptions::default() }
}

fn run(dev: &impl BlockDevice, o: &RestoreOptions) -> RestoreOutcome {
    restore(dev, o, &mut quiet()).expect("restore").outcome
}

/// A device checkpointed by the log producer.
struct Scenario {
    bs: usize,
    original: Vec<u8>,
    checkpointed: Vec<u8>,
    free_at_start: HashSet<u64>,
}

impl Scenario {
    fn new(seed: u64, bs: BlockSize, blocks: u64, writes: usize) -> Scenario {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let b = bs.as_usize();
        let original = rng.bytes(b * blocks as usize);
        let dev = MemDevice::from_bytes(original.clone());
        let mut free: Vec<u64> = (1..blocks).filter(|_| rng.below(100) < 55).collect();
        // Mostly ascending with some shuffled stretches, like a trimmed list in use.
        for i in 0..free.len() / 4 {
            let j = rng.below(free.len() as u64) as usize;
            free.swap(i * 4, j);
        }
        let free_at_start: HashSet<u64> = free.iter().copied().collect();
        let mut w = LogWriter::start(&dev, bs, &free).expect("start");
        for _ in 0..writes {
            let (start, n) = match rng.below(10) {
                0 | 1 => (0, 1),
                2 | 3 => (w.sector0_block(), 1),
                4 => (free[rng.below(free.len() as u64) as usize], 1),
                5 | 6 => {
                    let n = rng.below(6) + 1;
                    (rng.below(blocks - n), n)
                }
                _ => (rng.below(blocks), 1),
            };
            let data = rng.bytes(b * n as usize);
            match w.write(start, &data) {
                Ok(()) => {}
                Err(SynthError::NoSpace) => break,
                Err(e) => panic!("{e}"),
            }
        }
        Scenario { bs: b, original, checkpointed: dev.snapshot(), free_at_start }
    }

    /// The same through the engine model (kernel-exact logs): discards in TRIM, checkpoint,
    /// then random writes (block 0, the live block 0's location, backups, runs) and discards.
    fn model(seed: u64, bs: BlockSize, blocks: u64, ops: usize) -> Scenario {
        use crate::model::{BowEngine, BowModel, BowState, ModelConfig};
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let b = bs.as_usize();
        let bss = bs.sectors();
        let original = rng.bytes(b * blocks as usize);
        let mut m = BowModel::new(MemDevice::from_bytes(original.clone()), ModelConfig::new(bs));
        let mut free_at_start = HashSet::new();
        for _ in 0..blocks / 6 {
            let n = rng.below(8) + 1;
            let start = 1 + rng.below(blocks - n - 1);
            m.discard(Sectors(start * bss), n * b as u64).unwrap();
            free_at_start.extend(start..start + n);
        }
        m.set_state(BowState::Checkpoint).unwrap();
        for _ in 0..ops {
            let n = rng.below(4) + 1;
            let start = match rng.below(8) {
                0 => 0,
                1 => m.sector0_location().0 / bss,
                2 => *free_at_start
                    .iter()
                    .nth(rng.below(free_at_start.len() as u64) as usize)
                    .unwrap(),
                _ => rng.below(blocks),
            }
            .min(blocks - n);
            let n = if start == 0 { 1 } else { n };
            if rng.below(10) == 0 && start != 0 {
                let _ = m.discard(Sectors(start * bss), n * b as u64);
            } else {
                // ENOSPC fails the bio, as in the kernel; the test goes on.
                let _ = m.write(Sectors(start * bss), &rng.bytes(b * n as usize));
            }
        }
        let checkpointed = m.into_device().snapshot();
        Scenario { bs: b, original, checkpointed, free_at_start }
    }

    fn blocks(&self) -> u64 {
        (self.original.len() / self.bs) as u64
    }

    /// Every block in use at checkpoint start holds its original bytes.
    fn assert_restored(&self, got: &[u8], what: &str) {
        for blk in 0..self.blocks() {
            if self.free_at_start.contains(&blk) {
                continue;
            }
            let r = blk as usize * self.bs..(blk as usize + 1) * self.bs;
            assert!(got[r.clone()] == self.original[r], "{what}: block {blk} not restored");
        }
    }
}

/// vold's algorithm on a copy: its validation pass, then its replay.
fn vold_result(image: &[u8]) -> Vec<u8> {
    let dev = MemDevice::from_bytes(image.to_vec());
    vold::validate_like_vold(&dev).expect("vold validation");
    vold::replay(&dev, None, 0, &mut quiet()).expect("vold replay");
    dev.snapshot()
}

/// A device that stops accepting writes after a budget (a crash) and can then produce the
/// image a power cut would leave: everything flushed, plus any subset of the later writes.
struct CrashDev {
    cur: MemDevice,
    durable: Mutex<Vec<u8>>,
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
    budget: AtomicU64,
}

impl CrashDev {
    fn new(image: &[u8], budget: u64) -> CrashDev {
        CrashDev {
            cur: MemDevice::from_bytes(image.to_vec()),
            durable: Mutex::new(image.to_vec()),
            pending: Mutex::new(Vec::new()),
            budget: AtomicU64::new(budget),
        }
    }
    fn crashed(&self) -> bool {
        self.budget.load(Ordering::SeqCst) == 0
    }
    /// The durable image plus the unflushed writes `keep` selects, in issue order.
    fn crash_image(&self, keep: &mut dyn FnMut() -> bool) -> Vec<u8> {
        let mut img = self.durable.lock().unwrap().clone();
        for (off, data) in self.pending.lock().unwrap().iter() {
            if keep() {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        img
    }
}

impl BlockDevice for CrashDev {
    fn size(&self) -> u64 {
        self.cur.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.cur.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let ok = self.budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1));
        if ok.is_err() {
            return Err(DeviceError::Injected("crash"));
        }
        let mut pending = self.pending.lock().unwrap();
        self.cur.write_at(buf, offset)?;
        pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        if self.crashed() {
            return Err(DeviceError::Injected("crash"));
        }
        let mut pending = self.pending.lock().unwrap();
        *self.durable.lock().unwrap() = self.cur.snapshot();
        pending.clear();
        Ok(())
    }
}

/// Counts writes.
struct Counting(MemDevice, AtomicU64);

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// The worked example (dm-bow-format.md §9).

fn worked_example() -> MemDevice {
    let bs = 4096;
    let mut img = vec![0u8; 256 * bs];
    for blk in 0..256 {
        img[blk * bs..(blk + 1) * bs].fill(blk as u8);
    }
    img[..bs].fill(0xAA);
    img[3 * bs..4 * bs].fill(0x33);
    // Checkpoint: block 10 = live block 0, 11 = original block 0, 12 = original block 3.
    img[10 * bs..11 * bs].fill(0xAA);
    img[11 * bs..12 * bs].fill(0xAA);
    img[12 * bs..13 * bs].fill(0x33);
    img[3 * bs..4 * bs].fill(0xEE);
    img[50 * bs..51 * bs].fill(0xEE);
    let log = LogSector {
        header: LogHeader { count: 2, ..LogHeader::new(BlockSize::B4096, 0, Sectors(80)) },
        entries: vec![
            LogEntry { source: Sectors(0), dest: Sectors(88), size: 4096, checksum: 0x92A0_B82D },
            LogEntry { source: Sectors(24), dest: Sectors(96), size: 4096, checksum: 0x8CCE_4E66 },
        ],
    };
    img[..bs].copy_from_slice(&log.encode());
    MemDevice::from_bytes(img)
}

#[test]
fn worked_example_is_restored() {
    let dev = worked_example();
    let before = dev.snapshot();
    let log = validate(&dev).unwrap();
    assert_eq!(log.entries, 2);
    assert_eq!(log.plan.copies, vec![BlockCopy { target: 3, source: 12, blocks: 1 }]);
    assert_eq!(log.plan.block0_source, 11);
    assert_eq!(log.plan.mode, ApplyMode::Plan);
    let out = run(&dev, &opts());
    assert!(
        matches!(out, RestoreOutcome::Restored { entries: 2, blocks_written: 2, .. }),
        "{out:?}"
    );
    let after = dev.snapshot();
    let bs = 4096;
    assert!(after[..bs].iter().all(|&b| b == 0xAA), "block 0 original");
    assert!(after[3 * bs..4 * bs].iter().all(|&b| b == 0x33), "block 3 original");
    assert!(after[50 * bs..51 * bs].iter().all(|&b| b == 0xEE), "block 50 keeps new data");
    // Nothing else changed.
    for blk in (1..256).filter(|&b| b != 3) {
        assert_eq!(after[blk * bs..(blk + 1) * bs], before[blk * bs..(blk + 1) * bs], "{blk}");
    }
    assert_eq!(vold_result(&before), after, "same bytes as vold");
    assert!(matches!(run(&dev, &opts()), RestoreOutcome::NoLog));
}

#[test]
fn worked_example_corrupt_backup_rolls_forward_or_is_refused() {
    let dev = worked_example();
    dev.write_at(&[0x34], 12 * 4096 + 7).unwrap();
    let before = dev.snapshot();
    let refuse = RestoreOptions { policy: CorruptLogPolicy::Refuse, ..opts() };
    let out = run(&dev, &refuse);
    assert!(
        matches!(out, RestoreOutcome::Refused { reason: CorruptLog::Checksum { index: 1, .. } }),
        "{out:?}"
    );
    assert_eq!(dev.snapshot(), before, "refuse writes nothing");
    let out = run(&dev, &opts());
    assert!(matches!(out, RestoreOutcome::RolledForward { sector0: Sectors(80), .. }), "{out:?}");
    let after = dev.snapshot();
    assert!(after[..4096].iter().all(|&b| b == 0xAA), "live block 0 back in block 0");
    assert_eq!(after[4096..], before[4096..], "roll-forward keeps all new data");
    assert!(matches!(run(&dev, &opts()), RestoreOutcome::NoLog));
}

#[test]
fn dry_run_writes_nothing_and_returns_the_plan() {
    let dev = NoWriteDevice(worked_example());
    let out = run(&dev, &RestoreOptions { dry_run: true, ..opts() });
    let RestoreOutcome::DryRun { action: PlannedAction::Restore(plan) } = out else {
        panic!("{out:?}")
    };
    assert_eq!(plan.blocks(), 2);
    assert!(plan.render().contains("blocks 3..4 <- physical 12..13"));
}

#[test]
fn no_magic_is_no_log() {
    let dev = NoWriteDevice(MemDevice::new(8192));
    assert!(matches!(run(&dev, &opts()), RestoreOutcome::NoLog));
    assert_eq!(validate(&dev).unwrap_err().kind(), ErrorKind::NoLog);
}

// ---------------------------------------------------------------------------------------------
// Produced logs: rollovers, relocated backups, relocated SECTOR0_CURRENT.

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    for seed in 1..=6 {
        v.push(Scenario::new(seed, BlockSize::B512, 160, 90));
    }
    v.push(Scenario::new(7, BlockSize::new(1024).unwrap(), 300, 250));
    for seed in 1..=3 {
        v.push(Scenario::model(seed, BlockSize::B512, 200, 80));
    }
    v.push(Scenario::new(8, BlockSize::B4096, 500, 400));
    v.push(Scenario::model(4, BlockSize::B4096, 600, 400));
    v
}

#[test]
fn produced_logs_restore_like_vold() {
    let mut sequences = Vec::new();
    for (i, s) in scenarios().iter().enumerate() {
        let dev = MemDevice::from_bytes(s.checkpointed.clone());
        let log = validate(&dev).unwrap();
        sequences.push(log.header.sequence);
        assert_eq!(log.plan.mode, ApplyMode::Plan, "kernel-shaped logs have no hazards");
        let out = run(&dev, &opts());
        assert!(matches!(out, RestoreOutcome::Restored { mode: ApplyMode::Plan, .. }), "{out:?}");
        let got = dev.snapshot();
        s.assert_restored(&got, &format!("scenario {i}"));
        assert!(got == vold_result(&s.checkpointed), "scenario {i}: differs from vold's bytes");
    }
    assert!(sequences.iter().any(|&q| q >= 2), "some logs roll over: {sequences:?}");
}

#[test]
fn relocated_sector0_current_has_checksum_zero_and_restores() {
    let bs = BlockSize::B512;
    let dev = MemDevice::from_bytes((0..64 * 512usize).map(|i| (i / 512) as u8).collect());
    let original = dev.snapshot();
    let mut w = LogWriter::start(&dev, bs, &(20..40).collect::<Vec<_>>()).unwrap();
    w.write(0, &[1; 512]).unwrap();
    let old = w.sector0_block();
    w.write(old, &[2; 512]).unwrap(); // the file system reuses the block: relocation
    assert_ne!(w.sector0_block(), old);
    w.write(0, &[3; 512]).unwrap();
    w.write(5, &[4; 512]).unwrap();
    let log = validate(&dev).unwrap();
    let entries = &log.sectors[0].entries;
    let reloc = entries.iter().find(|e| e.source.0 == old).unwrap();
    assert_eq!(reloc.checksum, 0);
    run(&dev, &opts());
    let got = dev.snapshot();
    assert_eq!(got[..512], original[..512]);
    assert_eq!(got[5 * 512..6 * 512], original[5 * 512..6 * 512]);
}

#[test]
fn roll_forward_uses_the_relocated_sector0() {
    // The newest entry relocates SECTOR0_CURRENT; the on-disk header still names the old block
    // (dm-bow-format.md §10 item 2). Roll-forward must take the live block 0 from the new one.
    let bs = BlockSize::B512;
    let dev = MemDevice::from_bytes(vec![0x5A; 64 * 512]);
    let mut w = LogWriter::start(&dev, bs, &(20..40).collect::<Vec<_>>()).unwrap();
    w.write(0, &[7; 512]).unwrap();
    let old = w.sector0_block();
    w.write(old, &[9; 512]).unwrap();
    let new = w.sector0_block();
    let header = validate(&dev).unwrap().header;
    assert_eq!(header.sector0, Sectors(old), "header is stale, like the kernel's");
    // Corrupt the backup of block 0 so validation fails.
    let block0_backup = 21;
    dev.write_at(&[0xFF; 8], block0_backup * 512).unwrap();
    let out = run(&dev, &opts());
    assert!(
        matches!(out, RestoreOutcome::RolledForward { sector0, .. } if sector0 == Sectors(new))
    );
    assert_eq!(dev.snapshot()[..512], [7; 512]);
}

// ---------------------------------------------------------------------------------------------
// Crash safety.

/// Crash after `n` writes for every `n`, with every unflushed write kept, none kept, and a
/// random subset kept; then run `finish` on the crash image. The result must equal `want`.
fn crash_everywhere(
    image: &[u8],
    want: &[u8],
    modes: u32,
    first: &dyn Fn(&CrashDev),
    finish: &dyn Fn(&MemDevice),
    what: &str,
) -> usize {
    let counting = Counting(MemDevice::from_bytes(image.to_vec()), AtomicU64::new(0));
    first(&CrashDev::new(image, u64::MAX));
    let _ = restore(&counting, &opts(), &mut quiet());
    let mut rng = Rng(0xC0FFEE);
    let mut states = 0;
    let total = counting.1.load(Ordering::SeqCst).max(64) + 8;
    for n in 0..=total {
        let dev = CrashDev::new(image, n);
        first(&dev);
        for mode in 0..modes {
            let img = dev.crash_image(&mut || match mode {
                0 => true,
                1 => false,
                _ => rng.below(2) == 0,
            });
            let again = MemDevice::from_bytes(img);
            finish(&again);
            assert!(again.snapshot() == want, "{what}: crash after {n} writes, mode {mode}");
            states += 1;
        }
    }
    states
}

#[test]
fn crash_anywhere_in_restore_then_rerun_gives_the_same_bytes() {
    let mut states = 0;
    // The 4 KiB scenarios are left to `produced_logs_restore_like_vold` to keep this quick.
    for (i, s) in scenarios().iter().enumerate().take(10) {
        let reference = MemDevice::from_bytes(s.checkpointed.clone());
        run(&reference, &opts());
        let want = reference.snapshot();
        // Both apply paths: copies read again (budget 0), copies written from memory.
        for (qd, memory_budget) in [(1, 0), (4, 0), (4, opts().memory_budget)] {
            let o = RestoreOptions { queue_depth: qd, memory_budget, ..opts() };
            states += crash_everywhere(
                &s.checkpointed,
                &want,
                3,
                &|d| {
                    let _ = restore(d, &o, &mut quiet());
                },
                &|d| {
                    run(d, &opts());
                },
                &format!("scenario {i} qd {qd} budget {memory_budget}, rerun ours"),
            );
        }
        // vold, run after our interrupted restore, finishes it correctly too.
        states += crash_everywhere(
            &s.checkpointed,
            &want,
            3,
            &|d| {
                let _ = restore(d, &opts(), &mut quiet());
            },
            &|d| {
                if vold::validate_like_vold(d).is_ok() {
                    vold::replay(d, None, 0, &mut quiet()).unwrap();
                }
            },
            &format!("scenario {i}, rerun vold"),
        );
    }
    crate::crashdev::report_count(&format!("restore crash states tested: {states}"));
    assert!(states > 1000);
}

#[test]
fn vold_interrupted_anywhere_then_we_finish() {
    // vold's own replay crashing at every write (WOB saves, log sectors brought back with the
    // WOB magic, truncated counts): our restore resumes and gives vold's final bytes.
    let mut states = 0;
    let saw_wob = std::cell::Cell::new(false);
    for (i, s) in scenarios().iter().enumerate().filter(|(i, _)| [0, 1, 7, 8].contains(i)) {
        let want = vold_result(&s.checkpointed);
        // Real vold flushes only after entry 0, so only in-order crash states (every unflushed
        // write kept, or none) are recoverable from its interruptions; see vold.rs.
        states += crash_everywhere(
            &s.checkpointed,
            &want,
            2,
            &|d| {
                let _ = vold::replay_with(d, None, 0, vold::Protocol::Vold, &mut quiet());
            },
            &|d| {
                let mut head = [0u8; 4];
                d.read_at(&mut head, 0).unwrap();
                if head == MAGIC_WOB.to_le_bytes() {
                    saw_wob.set(true);
                }
                let out = run(d, &opts());
                assert!(
                    matches!(out, RestoreOutcome::Restored { .. } | RestoreOutcome::NoLog),
                    "{out:?}"
                );
            },
            &format!("scenario {i}"),
        );
    }
    crate::crashdev::report_count(&format!("vold-interrupted states tested: {states}"));
    assert!(saw_wob.get(), "some crash states were WOB logs");
}

#[test]
fn limit_then_full_restore() {
    for (i, s) in scenarios().iter().enumerate().filter(|(i, _)| [0, 1, 7, 8].contains(i)) {
        let want = vold_result(&s.checkpointed);
        let total = validate(&MemDevice::from_bytes(s.checkpointed.clone())).unwrap().entries;
        let mut saw_wob = false;
        for limit in 1..=total + 1 {
            let dev = MemDevice::from_bytes(s.checkpointed.clone());
            let out = run(&dev, &RestoreOptions { limit: Some(limit), ..opts() });
            match out {
                RestoreOutcome::LimitReached { entries_applied, entries_remaining } => {
                    assert_eq!(entries_applied, limit);
                    assert_eq!(entries_applied + entries_remaining, total);
                    let mut head = [0u8; 4];
                    dev.read_at(&mut head, 0).unwrap();
                    saw_wob |= head == MAGIC_WOB.to_le_bytes();
                    let out = run(&dev, &opts());
                    assert!(matches!(out, RestoreOutcome::Restored { .. }), "{out:?}");
                }
                RestoreOutcome::Restored { .. } => assert!(limit >= total),
                other => panic!("{other:?}"),
            }
            assert!(dev.snapshot() == want, "scenario {i} limit {limit}");
        }
        assert!(saw_wob, "scenario {i}: some partial restore left a WOB log");
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-made and hostile logs.

/// Writes a single-sector log with 512-byte blocks into block 0 of `img`, with checksums
/// computed the way validation reads the copies (through the relocation map, newest first).
fn hand_log(img: &mut [u8], entries: &[(u64, u64, u32)], sector0: u64) {
    let bs = 512;
    let mut map = super::relocation::RelocationMap::new();
    let mut crcs = vec![0; entries.len()];
    for (i, &(src, dst, blocks)) in entries.iter().enumerate().rev() {
        let mut data = Vec::new();
        for run in map.runs(dst, u64::from(blocks)) {
            data.extend_from_slice(
                &img[run.phys as usize * bs..(run.phys + run.len) as usize * bs],
            );
        }
        crcs[i] = bow_crc(src as u32, &data);
        map.relocate(src, dst, u64::from(blocks));
    }
    let sector = LogSector {
        header: LogHeader::new(BlockSize::B512, 0, Sectors(sector0)),
        entries: entries
            .iter()
            .zip(crcs)
            .map(|(&(src, dst, blocks), checksum)| LogEntry {
                source: Sectors(src),
                dest: Sectors(dst),
                size: blocks * 512,
                checksum,
            })
            .collect(),
    };
    img[..bs].copy_from_slice(&sector.encode());
}

/// Entry 1 saved block 5 in block 6; entry 2 then saved block 7 in block 5, which the kernel
/// never does (block 5 was no longer free). vold's order: 7 <- 5, then 5 <- 6. The plan would
/// read block 5 and also write it: a hazard.
fn hazard_image() -> Vec<u8> {
    let mut img: Vec<u8> = (0..32 * 512usize).map(|i| (i / 512) as u8).collect();
    img[10 * 512..11 * 512].fill(0xAA);
    hand_log(&mut img, &[(0, 10, 1), (5, 6, 1), (7, 5, 1)], 11);
    img
}

#[test]
fn hazardous_hand_log_uses_vold_replay_and_survives_crashes() {
    // The hazard makes the restore use the vold protocol.
    let img = hazard_image();
    let dev = MemDevice::from_bytes(img.clone());
    let log = validate(&dev).unwrap();
    assert_eq!(log.plan.mode, ApplyMode::VoldReplay);
    assert!(log.plan.hazard_blocks > 0);
    let want = vold_result(&img);
    assert_eq!(want[7 * 512..8 * 512], [5; 512]);
    assert_eq!(want[5 * 512..6 * 512], [6; 512]);
    let out = run(&dev, &opts());
    assert!(matches!(out, RestoreOutcome::Restored { mode: ApplyMode::VoldReplay, .. }));
    assert_eq!(dev.snapshot(), want);
    crash_everywhere(
        &img,
        &want,
        3,
        &|d| {
            let _ = restore(d, &opts(), &mut quiet());
        },
        &|d| {
            run(d, &opts());
        },
        "swap",
    );
}

/// Sequence 0 saved at block 20; that block is then relocated to 21 by an entry of sequence 1
/// (the file system reused it), so reading sequence 0 needs the map.
fn relocated_chain_image() -> Vec<u8> {
    let mut img: Vec<u8> = (0..64 * 512usize).map(|i| (i / 512) as u8).collect();
    img[10 * 512..11 * 512].copy_from_slice(&[0u8; 512].map(|_| 0xAB));
    img[12 * 512..13 * 512].fill(3); // backup of block 3
    hand_log(&mut img, &[(0, 10, 1), (3, 12, 1)], 30);
    let saved: Vec<u8> = img[..512].to_vec();
    img[21 * 512..22 * 512].copy_from_slice(&saved);
    img[20 * 512..21 * 512].fill(0xEE);
    img[3 * 512..4 * 512].fill(0xEE);
    img[0..512].fill(0);
    let seq1 = LogSector {
        header: LogHeader::new(BlockSize::B512, 1, Sectors(30)),
        entries: vec![
            LogEntry { source: Sectors(0), dest: Sectors(20), size: 512, checksum: 0 },
            LogEntry {
                source: Sectors(20),
                dest: Sectors(21),
                size: 512,
                checksum: bow_crc(20, &saved),
            },
        ],
    };
    img[..512].copy_from_slice(&seq1.encode());
    img
}

#[test]
fn multi_sector_hand_chain_with_relocated_log_backup() {
    let img = relocated_chain_image();
    let dev = MemDevice::from_bytes(img.clone());
    let log = validate(&dev).unwrap();
    assert_eq!(log.sectors.len(), 2);
    run(&dev, &opts());
    let got = dev.snapshot();
    assert_eq!(got[..512], [0xAB; 512]);
    assert_eq!(got[3 * 512..4 * 512], [3; 512]);
    assert_eq!(got, vold_result(&img));
}

#[test]
fn hostile_headers_are_rejected_without_writes() {
    let base = worked_example().snapshot();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = base.clone();
        f(&mut img);
        let dev = NoWriteDevice(MemDevice::from_bytes(img));
        match validate(&dev) {
            Err(RestoreError::Corrupt(c)) => c,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        with(&|b| b[16..20].copy_from_slice(&(1u32 << 31).to_le_bytes())),
        CorruptLog::SequenceTooLarge(1 << 31)
    );
    assert!(matches!(
        with(&|b| b[16..20].copy_from_slice(&1000u32.to_le_bytes())),
        CorruptLog::ChainTooLong { .. }
    ));
    // The head claims sequence 1; its entry 0 names block 11, which holds no log sector.
    assert!(matches!(
        with(&|b| b[16..20].copy_from_slice(&1u32.to_le_bytes())),
        CorruptLog::Format { sequence: 0, .. }
    ));
    assert_eq!(
        with(&|b| b[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes())),
        CorruptLog::BlockSize(1 << 30)
    );
    // Entry 1's backup beyond the device.
    assert!(matches!(
        with(&|b| b[0x3C..0x44].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        CorruptLog::OutOfDevice { index: 1, .. }
    ));
    // Entry 1 of 2^20 blocks: more than the device.
    assert!(matches!(
        with(&|b| b[0x44..0x48].copy_from_slice(&(255u32 * 4096).to_le_bytes())),
        CorruptLog::OutOfDevice { .. } | CorruptLog::TooManyBlocks { .. }
    ));
    // Entry 0 not saving block 0.
    assert!(matches!(with(&|b| b[0x1C] = 8), CorruptLog::ChainEntry { .. }));
}

#[test]
fn malformed_logs_never_write() {
    // Mutations of real logs and random bytes through the fuzz body.
    let mut rng = Rng(42);
    let mut images = vec![worked_example().snapshot()[..64 * 4096].to_vec()];
    for s in scenarios().into_iter().take(3) {
        images.push(s.checkpointed);
    }
    let mut runs = 0;
    for img in &images {
        for _ in 0..300 {
            let mut m = img.clone();
            for _ in 0..=rng.below(4) {
                let at = if rng.below(2) == 0 { rng.below(96) } else { rng.below(m.len() as u64) };
                m[at as usize] = rng.next() as u8;
            }
            fuzzing::validate_log(&m);
            fuzzing::parse_log_sector(&m[..512]);
            fuzzing::parse_log_sector(&m[..4096]);
            runs += 1;
        }
    }
    for len in [0usize, 28, 600, 4096, 9000] {
        for _ in 0..50 {
            let mut m = rng.bytes(len);
            if len >= 4 {
                m[..4].copy_from_slice(b"BOW\0");
            }
            fuzzing::validate_log(&m);
            fuzzing::parse_log_sector(&m);
        }
    }
    assert!(runs >= 1000);
}

#[test]
fn progress_reports_blocks_done_of_total() {
    let dev = MemDevice::from_bytes(Scenario::new(3, BlockSize::B512, 160, 90).checkpointed);
    let mut last = None;
    let mut validate_steps = 0;
    restore(&dev, &opts(), &mut |p| match p.phase {
        Phase::Validate => validate_steps += 1,
        Phase::Apply => {
            assert!(p.done <= p.total);
            last = Some(p);
        }
    })
    .unwrap();
    let last = last.unwrap();
    assert_eq!(last.done, last.total);
    assert!(validate_steps >= 1);
}

mod fuzz_bodies {
    use super::*;
    use proptest::prelude::*;

    fn seed_images() -> &'static [Vec<u8>] {
        static IMAGES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        IMAGES.get_or_init(|| {
            vec![
                worked_example().snapshot()[..16 * 4096].to_vec(),
                Scenario::new(11, BlockSize::B512, 128, 60).checkpointed,
                Scenario::model(12, BlockSize::B512, 128, 60).checkpointed,
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// The fuzz targets' bodies on arbitrary bytes (libFuzzer runs them in fuzz/).
        #[test]
        fn fuzz_bodies_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
            fuzzing::parse_log_sector(&data);
            fuzzing::validate_log(&data);
        }

        /// The fuzz bodies on real logs with a few bytes changed (mostly in the log sector).
        #[test]
        fn fuzz_bodies_on_mutated_logs(
            which in 0usize..3,
            edits in proptest::collection::vec((any::<bool>(), any::<u32>(), any::<u8>()), 1..6),
        ) {
            let mut img = seed_images()[which].clone();
            for (in_log, at, byte) in edits {
                let len = if in_log { 128 } else { img.len() };
                img[at as usize % len] = byte;
            }
            fuzzing::validate_log(&img);
            fuzzing::parse_log_sector(&img[..512]);
        }
    }
}

/// Fails every read at or after `from` bytes.
struct FailingReads(MemDevice, u64);

impl BlockDevice for FailingReads {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        if offset + buf.len() as u64 > self.1 {
            return Err(DeviceError::Injected("read error"));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        panic!("write at {offset} after a read error")
    }
    fn flush(&self) -> Result<(), DeviceError> {
        panic!("flush after a read error")
    }
}

#[test]
fn read_errors_are_errors_never_a_roll_forward() {
    // The worked example's backup of block 3 (block 12) cannot be read.
    let dev = FailingReads(worked_example(), 12 * 4096);
    let err = restore(&dev, &opts(), &mut quiet()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
}

#[test]
fn crash_during_a_limited_run_then_full_restore() {
    let mut states = 0;
    for s in scenarios().iter().take(3) {
        let want = vold_result(&s.checkpointed);
        let total = validate(&MemDevice::from_bytes(s.checkpointed.clone())).unwrap().entries;
        for limit in [1, total / 3, total - 1] {
            let o = RestoreOptions { limit: Some(limit.max(1)), ..opts() };
            states += crash_everywhere(
                &s.checkpointed,
                &want,
                3,
                &|d| {
                    let _ = restore(d, &o, &mut quiet());
                },
                &|d| {
                    run(d, &opts());
                },
                &format!("limit {limit}"),
            );
        }
    }
    crate::crashdev::report_count(&format!("limited-run crash states tested: {states}"));
}

// ---------------------------------------------------------------------------------------------
// vold's validation pass (`vold::validate_like_vold`) against ours.

/// How the two validators agreed on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Agreement {
    /// Both accept, with the same number of entries.
    Accepted,
    /// Both reject with the same error (no log included).
    SameError,
    /// Both reject the same log sector, vold's pass naming a fault of a header check vold makes
    /// before the one ours reports (see `header_check_rank`).
    EarlierHeaderCheck,
    /// WOB head: vold skips validation (`Ok(0)`), whatever ours says of the resumed chain.
    WobSkipped,
}

/// For a fault in the header of log sector `sequence`: (sequence, position of the check in
/// vold's order: magic, block size, sequence, then the other fields). `None` for other faults.
fn header_check_rank(c: &CorruptLog) -> Option<(u32, u8)> {
    use crate::format::FormatError;
    match *c {
        CorruptLog::UnexpectedWob { sequence }
        | CorruptLog::Format { sequence, error: FormatError::NoMagic(_) } => Some((sequence, 0)),
        CorruptLog::BlockSizeMismatch { sequence, .. }
        | CorruptLog::Format {
            sequence,
            error: FormatError::BlockSize(_) | FormatError::BufferSize { .. },
        } => Some((sequence, 1)),
        CorruptLog::SequenceMismatch { expected, .. } => Some((expected, 2)),
        CorruptLog::Format { sequence, .. } => Some((sequence, 3)),
        _ => None,
    }
}

/// Runs both validators on `img` through a device that panics on any write, and checks that
/// they agree; the only differences allowed are the documented ones (vold.rs module docs).
fn compare_validators(img: &[u8], what: &str) -> Agreement {
    let dev = NoWriteDevice(MemDevice::from_bytes(img.to_vec()));
    let ours = validate(&dev);
    let vold = vold::validate_like_vold(&dev);
    assert!(dev.0.snapshot() == img, "{what}: image changed");
    let mut head = [0u8; 4];
    if img.len() >= 4 {
        head.copy_from_slice(&img[..4]);
    }
    if head == MAGIC_WOB.to_le_bytes() && img.len() >= 28 {
        assert!(matches!(vold, Ok(0)), "{what}: WOB head must skip validation: {vold:?}");
        return Agreement::WobSkipped;
    }
    match (ours, vold) {
        (Ok(log), Ok(entries)) => {
            assert_eq!(log.entries, entries, "{what}: entry counts");
            Agreement::Accepted
        }
        (Err(RestoreError::NoLog), Err(RestoreError::NoLog)) => Agreement::SameError,
        (Err(RestoreError::Corrupt(a)), Err(RestoreError::Corrupt(b))) if a == b => {
            Agreement::SameError
        }
        (Err(RestoreError::Corrupt(a)), Err(RestoreError::Corrupt(b))) => {
            // Same sector; vold's error comes from a check it makes before the one ours failed,
            // or it is vold's block size check where ours failed the parse on the block size.
            let (Some((seq_a, rank_a)), Some((seq_b, rank_b))) =
                (header_check_rank(&a), header_check_rank(&b))
            else {
                panic!("{what}: ours {a:?}, vold's {b:?}")
            };
            let moved_ahead = matches!(
                b,
                CorruptLog::UnexpectedWob { .. }
                    | CorruptLog::BlockSizeMismatch { .. }
                    | CorruptLog::SequenceMismatch { .. }
            );
            let block_size = rank_a == 1 && matches!(b, CorruptLog::BlockSizeMismatch { .. });
            assert!(
                seq_a == seq_b && moved_ahead && (rank_b < rank_a || block_size),
                "{what}: ours {a:?}, vold's {b:?}"
            );
            Agreement::EarlierHeaderCheck
        }
        (ours, vold) => panic!("{what}: ours {ours:?}, vold's {vold:?}"),
    }
}

/// The physical blocks holding the log sectors of a valid log, newest first.
fn log_sector_blocks(img: &[u8]) -> Vec<u64> {
    let w = walk(&MemDevice::from_bytes(img.to_vec()), false, &mut quiet()).unwrap();
    w.sectors.iter().map(|s| s.block).collect()
}

/// The fuzz seeds (committed) and, when present, the local fuzz corpus (not committed).
fn fuzz_inputs() -> (Vec<Vec<u8>>, usize) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let read_dir = |dir: &str| -> Vec<Vec<u8>> {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { return Vec::new() };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
    };
    let seeds = read_dir("seeds/validate_log");
    let n = seeds.len();
    let mut all = seeds;
    all.extend(read_dir("corpus/validate_log"));
    (all, n)
}

#[test]
fn vold_validation_agrees_with_ours_and_never_writes() {
    let mut tally: std::collections::HashMap<Agreement, usize> = Default::default();
    let mut check = |img: &[u8], what: &str| {
        *tally.entry(compare_validators(img, what)).or_default() += 1;
    };
    let worked = worked_example().snapshot();
    let mut images: Vec<(String, Vec<u8>)> = vec![
        ("worked example".into(), worked.clone()),
        ("hazard".into(), hazard_image()),
        ("relocated chain".into(), relocated_chain_image()),
    ];
    for (i, s) in scenarios().into_iter().enumerate() {
        images.push((format!("scenario {i}"), s.checkpointed));
    }
    for (what, img) in &images {
        assert_eq!(compare_validators(img, what), Agreement::Accepted, "{what}");
    }
    // The hostile headers of `hostile_headers_are_rejected_without_writes`, and a bad backup.
    type Edit<'a> = &'a dyn Fn(&mut Vec<u8>);
    let hostile: [(&str, Edit); 8] = [
        ("sequence 2^31", &|b| b[16..20].copy_from_slice(&(1u32 << 31).to_le_bytes())),
        ("sequence 1000", &|b| b[16..20].copy_from_slice(&1000u32.to_le_bytes())),
        ("sequence 1", &|b| b[16..20].copy_from_slice(&1u32.to_le_bytes())),
        ("block size 2^30", &|b| b[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes())),
        ("backup out of device", &|b| b[0x3C..0x44].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        ("huge entry", &|b| b[0x44..0x48].copy_from_slice(&(255u32 * 4096).to_le_bytes())),
        ("entry 0 not the chain", &|b| b[0x1C] = 8),
        ("bad backup", &|b| b[12 * 4096 + 7] = 0x34),
    ];
    for (what, f) in hostile {
        let mut img = worked.clone();
        f(&mut img);
        assert_eq!(compare_validators(&img, what), Agreement::SameError, "{what}");
    }
    // Entry 0 saves block 0 into block 0: after the walk block 0 still reads from block 0.
    let mut img: Vec<u8> = (0..32 * 512usize).map(|i| (i / 512) as u8).collect();
    hand_log(&mut img, &[(0, 0, 1), (3, 12, 1)], 11);
    assert_eq!(compare_validators(&img, "block 0 stays"), Agreement::SameError);
    assert!(matches!(
        vold::validate_like_vold(&MemDevice::from_bytes(img)),
        Err(RestoreError::Corrupt(CorruptLog::ChainEntry { sequence: 0, .. }))
    ));
    // Random bytes changed in the head, in the older log sectors, and anywhere.
    let mut rng = Rng(0x5EED);
    let mut mutated = 0;
    for (what, img) in images.iter().take(12) {
        let sectors = log_sector_blocks(img);
        let bs = u64::from(u32::from_le_bytes(img[8..12].try_into().unwrap()));
        for round in 0..150 {
            let mut m = img.clone();
            for _ in 0..=rng.below(3) {
                let at = match rng.below(3) {
                    0 => rng.below(128),
                    1 => sectors[rng.below(sectors.len() as u64) as usize] * bs + rng.below(128),
                    _ => rng.below(m.len() as u64),
                };
                m[at as usize] = rng.next() as u8;
            }
            check(&m, &format!("{what} mutation {round}"));
            mutated += 1;
        }
    }
    // The fuzz inputs, as the fuzz target builds its image.
    let (inputs, seeds) = fuzz_inputs();
    assert!(seeds >= 3, "fuzz seeds missing: {seeds}");
    for (i, data) in inputs.iter().enumerate() {
        check(&fuzzing::image(data), &format!("fuzz input {i}"));
    }
    println!(
        "validators compared on {mutated} mutated logs and {} fuzz inputs: {tally:?}",
        inputs.len()
    );
    assert!(tally.get(&Agreement::Accepted).copied().unwrap_or(0) >= 3, "{tally:?}");
    assert!(tally.get(&Agreement::SameError).copied().unwrap_or(0) >= 100, "{tally:?}");
}

#[test]
fn vold_validation_checks_the_header_in_vold_order() {
    // A produced log that rolled over: break the sector after the head. The head's entry 0 (the
    // copy of that sector) gets checksum 0, so the walk reaches the broken sector.
    let s = scenarios().into_iter().find(|s| s.checkpointed[16..20] != [0; 4]).unwrap();
    let head_seq = u32::from_le_bytes(s.checkpointed[16..20].try_into().unwrap());
    let older = log_sector_blocks(&s.checkpointed)[1] as usize * s.bs;
    let seq = head_seq - 1;
    let mut base = s.checkpointed.clone();
    base[28 + 20..28 + 24].fill(0);
    assert_eq!(compare_validators(&base, "unchecked chain entry"), Agreement::Accepted);
    let broken = |f: &dyn Fn(&mut [u8])| {
        let mut img = base.clone();
        f(&mut img[older..older + s.bs]);
        let dev = NoWriteDevice(MemDevice::from_bytes(img.clone()));
        let corrupt = |r: Result<_, RestoreError>| match r {
            Err(RestoreError::Corrupt(c)) => c,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        };
        let ours = corrupt(validate(&dev).map(|_| ()));
        let vold = corrupt(vold::validate_like_vold(&dev).map(|_| ()));
        let agreement = compare_validators(&img, "broken older sector");
        (ours, vold, agreement)
    };
    use crate::format::FormatError;
    let wob = |b: &mut [u8]| b[..4].copy_from_slice(&MAGIC_WOB.to_le_bytes());
    let bad_seq = |b: &mut [u8]| b[16..20].copy_from_slice(&(seq + 7).to_le_bytes());
    let no_count = |b: &mut [u8]| b[12..16].fill(0);
    // Same error where a single check fails.
    let (ours, vold, agreement) = broken(&wob);
    let unexpected_wob = CorruptLog::UnexpectedWob { sequence: seq };
    assert_eq!((&ours, &vold), (&unexpected_wob, &unexpected_wob));
    assert_eq!(agreement, Agreement::SameError);
    let (ours, vold, _) = broken(&bad_seq);
    let mismatch = CorruptLog::SequenceMismatch { expected: seq, found: seq + 7 };
    assert_eq!((&ours, &vold), (&mismatch, &mismatch));
    let (ours, vold, _) = broken(&no_count);
    let count = CorruptLog::Format {
        sequence: seq,
        error: FormatError::Count { count: 0, max: crate::units::max_entries(512, 28) },
    };
    assert_eq!((&ours, &vold), (&count, &count));
    // vold checks the magic first; ours parses, then compares the sequence, then the magic.
    let (ours, vold, agreement) = broken(&|b| {
        wob(b);
        bad_seq(b);
    });
    assert_eq!(ours, mismatch);
    assert_eq!(vold, unexpected_wob);
    assert_eq!(agreement, Agreement::EarlierHeaderCheck);
    // vold compares the sequence before the count; ours parses first.
    let (ours, vold, agreement) = broken(&|b| {
        bad_seq(b);
        no_count(b);
    });
    assert_eq!((ours, vold), (count, mismatch));
    assert_eq!(agreement, Agreement::EarlierHeaderCheck);
    // A different block size: vold's "Block size mismatch"; ours fails the parse (the buffer
    // is one block of the head's size).
    let expected = u32::try_from(s.bs).unwrap();
    for found in [1024u32, 3] {
        let (ours, vold, agreement) = broken(&|b| b[8..12].copy_from_slice(&found.to_le_bytes()));
        assert_eq!(vold, CorruptLog::BlockSizeMismatch { sequence: seq, expected, found });
        let parse = if found == 3 {
            FormatError::BlockSize(3)
        } else {
            FormatError::BufferSize { len: s.bs, expected: 1024 }
        };
        assert_eq!(ours, CorruptLog::Format { sequence: seq, error: parse });
        assert_eq!(agreement, Agreement::EarlierHeaderCheck);
    }
}

/// Records every read; panics on writes (through [`NoWriteDevice`]).
struct ReadLog(NoWriteDevice, Mutex<Vec<(u64, usize)>>);

impl BlockDevice for ReadLog {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.1.lock().unwrap().push((offset, buf.len()));
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush()
    }
}

#[test]
fn vold_validation_reads_one_block_at_a_time() {
    // vold's I/O: the 28-byte header, then per log sector one block at virtual block 0 and one
    // read per block of every saved copy, checksum or not.
    for (i, s) in scenarios().iter().enumerate() {
        let log = validate(&MemDevice::from_bytes(s.checkpointed.clone())).unwrap();
        let dev = ReadLog(
            NoWriteDevice(MemDevice::from_bytes(s.checkpointed.clone())),
            Mutex::new(Vec::new()),
        );
        assert_eq!(vold::validate_like_vold(&dev).unwrap(), log.entries);
        let reads = dev.1.into_inner().unwrap();
        let copies: u64 = log
            .sectors
            .iter()
            .flat_map(|sector| &sector.entries)
            .map(|e| u64::from(e.size) / s.bs as u64)
            .sum();
        assert_eq!(reads.len() as u64, 1 + log.sectors.len() as u64 + copies, "scenario {i}");
        assert_eq!(reads[0], (0, 28));
        assert_eq!(reads[1], (0, s.bs), "scenario {i}: the head is read first, in place");
        assert!(reads[1..].iter().all(|&(_, len)| len == s.bs), "scenario {i}");
    }
}

#[test]
fn wob_head_skips_vold_validation_and_the_baseline_finishes() {
    let s = &scenarios()[1];
    let want = vold_result(&s.checkpointed);
    let mut wob_images = 0;
    for limit in 1..40 {
        let dev = MemDevice::from_bytes(s.checkpointed.clone());
        run(&dev, &RestoreOptions { limit: Some(limit), ..opts() });
        let img = dev.snapshot();
        if img[..4] != MAGIC_WOB.to_le_bytes() {
            continue;
        }
        wob_images += 1;
        let reader =
            ReadLog(NoWriteDevice(MemDevice::from_bytes(img.clone())), Mutex::new(Vec::new()));
        assert_eq!(vold::validate_like_vold(&reader).unwrap(), 0);
        assert_eq!(reader.1.into_inner().unwrap(), vec![(0, 28)], "only the header is read");
        let dev = MemDevice::from_bytes(img);
        vold::faithful_baseline(&dev).unwrap();
        assert!(dev.snapshot() == want, "limit {limit}: the baseline finishes like vold");
    }
    assert!(wob_images > 0, "no limited restore left a WOB head");
}

#[test]
fn faithful_baseline_restores_the_same_bytes_as_restore() {
    let mut images = vec![
        ("worked example".to_string(), worked_example().snapshot()),
        ("hazard".to_string(), hazard_image()),
        ("relocated chain".to_string(), relocated_chain_image()),
    ];
    for (i, s) in scenarios().into_iter().enumerate() {
        images.push((format!("scenario {i}"), s.checkpointed));
    }
    for (what, img) in &images {
        let ours = MemDevice::from_bytes(img.clone());
        let out = run(&ours, &opts());
        let RestoreOutcome::Restored { entries, .. } = out else { panic!("{what}: {out:?}") };
        let baseline = MemDevice::from_bytes(img.clone());
        assert_eq!(vold::faithful_baseline(&baseline).unwrap(), entries, "{what}");
        assert!(baseline.snapshot() == ours.snapshot(), "{what}: baseline bytes differ");
    }
    // A log that fails vold's validation is an error, and nothing is written.
    let mut bad = worked_example().snapshot();
    bad[12 * 4096 + 7] = 0x34;
    let dev = NoWriteDevice(MemDevice::from_bytes(bad));
    assert!(matches!(
        vold::faithful_baseline(&dev),
        Err(RestoreError::Corrupt(CorruptLog::Checksum { index: 1, .. }))
    ));
}
