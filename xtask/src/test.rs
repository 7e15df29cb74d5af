//! `cargo xtask test`: every check and test, with a summary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::summary::{self, Tally, TestLine};
use crate::{cargo, setup, vm_tests};

/// Seconds each fuzz target runs in the smoke run.
const FUZZ_SECONDS: u32 = 15;
/// Lines of each failed test's output repeated before the summary: its first and its last.
const FAILURE_HEAD_LINES: usize = 20;
const FAILURE_TAIL_LINES: usize = 30;

#[derive(Debug)]
struct Phase {
    name: String,
    ok: bool,
    seconds: f64,
}

#[derive(Debug, Default)]
struct Report {
    phases: Vec<Phase>,
    tests: Tally,
    /// Checks that are not libtest tests (fmt, clippy, build, fuzz targets), counted one each.
    checks: Tally,
    skipped: Vec<(String, Option<String>)>,
    failed: Vec<String>,
    /// The VM phase's guest time per test binary (testbench::guest_time), one line each.
    guest_time: Vec<String>,
    /// What each failed test printed (its last lines), shown again at the end.
    failure_output: Vec<(String, Vec<String>)>,
}

impl Report {
    /// Runs `f` as a phase, prints and records its wall time.
    fn phase(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<bool>) {
        println!("\n=== xtask test: {name} ===");
        let start = Instant::now();
        let ok = f(self).unwrap_or_else(|e| {
            eprintln!("xtask test: {name}: {e:#}");
            false
        });
        let seconds = start.elapsed().as_secs_f64();
        println!("=== {name}: {} in {seconds:.1} s ===", if ok { "ok" } else { "FAILED" });
        self.phases.push(Phase { name: name.to_owned(), ok, seconds });
    }

    /// A phase that is one check (counted as one passed or failed item).
    fn check(&mut self, name: &str, f: impl FnOnce() -> Result<bool>) {
        self.phase(name, |r| {
            let ok = f()?;
            if ok {
                r.checks.passed += 1;
            } else {
                r.checks.failed += 1;
                r.failed.push(format!("[{name}]"));
            }
            Ok(ok)
        });
    }
}

/// The ublk server, its binary and its VM test (libclang from setup's libclang-dev).
const UBLK: &str = "bow-ublk/ublk,bow-ublk/fault";

