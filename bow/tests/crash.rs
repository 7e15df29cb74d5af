//! Crash consistency at model level (CrashMonkey's model, see `bow::crashdev`).
//!
//! Random workloads run through the engine model on a crash-recording device. For every flush
//! epoch after checkpoint start, crash states (durable image + subsets of the epoch's unflushed
//! writes: none, all, prefixes, all-but-one, random) are restored with `bow::restore`; every
//! block in use at checkpoint start must come back bit for bit. A sample of those restores is
//! itself recorded and crashed at every flush epoch (with subsets of its unflushed writes), then
//! restored again: same result, byte for byte with the uninterrupted restore. The naive reference restore of `common` cross-checks the first
//! restore. Counts are printed and must reach a floor, so the test cannot silently test nothing.

// Test devices are a few hundred KiB: index casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bow::crashdev::{CrashDevice, XorShift};
use bow::device::MemDevice;
use bow::format::{LogHeader, Magic};
use bow::model::{BowEngine, BowModel, BowState, BufioModel, EngineError, ModelConfig, RangeType};
use bow::restore::{restore, RestoreOptions, RestoreOutcome};
use bow::units::{BlockSize, Sectors};

/// Prefixes and all-but-one states per epoch, at most: larger than any epoch of these small
/// workloads (or of their restores), so every prefix — a crash right after each write — is
/// tried.
const PREFIXES: usize = 256;

/// One workload's run: the recorded device and what must come back.
struct Run {
    dev: CrashDevice,
    bs: usize,
    /// Device image at checkpoint start.
    pre: Vec<u8>,
    /// Blocks in use (not TRIMMED) at checkpoint start.
    in_use: Vec<bool>,
    /// Flush epochs before checkpoint start (earlier crashes are not checkpoint crashes).
    first_epoch: usize,
    /// If the workload committed: logical block 0 at commit and the epoch of the commit flush.
    committed: Option<(Vec<u8>, usize)>,
}

