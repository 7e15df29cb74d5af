//! Restore benchmark (not a timed test): `cargo bench -p bow --bench restore`.
//!
//! On an image file (on the disk of the cargo target directory), a checkpoint is produced by
//! the engine model (`bow::model`, the kernel's algorithm): discard the top 40 % of the device,
//! enter CHECKPOINT, then overwrite N MiB of used blocks — scattered 4 KiB blocks, or runs of
//! 256 KiB ("coalesced"). Then, interleaved in one process, each round times:
//! * **ours**: `bow::restore::restore` (validation + plan + parallel apply + flushes), with
//!   the default memory budget (the checked copies are written from memory, not read twice);
//! * **ours, budget 0**: the same with `memory_budget: 0` (every copy read again to apply);
//! * **vold**: `bow::restore::vold_baseline`, vold's algorithm: its validation pass (newest
//!   entry first, every saved block read on its own through the relocation map, CRC checked),
//!   then its entry-by-entry replay newest first, buffered pread/pwrite, a flush after every
//!   entry 0 and around every WOB progress save (vold-checkpoint.md §5.4);
//! * **raw**: bytes written to the same blocks with the same I/O pattern as our apply (sorted
//!   extents, same I/O size, same number of threads) and the same two flushes — no reads, no
//!   log: the device's write limit for this block set;
//! * **copy**: a raw copy of the same block set: every saved copy read once in physical
//!   order (sorted, merged reads of up to 4 MiB, `qd` in flight), then written in place like
//!   raw. No walk, no CRCs: the least I/O any restore must do, since it has to read the saved
//!   copies before it can write them.
//!
//! Every method writes through the page cache and flushes with `fdatasync`, so the device sees
//! the writes at the flush points. Ours and copy read with `O_DIRECT` where the file system
//! allows it (`FileDevice::with_direct_reads`, as the daemon and the CLI open devices); vold
//! reads through the page cache as vold does (`O_RDWR`, no `O_DIRECT`). Before every run
//! the touched blocks are reset to the checkpointed bytes, flushed, and the page cache is
//! dropped (`/proc/sys/vm/drop_caches`, when writable), so every run starts cold. Results of
//! ours, vold and copy are checked against the original data.
//!
//! The last line of each case is the ceiling of ours/raw on this device: a restore checks
//! every saved copy's CRC before it writes anything, so it takes at least copy's read time
//! plus raw's time.
//!
//! A real run (`--bench`) also writes `target/bench/restore.json` for `cargo xtask bench`'s
//! report: the machine, the kernel, every method's median per case (`rows`) and the ratios
//! between them (`figures`, each with its inputs).
//!
//! Environment: `BOW_BENCH_IMAGE_MIB` (default 512), `BOW_BENCH_RESTORE_MIB` (default 64),
//! `BOW_BENCH_ROUNDS` (default 3), `BOW_BENCH_QD` (queue depth of ours, raw and copy; default
//! 8), `BOW_BENCH_DIR` (default: the target's tmp dir).

#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // Benchmark arithmetic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bow::device::{BlockDevice, FileDevice, IoBuf, MemDevice};
use bow::model::{BowEngine, BowModel, BowState, ModelConfig};
use bow::restore::{self, Phase, RestoreOptions, RestoreOutcome, RestorePlan};
use bow::units::{BlockSize, Sectors};

const BS: u64 = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A checkpointed image, the original contents, and what restoring touches.
struct Case {
    name: &'static str,
    checkpointed: Vec<u8>,
    original: Vec<u8>,
    /// Blocks any method writes: every entry's source range and block 0.
    touched: Vec<(u64, u64)>,
    /// Blocks in use at checkpoint start that the checkpoint overwrote (checked after a run).
    overwritten: Vec<u64>,
    plan: RestorePlan,
    entries: u64,
    sequence: u32,
}

