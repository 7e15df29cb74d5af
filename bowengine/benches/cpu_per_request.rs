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
}
