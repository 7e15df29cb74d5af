//! Host CPU per request of the engine's write path, with no device cost (a memory device, the
//! journal into a sink): what the engine itself adds to each ublk request before any I/O.
//! Printed, not judged: the ublk bench (`cargo xtask bench ublk`) is where the goals are.
//!
//! `cargo bench -p bow-engine --bench cpu_per_request` (a release build).

use blockcopy::device::{BlockDevice, MemDevice};
use bow::model::{BowEngine, BowState};
use bow::units::{BlockSize, Sectors};
use bow_engine::{Engine, EngineConfig, UserIo};

/// Blocks of the device (256 MiB of 4 KiB blocks); the upper half is free at checkpoint start.
const BLOCKS: u64 = 65_536;
/// Writes timed per kind.
const WRITES: u64 = 20_000;

fn main() {
    let dev = MemDevice::new(usize::try_from(BLOCKS * 4096).expect("fits"));
    // Every page of the device touched first: a first write into untouched memory pays a page
    // fault, which made writes into free space look 3 µs dearer than rewrites (until
    // 2026-12-07; the engine's own work differs by far less).
    let block = vec![0x5a_u8; 4096];
    for b in 0..BLOCKS {
        dev.write_at(&block, b * 4096).expect("touching the device");
    }
    let mut engine =
        Engine::with_journal(dev, EngineConfig::new(BlockSize::B4096), Box::new(std::io::sink()))
            .expect("engine");
    let half = BLOCKS / 2;
    engine
        .submit(vec![UserIo::Discard { sector: Sectors(half * 8), len: half * 4096 }])
        .and_then(|batch| batch.commit())
        .expect("the TRIM-state discard");
    engine.set_state(BowState::Checkpoint).expect("CHECKPOINT");
    // Random blocks in the lower half of the free space (xorshift: the same blocks every run).
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let free: Vec<u64> = (0..WRITES)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            half + rng % (half / 2)
        })
        .collect();
    let mut per_write = |fill: u8| {
        let t = std::time::Instant::now();
        for b in &free {
            let io = UserIo::Write { sector: Sectors(b * 8), data: vec![fill; 4096].into() };
            engine.submit(vec![io]).and_then(|batch| batch.commit()).expect("write");
        }
        t.elapsed().as_secs_f64() * 1e6 / WRITES as f64
    };
    // First into free (TRIMMED) blocks, then the same blocks again: now CHANGED.
    let free_us = per_write(7);
    let changed_us = per_write(8);
    println!(
        "engine CPU per 4 KiB write ({WRITES} each, memory device): into free space \
         {free_us:.2} us, rewrite of a CHANGED block {changed_us:.2} us"
    );
    drain_shaped(&mut engine, half + half / 2, &mut rng);
}

/// Blocks of one region of the drain-shaped part (the ublk bench's region: 8 MiB).
const REGION: u64 = 2048;
/// Writes per batch: the ublk bench's slice, which one flush drains.
const SLICE: usize = 256;

/// The batches a ublk server's drain gives the engine in the ublk bench: each region's blocks
/// in a random order, cut into slices, each slice sorted (a drain goes in device order) and
/// planned and committed as one batch. Planning (the range map) and committing are timed
/// apart, into free space first and then over the same blocks again.
fn drain_shaped(engine: &mut Engine<MemDevice>, from: u64, rng: &mut u64) {
    let regions = (BLOCKS - from) / REGION;
    let mut slices: Vec<Vec<u64>> = Vec::new();
    for r in 0..regions {
        let mut blocks: Vec<u64> = (from + r * REGION..from + (r + 1) * REGION).collect();
        for i in (1..blocks.len()).rev() {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            blocks.swap(i, usize::try_from(*rng % (i as u64 + 1)).expect("fits"));
        }
        for chunk in blocks.chunks(SLICE) {
            let mut slice = chunk.to_vec();
            slice.sort_unstable();
            slices.push(slice);
        }
    }
    let writes = slices.iter().map(Vec::len).sum::<usize>() as f64;
    let mut run = |fill: u8| {
        let (mut plan, mut commit) = (0.0, 0.0);
        for slice in &slices {
            let ios = slice
                .iter()
                .map(|b| UserIo::Write { sector: Sectors(b * 8), data: vec![fill; 4096].into() })
                .collect();
            let t = std::time::Instant::now();
            let batch = engine.submit(ios).expect("plan");
            let planned = t.elapsed();
            batch.commit().expect("commit");
            plan += planned.as_secs_f64();
            commit += t.elapsed().as_secs_f64() - planned.as_secs_f64();
        }
        (plan * 1e6 / writes, commit * 1e6 / writes)
    };
    let (free_plan, free_commit) = run(9);
    let (changed_plan, changed_commit) = run(10);
    println!(
        "drain-shaped batches ({SLICE} sorted writes, one slice of a {REGION}-block region in \
         random order; {writes} writes each): plan / commit per write into free space \
         {free_plan:.2} / {free_commit:.2} us, rewrites {changed_plan:.2} / {changed_commit:.2} us"
    );
}