fn build(name: &'static str, image_blocks: u64, restore_blocks: u64, run: u64) -> Case {
    let mut rng = Rng(0x5EED_0000 + run);
    let mut original = vec![0u8; (image_blocks * BS) as usize];
    for (i, chunk) in original.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64 ^ 0xA5A5_5A5A_0F0F_F0F0).to_le_bytes());
    }
    let used = image_blocks * 6 / 10;
    let mut m =
        BowModel::new(MemDevice::from_bytes(original.clone()), ModelConfig::new(BlockSize::B4096));
    m.discard(Sectors(used * 8), (image_blocks - used) * BS).expect("discard");
    m.set_state(BowState::Checkpoint).expect("checkpoint");
    // Distinct runs of `run` blocks in the used area (block 0 excluded).
    let mut starts = BTreeSet::new();
    let slots = (used - 1) / run;
    while (starts.len() as u64) * run < restore_blocks {
        starts.insert(1 + (rng.next() % slots) * run);
    }
    let mut order: Vec<u64> = starts.into_iter().collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let data = vec![0xE7u8; (run * BS) as usize];
    let mut overwritten = Vec::new();
    for s in order {
        m.write(Sectors(s * 8), &data).expect("write");
        overwritten.extend(s..s + run);
    }
    let dev = m.into_device();
    let log = restore::validate(&dev).expect("the model's log validates");
    let mut touched: Vec<(u64, u64)> = vec![(0, 1)];
    for sector in &log.sectors {
        for e in &sector.entries {
            let s = e.source.0 / 8;
            touched.push((s, s + u64::from(e.size) / BS));
        }
    }
    touched.sort_unstable();
    Case {
        name,
        checkpointed: dev.snapshot(),
        original,
        touched,
        overwritten,
        entries: log.entries,
        sequence: log.header.sequence,
        plan: log.plan,
    }
}

/// Puts the checkpointed bytes back on every touched block, flushes, drops the page cache
/// (only in a real benchmark run, not when `cargo test --benches` runs this quickly).
fn reset(path: &Path, case: &Case, drop_caches: bool) -> bool {
    let dev = FileDevice::open(path).expect("open");
    for &(s, e) in &case.touched {
        let r = (s * BS) as usize..(e * BS) as usize;
        dev.write_at(&case.checkpointed[r], s * BS).expect("reset write");
    }
    dev.flush().expect("reset flush");
    drop(dev);
    drop_caches && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn check(path: &Path, case: &Case, who: &str) {
    let dev = FileDevice::open_read_only(path).expect("open");
    let mut buf = vec![0u8; BS as usize];
    for &b in case.overwritten.iter().chain(std::iter::once(&0)) {
        dev.read_at(&mut buf, b * BS).expect("read");
        let want = &case.original[(b * BS) as usize..((b + 1) * BS) as usize];
        assert!(buf == want, "{who}: block {b} not restored");
    }
}

/// Our restore; returns the total time and the time until the apply started (validation).
fn ours(path: &Path, qd: usize, memory_budget: usize) -> (Duration, Duration) {
    let t = Instant::now();
    let dev = FileDevice::open(path).expect("open").with_direct_reads();
    let opts = RestoreOptions { queue_depth: qd, memory_budget, ..RestoreOptions::default() };
    let mut validated = None;
    let report = restore::restore(&dev, &opts, &mut |p| {
        if p.phase == Phase::Apply && validated.is_none() {
            validated = Some(t.elapsed());
        }
    })
    .expect("restore");
    assert!(matches!(report.outcome, RestoreOutcome::Restored { .. }), "{:?}", report.outcome);
    let total = t.elapsed();
    (total, validated.unwrap_or(total))
}

fn vold(path: &Path) -> Duration {
    let t = Instant::now();
    let dev = FileDevice::open(path).expect("open");
    restore::vold_baseline(&dev).expect("vold");
    t.elapsed()
}

/// The same final bytes, same extents, same I/O size and threads as our apply; one flush.
fn raw(path: &Path, case: &Case, qd: usize) -> Duration {
    let max_blocks = (RestoreOptions::default().max_io_bytes as u64 / BS).max(1);
    let mut jobs: Vec<(u64, u64)> = Vec::new();
    for c in &case.plan.copies {
        let mut at = 0;
        while at < c.blocks {
            let n = (c.blocks - at).min(max_blocks);
            jobs.push((c.target + at, n));
            at += n;
        }
    }
    let final_bytes = &case.original;
    let t = Instant::now();
    let dev = FileDevice::open(path).expect("open");
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..qd {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(b, n)) = jobs.get(i) else { break };
                let r = (b * BS) as usize..((b + n) * BS) as usize;
                dev.write_at(&final_bytes[r], b * BS).expect("raw write");
            });
        }
    });
    dev.flush().expect("flush");
    dev.write_at(&final_bytes[..BS as usize], 0).expect("raw block 0");
    dev.flush().expect("flush");
    t.elapsed()
}