pub fn run(fuzz: bool) -> Result<ExitCode> {
    let root = testbench::paths::workspace_root();
    let mut r = Report::default();
    r.check("setup", || setup::ensure().map(|()| true));
    r.check("fmt", || status(cargo_cmd(&root, &["fmt", "--all", "--", "--check"])));
    r.check("clippy", || {
        status(cargo_cmd(
            &root,
            &["clippy", "--workspace", "--all-targets", "--features", UBLK, "--", "-D", "warnings"],
        ))
    });
    // Examples too: the scenarios' update client is client/examples/updater.rs.
    r.check("build", || {
        status(cargo_cmd(
            &root,
            &["build", "--workspace", "--bins", "--examples", "--features", UBLK],
        ))
    });
    // Counts the crash tests measure (libtest hides the output of passing tests).
    let counts_file = root.join("target").join("test-counts.txt");
    let _ = std::fs::remove_file(&counts_file);
    // VM trials are deferred here and run by the VM phase below (crate::vm_tests).
    let mut deferred = 0;
    r.phase("cargo test", |r| {
        let mut cmd =
            cargo_cmd(&root, &["test", "--workspace", "--no-fail-fast", "--features", UBLK]);
        cmd.env(testbench::VM_ENV, testbench::VM_DEFER)
            .env(bow::crashdev::COUNTS_FILE_ENV, &counts_file);
        let run = run_tests(cmd)?;
        if run.ok || run.tally != Tally::default() {
            let ok = run.ok;
            deferred += run.deferred;
            r.record(run, "cargo test");
            return Ok(ok);
        }
        // Nothing ran: something does not compile. Test each package on its own so one broken
        // crate does not hide the results of the others.
        println!("\nxtask test: the workspace does not build as a whole; testing each package");
        let mut all_ok = true;
        for pkg in crate::workspace_packages()? {
            let mut cmd = cargo_cmd(&root, &["test", "-p", &pkg, "--no-fail-fast"]);
            cmd.env(testbench::VM_ENV, testbench::VM_DEFER)
                .env(bow::crashdev::COUNTS_FILE_ENV, &counts_file);
            let run = run_tests(cmd)?;
            all_ok &= run.ok;
            deferred += run.deferred;
            r.record(run, &format!("cargo test -p {pkg}"));
        }
        Ok(all_ok)
    });
    r.phase("VM tests", |r| vm_phase(r, &root, &counts_file, deferred));
    if fuzz {
        fuzz_smoke(&mut r, &root)?;
    }

    // Again at the end, where a CI log's tail shows it (the fuzz phases print after the tests).
    for (name, lines) in &r.failure_output {
        println!("\n=== what the failed test {name} printed (its start and end) ===");
        for line in lines {
            println!("{line}");
        }
    }
    println!("\n=== summary ===");
    for p in &r.phases {
        println!("  {:<30} {:>8.1} s  {}", p.name, p.seconds, if p.ok { "ok" } else { "FAILED" });
    }
    if !r.guest_time.is_empty() {
        println!("guest time of the VM phase, per test binary (boots, seconds):");
        for line in &r.guest_time {
            println!("  {line}");
        }
    }
    if let Ok(counts) = std::fs::read_to_string(&counts_file) {
        println!("counted by the crash tests:");
        for line in counts.lines() {
            println!("  {line}");
        }
    }
    if !r.skipped.is_empty() {
        println!("skipped:");
        for (name, reason) in &r.skipped {
            println!("  {name}: {}", reason.as_deref().unwrap_or("(no reason given)"));
        }
    }
    if !r.failed.is_empty() {
        println!("failed:");
        for name in &r.failed {
            println!("  {name}");
        }
    }
    let passed = r.tests.passed + r.checks.passed;
    let failed = r.tests.failed + r.checks.failed;
    println!("{}", summary::summary_line(passed, failed, r.tests.ignored));
    Ok(if failed == 0 && r.phases.iter().all(|p| p.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What one `cargo test` run reported.
#[derive(Debug, Default)]
struct TestRun {
    ok: bool,
    /// Counts of tests run; VM trials deferred to the VM phase are not in `ignored`.
    tally: Tally,
    skipped: Vec<(String, Option<String>)>,
    /// VM trials reported as deferred (`testbench::VM_DEFERRED_REASON`).
    deferred: u64,
    failed: Vec<String>,
    failure_output: Vec<(String, Vec<String>)>,
}

/// Reads a test run's output line by line.
#[derive(Debug, Default)]
struct RunReader {
    run: TestRun,
    sections: summary::FailureSections,
}

impl RunReader {
    fn feed(&mut self, line: &str) {
        self.sections.feed(line);
        if let Some(t) = summary::parse_result_line(line) {
            self.run.tally.add(t);
        }
        match summary::parse_test_line(line) {
            Some(TestLine::Ignored { reason, .. })
                if reason.as_deref() == Some(testbench::VM_DEFERRED_REASON) =>
            {
                self.run.deferred += 1;
            }
            Some(TestLine::Ignored { name, reason }) => self.run.skipped.push((name, reason)),
            Some(TestLine::Failed { name }) => self.run.failed.push(name),
            None => {}
        }
    }

    fn finish(mut self, ok: bool) -> TestRun {
        self.run.ok = ok;
        self.run.tally.ignored = self.run.tally.ignored.saturating_sub(self.run.deferred);
        self.run.failure_output = self.sections.finish(FAILURE_HEAD_LINES, FAILURE_TAIL_LINES);
        self.run
    }
}

/// The VM phase: every `vm_*` test binary, side by side (crate::vm_tests), with the VM trials
/// for real. Every trial the `cargo test` phase deferred must have run here.
fn vm_phase(r: &mut Report, root: &Path, counts_file: &Path, deferred: u64) -> Result<bool> {
    let mut cmd = cargo_cmd(
        root,
        &[
            "test",
            "--workspace",
            "--features",
            UBLK,
            "--no-run",
            "--message-format=json-render-diagnostics",
        ],
    );
    println!("+ {}", setup::show(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output().context("running cargo test --no-run")?;
    if !out.status.success() {
        anyhow::bail!("cargo test --no-run failed: the VM test binaries do not build");
    }
    let binaries = vm_tests::parse_vm_binaries(&String::from_utf8_lossy(&out.stdout))?;
    // The binaries' disk images of earlier builds go now, while no test process can be
    // waiting to boot one (testbench::binimage).
    testbench::binimage::remove_images().context("removing the binaries' disk images")?;
    let guest_log = testbench::guest_time::log_path();
    match std::fs::remove_file(&guest_log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", guest_log.display()));
        }
        _ => {}
    }
    // One more binary than guest slots: a binary doing host-side work between its guests
    // leaves its slot to the next one.
    let parallel = testbench::slots::slot_count() + 1;
    println!(
        "xtask test: {} VM test binaries, {parallel} at a time, {} guests at a time",
        binaries.len(),
        testbench::slots::slot_count()
    );
    let env = [
        (testbench::VM_ENV, std::ffi::OsStr::new("1")),
        (bow::crashdev::COUNTS_FILE_ENV, counts_file.as_os_str()),
    ];
    let log_dir = root.join("target").join("xtask-vm-tests");
    let mut ran = Tally::default();
    let mut all_ok = true;
    let mut runs = Vec::new();
    vm_tests::run_all(&binaries, &env, parallel, &log_dir, |f| {
        println!(
            "\n--- {} ({}): {} in {:.1} s ---",
            f.binary.name,
            f.binary.executable.display(),
            if f.ok { "ok" } else { "FAILED" },
            f.seconds
        );
        let mut reader = RunReader::default();
        match vm_tests::log_lines(&f.log) {
            Ok(lines) => {
                for line in &lines {
                    println!("{line}");
                    reader.feed(line);
                }
            }
            Err(e) => println!("xtask test: reading {}: {e:#}", f.log.display()),
        }
        runs.push((reader.finish(f.ok), f.binary.name.clone()));
    })?;
    r.guest_time = guest_time_lines(&guest_log);
    for (run, name) in runs {
        all_ok &= run.ok;
        ran.add(run.tally);
        r.record(run, &name);
    }
    let trials = ran.passed + ran.failed;
    if trials != deferred {
        r.tests.failed += 1;
        r.failed.push(format!(
            "[VM tests: the cargo test phase deferred {deferred} VM trials, this phase ran {trials}]"
        ));
        return Ok(false);
    }
    Ok(all_ok)
}

impl Report {
    fn record(&mut self, run: TestRun, what: &str) {
        self.tests.add(run.tally);
        self.skipped.extend(run.skipped);
        self.failed.extend(run.failed);
        self.failure_output.extend(run.failure_output);
        if !run.ok && run.tally.failed == 0 {
            // A crate did not compile, or a test binary crashed without a result line.
            self.tests.failed += 1;
            self.failed.push(format!("[{what}: exited with an error outside any test, see above]"));
        }
    }
}

/// The guest time lines of the summary, longest first, and their total; a line saying why
/// when the log cannot be read.
fn guest_time_lines(log: &Path) -> Vec<String> {
    let sums = std::fs::read_to_string(log)
        .map_err(|e| format!("reading {}: {e}", log.display()))
        .and_then(|text| testbench::guest_time::by_binary(&text));
    let sums = match sums {
        Ok(sums) => sums,
        Err(e) => return vec![format!("(no guest times: {e})")],
    };
    let mut rows: Vec<_> = sums.into_iter().collect();
    rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let (boots, seconds) =
        rows.iter().fold((0, 0.0), |(b, s), (_, t)| (b + t.boots, s + t.seconds));
    let mut lines: Vec<String> = rows
        .iter()
        .map(|(name, t)| format!("{name:<24} {:>4} {:>8.1}", t.boots, t.seconds))
        .collect();
    lines.push(format!("{:<24} {boots:>4} {seconds:>8.1}", "all"));
    lines
}

/// Runs `cargo test`, echoing its stdout and reading its results.
fn run_tests(mut cmd: Command) -> Result<TestRun> {
    println!("+ {}", setup::show(&cmd));
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut reader = RunReader::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        reader.feed(&line);
    }
    Ok(reader.finish(child.wait()?.success()))
}

/// `cargo fuzz run <target> -- -max_total_time=15` for each fuzz target, from `fuzz/`.
fn fuzz_smoke(r: &mut Report, root: &Path) -> Result<()> {
    let dir = root.join("fuzz");
    let targets_dir = dir.join("fuzz_targets");
    if !targets_dir.is_dir() {
        println!("\nxtask test: no fuzz/fuzz_targets: no fuzz smoke runs");
        return Ok(());
    }
    let mut targets: Vec<String> = std::fs::read_dir(&targets_dir)?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    targets.sort();
    let tools_bin = testbench::paths::cache_dir().join("tools/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools_bin];
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs)?;
    for target in targets {
        r.check(&format!("fuzz {target} ({FUZZ_SECONDS} s)"), || {
            let mut cmd = Command::new(cargo());
            // No leak detection, per input (-detect_leaks=0) or at exit (ASAN_OPTIONS):
            // validation checks CRCs on scoped worker threads, and a thread's exit can race
            // LeakSanitizer (seen as reports of std's own thread handle and thread-local
            // destructor records, 80 bytes, never of our code, which is safe Rust without
            // leaking APIs). The properties the targets check, no panic and no write, stay
            // fully checked, with AddressSanitizer on.
            let max_time = format!("-max_total_time={FUZZ_SECONDS}");
            cmd.args(["fuzz", "run", &target, "--", &max_time, "-detect_leaks=0"])
                .current_dir(&dir)
                .env("PATH", &path)
                .env("ASAN_OPTIONS", "detect_leaks=0")
                // cargo-fuzz passes -Z flags (sanitizers); this lets the stable toolchain take them.
                .env("RUSTC_BOOTSTRAP", "1");
            status(cmd)
        });
    }
    Ok(())
}

fn cargo_cmd(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.args(args).current_dir(root);
    cmd
}

fn status(mut cmd: Command) -> Result<bool> {
    println!("+ {}", setup::show(&cmd));
    Ok(cmd.status().with_context(|| format!("starting {}", setup::show(&cmd)))?.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_vm_trials_are_counted_apart_from_skipped_tests() {
        let mut reader = RunReader::default();
        for line in [
            "test chain ... ignored, runs in cargo xtask test's VM phase",
            "test helper ... ignored, helper process",
            "test unit ... ok",
            "test result: ok. 1 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out",
        ] {
            reader.feed(line);
        }
        let run = reader.finish(true);
        assert_eq!(run.deferred, 1);
        assert_eq!(run.tally, Tally { passed: 1, failed: 0, ignored: 1 });
        assert_eq!(run.skipped, [("helper".to_owned(), Some("helper process".to_owned()))]);
    }

    #[test]
    fn guest_time_is_listed_longest_first_with_a_total() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guest-seconds.tsv");
        std::fs::write(&log, "vm_a\tx-1\t10.0\nvm_b\ty-1\t30.5\nvm_a\tx-2\t12.0\n").unwrap();
        let lines = guest_time_lines(&log);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("vm_b ") && lines[0].ends_with("   1     30.5"), "{lines:?}");
        assert!(lines[1].starts_with("vm_a ") && lines[1].ends_with("   2     22.0"), "{lines:?}");
        assert!(lines[2].starts_with("all ") && lines[2].ends_with("   3     52.5"), "{lines:?}");
        let missing = guest_time_lines(&dir.path().join("none.tsv"));
        assert!(missing.len() == 1 && missing[0].starts_with("(no guest times: reading"));
    }

    #[test]
    fn a_failed_run_without_failing_tests_still_counts_as_a_failure() {
        let mut r = Report::default();
        r.record(TestRun { ok: false, ..TestRun::default() }, "cargo test -p x");
        assert_eq!(r.tests.failed, 1);
        assert!(r.failed[0].contains("cargo test -p x"));

        let mut r = Report::default();
        let tally = Tally { passed: 2, failed: 1, ignored: 1 };
        let run = TestRun {
            ok: false,
            tally,
            skipped: vec![("vm".into(), Some("needs the virtual device".into()))],
            deferred: 0,
            failed: vec!["t".into()],
            failure_output: vec![("t".into(), vec!["assertion failed".into()])],
        };
        r.record(run, "cargo test");
        assert_eq!(r.tests, tally);
        assert_eq!(r.failed, ["t"]);
        assert_eq!(r.failure_output, [("t".to_owned(), vec!["assertion failed".to_owned()])]);
        assert_eq!(r.skipped.len(), 1);
    }
}
