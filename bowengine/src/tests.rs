//! The engine against the reference model, the existing restore, the crash model and the
//! allocator comparison (docs/userspace-bow.md, "Tests").

use blockcopy::crashdev::CrashDevice;
use blockcopy::device::{BlockDevice, MemDevice};
use bow::model::{
    BowEngine, BowModel, BowState, EngineError, ModelConfig, PieceAction, RangeType, WriteAction,
};
use bow::restore::{restore, RestoreOptions, RestoreOutcome};
use bow::units::{BlockSize, Sectors, SECTOR_SIZE};
use checkpoint_estimate::{Record, Trace};
use proptest::prelude::*;

use crate::order::Fault;
use crate::{Allocator, Engine, EngineConfig, IoOutcome, UserIo};

/// A base image whose every block differs from every other (so a misplaced copy shows).
fn base_image(blocks: u64, bs: BlockSize) -> Vec<u8> {
    let bsz = bs.as_usize();
    let mut img = vec![0u8; usize::try_from(blocks).unwrap() * bsz];
    for (b, block) in img.chunks_mut(bsz).enumerate() {
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = u8::try_from((b * 131 + i * 7 + 1) % 251).unwrap();
        }
    }
    img
}

fn data(blocks: u64, bs: BlockSize, seed: u64) -> Vec<u8> {
    let n = usize::try_from(blocks).unwrap() * bs.as_usize();
    let s = seed % 251;
    (0..n).map(|i| u8::try_from((s as usize * 17 + i * 13 + 5) % 253).unwrap()).collect()
}

/// One step of a workload, in blocks.
#[derive(Debug, Clone)]
enum Op {
    Discard { block: u64, blocks: u64 },
    Write { block: u64, blocks: u64, seed: u64 },
    Next,
}

fn op_strategy(blocks: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..blocks, 1..6u64).prop_map(move |(b, n)| Op::Discard { block: b, blocks: n.min(blocks - b) }),
        6 => (0..blocks, 1..4u64, any::<u64>()).prop_map(move |(b, n, seed)| Op::Write { block: b, blocks: n.min(blocks - b), seed }),
        1 => Just(Op::Next),
    ]
}

fn bs_strategy() -> impl Strategy<Value = BlockSize> {
    prop_oneof![Just(BlockSize::B4096), Just(BlockSize::B512)]
}

/// The error's shape, for comparing engine and model outcomes.
fn shape(e: &EngineError) -> String {
    match e {
        EngineError::Bio { status, progress, .. } => {
            format!(
                "bio {status} after {} pieces, sector0 {}",
                progress.pieces.len(),
                progress.sector0_written
            )
        }
        other => format!("{:?}", other.kind()),
    }
}