/// A raw copy of the same block set, done as well as a copy can be without a log: read every
/// saved copy once, in physical order, merged into reads of at most 4 MiB with `qd` in flight
/// (direct reads where allowed, like ours); then write them in place with the same pattern,
/// threads and flushes as `raw`. No validation, no walk, no CRCs: the least I/O any restore
/// must do. Returns the total and the time the reads took.
fn raw_copy(path: &Path, case: &Case, qd: usize) -> (Duration, Duration) {
    const READ_MAX: u64 = 4 << 20;
    let max_blocks = (RestoreOptions::default().max_io_bytes as u64 / BS).max(1);
    // Source extents, sorted and merged, split into reads.
    let mut sources: Vec<(u64, u64)> =
        case.plan.copies.iter().map(|c| (c.source, c.source + c.blocks)).collect();
    sources.push((case.plan.block0_source, case.plan.block0_source + 1));
    sources.sort_unstable();
    let mut reads: Vec<(u64, u64)> = Vec::new();
    for (s, e) in sources {
        // Overlapping ranges must merge (every copy then lies inside one read); touching ones
        // merge up to READ_MAX.
        match reads.last_mut() {
            Some(last) if s < last.1 || (s == last.1 && (e - last.0) * BS <= READ_MAX) => {
                last.1 = last.1.max(e);
            }
            _ => reads.push((s, e)),
        }
    }
    let t = Instant::now();
    let dev = FileDevice::open(path).expect("open").with_direct_reads();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let read: std::sync::Mutex<Vec<(u64, u64, IoBuf)>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..qd {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(from, to)) = reads.get(i) else { break };
                let mut buf = IoBuf::new(((to - from) * BS) as usize);
                dev.read_at(buf.as_mut_slice(), from * BS).expect("copy read");
                read.lock().unwrap().push((from, to, buf));
            });
        }
    });
    let mut read = read.into_inner().unwrap();
    read.sort_unstable_by_key(|r| r.0);
    let t_read = t.elapsed();
    let find = |block: u64, n: u64| -> &[u8] {
        let i = read.partition_point(|r| r.0 <= block) - 1;
        let (from, to, buf) = &read[i];
        assert!(block + n <= *to, "every copy lies inside one read");
        &buf.as_slice()[((block - from) * BS) as usize..((block - from + n) * BS) as usize]
    };
    let mut jobs: Vec<(u64, u64, u64)> = Vec::new();
    for c in &case.plan.copies {
        let mut at = 0;
        while at < c.blocks {
            let n = (c.blocks - at).min(max_blocks);
            jobs.push((c.target + at, c.source + at, n));
            at += n;
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..qd {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(to, from, n)) = jobs.get(i) else { break };
                dev.write_at(find(from, n), to * BS).expect("copy write");
            });
        }
    });
    dev.flush().expect("flush");
    dev.write_at(find(case.plan.block0_source, 1), 0).expect("write block 0");
    dev.flush().expect("flush");
    (t.elapsed(), t_read)
}

/// The host: CPU model, CPUs, memory (for the report; the numbers hold on this machine only).
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown", |(_, v)| v.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "memory_mib": kib / 1024,
    })
}

