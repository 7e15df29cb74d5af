//! `cargo xtask bench` with no name: every benchmark of the report in one run, then one report
//! (`target/bench/report.md`, `report.json`, one SVG bar chart per benchmark).
//!
//! The contract with the benchmarks: each writes `target/bench/<name>.json`,
//!
//! ```json
//! {"bench": "<name>", "machine": {...} or "...", "kernel": "<release>",
//!  "figures": [{"group": "...", "name": "...", "ratio": 2.5, "inputs": {...}}],
//!  "rows": [{...}], "checks": [{"claim": "...", "value": 0.5, "holds": true}], "setup": {...}}
//! ```
//!
//! `figures` are ratios measured in the same run, each with the numbers it is made of; `rows`
//! are the measurements themselves (any flat objects), `checks` the claims and targets the
//! benchmark judged. Only `bench` is required, and at least one of `figures` or `rows`; the
//! rest is shown when present. The report never computes a result of its own: it lays out
//! what the benchmarks measured, side by side, with where and on which kernel.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::{cargo, find_bench_package, metadata, setup};

/// One row of measurements: a flat JSON object.
type Row = Map<String, Value>;

/// One benchmark of the report.
#[derive(Debug, Clone, Copy)]
pub struct BenchSpec {
    /// The bench target's name (and of its JSON file).
    pub name: &'static str,
    /// The report's section title.
    pub title: &'static str,
    /// What it measures and where (boots), for the report and the progress lines.
    pub about: &'static str,
    /// Arguments for the bench binary.
    pub args: &'static [&'static str],
    /// Extra arguments in `--quick` mode.
    pub quick_args: &'static [&'static str],
    /// Extra environment in `--quick` mode.
    pub quick_env: &'static [(&'static str, &'static str)],
    /// Cargo features the bench target needs (`--features`, for its build and its run).
    pub features: &'static [&'static str],
}

/// The benchmarks of the report, in report order.
pub const BENCHES: &[BenchSpec] = &[
    BenchSpec {
        name: "restore",
        title: "Restore: ours vs the vold-algorithm baseline vs raw copy vs raw write",
        about: "dm-bow restore on an image file on the host (no boot), scattered and coalesced \
                backups",
        args: &[],
        quick_args: &[],
        quick_env: &[
            ("BOW_BENCH_IMAGE_MIB", "128"),
            ("BOW_BENCH_RESTORE_MIB", "16"),
            ("BOW_BENCH_ROUNDS", "1"),
        ],
        features: &[],
    },
    BenchSpec {
        name: "rollback",
        title: "Rollback, write-path cost and backup space (kernel dm-snapshot vs ours)",
        about: "one boot of the virtual device: kernel snapshot-merge vs userspace merge vs \
                dm-bow restore, /data throughput through snapshot-origin vs linear and f2fs \
                checkpoint=disable vs a normal mount, backup space of captured traces",
        args: &[],
        quick_args: &["--quick"],
        quick_env: &[],
        features: &[],
    },
    BenchSpec {
        name: "estimate",
        title: "Estimator accuracy",
        about: "backup-space estimate against the space measured for the same workload",
        args: &[],
        quick_args: &[],
        quick_env: &[],
        features: &[],
    },
    BenchSpec {
        name: "binder",
        title: "Service latency, idle and under hostile load",
        about: "binder call latency in the virtual device (one boot) and root's calls on the \
                RPC socket idle vs under hostile clients (host)",
        // libtest-mimic runs trials on as many threads as there are CPUs: the boot of one
        // would skew the other's latencies.
        args: &["--test-threads=1"],
        quick_args: &[],
        quick_env: &[],
        features: &[],
    },
    BenchSpec {
        name: "ublk",
        title: "The userspace backup-on-write engine behind ublk (speed, space, rollback)",
        about: "one boot of the virtual device on the 6.12 kernel: raw 4 KiB writes through the \
                engine vs a ublk pass-through, dm-linear and dm-snapshot; backup space of two \
                interleaved writers per allocator vs dm-snapshot's COW; restore time of each log",
        args: &[],
        quick_args: &["--quick"],
        quick_env: &[],
        features: &["bow-ublk/ublk"],
    },
];

/// How one benchmark's run went.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    /// It ran and exited 0.
    Ok,
    /// It ran and failed (exit status), see the log.
    Failed(String),
    /// It was not run, and why.
    NotRun(String),
    /// Not run by this command: the report was rebuilt from an earlier run's JSON.
    Earlier,
}

/// One benchmark's part of the report.
#[derive(Debug, Clone)]
pub struct BenchOutcome {
    pub spec: BenchSpec,
    pub status: RunStatus,
    pub seconds: f64,
    /// Its output, when it ran.
    pub log: Option<PathBuf>,
    /// Its JSON, when it wrote one in this run.
    pub data: Option<BenchData>,
    /// Why its JSON could not be used, if it wrote one.
    pub data_error: Option<String>,
}

/// A benchmark's JSON, checked.
#[derive(Debug, Clone)]
pub struct BenchData {
    pub raw: Value,
    pub figures: Vec<Figure>,
    pub rows: Vec<Map<String, Value>>,
    pub checks: Vec<Map<String, Value>>,
}

/// One ratio and what it is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub group: String,
    pub name: String,
    pub ratio: f64,
    pub inputs: Map<String, Value>,
}