/// Drives the model and a DmBow engine (one I/O per batch) with `ops` over the same image;
/// fails at the first differing outcome, and unless the devices end byte for byte equal.
fn compare_with_model(
    bs: BlockSize,
    blocks: u64,
    ops: &[Op],
) -> Result<crate::EngineStats, String> {
    let img = base_image(blocks, bs);
    let mut model = BowModel::new(MemDevice::from_bytes(img.clone()), ModelConfig::new(bs));
    let mut engine = Engine::new(
        MemDevice::from_bytes(img),
        EngineConfig { block_size: bs, allocator: Allocator::DmBow },
    );
    let bss = bs.sectors();
    for (i, op) in ops.iter().enumerate() {
        let (m, e) = match *op {
            Op::Discard { block, blocks } => {
                let len = blocks * u64::from(bs.bytes());
                let m = model.discard(Sectors(block * bss), len);
                let e = engine.discard(Sectors(block * bss), len);
                (m.map(|a| format!("{a:?}")), e.map(|a| format!("{a:?}")))
            }
            Op::Write { block, blocks, seed } => {
                let d = data(blocks, bs, seed);
                let m = model.write(Sectors(block * bss), &d);
                let e = engine.write(Sectors(block * bss), &d);
                (m.map(|a| format!("{a:?}")), e.map(|a| format!("{a:?}")))
            }
            Op::Next => {
                let to = match model.state() {
                    BowState::Trim => BowState::Checkpoint,
                    _ => BowState::Committed,
                };
                let m = model.set_state(to);
                let e = engine.set_state(to);
                (m.map(|a| format!("{a:?}")), e.map(|a| format!("{a:?}")))
            }
        };
        let (m, e) = (m.map_err(|x| shape(&x)), e.map_err(|x| shape(&x)));
        if m != e {
            return Err(format!("op {i} {op:?}: model {m:?}, engine {e:?}"));
        }
        if model.true_free_bytes() != engine.space().free_bytes {
            return Err(format!("op {i}: free space differs"));
        }
    }
    if model.device().snapshot() != engine.device().snapshot() {
        return Err("device bytes differ".into());
    }
    if model.table_status() != engine.range_map().table_status() {
        return Err("range maps differ".into());
    }
    Ok(engine.stats())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// DmBow allocator, one I/O per batch: the device ends byte for byte as the model leaves
    /// it (log sectors, backups, user data), and every I/O has the same outcome.
    #[test]
    fn dmbow_unbatched_matches_the_model(
        bs in bs_strategy(),
        ops in proptest::collection::vec(op_strategy(48), 1..90),
    ) {
        if let Err(e) = compare_with_model(bs, 48, &ops) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The same comparison on a long fixed workload that certainly rolls the log over several
/// times, re-backs up backups and writes over SECTOR0_CURRENT and block 0's copy.
#[test]
fn dmbow_matches_the_model_through_rollovers_and_rebackups() {
    let blocks = 1024;
    let mut rng = blockcopy::crashdev::XorShift::new(42);
    let mut ops = vec![
        Op::Discard { block: 400, blocks: 300 },
        Op::Discard { block: 720, blocks: 280 },
        Op::Write { block: 500, blocks: 2, seed: 9 },
        Op::Next,
        // Over the start of both free ranges: where dm-bow put SECTOR0_CURRENT and the copy of
        // block 0, whichever range headed its list.
        Op::Write { block: 400, blocks: 3, seed: 3 },
        Op::Write { block: 720, blocks: 3, seed: 4 },
    ];
    for _ in 0..250 {
        // Mostly blocks in use (backups), some free space, SECTOR0_CURRENT and backups among it.
        let block = if rng.next() % 5 == 0 { 400 + rng.next() % 600 } else { rng.next() % 400 };
        ops.push(if rng.next() % 8 == 0 {
            Op::Discard { block, blocks: 1 + rng.next() % 3 }
        } else {
            Op::Write { block, blocks: 1 + rng.next() % 3, seed: rng.next() }
        });
    }
    ops.push(Op::Next);
    ops.push(Op::Write { block: 0, blocks: 2, seed: 5 });
    let stats = compare_with_model(BlockSize::B512, blocks, &ops).unwrap();
    println!("{stats:?}");
    assert!(stats.log_rollovers >= 3, "{stats:?}");
    assert!(stats.rebackups >= 5, "{stats:?}");
    assert!(stats.backups >= 100, "{stats:?}");
}

/// A checkpoint workload: the TRIM phase (discards of the free space, some writes), then
/// batches of writes and discards in CHECKPOINT.
#[derive(Debug, Clone)]
struct Workload {
    bs: BlockSize,
    blocks: u64,
    trim: Vec<Op>,
    batches: Vec<Vec<Op>>,
}

fn workload_strategy() -> impl Strategy<Value = Workload> {
    (bs_strategy(), 48u64..96).prop_flat_map(|(bs, blocks)| {
        (
            proptest::collection::vec(
                (1..blocks, 1..12u64)
                    .prop_map(move |(b, n)| Op::Discard { block: b, blocks: n.min(blocks - b) }),
                2..10,
            ),
            proptest::collection::vec(proptest::collection::vec(op_strategy(blocks), 1..8), 1..14),
        )
            .prop_map(move |(trim, batches)| {
                let batches = batches
                    .into_iter()
                    .map(|b| b.into_iter().filter(|o| !matches!(o, Op::Next)).collect::<Vec<_>>())
                    .filter(|b| !b.is_empty())
                    .collect();
                Workload { bs, blocks, trim, batches }
            })
    })
}

fn ios(ops: &[Op], bs: BlockSize) -> Vec<UserIo> {
    let bss = bs.sectors();
    ops.iter()
        .filter_map(|op| match *op {
            Op::Discard { block, blocks } => Some(UserIo::Discard {
                sector: Sectors(block * bss),
                len: blocks * u64::from(bs.bytes()),
            }),
            Op::Write { block, blocks, seed } => Some(UserIo::Write {
                sector: Sectors(block * bss),
                data: data(blocks, bs, seed).into(),
            }),
            Op::Next => None,
        })
        .collect()
}

/// What the checkpoint must preserve: the image at its start and the blocks in use then.
struct PreCheckpoint {
    image: Vec<u8>,
    used: Vec<u64>,
}

/// Runs the TRIM phase, a user flush, then enters CHECKPOINT.
fn start_checkpoint<D: BlockDevice>(
    engine: &mut Engine<D>,
    w: &Workload,
    snapshot: impl Fn(&D) -> Vec<u8>,
) -> PreCheckpoint {
    let batch = engine.submit(ios(&w.trim, w.bs)).unwrap();
    batch.commit().unwrap();
    engine.flush().unwrap();
    let image = snapshot(engine.device());
    let bss = w.bs.sectors();
    let used = engine
        .range_map()
        .ranges()
        .iter()
        .filter(|r| r.kind != RangeType::Trimmed)
        .flat_map(|r| r.start / bss..r.end / bss)
        .collect();
    engine.set_state(BowState::Checkpoint).unwrap();
    PreCheckpoint { image, used }
}

fn run_batches<D: BlockDevice>(engine: &mut Engine<D>, w: &Workload) {
    for ops in &w.batches {
        let report = engine.submit(ios(ops, w.bs)).unwrap().commit().unwrap();
        for r in report.results {
            // Running out of backup space is a legal outcome of a random workload.
            if let Err(e) = r {
                assert_eq!(e.kind(), bow::model::EngineErrorKind::NoSpace, "{e}");
            }
        }
    }
}

/// Restores `image` with the existing restore; `None` when a block in use at checkpoint start
/// differs from its contents then.
fn restored_matches(image: Vec<u8>, pre: &PreCheckpoint, bs: BlockSize) -> Result<(), String> {
    let dev = MemDevice::from_bytes(image);
    let report = restore(&dev, &RestoreOptions::default(), &mut |_| {})
        .map_err(|e| format!("restore failed: {e}"))?;
    if let RestoreOutcome::Refused { reason } = &report.outcome {
        return Err(format!("restore refused: {reason}"));
    }
    let out = dev.snapshot();
    let bsz = bs.as_usize();
    for &b in &pre.used {
        let at = usize::try_from(b).unwrap() * bsz;
        if out[at..at + bsz] != pre.image[at..at + bsz] {
            return Err(format!("block {b} differs after restore ({:?})", report.outcome));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Both allocators, batched: the log restores bit-exact to the pre-checkpoint image.
    #[test]
    fn batched_log_restores_to_the_pre_checkpoint_image(w in workload_strategy(), far in any::<bool>()) {
        let allocator = if far { Allocator::FarEnd } else { Allocator::DmBow };
        let img = base_image(w.blocks, w.bs);
        let mut engine = Engine::new(MemDevice::from_bytes(img), EngineConfig { block_size: w.bs, allocator });
        let pre = start_checkpoint(&mut engine, &w, MemDevice::snapshot);
        run_batches(&mut engine, &w);
        let after = engine.device().snapshot();
        if let Err(e) = restored_matches(after, &pre, w.bs) {
            prop_assert!(false, "{:?}: {}", allocator, e);
        }
    }
}

/// Crash states checked and those that failed.
#[derive(Debug, Default)]
struct CrashCounts {
    states: usize,
    failed: usize,
    first_failure: Option<String>,
}

/// Runs `w` over a crash device and restores every standard crash state of every epoch after
/// checkpoint start (every prefix: a cut after each write; all-but-one; random subsets).
fn crash_run(w: &Workload, allocator: Allocator, fault: Option<Fault>, seed: u64) -> CrashCounts {
    let img = base_image(w.blocks, w.bs);
    let unit = w.bs.as_usize();
    let mut engine =
        Engine::new(CrashDevice::new(img, unit), EngineConfig { block_size: w.bs, allocator });
    engine.fault = fault;
    let pre = start_checkpoint(&mut engine, w, CrashDevice::current);
    let epochs_before = count_flushes(engine.device());
    // set_state issued two ordering flushes; crashes inside prepare_log count too.
    let first_epoch = epochs_before - 2;
    run_batches(&mut engine, w);
    let mut counts = CrashCounts::default();
    engine.device().for_each_epoch(|epoch| {
        if epoch.index < first_epoch {
            return;
        }
        for keep in epoch.standard_states(64, 8, seed) {
            counts.states += 1;
            if let Err(e) = restored_matches(epoch.image(&keep), &pre, w.bs) {
                counts.failed += 1;
                counts.first_failure.get_or_insert(format!("epoch {} {keep:?}: {e}", epoch.index));
            }
        }
    });
    counts
}

fn count_flushes(dev: &CrashDevice) -> usize {
    dev.events().iter().filter(|e| matches!(e, blockcopy::crashdev::IoEvent::Flush)).count()
}

/// A workload where every batch backs up several blocks and writes into free space.
fn crash_workload(bs: BlockSize, seed: u64) -> Workload {
    let blocks = 96;
    let mut rng = blockcopy::crashdev::XorShift::new(seed);
    let trim = vec![
        Op::Discard { block: 40, blocks: 30 },
        Op::Discard { block: 75, blocks: 12 },
        Op::Write { block: 50, blocks: 1, seed: 1 },
    ];
    let batches = (0..10)
        .map(|_| {
            (0..5)
                .map(|_| Op::Write {
                    block: rng.next() % (blocks - 2),
                    blocks: 1 + rng.next() % 2,
                    seed: rng.next(),
                })
                .collect()
        })
        .collect();
    Workload { bs, blocks, trim, batches }
}

#[test]
fn crash_at_every_flush_point_restores_exactly() {
    let mut total = 0;
    for (i, bs) in [BlockSize::B4096, BlockSize::B512].into_iter().enumerate() {
        for allocator in [Allocator::DmBow, Allocator::FarEnd] {
            for seed in 1..4u64 {
                let w = crash_workload(bs, seed * 7 + u64::try_from(i).unwrap());
                let c = crash_run(&w, allocator, None, seed);
                assert_eq!(c.failed, 0, "{allocator:?} {bs:?} seed {seed}: {:?}", c.first_failure);
                total += c.states;
            }
        }
    }
    println!("crash states restored exactly: {total}");
    assert!(total > 2000, "too few crash states: {total}");
}

#[test]
fn crash_suite_catches_a_user_write_released_before_its_backup_is_durable() {
    let w = crash_workload(BlockSize::B4096, 3);
    let c = crash_run(&w, Allocator::FarEnd, Some(Fault::UserWriteBeforeFlush), 5);
    println!("user write before flush: {} of {} crash states wrong", c.failed, c.states);
    assert!(c.failed > 0, "the broken order went unnoticed over {} states", c.states);
}

#[test]
fn crash_suite_catches_a_log_entry_written_before_its_data() {
    let w = crash_workload(BlockSize::B4096, 3);
    let c = crash_run(&w, Allocator::FarEnd, Some(Fault::LogBeforeData), 5);
    println!("log before data: {} of {} crash states wrong", c.failed, c.states);
    assert!(c.failed > 0, "the broken order went unnoticed over {} states", c.states);
}

/// An engine in CHECKPOINT over the crash workload's image (seed 9, 4 KiB blocks, FarEnd).
fn armed_crash_engine() -> Engine<CrashDevice> {
    let w = crash_workload(BlockSize::B4096, 9);
    let img = base_image(w.blocks, w.bs);
    let mut engine = Engine::new(
        CrashDevice::new(img, 4096),
        EngineConfig { block_size: w.bs, allocator: Allocator::FarEnd },
    );
    start_checkpoint(&mut engine, &w, CrashDevice::current);
    engine
}

/// One batch: writes into in-use blocks 1 and 2 (two backups) and into free block 45.
fn two_backups_and_a_free_space_write(engine: &mut Engine<CrashDevice>) {
    let bs = BlockSize::B4096;
    let ops = vec![
        UserIo::Write { sector: Sectors(8), data: data(1, bs, 1).into() },
        UserIo::Write { sector: Sectors(16), data: data(1, bs, 2).into() },
        UserIo::Write { sector: Sectors(45 * 8), data: data(1, bs, 3).into() },
    ];
    let report = engine.submit(ops).unwrap().commit().unwrap();
    assert_eq!((report.backup_blocks, report.flushes), (2, 2));
}

#[test]
fn a_batch_issues_backups_flush_log_flush_then_user_writes() {
    let mut engine = armed_crash_engine();
    let before = engine.device().events_without_reads().len();
    two_backups_and_a_free_space_write(&mut engine);
    use blockcopy::crashdev::IoEvent::{Flush, Write};
    let events = engine.device().events_without_reads()[before..].to_vec();
    let shape: Vec<String> = events
        .iter()
        .map(|e| match e {
            Flush => "F".to_string(),
            Write { offset: 0, .. } => "log".to_string(),
            Write { offset, .. } if [4096, 8192, 45 * 4096].contains(offset) => "user".into(),
            Write { .. } => "backup".to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(shape, ["backup", "backup", "F", "log", "F", "user", "user", "user"]);
}

/// Records each `write_durable` call's offsets (and writes nothing).
#[derive(Debug, Default, Clone)]
struct RecordedDurable(std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>);

impl crate::order::DurableWrites for RecordedDurable {
    fn write_durable(&self, writes: &[(u64, &[u8])]) -> Result<(), blockcopy::device::DeviceError> {
        let offsets = writes.iter().map(|(at, _)| *at).collect();
        self.0
            .lock()
            .map_err(|_| blockcopy::device::DeviceError::Io {
                offset: 0,
                source: std::io::Error::other("poisoned"),
            })?
            .push(offsets);
        Ok(())
    }
}

#[test]
fn with_durable_writes_the_two_ordering_points_go_through_them_and_no_device_flush() {
    let mut engine = armed_crash_engine();
    let durable = RecordedDurable::default();
    engine.set_durable_writes(Box::new(durable.clone()));
    let before = engine.device().events_without_reads().len();
    two_backups_and_a_free_space_write(&mut engine);
    let calls = durable.0.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].len(), 2, "the two backups first: {calls:?}");
    assert!(calls[0].iter().all(|at| *at != 0 && ![4096, 8192].contains(at)), "{calls:?}");
    assert_eq!(calls[1], [0], "then block 0: {calls:?}");
    use blockcopy::crashdev::IoEvent::Write;
    let events = engine.device().events_without_reads()[before..].to_vec();
    let user: Vec<u64> = events
        .iter()
        .map(|e| match e {
            Write { offset, .. } => *offset,
            other => panic!("only the user writes reach the device itself: {other:?}"),
        })
        .collect();
    assert_eq!(user, [4096, 8192, 45 * 4096]);
}

/// The "two writers at once, half into free space" workload of dm-bow-format.md §11: writer A
/// overwrites blocks in use (each needs a backup), writer B fills free space the way a
/// filesystem allocates, from the start of a free range and from a goal in its middle, and the
/// two interleave. Returns (backups, re-backups, backup bytes, blocks written).
fn two_writers(allocator: Allocator, seed: u64) -> (u64, u64, u64, u64) {
    let bs = BlockSize::B4096;
    let blocks = 8192u64;
    let used = 4096u64;
    let mut engine = Engine::new(
        MemDevice::new(usize::try_from(blocks).unwrap() * 4096),
        EngineConfig { block_size: bs, allocator },
    );
    let bss = bs.sectors();
    engine.discard(Sectors(used * bss), (blocks - used) * 4096).unwrap();
    engine.set_state(BowState::Checkpoint).unwrap();
    let mut rng = blockcopy::crashdev::XorShift::new(seed);
    // A permutation prefix of the used blocks (block 0 excluded: it is the log's).
    let mut in_use: Vec<u64> = (1..used).collect();
    for i in (1..in_use.len()).rev() {
        let j = usize::try_from(rng.next() % u64::try_from(i + 1).unwrap()).unwrap();
        in_use.swap(i, j);
    }
    let per_writer = 1024u64;
    let (mut b1, mut b2) = (used, used + (blocks - used) / 2);
    let mut written = 0;
    for i in 0..per_writer {
        let a = in_use[usize::try_from(i).unwrap()];
        // B extends one of its two files by a block, the file chosen at random.
        let b = if rng.next() % 2 == 0 {
            b1 += 1;
            b1 - 1
        } else {
            b2 += 1;
            b2 - 1
        };
        for block in [a, b] {
            engine.write(Sectors(block * bss), &[0xA5; 4096]).unwrap();
            written += 1;
        }
    }
    let s = engine.stats();
    let used = engine.space().used_bytes;
    // One-block writes: every log entry is one block taken from free space, plus
    // SECTOR0_CURRENT.
    assert_eq!(used, (s.backups + 1) * 4096);
    (s.backups, s.rebackups, used, written)
}

#[test]
fn far_end_allocator_avoids_rebackups_on_two_concurrent_writers() {
    let mut rows = Vec::new();
    for seed in [1u64, 2, 3] {
        let (db, dr, dspace, written) = two_writers(Allocator::DmBow, seed);
        let (fb, fr, fspace, _) = two_writers(Allocator::FarEnd, seed);
        // dm-snapshot's COW stores one chunk per block written, free or not.
        let cow = written * 4096;
        println!(
            "seed {seed}: {written} blocks written; DmBow {db} backups, {dr} re-backups, {} KiB \
             ({:.2}x COW); FarEnd {fb} backups, {fr} re-backups, {} KiB ({:.2}x COW)",
            dspace / 1024,
            dspace as f64 / cow as f64,
            fspace / 1024,
            fspace as f64 / cow as f64,
        );
        assert!(fspace <= dspace, "FarEnd used more space");
        assert!(fspace * 100 <= cow * 55, "FarEnd above 0.55x of the COW store");
        assert!(fr * 10 <= dr, "FarEnd re-backups {fr} not far fewer than DmBow's {dr}");
        rows.push((dr, fr));
    }
    assert!(rows.iter().any(|&(dr, _)| dr > 100), "the workload provoked no re-backups: {rows:?}");
}

#[test]
fn space_accounting_is_exact_where_the_kernel_counter_drifts() {
    let w = crash_workload(BlockSize::B4096, 11);
    for allocator in [Allocator::DmBow, Allocator::FarEnd] {
        let img = base_image(w.blocks, w.bs);
        let mut engine =
            Engine::new(MemDevice::from_bytes(img), EngineConfig { block_size: w.bs, allocator });
        start_checkpoint(&mut engine, &w, MemDevice::snapshot);
        let free_at_start = engine.space().free_bytes + engine.space().used_bytes;
        assert_eq!(engine.space().used_bytes, 2 * 4096, "the two copies of block 0");
        let mut claimed = 0;
        for ops in &w.batches {
            let report = engine.submit(ios(ops, w.bs)).unwrap().commit().unwrap();
            for r in report.results.into_iter().flatten() {
                if let IoOutcome::Write(WriteAction::Checkpointed { pieces, .. }) = r {
                    claimed += pieces
                        .iter()
                        .filter(|p| p.action == PieceAction::FreeClaimed)
                        .map(|p| p.sectors * SECTOR_SIZE)
                        .sum::<u64>();
                }
            }
        }
        let space = engine.space();
        // Every free block at checkpoint start is still free, was taken for a copy, or was
        // written by the filesystem while free.
        let stats = engine.stats();
        assert_eq!(free_at_start, space.free_bytes + space.used_bytes + claimed, "{allocator:?}");
        // Copies the filesystem overwrote no longer hold anything.
        assert_eq!(space.held_bytes, space.used_bytes - stats.rebackup_bytes, "{allocator:?}");

        // The kernel's counter over-reports whenever a free range was carved in its middle.
        let kernel = engine.range_map().trims_total();
        println!("{allocator:?}: exact free {} B, kernel counter {kernel} B", space.free_bytes);
        assert!(kernel >= space.free_bytes);
    }
}

#[test]
fn the_checkpoint_write_trace_is_recorded_in_the_estimator_format() {
    let w = crash_workload(BlockSize::B4096, 4);
    let img = base_image(w.blocks, w.bs);
    let mut engine = Engine::new(MemDevice::from_bytes(img), EngineConfig::new(w.bs));
    start_checkpoint(&mut engine, &w, MemDevice::snapshot);
    run_batches(&mut engine, &w);
    engine.flush().unwrap();
    let trace = engine.trace().expect("a trace");
    let bss = w.bs.sectors();
    let mut want: Vec<Record> = w
        .batches
        .iter()
        .flatten()
        .filter_map(|op| match *op {
            Op::Write { block, blocks, .. } => Some(Record::write(block * bss, blocks * bss)),
            Op::Discard { block, blocks } => Some(Record::discard(block * bss, blocks * bss)),
            Op::Next => None,
        })
        .collect();
    want.push(Record::Flush);
    // TRIM-state I/O is not part of the checkpoint's trace.
    assert_eq!(trace.records(), &want[..]);
    let back = Trace::read_from(&trace.to_bytes()[..]).unwrap();
    assert_eq!(back.records(), trace.records());
    assert!(!engine.trace_overflowed());
}

#[test]
fn a_dropped_batch_poisons_the_engine() {
    let mut engine = Engine::new(MemDevice::new(16 * 4096), EngineConfig::new(BlockSize::B4096));
    engine.discard(Sectors(64), 8 * 4096).unwrap();
    engine.set_state(BowState::Checkpoint).unwrap();
    drop(
        engine
            .submit(vec![UserIo::Write { sector: Sectors(8), data: vec![1; 4096].into() }])
            .unwrap(),
    );
    let e = engine.write(Sectors(16), &[2; 4096]).unwrap_err();
    assert_eq!(e.kind(), bow::model::EngineErrorKind::Io);
}

/// The point of batches: the ordering flushes are shared. 256 writes to blocks in use, one
/// per batch and 32 per batch; the restore still gives the pre-checkpoint image back.
#[test]
fn a_batch_shares_two_flushes_among_all_its_backups() {
    let bs = BlockSize::B4096;
    let blocks = 1024u64;
    let mut flushes = Vec::new();
    for per_batch in [1usize, 32] {
        let w = Workload {
            bs,
            blocks,
            trim: vec![Op::Discard { block: 512, blocks: 512 }],
            batches: (1..257u64)
                .map(|b| Op::Write { block: b, blocks: 1, seed: b })
                .collect::<Vec<_>>()
                .chunks(per_batch)
                .map(<[Op]>::to_vec)
                .collect(),
        };
        let mut engine =
            Engine::new(MemDevice::from_bytes(base_image(blocks, bs)), EngineConfig::new(bs));
        let pre = start_checkpoint(&mut engine, &w, MemDevice::snapshot);
        let before = engine.stats().flushes;
        run_batches(&mut engine, &w);
        assert_eq!(engine.stats().backups, 256 + 1 + 1, "256 writes, block 0, one rollover");
        flushes.push(engine.stats().flushes - before);
        restored_matches(engine.device().snapshot(), &pre, bs).unwrap();
    }
    println!(
        "ordering flushes for 256 backups: one per batch {}, 32 per batch {}",
        flushes[0], flushes[1]
    );
    assert_eq!(flushes, [2 * 256, 2 * 8]);
}

/// FarEnd carves the largest free range downwards from its end, and looks again when the
/// filesystem has cut that range below half its size.
#[test]
fn far_end_carves_from_the_end_and_moves_when_its_range_is_cut() {
    let bs = BlockSize::B4096;
    let mut engine = Engine::new(MemDevice::new(400 * 4096), EngineConfig::new(bs));
    engine.discard(Sectors(100 * 8), 100 * 4096).unwrap();
    engine.discard(Sectors(300 * 8), 50 * 4096).unwrap();
    let change = engine.set_state(BowState::Checkpoint).unwrap();
    assert_eq!(
        change,
        bow::model::StateChange::CheckpointStarted {
            sector0: Sectors(199 * 8),
            backup: Sectors(198 * 8)
        }
    );
    let dest = |engine: &mut Engine<MemDevice>, block: u64| -> u64 {
        match engine.write(Sectors(block * 8), &[7; 4096]).unwrap() {
            WriteAction::Checkpointed { pieces, .. } => match pieces[..] {
                [bow::model::Piece { action: PieceAction::BackedUp { entry, .. }, .. }] => {
                    entry.dest.0 / 8
                }
                _ => panic!("{pieces:?}"),
            },
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(dest(&mut engine, 1), 197);
    // The filesystem writes into the middle of the range: [151, 197) is under half of 100.
    engine.write(Sectors(150 * 8), &[8; 4096]).unwrap();
    // Largest now: [100, 150) and [300, 350), 50 blocks each; the higher one wins.
    assert_eq!(dest(&mut engine, 2), 349);
    assert_eq!(dest(&mut engine, 3), 348);
    assert_eq!(engine.stats().rebackups, 0);
}

mod resume;

/// A journal file shared with the test.
#[derive(Debug, Clone, Default)]
struct SharedJournal(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedJournal {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every batch's frame is in the journal when the batch returns, rewrites' included: a server
/// killed after any of them is rebuilt with the same decisions, the same write trace and the
/// same counters.
#[test]
fn a_recovery_after_any_batch_rebuilds_the_engine_and_its_whole_trace() {
    let w = crash_workload(BlockSize::B4096, 3);
    let img = base_image(w.blocks, w.bs);
    let journal = SharedJournal::default();
    let config = EngineConfig::new(w.bs);
    let mut engine =
        Engine::with_journal(MemDevice::from_bytes(img), config, Box::new(journal.clone()))
            .unwrap();
    start_checkpoint(&mut engine, &w, |d: &MemDevice| d.snapshot());
    // A first touch (a backup), a write into free space, then rewrites of both.
    for (block, seed) in [(3, 1), (45, 2), (3, 3), (45, 4), (3, 5)] {
        let before = journal.0.lock().unwrap().len();
        let io = UserIo::Write { sector: Sectors(block * 8), data: data(1, w.bs, seed).into() };
        engine.submit(vec![io]).unwrap().commit().unwrap();
        assert!(journal.0.lock().unwrap().len() > before, "block {block}: no frame appended");
        let dev = MemDevice::from_bytes(engine.device().snapshot());
        let bytes = journal.0.lock().unwrap().clone();
        let recovered = Engine::recover(dev, config, &bytes).unwrap();
        assert!(!recovered.dropped_last);
        assert_eq!(recovered.engine.decision_state(), engine.decision_state());
        assert_eq!(recovered.engine.trace(), engine.trace(), "block {block}");
        assert_eq!(recovered.engine.stats(), engine.stats(), "block {block}");
    }
}

/// A discard in CHECKPOINT: with the far-end allocator it changes nothing (no copy, no block
/// taken out of the pool, the copies in the discarded free space kept), and a later write to the
/// discarded in-use blocks is still backed up, so the log restores exactly. dm-bow's allocator
/// keeps dm-bow's behaviour: the discard is backed up like a write.
#[test]
fn a_discard_in_checkpoint_costs_the_far_end_engine_nothing() {
    let bs = BlockSize::B4096;
    let w = Workload {
        bs,
        blocks: 512,
        trim: vec![Op::Discard { block: 256, blocks: 256 }],
        batches: Vec::new(),
    };
    for allocator in [Allocator::FarEnd, Allocator::DmBow] {
        let img = base_image(w.blocks, bs);
        let mut engine =
            Engine::new(MemDevice::from_bytes(img), EngineConfig { block_size: bs, allocator });
        let pre = start_checkpoint(&mut engine, &w, MemDevice::snapshot);
        // Two in-use blocks backed up, then a discard over in-use blocks (including those two),
        // and the whole free half, where the copies went.
        let write = vec![Op::Write { block: 10, blocks: 2, seed: 1 }];
        engine.submit(ios(&write, bs)).unwrap().commit().unwrap();
        let before = (engine.space(), engine.stats().backups);
        let discard =
            vec![Op::Discard { block: 8, blocks: 24 }, Op::Discard { block: 256, blocks: 256 }];
        engine.submit(ios(&discard, bs)).unwrap().commit().unwrap();
        let after = (engine.space(), engine.stats().backups);
        match allocator {
            Allocator::FarEnd => assert_eq!(after, before, "a discard changed the far-end engine"),
            Allocator::DmBow => assert!(
                after.0.free_bytes < before.0.free_bytes,
                "dm-bow's allocator no longer backs a discard up: {before:?} -> {after:?}"
            ),
        }
        // The discarded in-use blocks are written now: backed up first, restored after.
        let rewrite = vec![Op::Write { block: 8, blocks: 24, seed: 2 }];
        if let Err(e) = engine.submit(ios(&rewrite, bs)).and_then(|b| b.commit()) {
            panic!("{allocator:?}: {e}");
        }
        engine.flush().unwrap();
        restored_matches(engine.device().snapshot(), &pre, bs)
            .unwrap_or_else(|e| panic!("{allocator:?}: {e}"));
    }
}
