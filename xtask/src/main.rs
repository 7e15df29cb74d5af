//! `cargo xtask`: setup, test, vm, demo, bench.

mod demo;
mod report;
mod setup;
mod summary;
mod test;
mod vm_tests;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "checkpointd project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install everything the tests need (Debian packages, kernel, virtme-ng, tools). Idempotent.
    Setup,
    /// Every check and test: fmt, clippy, build, host and VM tests, fuzz smoke runs.
    Test {
        /// Skip the fuzz smoke runs.
        #[arg(long)]
        no_fuzz: bool,
        /// An out-of-tree kernel module (a `.ko` for the guest kernel, e.g. dm-bow) that every
        /// VM scenario loads first; repeatable.
        #[arg(long = "module")]
        modules: Vec<PathBuf>,
        /// The deeper crash-consistency run (longer workloads, more crash states per flush;
        /// sets CPD_CRASH_LONG=1, docs/crash-consistency.md).
        #[arg(long)]
        long: bool,
    },
    /// Boot the virtual device and run a command in it, e.g. `cargo xtask vm -- dmesg`.
    Vm {
        /// modprobe lines (default: loop, dm-mod, binder_linux devices=binder,hwbinder).
        #[arg(long = "module")]
        modules: Vec<String>,
        /// Attach a raw image file as a virtio disk (repeatable).
        #[arg(long = "disk")]
        disks: Vec<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Timeout in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command and its arguments (looked up in the guest's PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Walk an update through the virtual device: checkpoint, failed boots, rollback, commit.
    Demo(demo::DemoArgs),
    /// Every benchmark of the report in one run, then the report (target/bench/report.md,
    /// report.json, SVG plots); or, given a name, that bench target alone with the virtual
    /// device enabled.
    Bench {
        /// Small sizes and one round (checks the whole pipeline; numbers not for conclusions).
        /// After a name, passed on to that bench as before.
        #[arg(long)]
        quick: bool,
        /// Rebuild the report from the JSON files already in target/bench; run nothing.
        #[arg(long, conflicts_with_all = ["name", "quick"])]
        report_only: bool,
        /// The bench target name (none: all of the report's).
        name: Option<String>,
        /// Arguments for the bench binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Internal: the guest half of `demo`.
    #[command(hide = true)]
    GuestDemo,
}

/// Modules loaded for `vm` and `demo`.
pub const DEFAULT_MODULES: &[&str] = &["loop", "dm-mod", "binder_linux devices=binder,hwbinder"];

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run().map(|_| ExitCode::SUCCESS),
        Cmd::Test { no_fuzz, modules, long } => {
            set_extra_modules(&modules)?;
            if long {
                // Set before any thread starts; the test processes inherit it.
                std::env::set_var("CPD_CRASH_LONG", "1");
            }
            test::run(!no_fuzz)
        }
        Cmd::Vm { modules, disks, memory, timeout, command } => {
            vm(&modules, &disks, memory, timeout, &command)
        }
        Cmd::Demo(args) => demo::host(&args),
        Cmd::GuestDemo => demo::guest(),
        Cmd::Bench { report_only: true, .. } => report::report_only(),
        Cmd::Bench { name: Some(name), quick, mut args, .. } => {
            // `bench rollback --quick`: clap takes the flag; it belongs to the bench.
            if quick {
                args.insert(0, "--quick".to_owned());
            }
            bench(&name, &args)
        }
        Cmd::Bench { name: None, quick, .. } => report::run_all(report::RunOptions { quick }),
    }
}

/// Makes every VM of this run (and of the test processes it starts) load `modules` first,
/// through testbench's [`testbench::vm::MODULES_ENV`]. Each must be an existing `.ko` file.
pub fn set_extra_modules(modules: &[PathBuf]) -> Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let mut paths = Vec::new();
    for m in modules {
        let abs = std::fs::canonicalize(m).with_context(|| format!("--module {}", m.display()))?;
        if abs.extension().and_then(|e| e.to_str()) != Some("ko") {
            bail!("--module {}: not a kernel module (.ko) file", m.display());
        }
        paths.push(abs);
    }
    let joined = std::env::join_paths(&paths).context("joining --module paths")?;
    // Set before any thread starts; the child processes inherit it.
    std::env::set_var(testbench::vm::MODULES_ENV, joined);
    Ok(())
}