impl BenchData {
    /// Checks `value` against the contract (module docs) for the benchmark `name`.
    pub fn parse(name: &str, value: Value) -> Result<BenchData> {
        let obj = value.as_object().context("not a JSON object")?;
        match obj.get("bench").and_then(Value::as_str) {
            Some(b) if b == name => {}
            Some(b) => bail!("\"bench\" is {b:?}, expected {name:?}"),
            None => bail!("no \"bench\" name"),
        }
        let mut figures = Vec::new();
        for (i, f) in obj.get("figures").and_then(Value::as_array).into_iter().flatten().enumerate()
        {
            let f = f.as_object().with_context(|| format!("figure {i} is not an object"))?;
            let label = ["name", "figure", "label"]
                .iter()
                .find_map(|k| f.get(*k).and_then(Value::as_str))
                .with_context(|| format!("figure {i} has no name"))?;
            let ratio = f
                .get("ratio")
                .and_then(Value::as_f64)
                .with_context(|| format!("figure {i} ({label}) has no numeric ratio"))?;
            let inputs = match f.get("inputs") {
                Some(Value::Object(m)) => m.clone(),
                // No "inputs" object: every other field is an input.
                _ => f
                    .iter()
                    .filter(|(k, _)| {
                        !["name", "figure", "label", "group", "ratio"].contains(&k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            figures.push(Figure {
                group: f.get("group").and_then(Value::as_str).unwrap_or_default().to_owned(),
                name: label.to_owned(),
                ratio,
                inputs,
            });
        }
        let objects = |key: &str| -> Result<Vec<Map<String, Value>>> {
            let mut out = Vec::new();
            for (i, r) in obj.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
                out.push(
                    r.as_object().with_context(|| format!("{key}[{i}] is not an object"))?.clone(),
                );
            }
            Ok(out)
        };
        let rows = objects("rows")?;
        let mut checks = objects("checks")?;
        if figures.is_empty() {
            figures = estimate_figures(&rows);
        }
        if checks.is_empty() {
            checks = estimate_checks(&rows);
        }
        if figures.is_empty() && rows.is_empty() {
            bail!("neither \"figures\" nor \"rows\"");
        }
        Ok(BenchData { raw: value, figures, rows, checks })
    }

    fn kernel(&self) -> String {
        self.raw.get("kernel").map_or_else(|| "not stated".to_owned(), plain)
    }

    fn machine(&self) -> String {
        self.raw.get("machine").map_or_else(|| "not stated".to_owned(), plain)
    }
}

/// The estimate bench writes rows only: one per workload and backend, with the estimate
/// (`predicted_bytes`, `needed_bytes` = predicted + margin) and the space the same workload
/// really took (`actual_bytes`). Its figures are those two over the actual, from the rows.
fn estimate_figures(rows: &[Row]) -> Vec<Figure> {
    let mut out = Vec::new();
    for r in rows {
        let (Some(actual), Some(workload), Some(backend)) = (
            r.get("actual_bytes").and_then(Value::as_u64).filter(|a| *a > 0),
            r.get("workload").and_then(Value::as_str),
            r.get("backend").and_then(Value::as_str),
        ) else {
            continue;
        };
        for (key, what) in
            [("needed_bytes", "needed (with margin)"), ("predicted_bytes", "predicted")]
        {
            if let Some(x) = r.get(key).and_then(Value::as_u64) {
                let mut inputs = Map::new();
                inputs.insert(key.to_owned(), json!(x));
                inputs.insert("actual_bytes".to_owned(), json!(actual));
                out.push(Figure {
                    group: format!("estimate / actual space, {backend} (from the rows)"),
                    name: format!("{workload}: {what} / actual"),
                    ratio: x as f64 / actual as f64,
                    inputs,
                });
            }
        }
    }
    out
}

/// The estimate bench's target per row (`target_met`, `needed_error_pct`) as checks.
fn estimate_checks(rows: &[Row]) -> Vec<Row> {
    rows.iter()
        .filter_map(|r| {
            let holds = r.get("target_met")?.as_bool()?;
            let workload = r.get("workload").map_or_else(String::new, plain);
            let backend = r.get("backend").map_or_else(String::new, plain);
            let mut c = Map::new();
            c.insert(
                "claim".into(),
                json!(format!(
                    "estimate, {workload}, {backend}: needed within -5 % .. +20 % of the actual \
                     (value: error in %)"
                )),
            );
            c.insert("value".into(), r.get("needed_error_pct").cloned().unwrap_or(Value::Null));
            c.insert("holds".into(), json!(holds));
            Some(c)
        })
        .collect()
}

/// A JSON value as short text: strings without quotes, objects as `k: v, ...`.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".to_owned(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => number(f),
            _ => n.to_string(),
        },
        Value::Object(m) => {
            m.iter().map(|(k, v)| format!("{k}: {}", field(k, v))).collect::<Vec<_>>().join(", ")
        }
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(", "),
        Value::Bool(b) => b.to_string(),
    }
}

/// A named value: byte counts (`*bytes`) in MiB, the rest as [`plain`].
fn field(key: &str, v: &Value) -> String {
    match v.as_u64() {
        Some(b) if key.ends_with("bytes") => {
            format!("{} MiB", number(b as f64 / f64::from(1 << 20)))
        }
        _ => plain(v),
    }
}

/// A measured number with about three significant digits.
fn number(f: f64) -> String {
    if !f.is_finite() {
        return f.to_string();
    }
    let a = f.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{f:.0}")
    } else if a >= 10.0 {
        format!("{f:.1}")
    } else if a >= 1.0 {
        format!("{f:.2}")
    } else {
        format!("{f:.3}")
    }
}

/// Markdown table cell text: no pipes or newlines.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// What `cargo xtask bench` was asked for.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub quick: bool,
}

