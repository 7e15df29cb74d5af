//! `cargo xtask demo`: the product story on the virtual device, with real data on /data.
//!
//! A device with a metadata disk and a /data disk (ext4 or f2fs) holding app data (a SQLite
//! database, hundreds of small files, a few large ones) boots under QEMU again and again: an
//! update asks for a checkpoint (the update-client library's example updater calls
//! `startCheckpoint(2)`) and switches the slot; the new slot boots
//! three times, changes /data and loses power each time (one boot also loses power in the middle
//! of its restore); the rollback boot restores /data before it is mounted (every file's SHA-256
//! back, fsck clean) and makes the old slot active; a second update commits, and nothing of the
//! checkpoint is left. The guest runs the real stack: rsb_hub on /dev/binder, checkpointd with
//! the chosen backend, `checkpointctl boot mount` and the vdc-compatible hooks.
//!
//! The story itself is `testbench::scenario`, the same code the end-to-end tests run; this
//! module adds the command line and the narration.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use testbench::device::{Fs, Profile, Transport};
use testbench::scenario::{self, Commit, Launcher};

use crate::setup;

/// `cargo xtask demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The backend: `snapshot` (dm-snapshot, any kernel), `f2fs` (f2fs checkpoint=disable),
    /// `userspace-bow` (the userspace backup-on-write engine behind ublk; boots the 6.12
    /// kernel), `auto` (dm-bow where the kernel has it, else snapshot) or `bow` (needs a dm-bow
    /// module).
    #[arg(long, default_value = "snapshot")]
    backend: String,
    /// The file system on /data: `ext4` or `f2fs` (default: f2fs for the f2fs backend, else
    /// ext4).
    #[arg(long)]
    fs: Option<String>,
    /// An out-of-tree kernel module for the guest kernel (e.g. a dm-bow build), loaded before
    /// every boot; repeatable.
    #[arg(long = "module")]
    modules: Vec<PathBuf>,
    /// Seed of the workload and the power-cut moments (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
}

/// Host half: build, then boot the story.
pub fn host(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let fs = match args.fs.as_deref() {
        None if args.backend == "f2fs" => Fs::F2fs,
        None | Some("ext4") => Fs::Ext4,
        Some("f2fs") => Fs::F2fs,
        Some(other) => bail!("--fs {other}: expected ext4 or f2fs"),
    };
    ensure!(
        ["snapshot", "f2fs", "userspace-bow", "auto", "bow"].contains(&args.backend.as_str()),
        "--backend {}: expected snapshot, f2fs, userspace-bow, auto or bow",
        args.backend
    );
    ensure!(
        args.backend != "f2fs" || fs == Fs::F2fs,
        "--backend f2fs needs --fs f2fs (it is f2fs's own checkpoint=disable)"
    );
    crate::set_extra_modules(&args.modules)?;
    setup::ensure()?;
    let mut profile = Profile::new(&args.backend, fs);
    build_binaries(profile.needs_bow_ublk())?;
    if let Some(seed) = args.seed {
        std::env::set_var("CPD_SCENARIO_SEED", seed.to_string());
    }
    profile.transport = Transport::Binder;
    banner(&profile, &args.modules);
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let launcher = Launcher::Program(exe, vec!["guest-demo".to_owned()]);
    scenario::chain("demo", &profile, Commit::Clean, &launcher, true)
        .map_err(|e| anyhow::anyhow!("{}", e.message().unwrap_or("the demo failed")))?;
    println!(
        "\ndemo: all checks passed with the `{}` backend on {}; wall time {:.0} s (each boot is \
         a run of the virtual device under QEMU TCG).",
        profile.backend,
        fs.as_str(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn banner(profile: &Profile, modules: &[PathBuf]) {
    println!(
        "\ncheckpointd demo: userdata checkpoint and rollback for A/B updates.\n\
         Real here: a Debian kernel under QEMU with device-mapper and binder; /data is a {fs} \
         disk with app data (a SQLite database, hundreds of small files, large media), \
         checkpointed by the `{backend}` backend; rsb_hub on /dev/binder, checkpointd, \
         `checkpointctl boot mount` as the boot flow and the vdc-compatible init hooks; the \
         state store and the boot record on a metadata disk; power cuts are resets of the \
         virtual machine with nothing synced.\n\
         The update client is the example updater of the update-client library \
         (client/examples/updater.rs: startCheckpoint, the rollback seen at boot, waiting for the \
         commit). Played by the demo: the bootloader (slot choice on the file boot record) and \
         the slot switch{modules}.",
        fs = profile.fs.as_str(),
        backend = profile.backend,
        modules = if modules.is_empty() {
            String::new()
        } else {
            format!("; out-of-tree modules loaded at every boot: {modules:?}")
        },
    );
}

fn build_binaries(bow_ublk: bool) -> Result<()> {
    // The example updater is the demo's update client.
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        "checkpointd",
        "-p",
        "checkpointctl",
        "-p",
        "checkpoint-client",
        "--bins",
        "--examples",
    ];
    if bow_ublk {
        // The userspace engine's server (libublk: its cargo feature).
        args.extend(["-p", "bow-ublk", "--features", "bow-ublk/ublk"]);
    }
    println!("demo: cargo {}", args.join(" "));
    let status = Command::new(crate::cargo())
        .args(args)
        .current_dir(testbench::paths::workspace_root())
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build of the demo's binaries failed");
    Ok(())
}

/// Guest half: one boot of the device, the step named by the host.
pub fn guest() -> Result<ExitCode> {
    scenario::guest_step()
        .map_err(|e| anyhow::anyhow!("{}", e.message().unwrap_or("guest step failed")))?;
    Ok(ExitCode::SUCCESS)
}