/// The running kernel's release (the host's: this bench runs on the host).
fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let image_mib = env_u64("BOW_BENCH_IMAGE_MIB", if quick { 16 } else { 512 });
    let restore_mib = env_u64("BOW_BENCH_RESTORE_MIB", if quick { 2 } else { 64 });
    let rounds = env_u64("BOW_BENCH_ROUNDS", if quick { 1 } else { 3 }).max(1);
    let qd = env_u64("BOW_BENCH_QD", RestoreOptions::default().queue_depth as u64).max(1) as usize;
    let dir = std::env::var_os("BOW_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let image_blocks = image_mib * 256;
    let restore_blocks = restore_mib * 256;
    let budget = RestoreOptions::default().memory_budget;
    println!(
        "restore benchmark: image {image_mib} MiB, {restore_mib} MiB restored per case, \
         {rounds} rounds, queue depth {qd}, memory budget {} MiB, dir {}",
        budget >> 20,
        dir.display()
    );
    let cases = [
        build("scattered 4 KiB", image_blocks, restore_blocks, 1),
        build("coalesced 256 KiB runs", image_blocks, restore_blocks, 64),
    ];
    let mut dropped_all = true;
    let (mut rows, mut figures, mut checks) = (Vec::new(), Vec::new(), Vec::new());
    for case in &cases {
        let path =
            dir.join(format!("bow-bench-{}.img", case.name.split(' ').next().unwrap_or("x")));
        std::fs::write(&path, &case.checkpointed).expect("write image");
        let bytes = case.plan.blocks() * BS;
        println!(
            "\n{}: {} log entries in {} log sectors, plan {} blocks in {} extents ({:.1} MiB)",
            case.name,
            case.entries,
            case.sequence + 1,
            case.plan.blocks(),
            case.plan.copies.len() + 1,
            bytes as f64 / (1 << 20) as f64
        );
        let (mut t_ours, mut t_vold, mut t_raw) = (Vec::new(), Vec::new(), Vec::new());
        let (mut t_copy, mut t_twice, mut t_copy_read) = (Vec::new(), Vec::new(), Vec::new());
        let mut t_validate = Vec::new();
        for round in 0..rounds {
            // Rotate the order each round so no method always runs first.
            for k in 0..5 {
                dropped_all &= reset(&path, case, !quick);
                match (k + round) % 5 {
                    0 => {
                        let (total, validate) = ours(&path, qd, budget);
                        t_ours.push(total);
                        t_validate.push(validate);
                        check(&path, case, "ours");
                    }
                    4 => {
                        t_twice.push(ours(&path, qd, 0).0);
                        check(&path, case, "ours, budget 0");
                    }
                    1 => {
                        t_vold.push(vold(&path));
                        check(&path, case, "vold");
                    }
                    2 => t_raw.push(raw(&path, case, qd)),
                    3 => {
                        let (total, read) = raw_copy(&path, case, qd);
                        t_copy.push(total);
                        t_copy_read.push(read);
                        check(&path, case, "raw copy");
                    }
                    _ => unreachable!(),
                }
            }
        }
        let (o, v, r) = (median(&mut t_ours), median(&mut t_vold), median(&mut t_raw));
        let c = median(&mut t_copy);
        let c_read = median(&mut t_copy_read);
        let twice = median(&mut t_twice);
        let val = median(&mut t_validate);
        println!(
            "  ours  {:>8.1} ms  {:>8.1} MiB/s  (validation {:.1} ms)",
            o.as_secs_f64() * 1e3,
            mib_s(bytes, o),
            val.as_secs_f64() * 1e3
        );
        println!(
            "  ours, budget 0  {:>8.1} ms  {:>8.1} MiB/s  (copies read twice)",
            twice.as_secs_f64() * 1e3,
            mib_s(bytes, twice)
        );
        println!("  vold  {:>8.1} ms  {:>8.1} MiB/s", v.as_secs_f64() * 1e3, mib_s(bytes, v));
        println!("  raw   {:>8.1} ms  {:>8.1} MiB/s", r.as_secs_f64() * 1e3, mib_s(bytes, r));
        println!(
            "  copy  {:>8.1} ms  {:>8.1} MiB/s  (reading the saved copies {:.1} ms)",
            c.as_secs_f64() * 1e3,
            mib_s(bytes, c),
            c_read.as_secs_f64() * 1e3
        );
        println!(
            "  ours/raw = {:.2} (target >= 0.8)   ours/vold = {:.2}x (target >= 3x)   \
             ours/copy = {:.2}",
            r.as_secs_f64() / o.as_secs_f64(),
            v.as_secs_f64() / o.as_secs_f64(),
            c.as_secs_f64() / o.as_secs_f64()
        );
        // A restore must read every saved copy (to check its CRC) before it writes anything,
        // so on this device no restore can beat raw + the copy's read time.
        println!(
            "  ceiling of ours/raw for any restore that reads the copies before writing: \
             raw / (raw + copy's reads) = {:.2}",
            r.as_secs_f64() / (r + c_read).as_secs_f64()
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for (method, d) in [
            ("ours", o),
            ("ours, budget 0", twice),
            ("vold algorithm", v),
            ("raw copy", c),
            ("raw write alone", r),
        ] {
            rows.push(serde_json::json!({
                "case": case.name, "method": method, "median_ms": ms(d), "mib_s": mib_s(bytes, d),
            }));
        }
        let group = format!("restore, {}", case.name);
        let inputs = |a: (&str, Duration), b: (&str, Duration)| serde_json::json!({ a.0: ms(a.1), b.0: ms(b.1), "bytes": bytes });
        figures.push(serde_json::json!({
            "group": group, "name": "ours speed / vold-algorithm baseline speed",
            "ratio": v.as_secs_f64() / o.as_secs_f64(),
            "inputs": inputs(("ours_ms", o), ("vold_ms", v)),
        }));
        figures.push(serde_json::json!({
            "group": group, "name": "ours speed / raw copy of the same blocks",
            "ratio": c.as_secs_f64() / o.as_secs_f64(),
            "inputs": inputs(("ours_ms", o), ("raw_copy_ms", c)),
        }));
        figures.push(serde_json::json!({
            "group": group, "name": "ours speed / raw write alone",
            "ratio": r.as_secs_f64() / o.as_secs_f64(),
            "inputs": inputs(("ours_ms", o), ("raw_write_ms", r)),
        }));
        figures.push(serde_json::json!({
            "group": group,
            "name": "ceiling of ours/raw write: raw write / (raw write + reading the copies)",
            "ratio": r.as_secs_f64() / (r + c_read).as_secs_f64(),
            "inputs": inputs(("raw_write_ms", r), ("copy_read_ms", c_read)),
        }));
        let (vs_raw, vs_vold) =
            (r.as_secs_f64() / o.as_secs_f64(), v.as_secs_f64() / o.as_secs_f64());
        let ceiling = r.as_secs_f64() / (r + c_read).as_secs_f64();
        let vs_copy = c.as_secs_f64() / o.as_secs_f64();
        checks.push(serde_json::json!({
            "claim": format!("{}: ours >= 0.8x the raw write alone (issue target; the ceiling for \
                any restore that reads the copies before writing is {ceiling:.2} here)", case.name),
            "value": vs_raw, "holds": vs_raw >= 0.8}));
        checks.push(serde_json::json!({
            "claim": format!("{}: ours >= 0.8x the raw copy of the same blocks", case.name),
            "value": vs_copy, "holds": vs_copy >= 0.8}));
        checks.push(serde_json::json!({
            "claim": format!("{}: ours >= 3x the vold algorithm", case.name),
            "value": vs_vold, "holds": vs_vold >= 3.0}));
        let _ = std::fs::remove_file(&path);
    }
    if !quick {
        let json = serde_json::json!({
            "bench": "restore",
            "machine": machine(),
            "kernel": kernel(),
            "setup": {
                "where": format!("image file on the host, {}", dir.display()),
                "image_mib": image_mib, "restored_mib_per_case": restore_mib,
                "rounds": rounds, "queue_depth": qd, "cold_cache": dropped_all,
            },
            "figures": figures,
            "rows": rows,
            "checks": checks,
        });
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target dir");
        let out = target.join("bench").join("restore.json");
        std::fs::create_dir_all(out.parent().expect("a parent")).expect("target/bench");
        std::fs::write(&out, serde_json::to_string_pretty(&json).expect("json")).expect("write");
        println!("\nwrote {}", out.display());
    }
    if quick {
        println!("\nquick mode (not `cargo bench`): tiny sizes, warm caches, numbers meaningless");
    } else if !dropped_all {
        println!("\nnote: /proc/sys/vm/drop_caches was not writable: runs were not all cold");
    }
}
