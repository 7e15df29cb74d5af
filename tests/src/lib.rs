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

use std::path::{Path, PathBuf};
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

/// Writes an executable script (mode 0755) that a test then runs, without ever holding it open
/// for writing in this process. Linux refuses to execute a file that any process has open for
/// writing (ETXTBSY), and a test harness runs tests on many threads: another test's fork,
/// between this thread's `open` and `close`, gives its child a copy of the write descriptor
/// until that child's `exec`, and the script's own `exec` then fails at random (seen in
/// `backends`' unit tests). So the bytes are written by a child process (`sh`, from its
/// standard input), whose descriptor no other fork of this process can inherit.
///
/// # Errors
/// When the child cannot be started or fails to write the file.
pub fn write_script(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", "cat > \"$1\" && chmod 0755 \"$1\"", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let written = child.stdin.take().map_or(Ok(()), |mut stdin| stdin.write_all(text.as_bytes()));
    let status = child.wait()?;
    written?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "writing the script {}: sh exited with {status}",
            path.display()
        )));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_script_runs_and_a_bad_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hello");
        write_script(&path, "#!/bin/sh\necho \"hello $1\"\n").unwrap();
        let out = std::process::Command::new(&path).arg("there").output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello there\n");
        let err = write_script(&dir.path().join("no-such-dir").join("x"), "#!/bin/sh\n");
        assert!(err.unwrap_err().to_string().contains("sh exited"));
    }
}
