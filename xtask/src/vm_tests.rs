//! `cargo xtask test`'s VM phase: the VM test binaries run side by side.
//!
//! `cargo test` runs test binaries one after another, so a binary with one guest leaves the
//! second core idle for its whole run. After the workspace's `cargo test` (in which VM trials
//! are deferred, `TESTBENCH_VM=defer`), this phase starts the binaries named `vm_*` itself,
//! a few at a time, each in its package directory as `cargo test` would. How many guests boot
//! at once is bounded across all of them by testbench's guest slots (`testbench::slots`), not
//! here: a binary waiting for a slot costs nothing.

use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One VM test binary, as `cargo test --no-run` built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmBinary {
    /// The test target's name (`vm_rollback`).
    pub name: String,
    pub executable: PathBuf,
    /// The package directory (the working directory `cargo test` gives a test binary).
    pub package_dir: PathBuf,
}

/// How one binary ended.
#[derive(Debug)]
pub struct Finished {
    pub binary: VmBinary,
    /// Its stdout and stderr, interleaved as written.
    pub log: PathBuf,
    pub ok: bool,
    pub seconds: f64,
}

/// Binaries known to run longest go first, so the phase does not end on one long binary
/// running alone; the rest follow by name.
const LONGEST_FIRST: &[&str] = &[
    "vm_rollback",
    "vm_crash",
    "vm_ublk",
    "vm_crash_ublk",
    "vm_full_userspace_bow",
    "vm_binder",
    "vm_backends",
];

/// The `vm_*` test binaries in `cargo test --no-run --message-format=json` output.
pub fn parse_vm_binaries(json_lines: &str) -> Result<Vec<VmBinary>> {
    let mut out = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo message {line:?}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let target = &msg["target"];
        let is_test = target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        let Some(name) = target["name"].as_str() else { continue };
        if !is_test || !name.starts_with("vm_") {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            bail!("cargo reported test target {name} without an executable or manifest");
        };
        let package_dir = Path::new(manifest).parent().map(Path::to_path_buf).unwrap_or_default();
        out.push(VmBinary { name: name.to_owned(), executable: exe.into(), package_dir });
    }
    out.sort_by_key(|b| {
        let rank = LONGEST_FIRST.iter().position(|n| *n == b.name).unwrap_or(LONGEST_FIRST.len());
        (rank, b.name.clone())
    });
    out.dedup_by(|a, b| a.executable == b.executable);
    Ok(out)
}

/// Runs every binary with `env`, at most `parallel` at once; each one's output goes to a file
/// under `log_dir`, and `on_finish` sees each binary as it ends.
pub fn run_all(
    binaries: &[VmBinary],
    env: &[(&str, &std::ffi::OsStr)],
    parallel: usize,
    log_dir: &Path,
    mut on_finish: impl FnMut(&Finished),
) -> Result<Vec<Finished>> {
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut queue = binaries.iter();
    let mut running: Vec<(VmBinary, PathBuf, Child, Instant)> = Vec::new();
    let mut done = Vec::new();
    loop {
        while running.len() < parallel.max(1) {
            let Some(b) = queue.next() else { break };
            let log = log_dir.join(format!("{}.log", b.name));
            let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let err = out.try_clone()?;
            let mut cmd = Command::new(&b.executable);
            cmd.current_dir(&b.package_dir).stdin(Stdio::null()).stdout(out).stderr(err);
            for (k, v) in env {
                cmd.env(k, v);
            }
            println!(
                "+ (in {}) {} > {}",
                b.package_dir.display(),
                b.executable.display(),
                log.display()
            );
            let child =
                cmd.spawn().with_context(|| format!("starting {}", b.executable.display()))?;
            running.push((b.clone(), log, child, Instant::now()));
        }
        if running.is_empty() {
            return Ok(done);
        }
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].2.try_wait()? {
                let (binary, log, _, start) = running.swap_remove(i);
                let finished = Finished {
                    binary,
                    log,
                    ok: status.success(),
                    seconds: start.elapsed().as_secs_f64(),
                };
                on_finish(&finished);
                done.push(finished);
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The lines of a finished binary's log.
pub fn log_lines(log: &Path) -> Result<Vec<String>> {
    let file = File::open(log).with_context(|| format!("opening {}", log.display()))?;
    // A guest's console can carry bytes that are not UTF-8; keep the line, replace them.
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(file).split(b'\n') {
        lines.push(String::from_utf8_lossy(&line?).into_owned());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_test_binaries_are_found_longest_first_and_others_left_out() {
        let lines = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"vm_hal"},"executable":"/t/deps/vm_hal-1","manifest_path":"/w/bootctl/Cargo.toml"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"vm_lib"},"executable":null,"manifest_path":"/w/x/Cargo.toml"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"hostile_inputs"},"executable":"/t/deps/hostile_inputs-2","manifest_path":"/w/service/Cargo.toml"}
{"reason":"build-finished","success":true}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"vm_rollback"},"executable":"/t/deps/vm_rollback-3","manifest_path":"/w/tests/Cargo.toml"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"vm_crash"},"executable":"/t/deps/vm_crash-4","manifest_path":"/w/backends/Cargo.toml"}
"#;
        let found = parse_vm_binaries(lines).unwrap();
        let names: Vec<&str> = found.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["vm_rollback", "vm_crash", "vm_hal"]);
        assert_eq!(found[0].package_dir, Path::new("/w/tests"));
        assert_eq!(found[0].executable, Path::new("/t/deps/vm_rollback-3"));
    }

    #[test]
    fn a_test_artifact_without_an_executable_is_an_error() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"vm_x"},"executable":null,"manifest_path":"/w/x/Cargo.toml"}"#;
        assert!(parse_vm_binaries(line).is_err());
    }

    #[test]
    fn binaries_run_side_by_side_and_report_how_they_ended() {
        let dir = tempfile::tempdir().unwrap();
        let bin = |name: &str, script: &str| {
            let path = dir.path().join(name);
            testbench::write_script(&path, &format!("#!/bin/sh\n{script}\n")).unwrap();
            VmBinary { name: name.into(), executable: path, package_dir: dir.path().into() }
        };
        // Each waits for the other's file: they finish only if both run at once.
        let a = bin("vm_a", "touch a; while [ ! -e b ]; do sleep 0.05; done; echo \"A $X\"");
        let b = bin("vm_b", "touch b; while [ ! -e a ]; do sleep 0.05; done; echo B >&2; exit 3");
        let logs = dir.path().join("logs");
        let x = std::ffi::OsStr::new("set");
        let mut seen = Vec::new();
        let done =
            run_all(&[a, b], &[("X", x)], 2, &logs, |f| seen.push(f.binary.name.clone())).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(seen.len(), 2);
        let by = |n: &str| done.iter().find(|f| f.binary.name == n).unwrap();
        assert!(by("vm_a").ok);
        assert!(!by("vm_b").ok);
        assert_eq!(log_lines(&by("vm_a").log).unwrap(), ["A set"]);
        assert_eq!(log_lines(&by("vm_b").log).unwrap(), ["B"]);
    }
}