/// Runs every benchmark of [`BENCHES`], then writes the report.
pub fn run_all(opts: RunOptions) -> Result<ExitCode> {
    let started = Instant::now();
    let meta = metadata()?;
    setup::ensure()?;
    let out_dir = testbench::paths::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    build_all(&meta);
    let mut outcomes = Vec::new();
    for (i, spec) in BENCHES.iter().enumerate() {
        println!(
            "\n=== xtask bench [{}/{}] {}: {} ===",
            i + 1,
            BENCHES.len(),
            spec.name,
            spec.about
        );
        let t = Instant::now();
        let json_path = out_dir.join(format!("{}.json", spec.name));
        let status = match find_bench_package(&meta, spec.name) {
            Err(_) => {
                RunStatus::NotRun(format!("no bench target `{}` in the workspace", spec.name))
            }
            Ok(pkg) => {
                // A JSON left from an earlier run must not pass for this run's.
                let _ = std::fs::remove_file(&json_path);
                let log = out_dir.join(format!("{}.log", spec.name));
                let ok = run_one(&pkg, spec, opts, &log)?;
                if ok {
                    RunStatus::Ok
                } else {
                    RunStatus::Failed(format!("exited with an error, see {}", log.display()))
                }
            }
        };
        let seconds = t.elapsed().as_secs_f64();
        let mut outcome = load(spec, status, seconds, &out_dir);
        if !matches!(outcome.status, RunStatus::NotRun(_)) {
            outcome.log = Some(out_dir.join(format!("{}.log", spec.name)));
        }
        println!(
            "=== {}: {} in {seconds:.0} s{} ===",
            spec.name,
            status_text(&outcome.status),
            match (&outcome.data, &outcome.data_error) {
                (Some(d), _) => format!(", {} figures", d.figures.len()),
                (None, Some(e)) => format!(", no usable JSON: {e}"),
                (None, None) => String::new(),
            }
        );
        outcomes.push(outcome);
    }
    let report = Report {
        outcomes,
        wall_seconds: started.elapsed().as_secs_f64(),
        generated: utc_now(),
        quick: opts.quick,
    };
    let written = report.write(&out_dir)?;
    println!("\n=== xtask bench: report written ({:.0} s in all) ===", report.wall_seconds);
    for p in &written {
        println!("  {}", p.display());
    }
    let all_ok = report.outcomes.iter().all(|o| !matches!(o.status, RunStatus::Failed(_)));
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Builds every bench target first, so that build time is not counted in any benchmark's
/// time. One cargo call per target, the same as its run's: built together, the packages'
/// dependencies get unified features and each run would build again. Best effort: a target
/// that does not build fails in its own run.
fn build_all(meta: &Value) {
    println!("\n=== xtask bench: building the benchmarks ===");
    let t = Instant::now();
    for spec in BENCHES {
        let Ok(pkg) = find_bench_package(meta, spec.name) else { continue };
        let mut cmd = Command::new(cargo());
        cmd.args(["bench", "--no-run", "-p", &pkg, "--bench", spec.name])
            .args(feature_args(spec.features))
            .current_dir(testbench::paths::workspace_root());
        println!("+ {}", setup::show(&cmd));
        match cmd.status() {
            Ok(s) if s.success() => {}
            other => println!("  ({} did not build: {other:?}; its run will say why)", spec.name),
        }
    }
    println!("=== built in {:.0} s ===", t.elapsed().as_secs_f64());
}

/// `--features a,b` for cargo, or nothing.
pub fn feature_args(features: &[&str]) -> Vec<String> {
    if features.is_empty() {
        Vec::new()
    } else {
        vec!["--features".to_owned(), features.join(",")]
    }
}

/// Rebuilds the report from the JSON files already in `target/bench` (no benchmark runs).
pub fn report_only() -> Result<ExitCode> {
    let out_dir = testbench::paths::target_dir().join("bench");
    let outcomes = BENCHES
        .iter()
        .map(|spec| {
            let json = out_dir.join(format!("{}.json", spec.name));
            let log = out_dir.join(format!("{}.log", spec.name));
            let status = if json.exists() || (spec.name == "binder" && log.exists()) {
                RunStatus::Earlier
            } else {
                RunStatus::NotRun("no JSON in target/bench (--report-only runs nothing)".to_owned())
            };
            load(spec, status, 0.0, &out_dir)
        })
        .collect();
    let report = Report { outcomes, wall_seconds: 0.0, generated: utc_now(), quick: false };
    for p in report.write(&out_dir)? {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn status_text(s: &RunStatus) -> String {
    match s {
        RunStatus::Ok => "ok".to_owned(),
        RunStatus::Failed(why) => format!("FAILED ({why})"),
        RunStatus::NotRun(why) => format!("not run ({why})"),
        RunStatus::Earlier => "from an earlier run (--report-only)".to_owned(),
    }
}

/// Reads `<out_dir>/<name>.json`, if there.
fn load(spec: &BenchSpec, status: RunStatus, seconds: f64, out_dir: &Path) -> BenchOutcome {
    let path = out_dir.join(format!("{}.json", spec.name));
    let log = out_dir.join(format!("{}.log", spec.name));
    let ran = !matches!(status, RunStatus::NotRun(_));
    let (data, data_error) = match std::fs::read(&path) {
        // The binder bench prints its measurements but may write no JSON: read its output.
        Err(_) if spec.name == "binder" && ran => match std::fs::read_to_string(&log) {
            Ok(text) => match binder_from_output(&text) {
                Some(v) => match BenchData::parse(spec.name, v) {
                    Ok(d) => {
                        // Kept as the bench's JSON, so every bench of the run has one.
                        let _ = std::fs::write(&path, format!("{:#}", d.raw));
                        (Some(d), None)
                    }
                    Err(e) => (None, Some(format!("{}: {e:#}", log.display()))),
                },
                None => (None, None),
            },
            Err(_) => (None, None),
        },
        Err(_) => (None, None),
        Ok(bytes) => match serde_json::from_slice(&bytes)
            .context("not JSON")
            .and_then(|v| BenchData::parse(spec.name, v))
        {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(format!("{}: {e:#}", path.display()))),
        },
    };
    BenchOutcome { spec: *spec, status, seconds, log: None, data, data_error }
}

/// The binder bench's results from its output, when it wrote no JSON: its lines
/// `bench: <what> p50_ns=<n> p99_ns=<n> n=<n>` and `bench: fsync per <call>=<x> ...`. Figures:
/// root's `markBootAttempt` under hostile load over each idle phase (per kind of session), and
/// checkpointd's `needsRollback` over the empty service's, p50 and p99 each; checks: issue 10's
/// p99 within 5x of idle, issue 5's 1.2x of the empty service. `None` if there is no such line.
pub fn binder_from_output(text: &str) -> Option<Value> {
    let mut rows = Vec::new();
    let mut lat: Vec<(String, u64, u64)> = Vec::new();
    for line in text.lines() {
        // libtest-mimic prints `test binder ... ` before a trial's first output line.
        let Some(at) = line.find("bench: ") else { continue };
        let rest = line[at + "bench: ".len()..].trim();
        if let Some((what, nums)) = rest.split_once(" p50_ns=") {
            let mut it = nums.split_whitespace();
            let p50 = it.next().and_then(|v| v.parse::<u64>().ok());
            let p99 = it.next().and_then(|v| v.strip_prefix("p99_ns=")?.parse::<u64>().ok());
            let n = it.next().and_then(|v| v.strip_prefix("n=")?.parse::<u64>().ok());
            if let (Some(p50), Some(p99), Some(n)) = (p50, p99, n) {
                rows.push(json!({"measurement": what, "p50_us": p50 as f64 / 1e3,
                    "p99_us": p99 as f64 / 1e3, "samples": n}));
                lat.push((what.to_owned(), p50, p99));
            }
        } else if let Some(call) = rest.strip_prefix("fsync per ") {
            if let Some((call, value)) = call.split_once('=') {
                let v = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
                if let Some(v) = v {
                    rows.push(json!({"measurement": format!("fsyncs per {call}"), "value": v}));
                }
            }
        }
    }
    if rows.is_empty() {
        return None;
    }
    let mut figures = Vec::new();
    let mut checks = Vec::new();
    let mut ratio_pair = |group: String,
                          num: &(String, u64, u64),
                          den: &(String, u64, u64),
                          limit: (f64, &str)| {
        for (label, a, b) in [("p50", num.1, den.1), ("p99", num.2, den.2)] {
            let ratio = a as f64 / b.max(1) as f64;
            figures.push(json!({"group": group, "name": format!("{label}: {} / {}", num.0, den.0),
                "ratio": ratio,
                "inputs": {format!("{}_us", num.0): a as f64 / 1e3, format!("{}_us", den.0): b as f64 / 1e3}}));
            if label == "p99" {
                checks.push(json!({"claim": format!("{}: p99 {} / {} <= {}x", limit.1, num.0, den.0, limit.0),
                    "value": ratio, "holds": ratio <= limit.0}));
            }
        }
    };
    // Hostile phases: `hostile <phase> markBootAttempt (<kind>)`.
    let phase = |name: &str| -> Option<(String, String)> {
        let rest = name.strip_prefix("hostile ")?;
        let (phase, kind) = rest.split_once(" markBootAttempt ")?;
        Some((phase.to_owned(), kind.trim_matches(|c| c == '(' || c == ')').to_owned()))
    };
    for loaded in lat.iter().filter(|l| phase(&l.0).is_some_and(|(p, _)| p == "loaded")) {
        let Some((_, kind)) = phase(&loaded.0) else { continue };
        for idle in
            lat.iter().filter(|l| phase(&l.0).is_some_and(|(p, k)| p.contains("idle") && k == kind))
        {
            ratio_pair(
                format!(
                    "root markBootAttempt on the RPC socket, {kind}: under hostile load / idle"
                ),
                loaded,
                idle,
                (5.0, "issue 10"),
            );
        }
    }
    let find = |name: &str| lat.iter().find(|l| l.0 == name);
    if let (Some(ours), Some(empty)) =
        (find("needsRollback checkpointd"), find("needsRollback empty-service"))
    {
        ratio_pair(
            "binder needsRollback: checkpointd / an empty service (virtual device)".to_owned(),
            ours,
            empty,
            (1.2, "issue 5"),
        );
    }
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let guest_kernel =
        testbench::paths::Bench::locate().map(|b| b.kernel_version).unwrap_or_default();
    Some(json!({
        "bench": "binder",
        "source": "read from the bench's output (target/bench/binder.log): it wrote no JSON",
        "machine": host_machine(),
        "kernel": format!("guest {guest_kernel} (binder, virtual device); host {} \
            (binder_hostile)", host_kernel.trim()),
        "figures": figures,
        "rows": rows,
        "checks": checks,
    }))
}

/// This machine: CPU model and count (for results that do not state theirs).
fn host_machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown", |(_, v)| v.trim());
    json!({"cpu": cpu, "cpus": std::thread::available_parallelism().map_or(0, usize::from)})
}

/// Runs one bench through cargo with the virtual device enabled, its output shown and saved to
/// `log`; a line every minute says how long it has been running. Returns whether it succeeded.
fn run_one(pkg: &str, spec: &BenchSpec, opts: RunOptions, log: &Path) -> Result<bool> {
    let mut cmd = Command::new(cargo());
    cmd.args(["bench", "-p", pkg, "--bench", spec.name])
        .args(feature_args(spec.features))
        .arg("--")
        .env(testbench::VM_ENV, "1")
        .current_dir(testbench::paths::workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if opts.quick {
        cmd.args(spec.quick_args);
        cmd.envs(spec.quick_env.iter().copied());
    }
    cmd.args(spec.args);
    println!("+ {}", setup::show(&cmd));
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let file = Mutex::new(file);
    let mut child = cmd.spawn().context("starting cargo bench")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let status = std::thread::scope(|s| {
        let tee = |input: Box<dyn Read + Send>, to_stderr: bool| {
            let file = &file;
            move || {
                for line in BufReader::new(input).lines().map_while(Result::ok) {
                    if to_stderr {
                        eprintln!("{line}");
                    } else {
                        println!("{line}");
                    }
                    if let Ok(mut f) = file.lock() {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                }
            }
        };
        s.spawn(tee(Box::new(stdout), false));
        s.spawn(tee(Box::new(stderr), true));
        s.spawn(|| {
            let mut next = Duration::from_secs(60);
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if start.elapsed() >= next {
                    println!("[xtask bench: {} running for {} s]", spec.name, next.as_secs());
                    next += Duration::from_secs(60);
                }
            }
        });
        let status = child.wait();
        done.store(true, Ordering::Relaxed);
        status
    })
    .context("waiting for cargo bench")?;
    Ok(status.success())
}

/// The whole report.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<BenchOutcome>,
    pub wall_seconds: f64,
    /// UTC time, `YYYY-MM-DD HH:MM`.
    pub generated: String,
    pub quick: bool,
}

impl Report {
    /// Writes report.md, report.json and `<bench>.svg` for each benchmark with figures into
    /// `dir`; returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for o in &self.outcomes {
            let svg_path = dir.join(format!("{}.svg", o.spec.name));
            match &o.data {
                Some(d) if !d.figures.is_empty() => {
                    std::fs::write(&svg_path, svg_bars(o.spec.title, &d.figures))?;
                    written.push(svg_path);
                }
                // No stale plot beside a report that has no such figures.
                _ => {
                    let _ = std::fs::remove_file(&svg_path);
                }
            }
        }
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown())?;
        let js = dir.join("report.json");
        std::fs::write(&js, serde_json::to_string_pretty(&self.json())?)?;
        written.insert(0, js);
        written.insert(0, md);
        Ok(written)
    }

    /// The report as JSON: each benchmark's own JSON with its run status.
    pub fn json(&self) -> Value {
        let benches: Vec<Value> = self
            .outcomes
            .iter()
            .map(|o| {
                let (status, reason) = match &o.status {
                    RunStatus::Ok => ("ok", None),
                    RunStatus::Failed(r) => ("failed", Some(r.clone())),
                    RunStatus::NotRun(r) => ("not run", Some(r.clone())),
                    RunStatus::Earlier => ("earlier run", None),
                };
                json!({
                    "bench": o.spec.name,
                    "title": o.spec.title,
                    "status": status,
                    "reason": reason,
                    "seconds": o.seconds,
                    "log": o.log.as_ref().map(|p| p.display().to_string()),
                    "data_error": o.data_error,
                    "data": o.data.as_ref().map(|d| d.raw.clone()),
                })
            })
            .collect();
        json!({
            "generated_utc": self.generated,
            "command": if self.quick { "cargo xtask bench --quick" } else { "cargo xtask bench" },
            "wall_seconds": self.wall_seconds,
            "benches": benches,
        })
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmark report\n");
        let _ = writeln!(
            s,
            "`{}`, {} UTC, {:.0} s in all{}. Every figure is a ratio of two measurements from \
             this same run; the inputs column holds what it is made of. docs/benchmark-report.md \
             explains each figure.\n",
            if self.quick { "cargo xtask bench --quick" } else { "cargo xtask bench" },
            self.generated,
            self.wall_seconds,
            if self.quick {
                " (quick mode: small sizes, one round; not for conclusions)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "| benchmark | status | time | kernel | machine | setup |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for o in &self.outcomes {
            let (kernel, machine, setup) = o.data.as_ref().map_or_else(
                || ("—".to_owned(), "—".to_owned(), "—".to_owned()),
                |d| (d.kernel(), d.machine(), setup_text(&d.raw)),
            );
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} s | {} | {} | {} |",
                o.spec.name,
                cell(&status_text(&o.status)),
                o.seconds,
                cell(&kernel),
                cell(&machine),
                cell(&setup)
            );
        }
        let checks: Vec<(&str, &Map<String, Value>)> = self
            .outcomes
            .iter()
            .filter_map(|o| o.data.as_ref().map(|d| (o.spec.name, d)))
            .flat_map(|(n, d)| d.checks.iter().map(move |c| (n, c)))
            .collect();
        if !checks.is_empty() {
            let _ = writeln!(s, "\n## Claims and targets checked\n");
            let _ = writeln!(s, "| benchmark | claim | measured | holds |");
            let _ = writeln!(s, "|---|---|---|---|");
            for (n, c) in checks {
                let get = |k: &str| c.get(k).map_or_else(|| "—".to_owned(), plain);
                let holds = match c.get("holds").and_then(Value::as_bool) {
                    Some(true) => "**yes**",
                    Some(false) => "**no**",
                    None => "—",
                };
                let _ = writeln!(
                    s,
                    "| {n} | {} | {} | {holds} |",
                    cell(&get("claim")),
                    cell(&get("value"))
                );
            }
        }
        for o in &self.outcomes {
            let _ = writeln!(s, "\n## {}\n", o.spec.title);
            let _ = writeln!(s, "`{}`: {}.", o.spec.name, o.spec.about);
            let Some(d) = &o.data else {
                let why = match (&o.status, &o.data_error) {
                    (_, Some(e)) => format!("its JSON could not be used: {e}"),
                    (RunStatus::NotRun(r), None) => format!("not run: {r}"),
                    (RunStatus::Failed(r), None) => format!("failed, no results: {r}"),
                    (RunStatus::Ok | RunStatus::Earlier, None) => format!(
                        "ran, but wrote no target/bench/{}.json: nothing to report",
                        o.spec.name
                    ),
                };
                let _ = writeln!(s, "\n**No results in this report**: {why}.");
                continue;
            };
            if let RunStatus::Failed(r) = &o.status {
                let _ = writeln!(s, "\n**The run failed** ({r}); the results it wrote follow.");
            }
            let _ = writeln!(s, "\nKernel {}; machine {}.", d.kernel(), d.machine());
            if let Some(src) = d.raw.get("source").and_then(Value::as_str) {
                let _ = writeln!(s, "\nSource: {src}.");
            }
            let errors: Vec<String> = d
                .raw
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(plain)
                .collect();
            for e in errors {
                let _ = writeln!(s, "\n**Error in this run**: {e}");
            }
            if !d.figures.is_empty() {
                let _ = writeln!(s, "\n![{}]({}.svg)\n", o.spec.title, o.spec.name);
                let _ = writeln!(s, "| figure | ratio | inputs |");
                let _ = writeln!(s, "|---|---|---|");
                let mut group = None;
                for f in &d.figures {
                    if group != Some(&f.group) && !f.group.is_empty() {
                        let _ = writeln!(s, "| **{}** | | |", cell(&f.group));
                    }
                    group = Some(&f.group);
                    let inputs = plain(&Value::Object(f.inputs.clone()));
                    let _ = writeln!(
                        s,
                        "| {} | **{}x** | {} |",
                        cell(&f.name),
                        number(f.ratio),
                        cell(&inputs)
                    );
                }
            }
            if !d.rows.is_empty() {
                let _ = writeln!(s, "\nMeasurements:\n");
                for table in split_rows(&d.rows) {
                    s.push_str(&rows_table(&table));
                    s.push('\n');
                }
            }
        }
        s
    }
}