fn vm(
    modules: &[String],
    disks: &[PathBuf],
    memory: u32,
    timeout: u64,
    command: &[String],
) -> Result<ExitCode> {
    setup::ensure()?;
    let mut vm = testbench::vm::Vm::new("xtask-vm")
        .memory_mib(memory)
        .timeout(std::time::Duration::from_secs(timeout))
        .stream_output(true);
    if modules.is_empty() {
        vm = vm.modules(DEFAULT_MODULES);
    } else {
        let lines: Vec<&str> = modules.iter().map(String::as_str).collect();
        vm = vm.modules(&lines);
    }
    for d in disks {
        vm = vm.disk(d);
    }
    // `exec "$@"` resolves the command through the guest's PATH.
    let mut args = vec!["-c", "exec \"$@\"", "sh"];
    args.extend(command.iter().map(String::as_str));
    let run = vm.run(std::path::Path::new("/bin/sh"), &args)?;
    eprintln!(
        "xtask vm: {:?} after {:.1} s (console log: {})",
        run.exit,
        run.duration.as_secs_f64(),
        run.console.display()
    );
    Ok(match run.exit {
        testbench::vm::GuestExit::Exited(code) => {
            ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
        }
        _ => ExitCode::FAILURE,
    })
}

/// `cargo metadata --no-deps` of the workspace.
fn metadata() -> Result<serde_json::Value> {
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(testbench::paths::workspace_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Names of the workspace's packages.
pub fn workspace_packages() -> Result<Vec<String>> {
    let meta = metadata()?;
    Ok(meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

fn bench(name: &str, args: &[String]) -> Result<ExitCode> {
    let meta = metadata()?;
    let pkg = find_bench_package(&meta, name)?;
    setup::ensure()?;
    // The report's benches that need cargo features (the ublk server) get them here too.
    let features = report::BENCHES
        .iter()
        .find(|s| s.name == name)
        .map_or_else(Vec::new, |s| report::feature_args(s.features));
    println!(
        "xtask bench: cargo bench -p {pkg} --bench {name} {} (TESTBENCH_VM=1)",
        features.join(" ")
    );
    let status = Command::new(cargo())
        .args(["bench", "-p", &pkg, "--bench", name])
        .args(&features)
        .arg("--")
        .args(args)
        .env(testbench::VM_ENV, "1")
        .current_dir(testbench::paths::workspace_root())
        .status()
        .context("running cargo bench")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The package that has a bench target called `name`, from `cargo metadata` JSON.
fn find_bench_package(meta: &serde_json::Value, name: &str) -> Result<String> {
    let mut all = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        for target in pkg["targets"].as_array().into_iter().flatten() {
            let is_bench =
                target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bench"));
            if !is_bench {
                continue;
            }
            let target_name = target["name"].as_str().unwrap_or_default();
            if target_name == name {
                return Ok(pkg["name"].as_str().unwrap_or_default().to_owned());
            }
            all.push(target_name.to_owned());
        }
    }
    bail!("no bench target named `{name}` in the workspace (bench targets: {all:?})")
}

/// The cargo that runs us.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_targets_are_found_by_name() {
        let meta = serde_json::json!({"packages": [
            {"name": "bow", "targets": [{"name": "bow", "kind": ["lib"]},
                                        {"name": "restore", "kind": ["bench"]}]},
            {"name": "checkpointd", "targets": [{"name": "latency", "kind": ["bench"]}]}
        ]});
        assert_eq!(find_bench_package(&meta, "latency").unwrap(), "checkpointd");
        assert_eq!(find_bench_package(&meta, "restore").unwrap(), "bow");
        let err = find_bench_package(&meta, "bow").unwrap_err().to_string();
        assert!(err.contains("restore") && err.contains("latency"), "{err}");
    }

    #[test]
    fn cli_parses_bench_with_and_without_a_name() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.cmd) {
            Ok(Cmd::Bench { quick, report_only, name, args }) => {
                Ok((quick, report_only, name, args))
            }
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(parse(&["xtask", "bench"]), Ok((false, false, None, vec![])));
        assert_eq!(parse(&["xtask", "bench", "--quick"]), Ok((true, false, None, vec![])));
        assert_eq!(parse(&["xtask", "bench", "--report-only"]), Ok((false, true, None, vec![])));
        // The flag after a name goes to that bench (try_main passes it on).
        assert_eq!(
            parse(&["xtask", "bench", "rollback", "--quick"]),
            Ok((true, false, Some("rollback".into()), vec![]))
        );
        assert_eq!(
            parse(&["xtask", "bench", "binder", "--", "--exact", "binder"]),
            Ok((false, false, Some("binder".into()), vec!["--exact".into(), "binder".into()]))
        );
        assert!(parse(&["xtask", "bench", "--report-only", "rollback"]).is_err());
    }

    #[test]
    fn cli_parses_vm_commands_with_hyphens() {
        let cli = Cli::try_parse_from(["xtask", "vm", "--", "sh", "-c", "echo hi"]).unwrap();
        match cli.cmd {
            Cmd::Vm { command, .. } => assert_eq!(command, ["sh", "-c", "echo hi"]),
            other => panic!("parsed as {other:?}"),
        }
    }
}
