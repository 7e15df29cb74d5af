//! Rollback benchmark in the virtual device (`cargo xtask bench rollback [--quick]`), issue 9.
//!
//! One boot, two virtio disks (`a`, `b`, each `data + spare` bytes), three parts:
//! 1. **Rollback time of the same changed blocks** (scattered 4 KiB, then 1 MiB runs, at random
//!    offsets of the data area): the kernel's snapshot-merge (from the start of the handover
//!    until only metadata is allocated), the offline userspace merge (`snapcow::merge`, the
//!    backend's rollback before mount) over the same store, and the dm-bow restore
//!    (`bow::restore`) of a log made by the engine model (`bow::model`) for the same changes
//!    over the same original data. The snapshot state is built once through the kernel
//!    (snapshot-origin, COW on a dm-linear over the spare area of disk `a`), the dm-bow state
//!    once on disk `b`; before every timed run the bytes a rollback changes are written back
//!    (O_DIRECT, flushed) and the page cache is dropped, so all runs of a method start from
//!    identical bytes, cold. Methods rotate each round; every run is checked against the
//!    original data.
//! 2. **First-touch write throughput**, dm-linear vs snapshot-origin with an active persistent
//!    snapshot (4 KiB chunks, COW on a dm-linear region), same disk and offsets pattern, slices
//!    interleaved A B B A …: random 4 KiB and sequential 1 MiB O_DIRECT writes, `qd` threads,
//!    each slice ending with `fdatasync`. The store must then hold exactly the bytes written
//!    through the origin (else the writes were not first touches and the run fails).
//!    The same for f2fs's own checkpoint: O_DIRECT overwrites of a checkpointed file, f2fs
//!    mounted `checkpoint=disable` against the same file system mounted normally.
//! 3. **Backup space of the same block traces**: ext4 (populated to several fill levels, then
//!    the same workload of new files, in-place rewrites, replaced and deleted files), and raw
//!    writes half into free space (the seed's claim), on dm-log-writes over snapshot-origin: the
//!    snapshot's real COW usage, and the dm-log-writes trace replayed through the dm-bow engine
//!    model (`bow::dryrun`) from the free space at checkpoint start.
//!
//! The guest writes every median and ratio of the summary to `rollback.json` in the shared
//! folder; the host adds the machine and writes it to `target/bench/rollback.json` for
//! `cargo xtask bench`'s report.
//!
//! The host counts the QEMU processes running before and during the boot: another guest on the
//! two cores ruins every ratio (docs/benchmarks.md).
//!
//! `--quick` (or `ROLLBACK_BENCH_QUICK=1`): small sizes, one round, for CI (< 90 s).
//! Environment: `ROLLBACK_BENCH_CHANGED_MIB`, `ROLLBACK_BENCH_ROUNDS`, `ROLLBACK_BENCH_QD`,
//! `ROLLBACK_BENCH_BACKING` (`virtio`, default, or `shm`: loop devices over guest tmpfs files).

#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // Benchmark arithmetic.

#[path = "rollback/common.rs"]
mod common;
#[path = "rollback/merge.rs"]
mod merge;
#[path = "rollback/space.rs"]
mod space;
#[path = "rollback/writes.rs"]
mod writes;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blockdev::dm::DeviceMapper;
use blockdev::loopdev::{LoopDevice, LoopOptions};
use blockdev::DevId;
use testbench::vm::Vm;
use testbench::{guest, Failed};

use common::{mib, mib_s, ms, MIB};