/// The setup column: the bench's `mode` (if any) and its `setup` object.
fn setup_text(raw: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(mode) = raw.get("mode") {
        parts.push(format!("mode: {}", plain(mode)));
    }
    if let Some(setup) = raw.get("setup") {
        parts.push(plain(setup));
    }
    if parts.is_empty() {
        "—".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Rows split into tables of rows with the same fields, in first-seen order (one bench's
/// different measurements, e.g. times and space, each get their own table).
fn split_rows(rows: &[Row]) -> Vec<Vec<Row>> {
    let mut tables: Vec<(Vec<&String>, Vec<Row>)> = Vec::new();
    for r in rows {
        let keys: Vec<&String> = r.keys().collect();
        match tables.iter_mut().find(|(k, _)| *k == keys) {
            Some((_, t)) => t.push(r.clone()),
            None => tables.push((keys, vec![r.clone()])),
        }
    }
    tables.into_iter().map(|(_, t)| t).collect()
}

/// A Markdown table of flat objects: the columns holding text (what a row is) first, then the
/// numbers, each part in key order (JSON objects here do not keep their order).
fn rows_table(rows: &[Map<String, Value>]) -> String {
    let mut cols: Vec<&str> = Vec::new();
    for r in rows {
        for k in r.keys() {
            if !cols.contains(&k.as_str()) {
                cols.push(k);
            }
        }
    }
    let is_text = |c: &str| rows.iter().any(|r| r.get(c).is_some_and(Value::is_string));
    cols.sort_by_key(|c| !is_text(c));
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", cols.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(cols.len()));
    for r in rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| r.get(*c).map_or_else(String::new, |v| cell(&field(c, v))))
            .collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar chart of ratios on a log scale, bars growing from 1x (right: above 1x,
/// left: below); one bar per figure, labelled with its group and name.
pub fn svg_bars(title: &str, figures: &[Figure]) -> String {
    const LABEL_W: f64 = 560.0;
    const PLOT_W: f64 = 380.0;
    const ROW_H: f64 = 22.0;
    const TOP: f64 = 48.0;
    let finite: Vec<f64> =
        figures.iter().map(|f| f.ratio).filter(|r| r.is_finite() && *r > 0.0).collect();
    let lo = finite.iter().copied().fold(1.0_f64, f64::min).log10().floor().min(-1.0);
    let hi = finite.iter().copied().fold(1.0_f64, f64::max).log10().ceil().max(1.0);
    let x = |r: f64| LABEL_W + (r.log10() - lo) / (hi - lo) * PLOT_W;
    let height = TOP + ROW_H * figures.len() as f64 + 30.0;
    let width = LABEL_W + PLOT_W + 90.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        xml(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"8\" y=\"34\" fill=\"#555\">ratio, log scale; bars grow from 1x</text>"
    );
    // Decade grid lines.
    let bottom = TOP + ROW_H * figures.len() as f64;
    let mut p = lo;
    while p <= hi + 1e-9 {
        let gx = x(10f64.powf(p));
        let stroke = if p.abs() < 1e-9 { "#000" } else { "#ccc" };
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{bottom:.1}\" stroke=\"{stroke}\"/>",
            TOP - 4.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}x</text>",
            bottom + 14.0,
            number(10f64.powf(p))
        );
        p += 1.0;
    }
    for (i, f) in figures.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let label =
            if f.group.is_empty() { f.name.clone() } else { format!("{}: {}", f.group, f.name) };
        let short: String = if label.chars().count() > 92 {
            label.chars().take(90).chain("…".chars()).collect()
        } else {
            label.clone()
        };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\"><title>{}</title>{}</text>",
            LABEL_W - 6.0,
            y + 14.0,
            xml(&label),
            xml(&short)
        );
        if !(f.ratio.is_finite() && f.ratio > 0.0) {
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">n/a</text>", x(1.0) + 4.0, y + 14.0);
            continue;
        }
        let (a, b) = (x(1.0), x(f.ratio));
        let (left, w) = if b >= a { (a, b - a) } else { (b, a - b) };
        let fill = if f.ratio >= 1.0 { "#3a7bd5" } else { "#d5803a" };
        let _ = writeln!(
            s,
            "<rect x=\"{left:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>",
            y + 4.0,
            w.max(1.0),
            ROW_H - 8.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}x</text>",
            left + w.max(1.0) + 4.0,
            y + 14.0,
            number(f.ratio)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The current UTC time as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// `YYYY-MM-DD HH:MM` of a Unix time (the civil-from-days conversion of the proleptic
/// Gregorian calendar).
fn utc_from_unix(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_restore() -> Value {
        json!({
            "bench": "restore",
            "machine": {"cpu": "Test CPU", "cpus": 2},
            "kernel": "6.1.0-test",
            "setup": {"image_mib": 512},
            "figures": [
                {"group": "restore, scattered 4 KiB", "name": "ours speed / vold-algorithm baseline speed",
                 "ratio": 4.0, "inputs": {"ours_ms": 100.0, "vold_ms": 400.0}},
                {"group": "restore, scattered 4 KiB", "name": "ours speed / raw write alone",
                 "ratio": 0.5, "inputs": {"ours_ms": 100.0, "raw_write_ms": 50.0}}
            ],
            "rows": [{"case": "scattered 4 KiB", "method": "ours", "median_ms": 100.0}],
            "checks": [{"claim": "ours >= 3x vold", "value": 4.0, "holds": true}],
            "errors": ["part 3 stopped"]
        })
    }

    #[test]
    fn figures_rows_and_checks_are_read_from_a_bench_json() {
        let d = BenchData::parse("restore", sample_restore()).unwrap();
        assert_eq!(d.figures.len(), 2);
        assert_eq!(d.figures[0].group, "restore, scattered 4 KiB");
        assert_eq!(d.figures[0].ratio, 4.0);
        assert_eq!(d.figures[1].inputs["raw_write_ms"], json!(50.0));
        assert_eq!(d.rows.len(), 1);
        assert_eq!(d.checks.len(), 1);
        assert_eq!(d.kernel(), "6.1.0-test");
        assert_eq!(d.machine(), "cpu: Test CPU, cpus: 2");
        // Without an "inputs" object, the figure's other fields are its inputs.
        let flat = json!({"bench": "binder", "figures": [
            {"figure": "p99 loaded / idle", "ratio": 1.09, "idle_us": 100, "loaded_us": 109}]});
        let d = BenchData::parse("binder", flat).unwrap();
        assert_eq!(d.figures[0].name, "p99 loaded / idle");
        assert_eq!(d.figures[0].inputs.len(), 2);
    }

    #[test]
    fn the_estimate_rows_give_figures_over_the_actual_and_checks() {
        let v = json!({"bench": "estimate", "kernel": "k", "rows": [
            {"workload": "ota", "backend": "bow", "predicted_bytes": 90, "needed_bytes": 110,
             "actual_bytes": 100, "needed_error_pct": 10.0, "target_met": true},
            {"workload": "ota", "backend": "snapshot", "predicted_bytes": 90,
             "needed_bytes": 110, "actual_bytes": null, "needed_error_pct": null,
             "target_met": false}
        ]});
        let d = BenchData::parse("estimate", v).unwrap();
        let got: Vec<(&str, f64)> = d.figures.iter().map(|f| (f.name.as_str(), f.ratio)).collect();
        assert_eq!(
            got,
            [("ota: needed (with margin) / actual", 1.1), ("ota: predicted / actual", 0.9)]
        );
        assert_eq!(d.figures[0].group, "estimate / actual space, bow (from the rows)");
        assert_eq!(d.checks.len(), 2);
        assert_eq!(d.checks[0]["holds"], json!(true));
        assert_eq!(d.checks[1]["holds"], json!(false));
        assert!(d.checks[1]["claim"].as_str().unwrap().contains("snapshot"));
    }

    #[test]
    fn the_binder_output_gives_latency_figures_and_checks() {
        let out = "\
running 2 tests
test binder         ... bench: needsRollback checkpointd p50_ns=110000 p99_ns=300000 n=2000
bench: needsRollback empty-service p50_ns=100000 p99_ns=200000 n=2000
bench: needsRollback ratio p50=1.10 p99=1.50
bench: fsync per markBootAttempt=1.00 (12 total)
bench: hostile warm-up markBootAttempt (session) p50_ns=1 p99_ns=1 n=1000
bench: hostile idle markBootAttempt (session) p50_ns=50000 p99_ns=100000 n=1000
bench: hostile idle markBootAttempt (new session) p50_ns=400000 p99_ns=800000 n=1000
bench: hostile loaded markBootAttempt (session) p50_ns=45000 p99_ns=120000 n=1000
bench: hostile loaded markBootAttempt (new session) p50_ns=400000 p99_ns=4800000 n=1000
bench: hostile ratio loaded/idle (session): p50 0.90x p99 1.20x
";
        let d = BenchData::parse("binder", binder_from_output(out).unwrap()).unwrap();
        let got: Vec<(String, f64)> =
            d.figures.iter().map(|f| (f.name.clone(), (f.ratio * 100.0).round() / 100.0)).collect();
        let want = [
            ("p50: hostile loaded markBootAttempt (session) / hostile idle markBootAttempt (session)", 0.9),
            ("p99: hostile loaded markBootAttempt (session) / hostile idle markBootAttempt (session)", 1.2),
            ("p50: hostile loaded markBootAttempt (new session) / hostile idle markBootAttempt (new session)", 1.0),
            ("p99: hostile loaded markBootAttempt (new session) / hostile idle markBootAttempt (new session)", 6.0),
            ("p50: needsRollback checkpointd / needsRollback empty-service", 1.1),
            ("p99: needsRollback checkpointd / needsRollback empty-service", 1.5),
        ];
        let want: Vec<(String, f64)> = want.iter().map(|(n, r)| ((*n).to_owned(), *r)).collect();
        assert_eq!(got, want);
        let holds: Vec<bool> = d.checks.iter().map(|c| c["holds"].as_bool().unwrap()).collect();
        assert_eq!(holds, [true, false, false]);
        assert_eq!(d.rows.len(), 8, "{:?}", d.rows);
        assert_eq!(d.rows[2]["value"], json!(1.0));
        assert!(binder_from_output("no results here\n").is_none());

        // A run that left only its output: the report reads it and keeps it as binder.json;
        // a stale output of a bench that did not run this time is not read.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("binder.log"), out).unwrap();
        let spec = &BENCHES[3];
        let stale = load(spec, RunStatus::NotRun("x".into()), 0.0, dir.path());
        assert!(stale.data.is_none() && !dir.path().join("binder.json").exists());
        let o = load(spec, RunStatus::Ok, 1.0, dir.path());
        assert_eq!(o.data.unwrap().figures.len(), 6);
        let kept: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("binder.json")).unwrap())
                .unwrap();
        assert_eq!(kept["bench"], json!("binder"));
        assert!(kept["source"].as_str().unwrap().contains("binder.log"));
    }

    #[test]
    fn a_bench_json_that_breaks_the_contract_is_refused_with_the_reason() {
        let cases = [
            (json!([1, 2]), "not a JSON object"),
            (json!({"figures": []}), "no \"bench\""),
            (json!({"bench": "binder", "rows": [{}]}), "expected \"restore\""),
            (json!({"bench": "restore"}), "neither"),
            (json!({"bench": "restore", "figures": [{"name": "x"}]}), "no numeric ratio"),
            (json!({"bench": "restore", "figures": [{"ratio": 1.0}]}), "has no name"),
            (json!({"bench": "restore", "rows": [3]}), "rows[0] is not an object"),
        ];
        for (v, want) in cases {
            let err = format!("{:#}", BenchData::parse("restore", v.clone()).unwrap_err());
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn the_report_lays_out_every_bench_and_says_why_one_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("restore.json"), sample_restore().to_string()).unwrap();
        std::fs::write(dir.path().join("binder.json"), "{not json").unwrap();
        // A stale plot of a bench without figures this time is removed.
        std::fs::write(dir.path().join("estimate.svg"), "<svg/>").unwrap();
        let outcomes = vec![
            load(&BENCHES[0], RunStatus::Ok, 10.0, dir.path()),
            load(&BENCHES[1], RunStatus::Failed("exited with an error".into()), 20.0, dir.path()),
            load(
                &BENCHES[2],
                RunStatus::NotRun("no bench target `estimate`".into()),
                0.0,
                dir.path(),
            ),
            load(&BENCHES[3], RunStatus::Ok, 30.0, dir.path()),
            load(&BENCHES[4], RunStatus::NotRun("no bench target `ublk`".into()), 0.0, dir.path()),
        ];
        let report = Report {
            outcomes,
            wall_seconds: 60.0,
            generated: "2026-12-06 08:00".into(),
            quick: false,
        };
        let written = report.write(dir.path()).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["report.md", "report.json", "restore.svg"]);
        assert!(!dir.path().join("estimate.svg").exists());

        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| ours speed / vold-algorithm baseline speed | **4.00x** | ours_ms: 100, vold_ms: 400 |"), "{md}");
        assert!(md.contains("| **restore, scattered 4 KiB** | | |"), "{md}");
        assert!(md.contains("Kernel 6.1.0-test; machine cpu: Test CPU, cpus: 2."), "{md}");
        assert!(md.contains("| restore | ours >= 3x vold | 4.00 | **yes** |"), "{md}");
        assert!(md.contains("**Error in this run**: part 3 stopped"), "{md}");
        assert!(
            md.contains("**No results in this report**: failed, no results: exited with an error."),
            "{md}"
        );
        assert!(md.contains("not run: no bench target `estimate`"), "{md}");
        assert!(md.contains("its JSON could not be used"), "{md}");
        assert!(md.contains("| scattered 4 KiB | ours | 100 |"), "{md}");

        let js: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(js["wall_seconds"], json!(60.0));
        let benches = js["benches"].as_array().unwrap();
        assert_eq!(benches.len(), BENCHES.len());
        assert_eq!(benches[0]["data"]["figures"][0]["ratio"], json!(4.0));
        assert_eq!(benches[1]["status"], json!("failed"));
        assert_eq!(benches[2]["status"], json!("not run"));
        assert!(benches[3]["data"].is_null() && benches[3]["data_error"].is_string());
        assert_eq!(benches[4]["status"], json!("not run"));
    }

    #[test]
    fn bars_grow_from_one_on_a_log_scale() {
        let f = |name: &str, ratio: f64| Figure {
            group: String::new(),
            name: name.into(),
            ratio,
            inputs: Map::new(),
        };
        let svg = svg_bars("T <&>", &[f("ten", 10.0), f("tenth", 0.1), f("none", f64::NAN)]);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("T &lt;&amp;&gt;"));
        // Scale 0.1x..10x over 380 px from x = 560: 1x at 750; 10x ends at 940, 0.1x starts at 560.
        assert!(svg.contains("<rect x=\"750.0\" y=\"52.0\" width=\"190.0\""), "{svg}");
        assert!(svg.contains("<rect x=\"560.0\" y=\"74.0\" width=\"190.0\""), "{svg}");
        assert!(svg.contains(">n/a</text>"));
        assert_eq!(svg.matches("<rect x=").count(), 2);
        // Every element is closed: as many opening tags as closing ones for text and title.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn numbers_and_dates_print_as_the_report_shows_them() {
        assert_eq!(number(40.83), "40.8");
        assert_eq!(number(0.0312), "0.031");
        assert_eq!(number(1234.5), "1234");
        assert_eq!(plain(&json!({"a": 1, "b": "x", "c": null})), "a: 1, b: x, c: —");
        assert_eq!(
            plain(&json!({"bytes": 3 << 20, "bow_bytes": 1 << 19})),
            "bow_bytes: 0.500 MiB, bytes: 3.00 MiB"
        );
        assert_eq!(utc_from_unix(0), "1970-01-01 00:00");
        assert_eq!(utc_from_unix(1_796_547_600), "2026-12-06 09:00");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29 00:00");
    }
}