fn workload(seed: u64, bs: BlockSize, blocks: u64, bufio: BufioModel, commit: bool) -> Run {
    let bsz = bs.as_usize();
    let bss = bs.sectors();
    let mut rng = XorShift::new(seed);
    let mut img = vec![0u8; bsz * blocks as usize];
    for (b, chunk) in img.chunks_mut(bsz).enumerate() {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = (b as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ (seed as u8);
        }
    }
    let cfg = ModelConfig { bufio, ..ModelConfig::new(bs) };
    let mut m = BowModel::new(CrashDevice::new(img, bsz), cfg);

    // TRIM: free space as ascending discards (FITRIM order), a few writes.
    let mut b = 1 + rng.below(4);
    while b < blocks {
        let n = 1 + rng.below(5);
        let n = n.min(blocks - b);
        if rng.below(3) != 0 {
            m.discard(Sectors(b * bss), n * bsz as u64).unwrap();
        }
        b += n + rng.below(4);
    }
    for _ in 0..rng.below(4) {
        let blk = rng.below(blocks);
        m.write(Sectors(blk * bss), &vec![0xE0 ^ rng.next() as u8; bsz]).unwrap();
    }
    m.flush().unwrap();
    let pre = m.device().current();
    let in_use = (0..blocks)
        .map(|b| m.range_map().range_at(b * bss).map(|r| r.kind) != Some(RangeType::Trimmed))
        .collect();
    let first_epoch = count_flushes(m.device());

    if m.set_state(BowState::Checkpoint).is_err() {
        // Not enough free space to start: nothing was logged; still a valid (short) run.
        return Run { dev: m.into_device(), bs: bsz, pre, in_use, first_epoch, committed: None };
    }
    let ops = 20 + rng.below(30);
    for _ in 0..ops {
        let blk = rng.below(blocks);
        let n = (1 + rng.below(4)).min(blocks - blk);
        match rng.below(10) {
            0 => {
                let _ = m.discard(Sectors(blk * bss), n * bsz as u64);
            }
            1 => m.flush().unwrap(),
            2 => {
                let mut buf = vec![0u8; n as usize * bsz];
                m.read(Sectors(blk * bss), &mut buf).unwrap();
            }
            _ => {
                let data: Vec<u8> =
                    (0..n as usize * bsz).map(|i| (i as u8) ^ rng.next() as u8).collect();
                match m.write(Sectors(blk * bss), &data) {
                    Ok(_) | Err(EngineError::Bio { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
    }
    let mut committed = None;
    if commit {
        let mut live0 = vec![0u8; bsz];
        m.read(Sectors(0), &mut live0).unwrap();
        if m.set_state(BowState::Committed).is_ok() {
            // What the commit copy put in block 0. Uncached, that is the live block 0; with
            // bufio never evicting it may be checkpoint-start contents (§10.1).
            let written = m.device().current()[..bsz].to_vec();
            if bufio == BufioModel::Uncached {
                assert_eq!(written, live0, "seed {seed}: commit copied the live block 0");
            }
            committed = Some((written, count_flushes(m.device())));
        }
    }
    Run { dev: m.into_device(), bs: bsz, pre, in_use, first_epoch, committed }
}

fn count_flushes(dev: &CrashDevice) -> usize {
    dev.events_without_reads().iter().filter(|e| matches!(e, bow::crashdev::IoEvent::Flush)).count()
}

fn has_magic(img: &[u8]) -> bool {
    LogHeader::decode(img).is_ok_and(|h| h.magic == Magic::Bow || h.magic == Magic::Wob)
}

/// Checks a restored image; `what` names the crash state in failures.
fn check_restored(run: &Run, img: &[u8], what: &str) {
    let bs = run.bs;
    if let Some((live0, _)) = &run.committed {
        if !has_magic(img) && img[..bs] == live0[..] {
            return; // The commit reached the disk: the checkpoint is gone, as intended.
        }
    }
    for (b, used) in run.in_use.iter().enumerate() {
        if *used {
            assert!(
                img[b * bs..(b + 1) * bs] == run.pre[b * bs..(b + 1) * bs],
                "{what}: block {b} differs from its contents at checkpoint start"
            );
        }
    }
}

fn restore_mem(img: Vec<u8>, opts: &RestoreOptions, what: &str) -> Vec<u8> {
    let dev = MemDevice::from_bytes(img);
    let report = restore(&dev, opts, &mut |_| {}).unwrap_or_else(|e| panic!("{what}: {e}"));
    match report.outcome {
        RestoreOutcome::Restored { .. } | RestoreOutcome::NoLog => {}
        other => panic!("{what}: unexpected outcome {other:?}"),
    }
    dev.snapshot()
}

#[derive(Default)]
struct Counts {
    workloads: usize,
    epochs: usize,
    crash_states: usize,
    restore_crash_states: usize,
}

fn first_diff(a: &[u8], b: &[u8], bs: usize) -> Option<usize> {
    a.chunks(bs).zip(b.chunks(bs)).position(|(x, y)| x != y)
}

fn exercise(run: &Run, seed: u64, counts: &mut Counts, restore_crash_every: usize) {
    let opts = RestoreOptions::default();
    // Crashed restores read every copy again (budget 0); whole ones write them from memory.
    let serial = RestoreOptions { queue_depth: 1, memory_budget: 0, ..RestoreOptions::default() };
    counts.workloads += 1;
    let mut sample = 0usize;
    run.dev.for_each_epoch(|epoch| {
        if epoch.index < run.first_epoch {
            return;
        }
        counts.epochs += 1;
        assert!(epoch.pending().len() <= PREFIXES, "epoch too long for every prefix");
        for keep in epoch.standard_states(PREFIXES, 4, seed) {
            let what = format!("seed {seed} epoch {} keep {keep:?}", epoch.index);
            let crashed = epoch.image(&keep);
            // The oracle: the naive reference restore agrees.
            let mut reference = crashed.clone();
            common::reference_restore(&mut reference).unwrap_or_else(|e| panic!("{what}: {e}"));
            check_restored(run, &reference, &format!("{what} (reference)"));
            let restored = restore_mem(crashed.clone(), &opts, &what);
            check_restored(run, &restored, &what);
            counts.crash_states += 1;

            // Crash during the restore, then restore again.
            sample += 1;
            if sample % restore_crash_every != 0 || !has_magic(&crashed) {
                continue;
            }
            let rdev = CrashDevice::new(crashed, run.bs);
            restore(&rdev, &serial, &mut |_| {}).unwrap_or_else(|e| panic!("{what}: {e}"));
            let uninterrupted = rdev.current();
            check_restored(run, &uninterrupted, &format!("{what} (recorded restore)"));
            rdev.for_each_epoch(|re| {
                assert!(re.pending().len() <= PREFIXES, "restore epoch too long for every prefix");
                for rkeep in re.standard_states(PREFIXES, 2, seed ^ 0xA5A5) {
                    let rwhat = format!("{what}, restore epoch {} keep {rkeep:?}", re.index);
                    let again = restore_mem(re.image(&rkeep), &opts, &rwhat);
                    check_restored(run, &again, &rwhat);
                    // Same result: the very bytes of the uninterrupted restore, free blocks
                    // included.
                    if let Some(b) = first_diff(&again, &uninterrupted, run.bs) {
                        panic!("{rwhat}: block {b} differs from the uninterrupted restore");
                    }
                    counts.restore_crash_states += 1;
                }
            });
        }
    });
}

#[test]
fn crash_at_every_flush_and_between_then_restore() {
    let mut counts = Counts::default();
    for seed in 1..=40u64 {
        let (bs, blocks) = if seed % 2 == 0 {
            (BlockSize::B4096, 24 + seed % 9)
        } else {
            (BlockSize::B512, 40 + seed % 17)
        };
        let bufio = if seed % 4 == 3 { BufioModel::NeverEvict } else { BufioModel::Uncached };
        let run = workload(seed, bs, blocks, bufio, seed % 5 == 0);
        exercise(&run, seed, &mut counts, 6);
    }
    bow::crashdev::report_count(&format!(
        "crash consistency: {} workloads, {} flush epochs, {} crash states restored, \
         {} crash states during restore re-restored",
        counts.workloads, counts.epochs, counts.crash_states, counts.restore_crash_states
    ));
    assert!(counts.crash_states >= 2000, "only {} crash states", counts.crash_states);
    assert!(
        counts.restore_crash_states >= 2000,
        "only {} restore crash states",
        counts.restore_crash_states
    );
}

/// Long logs: 512-byte blocks, many single-block writes, several rollovers; crash everywhere.
#[test]
fn crash_across_log_rollovers_then_restore() {
    let bs = BlockSize::B512;
    let blocks = 160u64;
    let mut img = vec![0u8; 512 * blocks as usize];
    for (b, c) in img.chunks_mut(512).enumerate() {
        c.fill(b as u8);
    }
    let mut m = BowModel::new(CrashDevice::new(img, 512), ModelConfig::new(bs));
    m.discard(Sectors(64), 96 * 512).unwrap();
    m.flush().unwrap();
    let pre = m.device().current();
    let in_use = (0..blocks).map(|b| b < 64).collect();
    let first_epoch = count_flushes(m.device());
    m.set_state(BowState::Checkpoint).unwrap();
    let mut rng = XorShift::new(99);
    for i in 0..90u64 {
        // Mostly fresh blocks (many entries), some rewrites of backups and of block 0.
        let blk = if i % 7 == 6 { 64 + rng.below(30) } else { 1 + (i * 5) % 63 };
        let _ = m.write(Sectors(blk), &[0xF0 ^ i as u8; 512]);
        if i % 9 == 0 {
            m.write(Sectors(0), &[i as u8; 512]).unwrap();
        }
    }
    assert!(m.log_sectors() >= 3, "expected rollovers, got {} log sectors", m.log_sectors());
    let run = Run { dev: m.into_device(), bs: 512, pre, in_use, first_epoch, committed: None };
    let mut counts = Counts::default();
    exercise(&run, 99, &mut counts, 10);
    bow::crashdev::report_count(&format!(
        "rollover crash consistency: {} epochs, {} crash states, {} restore crash states",
        counts.epochs, counts.crash_states, counts.restore_crash_states
    ));
    assert!(counts.crash_states >= 500, "only {} crash states", counts.crash_states);
}