const ENV_KEYS: &[&str] = &[
    "ROLLBACK_BENCH_CHANGED_MIB",
    "ROLLBACK_BENCH_ROUNDS",
    "ROLLBACK_BENCH_QD",
    "ROLLBACK_BENCH_BACKING",
];

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Config {
    pub quick: bool,
    /// The data area at the start of each disk (the origin's file system, the changed blocks).
    pub data: u64,
    /// The area after it: COW store (parts 1, 2), dm-log-writes log (part 3), free for dm-bow.
    pub spare: u64,
    /// Bytes changed per rollback case.
    pub changed: u64,
    pub rounds: usize,
    /// Writer threads in part 2.
    pub qd: usize,
    /// Slices per device in part 2, and their sizes.
    pub slices: usize,
    pub rand_slice: u64,
    pub seq_slice: u64,
    /// Loop devices over guest tmpfs files instead of the virtio disks.
    pub shm: bool,
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

impl Config {
    fn new(quick: bool) -> Result<Config, Failed> {
        let mut c = if quick {
            Config {
                quick,
                data: 64 * MIB,
                spare: 40 * MIB,
                changed: 2 * MIB,
                rounds: 1,
                qd: 4,
                slices: 2,
                rand_slice: 2 * MIB,
                seq_slice: 8 * MIB,
                shm: false,
            }
        } else {
            Config {
                quick,
                data: 256 * MIB,
                spare: 128 * MIB,
                changed: 16 * MIB,
                rounds: 3,
                qd: 4,
                slices: 4,
                rand_slice: 4 * MIB,
                seq_slice: 16 * MIB,
                shm: false,
            }
        };
        if let Some(v) = env_u64("ROLLBACK_BENCH_CHANGED_MIB") {
            c.changed = v * MIB;
        }
        if let Some(v) = env_u64("ROLLBACK_BENCH_ROUNDS") {
            c.rounds = usize::try_from(v)?.max(1);
        }
        if let Some(v) = env_u64("ROLLBACK_BENCH_QD") {
            c.qd = usize::try_from(v)?.max(1);
        }
        match std::env::var("ROLLBACK_BENCH_BACKING").as_deref() {
            Ok("shm") => c.shm = true,
            Ok("virtio") | Err(_) => {}
            Ok(other) => {
                return Err(format!("ROLLBACK_BENCH_BACKING={other}: virtio or shm").into())
            }
        }
        // The store (changes + 1/256 metadata + header) must fit the spare area, and the
        // changes the data area past its first MiB.
        if c.changed == 0
            || c.changed + c.changed / 128 + 2 * MIB > c.spare
            || c.changed > c.data / 2
        {
            return Err(
                format!("ROLLBACK_BENCH_CHANGED_MIB too large for {} MiB", mib(c.spare)).into()
            );
        }
        Ok(c)
    }

    /// Size of each disk.
    pub fn disk(&self) -> u64 {
        self.data + self.spare
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--guest") {
        return testbench::main(Vec::new(), &[("bench", guest_bench)]);
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("ROLLBACK_BENCH_QUICK").is_ok_and(|v| v == "1");
    if !testbench::vm_requested() {
        eprintln!("the rollback benchmark needs the virtual device: run `cargo xtask bench rollback [--quick]`");
        return ExitCode::FAILURE;
    }
    match host(quick) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rollback benchmark failed: {}", e.message().unwrap_or("(no message)"));
            ExitCode::FAILURE
        }
    }
}

fn host(quick: bool) -> Result<(), Failed> {
    let cfg = Config::new(quick)?;
    let before = common::qemu_processes();
    let disk_a = testbench::vm::scratch_image(if cfg.shm { MIB } else { cfg.disk() })?;
    let disk_b = testbench::vm::scratch_image(if cfg.shm { MIB } else { cfg.disk() })?;
    let mut vm = Vm::new(if quick { "bench_rollback_quick" } else { "bench_rollback" })
        .modules(&["loop", "dm-mod", "dm-snapshot", "dm-log-writes", "f2fs"])
        .disk(&disk_a)
        .disk(&disk_b)
        .memory_mib(2048)
        // One guest at a time here: two vCPUs, as the published figures were measured.
        .cpus(2)
        .timeout(Duration::from_secs(if quick { 300 } else { 2400 }))
        .stream_output(true);
    for key in ENV_KEYS {
        if let Ok(v) = std::env::var(key) {
            vm = vm.env(*key, v);
        }
    }
    let alone = common::run_alone(&vm, "rollback", quick, before);
    let run = alone.run.as_ref().map_err(|e| Failed::from(e.to_string()))?;
    // A guest that failed part way may still have written its results so far: keep them.
    let guest_ok = run.expect_success().map(|_| ()).map_err(Failed::from);
    if guest_ok.is_err() && !run.shared_dir.join(GUEST_JSON).exists() {
        return guest_ok;
    }
    let from_guest = run.shared_dir.join(GUEST_JSON);
    let mut json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&from_guest).map_err(|e| format!("{}: {e}", from_guest.display()))?,
    )?;
    alone.record(&mut json);
    let out = testbench::paths::target_dir().join("bench").join("rollback.json");
    std::fs::create_dir_all(out.parent().ok_or("no parent")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.display());
    guest_ok
}

