//! Binder benchmark in the virtual device (`cargo xtask bench binder`).
//!
//! From one guest run:
//! - p50/p99 latency of `needsRollback` through checkpointd versus an empty rsbinder service
//!   implementing the same interface, calls interleaved A, B, A, B ... on kernel binder, both
//!   registered with rsb_hub;
//! - p50/p99 time of `markBootAttempt` and of an evaluating `needsCheckpoint` (after
//!   `resetCheckpoint`), with the store on an ext4 virtio disk;
//! - fsyncs per call of those two, counted with `strace -f -e trace=fsync,fdatasync` on the daemon
//!   in separate runs (startup + start vs. startup + start + K calls).
//!
//! Targets (issue 5): ≤ 1.2x the empty service; one fsync per state change.
//!
//! `binder_hostile` (on the host, no virtual device; needs root to switch clients to UID
//! 65534): root's `markBootAttempt` p50/p99 on the RPC socket, on an idle daemon and while
//! UID 65534 holds 2,000 connections (re-opening those the daemon closes) and 100 stopped
//! `checkpointctl watch` listeners, the daemon's open-file limit at 1024; both a call on an
//! established session and a new session per call (as init's `checkpointctl` makes it),
//! printed with the loaded/idle ratios. Target (issue 10): p99 within 5x of idle.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint_aidl::android::system::checkpoint::{
    CheckpointStatus::CheckpointStatus, HistoryEvent::HistoryEvent, ICheckpoint::ICheckpoint,
    ICheckpointListener::ICheckpointListener,
};
use rsbinder::{BinderResult, Strong};
use testbench::guest::{self, HubPolicy};
use testbench::vm::Vm;
use testbench::{Failed, Trial};

const EMPTY_NAME: &str = "bench.checkpoint.IEmpty/default";
const MOUNT: &str = "/dev/shm/bench-meta";
const LATENCY_CALLS: usize = 2000;
const STORE_CALLS: usize = 200;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            Trial::bench("binder", |test_mode| {
                if test_mode {
                    // `cargo test --benches`: nothing to check without the virtual device.
                    return Ok(None);
                }
                if !testbench::vm_requested() {
                    return Err("needs the virtual device: run `cargo xtask bench binder`".into());
                }
                host().map(Some)
            }),
            Trial::bench("binder_hostile", |test_mode| {
                if test_mode {
                    // `cargo test --benches`: a measurement, not a test (the tests are in
                    // tests/hostile_clients.rs).
                    return Ok(None);
                }
                hostile::run().map(Some)
            }),
        ],
        &[
            ("bench", guest_bench),
            ("empty_service", guest_empty_service),
            ("hold_connections", hostile::hold_connections),
        ],
    )
}

