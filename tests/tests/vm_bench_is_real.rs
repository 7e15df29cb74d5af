//! Proves the virtual device is real: device-mapper, loop and binder work in the guest, a write
//! survives a power cut only after fsync, and the harness reports what the guest did.
//! These tests fail (never skip) when a kernel feature is missing.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use testbench::vm::{GuestExit, Vm, VmError};
use testbench::{guest, vm_trial, Failed};

const MODULES: &[&str] = &["loop", "dm-mod", "binder_linux devices=binder,hwbinder"];
/// Offset of the synced block A and the unsynced block B on the power-cut disk.
const A_OFFSET: u64 = 0;
const B_OFFSET: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("device_mapper_loop_and_binder_work", host_kernel_features),
            vm_trial("power_cut_keeps_only_synced_writes", host_power_cut),
            vm_trial("harness_reports_status_output_and_module_failures", host_harness),
            vm_trial("harness_kills_a_hung_guest_at_the_timeout", host_timeout),
            vm_trial("harness_boots_again_when_the_guest_hangs_in_boot", host_boot_hang_retry),
        ],
        &[
            ("kernel_features", guest_kernel_features),
            ("write_then_cut", guest_write_then_cut),
            ("check_after_cut", guest_check_after_cut),
        ],
    )
}

fn pattern(byte: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| byte ^ u8::try_from(i % 251).unwrap_or(0)).collect()
}

// ---- device-mapper, loop, binder ----

fn host_kernel_features() -> Result<(), Failed> {
    let run = Vm::new("kernel_features").modules(MODULES).run_self("kernel_features", &[])?;
    run.expect_success()?;
    for want in ["dm driver version 4.", "binder opened", "dm-linear read back ok"] {
        if !run.output.contains(want) {
            return Err(format!("guest output lacks {want:?}:\n{}", run.output).into());
        }
    }
    Ok(())
}

fn guest_kernel_features(_: &[String]) -> Result<(), Failed> {
    // DM_VERSION through /dev/mapper/control.
    let version = guest::sh("dmsetup version")?;
    let driver = version
        .lines()
        .find_map(|l| l.strip_prefix("Driver version:"))
        .ok_or_else(|| format!("dmsetup version printed no driver version:\n{version}"))?;
    println!("dm driver version {}", driver.trim());

    let binder = OpenOptions::new().read(true).write(true).open("/dev/binder");
    binder.map_err(|e| format!("opening /dev/binder: {e}"))?;
    println!("binder opened");

    linear_over_loop()?;
    println!("dm-linear read back ok");
    Ok(())
}

fn linear_over_loop() -> Result<(), Failed> {
    let backing = Path::new("/dev/shm/linear-backing.img");
    let file =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(backing)?;
    file.set_len(16 << 20)?;
    // Data written into the file at 1 MiB must appear at the start of the dm device.
    let a = pattern(0xa5);
    file.write_all_at(&a, 1 << 20)?;
    file.sync_all()?;
    let loop_dev = guest::sh(&format!("losetup -f --show {}", backing.display()))?;
    let loop_dev = loop_dev.trim();
    let majmin =
        fs::read_to_string(format!("/sys/block/{}/dev", loop_dev.trim_start_matches("/dev/")))?;
    let table = format!("0 8192 linear {} 2048", majmin.trim());
    guest::sh(&format!("dmsetup create --noudevsync tb-linear --table '{table}'"))?;
    let minor = guest::sh("dmsetup info -c --noheadings -o minor tb-linear")?;
    let dm = format!("/dev/dm-{}", minor.trim());

    let mut got = vec![0u8; BLOCK];
    File::open(&dm)?.read_exact(&mut got)?;
    if got != a {
        return Err(format!("{dm} does not show what was written to the loop backing file").into());
    }
    // Data written through the dm device at sector 16 lands in the file at 1 MiB + 8 KiB.
    let b = pattern(0x3c);
    let mut dev = OpenOptions::new().write(true).open(&dm)?;
    dev.seek(SeekFrom::Start(16 * 512))?;
    dev.write_all(&b)?;
    dev.sync_all()?;
    drop(dev);
    let mut back = vec![0u8; BLOCK];
    file.read_exact_at(&mut back, (1 << 20) + 16 * 512)?;
    if back != b {
        return Err(format!("a write through {dm} did not reach the loop backing file").into());
    }
    guest::sh(&format!("dmsetup remove --noudevsync tb-linear && losetup -d {loop_dev}"))?;
    Ok(())
}

// ---- power cut ----

fn host_power_cut() -> Result<(), Failed> {
    let image = testbench::vm::scratch_image(8 << 20)?;

    let vm = Vm::new("power_cut").disk(&image).timeout(Duration::from_secs(240));
    let run = vm.run_self("write_then_cut", &[])?;
    run.expect_power_cut()?;
    if !run.output.contains("A synced, B written") {
        return Err(format!("guest did not reach the power cut:\n{}", run.output).into());
    }
    // QEMU must exit at the reset, not boot the guest again (the harness checks the command ran
    // once) and not hang until the timeout.
    if run.duration >= Duration::from_secs(200) {
        return Err(format!("power cut took {:?}: QEMU did not exit", run.duration).into());
    }

    // The host's copy of the image already holds exactly what was durable.
    let bytes = fs::read(&image)?;
    let at = |off: u64| {
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        bytes.get(off..off + BLOCK).map(<[u8]>::to_vec)
    };
    if at(A_OFFSET) != Some(pattern(b'A')) {
        return Err("the fsynced block A is not in the image after the power cut".into());
    }
    if at(B_OFFSET) != Some(vec![0; BLOCK]) {
        return Err("the unsynced block B reached the image despite the power cut".into());
    }

    // A second boot with the same image sees the same.
    let run = vm.run_self("check_after_cut", &[])?;
    run.expect_success()?;
    Ok(())
}

