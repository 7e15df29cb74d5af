//! The virtual device: a Debian kernel under QEMU (TCG) driven by virtme-ng.
//!
//! A VM test binary (`harness = false`) calls [`main`] with its host-side trials and its guest
//! entry points. On the host, [`main`] runs the trials with libtest-mimic; inside the VM the same
//! binary is started as `<exe> --guest <entry> [args]` by [`vm::Vm::run_self`] and [`main`]
//! dispatches to the entry. See docs/testing.md for how to write a scenario.

pub mod binimage;
pub mod daemon;
pub mod device;
pub mod guest;
pub mod guest_time;
pub mod kernel_image;
pub mod paths;
pub mod scenario;
pub mod slots;
pub mod status;
pub mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

pub use libtest_mimic::{Failed, Trial};

/// A guest entry point: runs inside the VM, as root, with the arguments given to `run_self`.
pub type GuestFn = fn(&[String]) -> Result<(), Failed>;

/// The reason printed for VM trials when the virtual device is not requested.
pub const VM_SKIP_REASON: &str = "needs the virtual device: run cargo xtask test";

/// Environment variable that makes [`vm_trial`]s run for real: `1`. `cargo xtask test` sets
/// it to [`VM_DEFER`] for its `cargo test` of the whole workspace, then runs the VM test binaries
/// side by side with `1` (docs/testing.md).
pub const VM_ENV: &str = "TESTBENCH_VM";

/// [`VM_ENV`]'s value for "a later phase runs the VM trials": a VM trial in a binary named
/// `vm_*` is reported ignored with [`VM_DEFERRED_REASON`]; anywhere else it fails, because that
/// phase only runs binaries named `vm_*`.
pub const VM_DEFER: &str = "defer";

/// The reason printed for VM trials deferred to `cargo xtask test`'s VM phase.
pub const VM_DEFERRED_REASON: &str = "runs in cargo xtask test's VM phase";

/// Entry point of every VM test binary.
///
/// `--guest <entry> [args...]` (only ever passed by [`vm::Vm::run_self`] inside the VM) runs the
/// named guest entry; anything else is libtest-mimic's command line (`cargo test -- filter`).
pub fn main(trials: Vec<Trial>, guest_entries: &[(&str, GuestFn)]) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--guest") {
        return run_guest_entry(&args[2..], guest_entries);
    }
    let parsed = libtest_mimic::Arguments::from_args();
    libtest_mimic::run(&parsed, trials).exit_code()
}

fn run_guest_entry(args: &[String], entries: &[(&str, GuestFn)]) -> ExitCode {
    let Some(name) = args.first() else {
        eprintln!("testbench: --guest needs an entry name");
        return ExitCode::from(2);
    };
    let Some((_, entry)) = entries.iter().find(|(n, _)| n == name) else {
        let known: Vec<&str> = entries.iter().map(|(n, _)| *n).collect();
        eprintln!("testbench: no guest entry `{name}` (known: {known:?})");
        return ExitCode::from(2);
    };
    match entry(&args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest entry `{name}` failed: {}", e.message().unwrap_or("(no message)"));
            ExitCode::FAILURE
        }
    }
}

/// A trial that needs the virtual device.
///
/// Without `TESTBENCH_VM=1` it is reported as ignored with [`VM_SKIP_REASON`]. With it, the trial
/// runs for real, and fails (never skips) when the kernel or virtme-ng are not installed.
pub fn vm_trial<F>(name: impl Into<String>, test: F) -> Trial
where
    F: FnOnce() -> Result<(), Failed> + Send + 'static,
{
    Trial::ignorable_test(name, move || {
        if vm_deferred() {
            let binary = vm::binary_name();
            if !binary.starts_with("vm_") {
                return Err(format!(
                    "VM trial in test binary `{binary}`: cargo xtask test's VM phase runs only \
                     binaries named vm_*, so this one would never run; rename the target"
                )
                .into());
            }
            return Ok(libtest_mimic::Completion::ignored_with(VM_DEFERRED_REASON));
        }
        if !vm_requested() {
            return Ok(libtest_mimic::Completion::ignored_with(VM_SKIP_REASON));
        }
        paths::Bench::locate()?;
        test().map(|()| libtest_mimic::Completion::Completed)
    })
}

/// Whether VM trials are left to a later phase (`TESTBENCH_VM=defer`).
pub fn vm_deferred() -> bool {
    std::env::var(VM_ENV).is_ok_and(|v| v == VM_DEFER)
}

/// Whether VM trials run for real (`TESTBENCH_VM=1`).
pub fn vm_requested() -> bool {
    std::env::var(VM_ENV).is_ok_and(|v| v == "1")
}

/// A binary built from this workspace (`cargo build --workspace --bins`), found in the target dir
/// of the running executable.
///
/// # Panics
/// When the binary has not been built; the message says how to build it.
pub fn cargo_bin(name: &str) -> PathBuf {
    let path = paths::profile_dir().join(name);
    assert!(
        path.is_file(),
        "workspace binary {} not found: run `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// A tool installed by `cargo xtask setup` under `<cache>/tools/bin` (e.g. `rsb_hub`).
///
/// # Panics
/// When the tool is not installed; the message says to run `cargo xtask setup`.
pub fn tool(name: &str) -> PathBuf {
    let path = paths::cache_dir().join("tools").join("bin").join(name);
    assert!(path.is_file(), "tool {} not found: run `cargo xtask setup`", path.display());
    path
}