/// The guest's results, in the shared folder (the guest's working directory).
const GUEST_JSON: &str = "rollback.json";

/// The two block devices: the virtio disks, or loop devices over tmpfs files.
fn devices(cfg: &Config) -> Result<(PathBuf, PathBuf, Vec<LoopDevice>), Failed> {
    if !cfg.shm {
        return Ok((guest::disk(0), guest::disk(1), Vec::new()));
    }
    let mut loops = Vec::new();
    for name in ["rb-a.img", "rb-b.img"] {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(Path::new("/dev/shm").join(name))?;
        file.set_len(cfg.disk())?;
        loops.push(LoopDevice::attach(&file, &LoopOptions::default())?);
    }
    Ok((loops[0].path().to_owned(), loops[1].path().to_owned(), loops))
}

fn guest_bench(args: &[String]) -> Result<(), Failed> {
    let cfg = Config::new(args.iter().any(|a| a == "quick"))?;
    let (pa, pb, _loops) = devices(&cfg)?;
    let disks = merge::Disks { a: (&pa, DevId::of_path(&pa)?), b: (&pb, DevId::of_path(&pb)?) };
    println!(
        "disks: {} and {} ({}), {:.0} MiB data + {:.0} MiB spare each; {:.0} MiB changed per \
         rollback case, {} rounds; guest CPUs: {}",
        pa.display(),
        pb.display(),
        if cfg.shm { "loop over guest tmpfs" } else { "virtio-blk" },
        mib(cfg.data),
        mib(cfg.spare),
        mib(cfg.changed),
        cfg.rounds,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let dm = DeviceMapper::open()?;
    let t = Instant::now();
    println!("\n== 1. rollback time, same changed blocks ==");
    let rollback = merge::run(&cfg, &dm, &disks)?;
    println!("  (part 1: {:.0} s)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    println!("\n== 2. first-touch write throughput: snapshot-origin vs dm-linear ==");
    let (rand, seq) = writes::run(&cfg, &dm, disks.a)?;
    println!("\n  f2fs: checkpoint=disable vs a normal mount");
    let mut errors = Vec::new();
    // Not fatal: the other parts' results stand without it.
    let f2fs = match writes::run_f2fs(&cfg, &dm, disks.a) {
        Ok(r) => Some(r),
        Err(e) => {
            let msg = format!("f2fs write throughput: {}", e.message().unwrap_or("(no message)"));
            println!("  FAILED: {msg}");
            errors.push(msg);
            writes::f2fs_cleanup(&dm);
            None
        }
    };
    println!("  (part 2: {:.0} s)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    println!("\n== 3. backup space of the same block traces: dm-snapshot vs dm-bow ==");
    // The raw traces first, the fullest file system last: a trace that fails leaves devices
    // behind, so part 3 stops there, and the results so far are still reported.
    let fills: &[u64] = if cfg.quick { &[45] } else { &[25, 45, 65] };
    let mut traces =
        vec![space::Trace::Raw { interleaved: false }, space::Trace::Raw { interleaved: true }];
    traces.extend(fills.iter().map(|&fill_percent| space::Trace::Ext4 { fill_percent }));
    let mut sp = Vec::new();
    for (i, trace) in traces.iter().enumerate() {
        let tt = Instant::now();
        println!("\n -- trace {}/{}: {} --", i + 1, traces.len(), trace.name());
        match space::run(&cfg, &dm, disks.a, disks.b, *trace) {
            Ok(r) => sp.push(r),
            Err(e) => {
                let msg = format!(
                    "backup space, {}: {} (part 3 stopped there)",
                    trace.name(),
                    e.message().unwrap_or("(no message)")
                );
                println!("  FAILED: {msg}");
                errors.push(msg);
                break;
            }
        }
        println!("  ({:.0} s)", tt.elapsed().as_secs_f64());
    }
    println!("  (part 3: {:.0} s)", t.elapsed().as_secs_f64());
    summary(&cfg, &rollback, &rand, &seq, f2fs.as_ref(), &sp);
    let mut json = report_json(&cfg, &rollback, &rand, &seq, f2fs.as_ref(), &sp);
    json["errors"] = serde_json::json!(errors);
    std::fs::write(GUEST_JSON, serde_json::to_string_pretty(&json)?)?;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; ").into())
    }
}

/// Every figure of the summary as JSON: `rows` (medians, bytes) and `figures` (ratios with
/// their inputs); the host adds the machine.
fn report_json(
    cfg: &Config,
    rollback: &[merge::CaseResult],
    rand: &writes::Throughput,
    seq: &writes::Throughput,
    f2fs: Option<&(writes::Throughput, writes::Throughput)>,
    sp: &[space::SpaceResult],
) -> serde_json::Value {
    use serde_json::json;
    let mut figures = Vec::new();
    let mut rows = Vec::new();
    for r in rollback {
        let group = format!("rollback of {:.0} MiB, {}", mib(cfg.changed), r.name);
        for (method, d) in [
            ("kernel snapshot-merge", r.kernel),
            ("userspace merge (snapcow)", r.user),
            ("dm-bow restore (bow, engine-model log)", r.bow),
        ] {
            rows.push(json!({"part": "rollback", "case": r.name, "method": method,
                "median_ms": ms(d), "mib_s": mib_s(cfg.changed, d)}));
        }
        let inputs = json!({"kernel_ms": ms(r.kernel), "userspace_ms": ms(r.user),
            "bow_ms": ms(r.bow), "bytes": cfg.changed});
        for (name, ratio) in [
            (
                "userspace merge speed / kernel snapshot-merge speed",
                r.kernel.as_secs_f64() / r.user.as_secs_f64(),
            ),
            (
                "dm-bow restore speed / kernel snapshot-merge speed",
                r.kernel.as_secs_f64() / r.bow.as_secs_f64(),
            ),
            (
                "userspace merge speed / dm-bow restore speed",
                r.bow.as_secs_f64() / r.user.as_secs_f64(),
            ),
        ] {
            figures.push(json!({"group": group, "name": name, "ratio": ratio, "inputs": inputs}));
        }
    }
    for (name, t) in [("random 4 KiB", rand), ("sequential 1 MiB", seq)] {
        let group = format!("/data write throughput during a checkpoint, first touch, {name}");
        figures.push(json!({"group": group,
            "name": "snapshot-origin (active snapshot) / dm-linear",
            "ratio": t.ratio(),
            "inputs": {"linear_mib_s": mib_s(t.linear.0, t.linear.1),
                "snapshot_mib_s": mib_s(t.snapshot.0, t.snapshot.1),
                "linear_bytes": t.linear.0, "snapshot_bytes": t.snapshot.0,
                "slice_pair_min": t.pair_range.0, "slice_pair_max": t.pair_range.1,
                "threads": cfg.qd}}));
    }
    for (name, t) in f2fs.iter().flat_map(|f| [("random 4 KiB", &f.0), ("sequential 1 MiB", &f.1)])
    {
        let group =
            format!("/data write throughput during a checkpoint, f2fs file overwrites, {name}");
        figures.push(json!({"group": group,
            "name": "f2fs checkpoint=disable / the same f2fs mounted normally",
            "ratio": t.ratio(),
            "inputs": {"normal_mib_s": mib_s(t.linear.0, t.linear.1),
                "disabled_mib_s": mib_s(t.snapshot.0, t.snapshot.1),
                "normal_bytes": t.linear.0, "disabled_bytes": t.snapshot.0,
                "slice_pair_min": t.pair_range.0, "slice_pair_max": t.pair_range.1,
                "threads": cfg.qd}}));
    }
    for s in sp {
        let bow = &s.bow;
        let enospc = bow.enospc.map(|e| format!("{e:?}"));
        rows.push(json!({"part": "space", "trace": s.name, "fill": s.fill, "ops": s.ops,
            "written_bytes": s.written, "written_free_bytes": s.written_free,
            "snapshot_bytes": s.snapshot, "snapshot_metadata_bytes": s.snapshot_metadata,
            "bow_bytes": bow.consumed_by_bow, "bow_backup_bytes": bow.backup_bytes,
            "bow_relocation_bytes": bow.relocation_bytes, "bow_entries": bow.backup_entries,
            "bow_enospc": enospc}));
        figures.push(json!({"group": "backup space, same captured trace",
            "name": format!("dm-bow (engine model) / dm-snapshot COW: {} ({:.0} % in use){}",
                s.name, s.fill * 100.0,
                if enospc.is_some() { " (dm-bow ran out of free space)" } else { "" }),
            "ratio": bow.consumed_by_bow as f64 / s.snapshot.max(1) as f64,
            "inputs": {"bow_bytes": bow.consumed_by_bow, "snapshot_bytes": s.snapshot,
                "fill": s.fill,
                "written_free_share": s.written_free as f64 / s.written.max(1) as f64,
                "bow_relocation_bytes": bow.relocation_bytes, "bow_enospc": enospc}}));
    }
    let mut checks = Vec::new();
    if let Some(r) = rollback.first() {
        let x = r.kernel.as_secs_f64() / r.user.as_secs_f64();
        checks.push(json!({"claim": format!("issue 9: userspace merge >= 10x the kernel merge on \
            {}", r.name), "value": x, "holds": x >= 10.0}));
    }
    // The seed's claim (dm-bow-format.md §11): about half of dm-snapshot's space when half the
    // written blocks are free space; "about" read as within 0.40–0.60.
    for s in sp {
        let x = s.bow.consumed_by_bow as f64 / s.snapshot.max(1) as f64;
        let free = s.written_free as f64 / s.written.max(1) as f64;
        checks.push(json!({"claim": format!("seed: dm-bow needs about half (0.40–0.60) of \
            dm-snapshot's space when new writes go to free space; trace {} ({:.0} % in use), \
            {:.0} % of the written blocks free at checkpoint start", s.name, s.fill * 100.0,
            free * 100.0),
            "value": x, "holds": (0.40..=0.60).contains(&x) && s.bow.enospc.is_none()}));
    }
    json!({
        "bench": "rollback",
        "checks": checks,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
        "mode": if cfg.quick { "quick" } else { "full" },
        "setup": {"where": "virtual device (QEMU TCG)",
            "backing": if cfg.shm { "loop over guest tmpfs" } else { "virtio-blk" },
            "guest_cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "data_mib": mib(cfg.data), "spare_mib": mib(cfg.spare),
            "changed_mib": mib(cfg.changed), "rounds": cfg.rounds},
        "figures": figures,
        "rows": rows,
    })
}

fn summary(
    cfg: &Config,
    rollback: &[merge::CaseResult],
    rand: &writes::Throughput,
    seq: &writes::Throughput,
    f2fs: Option<&(writes::Throughput, writes::Throughput)>,
    sp: &[space::SpaceResult],
) {
    println!("\n== summary (ratios from this run) ==");
    println!(
        "rollback of {:.0} MiB, median of {} ms        kernel merge   userspace merge   bow restore   kernel/userspace   kernel/bow   userspace/bow",
        mib(cfg.changed),
        cfg.rounds
    );
    for r in rollback {
        println!(
            "  {:<36} {:>10.1}   {:>15.1}   {:>11.1}   {:>15.1}x   {:>9.1}x   {:>12.2}x",
            r.name,
            ms(r.kernel),
            ms(r.user),
            ms(r.bow),
            r.kernel.as_secs_f64() / r.user.as_secs_f64(),
            r.kernel.as_secs_f64() / r.bow.as_secs_f64(),
            r.bow.as_secs_f64() / r.user.as_secs_f64(),
        );
        println!(
            "  {:<36} {:>10.1}   {:>15.1}   {:>11.1}   (MiB/s)",
            "",
            mib_s(cfg.changed, r.kernel),
            mib_s(cfg.changed, r.user),
            mib_s(cfg.changed, r.bow)
        );
    }
    if let Some(s) = rollback.first() {
        let x = s.kernel.as_secs_f64() / s.user.as_secs_f64();
        println!(
            "goal (issue 9): userspace merge >= 10x the kernel merge on scattered 4 KiB changes: \
             {x:.1}x, {}",
            if x >= 10.0 { "met" } else { "NOT met" }
        );
    }
    for (name, t) in [("random 4 KiB", rand), ("sequential 1 MiB", seq)] {
        println!(
            "write throughput, first touch, {name:<17}: dm-linear {:>7.1} MiB/s, snapshot-origin \
             {:>7.1} MiB/s, snapshot/linear {:.2}x (slice pairs {:.2}–{:.2})",
            mib_s(t.linear.0, t.linear.1),
            mib_s(t.snapshot.0, t.snapshot.1),
            t.ratio(),
            t.pair_range.0,
            t.pair_range.1
        );
    }
    for (name, t) in f2fs.iter().flat_map(|f| [("random 4 KiB", &f.0), ("sequential 1 MiB", &f.1)])
    {
        println!(
            "write throughput, f2fs overwrites, {name:<17}: normal mount {:>7.1} MiB/s, \
             checkpoint=disable {:>7.1} MiB/s, disable/normal {:.2}x (slice pairs {:.2}–{:.2})",
            mib_s(t.linear.0, t.linear.1),
            mib_s(t.snapshot.0, t.snapshot.1),
            t.ratio(),
            t.pair_range.0,
            t.pair_range.1
        );
    }
    for sp in sp {
        let bow = &sp.bow;
        let implied = (sp.chunks + 2 + sp.chunks / 256) * common::BLOCK;
        println!(
            "backup space, {} (in use at checkpoint start {:.0} %): {} ops, {:.1} MiB in \
             distinct 4 KiB blocks, {:.0} % of them in space free at checkpoint start:",
            sp.name,
            sp.fill * 100.0,
            sp.ops,
            mib(sp.written),
            100.0 * sp.written_free as f64 / sp.written.max(1) as f64
        );
        println!(
            "  dm-snapshot COW (status): {:.2} MiB ({:.2} MiB metadata); the trace implies {:.2} MiB",
            mib(sp.snapshot),
            mib(sp.snapshot_metadata),
            mib(implied)
        );
        println!(
            "  dm-bow (engine model): {:.2} MiB = backups {:.2} MiB ({} entries, {:.2} MiB \
             relocations) + {} log sectors + {} blocks at checkpoint start{}",
            mib(bow.consumed_by_bow),
            mib(bow.backup_bytes),
            bow.backup_entries,
            mib(bow.relocation_bytes),
            bow.log_sectors,
            bow.checkpoint_blocks,
            bow.enospc.map_or(String::new(), |e| format!("; RAN OUT OF FREE SPACE: {e:?}"))
        );
        println!("  bow/snapshot = {:.2}", bow.consumed_by_bow as f64 / sp.snapshot.max(1) as f64);
    }
    if cfg.quick {
        println!("quick mode: small sizes and one round; run without --quick for the numbers");
    }
}