fn guest_write_then_cut(_: &[String]) -> Result<(), Failed> {
    let dev = guest::disk(0);
    let disk = OpenOptions::new().write(true).open(&dev)?;
    disk.write_all_at(&pattern(b'A'), A_OFFSET)?;
    disk.sync_all()?;
    disk.write_all_at(&pattern(b'B'), B_OFFSET)?;
    println!("A synced, B written to {}", dev.display());
    std::io::stdout().flush()?;
    // `disk` stays open: the last close of a block device would write B back.
    guest::power_cut()
}

fn guest_check_after_cut(_: &[String]) -> Result<(), Failed> {
    let disk = File::open(guest::disk(0))?;
    let mut buf = vec![0u8; BLOCK];
    disk.read_exact_at(&mut buf, A_OFFSET)?;
    if buf != pattern(b'A') {
        return Err("block A is missing after the power cut".into());
    }
    disk.read_exact_at(&mut buf, B_OFFSET)?;
    if buf != vec![0; BLOCK] {
        return Err("block B survived the power cut without fsync".into());
    }
    println!("A present, B absent");
    Ok(())
}

// ---- the harness itself ----

fn host_harness() -> Result<(), Failed> {
    let run = Vm::new("exit_status").env("TB_WORD", "it's here").run_shell(
        "echo \"out $TB_WORD\"; echo err >&2; test -w \"$TESTBENCH_SHARED\" && test \"$PWD\" = \
         \"$TESTBENCH_SHARED\" && echo cwd-ok; echo \"cache=$CHECKPOINTD_CACHE.\"; exit 7",
    )?;
    if run.exit != GuestExit::Exited(7) {
        return Err(format!("expected exit status 7, got {:?}", run.exit).into());
    }
    let cache = format!("cache={}.", testbench::paths::cache_dir().display());
    for want in ["out it's here", "err", "cwd-ok", &cache] {
        if !run.output.contains(want) {
            return Err(format!("output lacks {want:?}: {:?}", run.output).into());
        }
    }
    if run.expect_success().is_ok() {
        return Err("expect_success accepted exit status 7".into());
    }

    match Vm::new("missing_module").modules(&["loop", "no_such_module_tb"]).run_shell("true") {
        Err(VmError::ModuleLoad { message, console, .. }) => {
            if !message.contains("no_such_module_tb") || !console.is_file() {
                return Err(format!("module error lacks details: {message}").into());
            }
            Ok(())
        }
        other => Err(format!("a missing module was not reported: {other:?}").into()),
    }
}

fn host_boot_hang_retry() -> Result<(), Failed> {
    // A 1 s boot timeout makes every boot count as hung: the harness must boot 3 times, keep
    // each hung console, and then report a timeout.
    let run = Vm::new("boot_hang")
        .boot_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(120))
        .run_shell("true")?;
    if run.exit != GuestExit::TimedOut {
        return Err(format!("expected a timeout after 3 hung boots, got {:?}", run.exit).into());
    }
    let dir = run.console.parent().ok_or("console log has no folder")?;
    for k in 1..=2 {
        let kept = dir.join(format!("console.boot-hang-{k}.log"));
        if !kept.is_file() {
            return Err(format!("{} was not kept", kept.display()).into());
        }
    }
    if run.duration > Duration::from_secs(60) {
        return Err(format!("3 hung boots took {:?}", run.duration).into());
    }
    Ok(())
}

fn host_timeout() -> Result<(), Failed> {
    // The guest's watchdog reports (2 s into the program) before the host kills it (the boot
    // takes 10-20 s of the 45).
    let run = Vm::new("timeout")
        .timeout(Duration::from_secs(45))
        .watchdog_after(Duration::from_secs(2))
        .run_shell("sleep 600")?;
    if run.exit != GuestExit::TimedOut {
        return Err(format!("expected a timeout, got {:?}", run.exit).into());
    }
    if run.duration > Duration::from_secs(75) {
        return Err(format!("the timeout took {:?} to act", run.duration).into());
    }
    // Neither vng nor QEMU may survive: their command lines name the run's shared folder.
    let needle = run.shared_dir.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc")?.flatten() {
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            return Err(format!("process {:?} outlived the timeout", entry.file_name()).into());
        }
    }
    // The report names the hung program's thread, sleeping, and was shown with the timeout.
    let report = run.watchdog_report().ok_or("the guest's watchdog did not report")?;
    let sleeping = report.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 6 && f[2].starts_with('S') && f[5] == "sleep"
    });
    if !report.contains("five seconds later") || !report.contains("blocked tasks") || !sleeping {
        return Err(format!("the watchdog's report lacks the sleeping program:\n{report}").into());
    }
    let shown = run.expect_success().err().map(|e| e.to_string()).unwrap_or_default();
    if !shown.contains("the guest's watchdog report") {
        return Err(format!("the timeout's error does not show the report:\n{shown}").into());
    }
    Ok(())
}