fn host() -> Result<libtest_mimic::Measurement, Failed> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("meta.img");
    fs::File::create(&image)?.set_len(256 << 20)?;
    let out = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).output()?;
    if !out.status.success() {
        return Err(format!("mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let run = Vm::new("bench_binder")
        .modules(&["binder_linux devices=binder,hwbinder"])
        .disk(&image)
        .memory_mib(1024)
        // One guest at a time here: two vCPUs, as the published figures were measured.
        .cpus(2)
        .timeout(Duration::from_secs(900))
        .run_self("bench", &[])?;
    run.expect_success()?;
    let report: Vec<&str> = run.output.lines().filter(|l| l.starts_with("bench:")).collect();
    for line in &report {
        println!("{line}");
    }
    let p50 = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("bench: needsRollback checkpointd p50_ns="))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .ok_or_else(|| format!("no result in the guest output:\n{}", run.output))?;
    Ok(libtest_mimic::Measurement { avg: p50, variance: 0 })
}

// ---- the empty service ----

/// An ICheckpoint whose methods do nothing: the floor of a binder call.
struct Empty;

impl rsbinder::Interface for Empty {}

#[allow(non_snake_case, reason = "AIDL names")]
impl ICheckpoint for Empty {
    fn startCheckpoint(&self, _: i32) -> BinderResult<()> {
        Ok(())
    }
    fn needsCheckpoint(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn needsRollback(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn isCheckpointing(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn commitChanges(&self) -> BinderResult<()> {
        Ok(())
    }
    fn abortChanges(&self, _: &str, _: bool) -> BinderResult<()> {
        Ok(())
    }
    fn prepareCheckpoint(&self) -> BinderResult<()> {
        Ok(())
    }
    fn restoreCheckpoint(&self, _: &str) -> BinderResult<()> {
        Ok(())
    }
    fn restoreCheckpointPart(&self, _: &str, _: i32) -> BinderResult<()> {
        Ok(())
    }
    fn markBootAttempt(&self) -> BinderResult<()> {
        Ok(())
    }
    fn supportsCheckpoint(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn supportsBlockCheckpoint(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn supportsFileCheckpoint(&self) -> BinderResult<bool> {
        Ok(false)
    }
    fn resetCheckpoint(&self) -> BinderResult<()> {
        Ok(())
    }
    fn getStatus(&self) -> BinderResult<CheckpointStatus> {
        Ok(CheckpointStatus::default())
    }
    fn registerListener(&self, _: &Strong<dyn ICheckpointListener>) -> BinderResult<()> {
        Ok(())
    }
    fn getHistory(&self, _: i32) -> BinderResult<Vec<HistoryEvent>> {
        Ok(Vec::new())
    }
    fn estimateBackupSpace(
        &self,
        _: &checkpoint_aidl::android::system::checkpoint::EstimateRequest::EstimateRequest,
    ) -> BinderResult<checkpoint_aidl::android::system::checkpoint::BackupEstimate::BackupEstimate>
    {
        Ok(Default::default())
    }
    fn reserveSpace(
        &self,
        _: i64,
    ) -> BinderResult<checkpoint_aidl::android::system::checkpoint::ReservationInfo::ReservationInfo>
    {
        Ok(Default::default())
    }
    fn releaseReservation(&self) -> BinderResult<()> {
        Ok(())
    }
}

fn guest_empty_service(_: &[String]) -> Result<(), Failed> {
    use checkpoint_aidl::android::system::checkpoint::ICheckpoint::BnCheckpoint;
    rsbinder::serve(rsbinder::Uri::kernel())
        .and_then(|s| s.add(EMPTY_NAME, BnCheckpoint::new_binder(Empty).as_binder()))
        .and_then(rsbinder::Server::run)
        .map_err(|e| format!("empty service: {e:?}"))?;
    Ok(())
}

// ---- the guest run ----

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            stop(child);
        }
    }
}

fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log(name: &str) -> Result<fs::File, Failed> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(guest::shared_dir().join(name))?)
}

fn daemon_config(meta: &str) -> Result<PathBuf, Failed> {
    let path = PathBuf::from("/dev/shm/bench-checkpointd.toml");
    fs::write(
        &path,
        format!(
            "metadata_dir = \"{meta}\"\n\
             [[backend]]\ntype = \"test-null\"\n[monitor]\ninterval_ms = 0\n"
        ),
    )?;
    Ok(path)
}

/// Starts checkpointd (optionally under strace writing to `trace`), waits for its name.
fn start_daemon(config: &Path, trace: Option<&Path>) -> Result<Child, Failed> {
    let daemon = env!("CARGO_BIN_EXE_checkpointd");
    let mut cmd = match trace {
        Some(out) => {
            let strace = ["/usr/bin/strace", "/bin/strace"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .ok_or("strace is not installed (setup must install it for the fsync count)")?;
            let mut c = Command::new(strace);
            c.args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"]).arg(out).arg(daemon);
            c
        }
        None => Command::new(daemon),
    };
    cmd.arg("--config").arg(config).env("RUST_LOG", "warn");
    let child = cmd.stdout(log("checkpointd.log")?).stderr(log("checkpointd.log")?).spawn()?;
    Ok(child)
}

fn lookup(name: &str) -> Result<Strong<dyn ICheckpoint>, Failed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = rsbinder::hub::try_get_interface::<dyn ICheckpoint>(name)
            .map_err(|e| format!("lookup {name}: {e:?}"))?
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not register in 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The registered service once it answers (after a restart the old, dead binder may still be
/// registered for a moment).
fn lookup_alive(name: &str) -> Result<Strong<dyn ICheckpoint>, Failed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let service = lookup(name)?;
        if service.supportsCheckpoint().is_ok() {
            return Ok(service);
        }
        if Instant::now() > deadline {
            return Err(format!("{name} registered but never answered").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[index]
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn summary(name: &str, mut samples: Vec<u64>) -> (u64, u64) {
    samples.sort_unstable();
    let (p50, p99) = (percentile(&samples, 50), percentile(&samples, 99));
    println!("bench: {name} p50_ns={p50} p99_ns={p99} n={}", samples.len());
    (p50, p99)
}

fn fsync_lines(trace: &Path) -> Result<u64, Failed> {
    let text =
        fs::read_to_string(trace).map_err(|e| format!("reading {}: {e}", trace.display()))?;
    Ok(u64::try_from(
        text.lines().filter(|l| l.contains("fsync(") || l.contains("fdatasync(")).count(),
    )?)
}

/// One traced daemon run: start, then `calls` on the service; returns the fsyncs seen.
fn traced_run(
    config: &Path,
    meta: &str,
    label: &str,
    calls: impl Fn(&dyn ICheckpoint) -> Result<(), Failed>,
) -> Result<u64, Failed> {
    let _ = fs::remove_dir_all(meta);
    let trace = PathBuf::from(format!("/dev/shm/trace-{label}.txt"));
    let mut daemon = start_daemon(config, Some(&trace))?;
    let service = lookup_alive(checkpoint_aidl::SERVICE_NAME)?;
    calls(&*service)?;
    drop(service);
    // `daemon` is strace: stop the traced checkpointd (its child), then strace exits with it.
    let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.id()))?;
    for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.try_wait()?.is_none() {
        if Instant::now() > deadline {
            return Err("strace did not exit after checkpointd stopped".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // rsb_hub keeps the dead service's name; wait until the lookup no longer finds it alive.
    std::thread::sleep(Duration::from_millis(300));
    fsync_lines(&trace)
}

fn guest_bench(_: &[String]) -> Result<(), Failed> {
    let disk = guest::disk(0);
    guest::sh(&format!("mkdir -p {MOUNT} && mount -t ext4 {} {MOUNT}", disk.display()))?;
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/rsb_hub_bench.toml");
    let hub = guest::start_rsb_hub(HubPolicy::File(&policy), log("rsb_hub.log")?)?;
    let mut procs = Procs(vec![hub]);
    rsbinder::ProcessState::init_default().map_err(|e| format!("binder: {e}"))?;

    let meta = format!("{MOUNT}/checkpointd");
    let config = daemon_config(&meta)?;
    procs.0.push(start_daemon(&config, None)?);
    let exe = std::env::current_exe()?;
    procs.0.push(
        Command::new(exe)
            .args(["--guest", "empty_service"])
            .stdin(Stdio::null())
            .stdout(log("empty.log")?)
            .stderr(log("empty.log")?)
            .spawn()?,
    );
    let daemon = lookup(checkpoint_aidl::SERVICE_NAME)?;
    let empty = lookup(EMPTY_NAME)?;

    // Latency, interleaved A/B so both see the same machine state.
    for _ in 0..200 {
        daemon.needsRollback()?;
        empty.needsRollback()?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..LATENCY_CALLS {
        let t = Instant::now();
        daemon.needsRollback()?;
        a.push(nanos(t.elapsed()));
        let t = Instant::now();
        empty.needsRollback()?;
        b.push(nanos(t.elapsed()));
    }
    let (a50, a99) = summary("needsRollback checkpointd", a);
    let (b50, b99) = summary("needsRollback empty-service", b);
    let ratio = |x: u64, y: u64| if y == 0 { f64::NAN } else { x as f64 / y as f64 };
    println!("bench: needsRollback ratio p50={:.2} p99={:.2}", ratio(a50, b50), ratio(a99, b99));

    // Boot-path calls against the store on the virtio disk.
    daemon.startCheckpoint(1_000_000)?;
    let mut marks = Vec::new();
    for _ in 0..STORE_CALLS {
        let t = Instant::now();
        daemon.markBootAttempt()?;
        marks.push(nanos(t.elapsed()));
    }
    summary("markBootAttempt", marks);
    let mut needs = Vec::new();
    for _ in 0..STORE_CALLS {
        daemon.resetCheckpoint()?;
        let t = Instant::now();
        daemon.needsCheckpoint()?;
        needs.push(nanos(t.elapsed()));
    }
    summary("needsCheckpoint (evaluating)", needs);
    drop(daemon);
    let daemon_child = procs.0.remove(1);
    let mut daemon_child = daemon_child;
    stop(&mut daemon_child);
    std::thread::sleep(Duration::from_millis(300));

    // fsync counts: the same runs with and without K calls, under strace.
    let base = traced_run(&config, &meta, "base", |s| {
        s.startCheckpoint(1_000_000)?;
        Ok(())
    })?;
    let with_marks = traced_run(&config, &meta, "marks", |s| {
        s.startCheckpoint(1_000_000)?;
        for _ in 0..STORE_CALLS {
            s.markBootAttempt()?;
        }
        Ok(())
    })?;
    let with_needs = traced_run(&config, &meta, "needs", |s| {
        s.startCheckpoint(1_000_000)?;
        for _ in 0..STORE_CALLS {
            s.resetCheckpoint()?;
            s.needsCheckpoint()?;
        }
        Ok(())
    })?;
    let per = |total: u64| (total.saturating_sub(base)) as f64 / STORE_CALLS as f64;
    println!("bench: fsync baseline (startup + startCheckpoint)={base}");
    println!("bench: fsync per markBootAttempt={:.2} ({with_marks} total)", per(with_marks));
    println!("bench: fsync per needsCheckpoint={:.2} ({with_needs} total)", per(with_needs));
    drop(procs);
    guest::sh(&format!("umount {MOUNT}"))?;
    Ok(())
}

// ---- root's latency under hostile local clients (host, RPC socket) ----

mod hostile {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use checkpoint_aidl::android::system::checkpoint::ICheckpoint::ICheckpoint;
    use nix::sys::signal::Signal;
    use rsbinder::Strong;
    use testbench::daemon::{as_uid, ClientProcess, Launch, Setup, NOBODY, TEST_BACKEND};
    use testbench::Failed;

    use super::{nanos, summary};

    const SAMPLES: usize = 1000;

    fn connect(socket: &Path) -> Result<Strong<dyn ICheckpoint>, Failed> {
        testbench::daemon::connect(socket).map_err(|e| format!("connect: {e:?}").into())
    }

    /// p50/p99 (ns) of `n` markBootAttempt calls on one session, then of `n` each on a new
    /// session. A call slower than 10 s fails the run (the hang the limits prevent).
    fn latencies(socket: &Path, label: &str) -> Result<[(u64, u64); 2], Failed> {
        let service = connect(socket)?;
        let mut same = Vec::with_capacity(SAMPLES);
        let mut fresh = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let started = Instant::now();
            service.markBootAttempt().map_err(|e| format!("markBootAttempt: {e}"))?;
            same.push(nanos(started.elapsed()));
            let started = Instant::now();
            connect(socket)?.markBootAttempt().map_err(|e| format!("markBootAttempt: {e}"))?;
            fresh.push(nanos(started.elapsed()));
            // Paced, so the samples span the load's re-open rounds.
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(worst) = same.iter().chain(&fresh).max() {
            if *worst > 10_000_000_000 {
                return Err(format!("a root call took {worst} ns").into());
            }
        }
        Ok([
            summary(&format!("hostile {label} markBootAttempt (session)"), same),
            summary(&format!("hostile {label} markBootAttempt (new session)"), fresh),
        ])
    }

    pub(super) fn run() -> Result<libtest_mimic::Measurement, Failed> {
        if !nix::unistd::geteuid().is_root() {
            return Err("binder_hostile switches clients to UID 65534: run it as root".into());
        }
        // The daemon at the open-file limit systemd gives a unit without LimitNOFILE, logging
        // little (the log is not what is measured).
        let setup = Setup::new(TEST_BACKEND);
        let launch =
            Launch { nofile: Some(1024), log_level: Some("warn".to_owned()), ..Launch::default() };
        let _daemon = setup.boot_with(&launch);
        let socket = setup.socket();
        latencies(&socket, "warm-up")?;
        let idle = latencies(&socket, "idle")?;

        let mut watchers = Vec::new();
        for _ in 0..100 {
            // Those the daemon refuses (its listener caps) are not load; they are counted.
            if let Ok(watcher) = setup.watch_as(NOBODY) {
                watcher.signal(Signal::SIGSTOP);
                watchers.push(watcher);
            }
        }
        let mut holder = Command::new("/bin/sh");
        holder
            .arg("-c")
            .arg("ulimit -n 2100 && exec \"$0\" --guest hold_connections \"$1\" 2000")
            .arg(std::env::current_exe()?)
            .arg(&socket);
        let mut holder = as_uid(&mut holder, NOBODY).stdout(Stdio::piped()).spawn()?;
        let mut ready = String::new();
        BufReader::new(holder.stdout.take().ok_or("stdout")?).read_line(&mut ready)?;
        let _holder = ClientProcess(holder);
        println!(
            "bench: hostile load: {} of 100 stopped watchers registered, holder: {}",
            watchers.len(),
            ready.trim()
        );
        let loaded = latencies(&socket, "loaded")?;
        for (i, kind) in ["session", "new session"].iter().enumerate() {
            let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
            println!(
                "bench: hostile ratio loaded/idle ({kind}): p50 {:.2}x p99 {:.2}x",
                ratio(loaded[i].0, idle[i].0),
                ratio(loaded[i].1, idle[i].1)
            );
        }
        Ok(libtest_mimic::Measurement { avg: loaded[1].1, variance: 0 })
    }

    /// `--guest hold_connections SOCKET N` (run as UID 65534): holds N connections, re-opening
    /// up to 200 a second of those the daemon closes, until killed (or 10 minutes).
    pub(super) fn hold_connections(args: &[String]) -> Result<(), Failed> {
        let [path, count] = args else {
            return Err("usage: --guest hold_connections SOCKET N".into());
        };
        testbench::daemon::hold_connections(
            Path::new(path),
            count.parse::<usize>()?,
            Duration::from_secs(600),
        );
        Ok(())
    }
}
