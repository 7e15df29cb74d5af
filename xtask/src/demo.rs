//! `cargo xtask demo`: boots the virtual device and shows, for real, what it offers.
//!
//! checkpointd's own features do not exist yet; this shows the kernel facilities they will use.

use std::fs::{self, OpenOptions};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use testbench::vm::Vm;

use crate::setup;

/// Host half: boot, run `xtask guest-demo` inside, print its report.
pub fn host() -> Result<ExitCode> {
    setup::ensure()?;
    let exe = std::env::current_exe()?;
    println!("demo: booting the virtual device (Debian kernel under QEMU TCG, ~10-20 s)...");
    let run = Vm::new("demo")
        .modules(crate::DEFAULT_MODULES)
        .stream_output(true)
        .run(&exe, &["guest-demo"])?;
    run.expect_success()?;
    println!(
        "demo: the guest checked all of the above in {:.1} s (console log: {}).",
        run.duration.as_secs_f64(),
        run.console.display()
    );
    println!(
        "demo: checkpointd's checkpoint features are not built yet; this shows the bench only."
    );
    Ok(ExitCode::SUCCESS)
}

/// Guest half: each line is something checked just now in the guest.
pub fn guest() -> Result<ExitCode> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!("kernel:        {} (uname -r)", release.trim());

    let version = sh("dmsetup version")?;
    let driver = version
        .lines()
        .find_map(|l| l.strip_prefix("Driver version:"))
        .context("dmsetup version printed no driver version")?;
    println!(
        "device-mapper: ioctl interface {} (DM_VERSION on /dev/mapper/control)",
        driver.trim()
    );
    let targets = sh("dmsetup targets")?;
    let names: Vec<&str> = targets.lines().filter_map(|l| l.split_whitespace().next()).collect();
    println!("               targets loaded now: {}", names.join(", "));

    OpenOptions::new().read(true).write(true).open("/dev/binder").context("opening /dev/binder")?;
    let dev = fs::read_to_string("/sys/class/misc/binder/dev").unwrap_or_default();
    println!("binder:        /dev/binder opened read-write (char device {})", dev.trim());

    let backing = "/dev/shm/demo-loop.img";
    fs::File::create(backing)?.set_len(64 << 20)?;
    let loop_dev = sh(&format!("losetup -f --show {backing}"))?;
    let loop_dev = loop_dev.trim();
    let name = loop_dev.trim_start_matches("/dev/");
    let sectors = fs::read_to_string(format!("/sys/block/{name}/size"))?;
    let sectors: u64 = sectors.trim().parse()?;
    println!("loop:          {loop_dev} over {backing}: {} MiB", sectors / 2048);

    let majmin = fs::read_to_string(format!("/sys/block/{name}/dev"))?;
    let table = format!("0 {sectors} linear {} 0", majmin.trim());
    sh(&format!("dmsetup create --noudevsync demo-linear --table '{table}'"))?;
    let info = sh("dmsetup table demo-linear")?;
    println!("dm-linear:     demo-linear over {loop_dev}: table `{}`", info.trim());
    sh(&format!("dmsetup remove --noudevsync demo-linear && losetup -d {loop_dev}"))?;
    fs::remove_file(backing)?;
    Ok(ExitCode::SUCCESS)
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("/bin/sh").args(["-c", cmd]).output()?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
