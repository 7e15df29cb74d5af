//! The crash suite under the userspace engine (docs/crash-consistency.md, "The ublk engine";
//! issue 16): the real `bow-ublk` server on the 6.12 kernel, its raw device a **dm-log-writes**
//! device over a loop device, so the log holds exactly what the engine wrote and flushed: its
//! copies, block 0's log, the file system's writes it released, and their order.
//!
//! One boot, three captures of the same seeded workload: the correct engine, and the engine
//! broken on purpose (`bow-ublk serve --fault user-write-before-flush|log-before-data`, the
//! `bow-ublk/fault` feature). Each: the raw device filled with old (random) data, ext4 made on
//! /dev/ublkb0 (TRIM state passes it through), the demo's app data, `fstrim` (the engine
//! records the free space), unmount, a flush of the log device, the mark `ublk-checkpoint`,
//! `bow-ublk checkpoint`, the demo's update steps and fsx-like operations, a sync, the mark
//! `ublk-end`.
//!
//! On the host, every crash state of the window (every flush and FUA prefix, seeded subsets of
//! the writes after each flush) is restored with `bow::restore`, and every block ext4 had
//! allocated at the mark must come back bit for bit; a sample is also fsck'ed and has its
//! restore crashed and run again (`crash::ublk`). The correct engine must pass every state;
//! each broken one must fail some.

mod crash;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crash::capture::{
    dm_create, ensure, failures_dir, long_mode, loop_file, majmin, mark, mkfs_ext4, report,
    save_log, workload, LONG_ENV,
};
use crash::ublk::{run_ublk, UblkTally};
use crash::CaseSpec;
use testbench::device::{populate_app_data, Rng};
use testbench::vm::{Kernel, Vm};
use testbench::{cargo_bin, guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;
/// The engine's raw device (the bow capture's sizes: the workload fits with its backups; the
/// long run writes about three times as much).
fn ublk_bytes(long: bool) -> u64 {
    if long {
        96 * MIB
    } else {
        48 * MIB
    }
}
const UBLK: &str = "/dev/ublkb0";
/// The broken engines: `bow-ublk serve --fault <name>` (feature `bow-ublk/fault`).
const FAULTS: [&str; 2] = ["user-write-before-flush", "log-before-data"];
/// The floor of crash states of the correct engine in the default run.
const MIN_STATES: usize = 200;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("crash_states_of_the_ublk_engine_and_its_broken_orders", host_crash_ublk)],
        &[("capture", guest_capture)],
    )
}

fn tally_line(what: &str, u: &UblkTally, took: Duration) -> String {
    let t = &u.tally;
    format!(
        "crash suite {what}: {} crash states checked ({} restored a log, {} during the restore), \
         {} fsck runs, {} failing states, {:.1} s",
        t.states,
        u.restored,
        t.recovery_states,
        t.fsck_runs,
        u.failed_states,
        took.as_secs_f64()
    )
}

/// The engine's free bytes when the guest printed `label: ... free=N ...`.
fn engine_free(output: &str, label: &str) -> Result<u64, Failed> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(label))
        .flat_map(str::split_whitespace)
        .find_map(|w| w.strip_prefix("free="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("the guest did not print {label:?} with free=").into())
}

fn host_crash_ublk() -> Result<(), Failed> {
    let long = long_mode();
    let started = Instant::now();
    let run = Vm::new("crash_capture_ublk")
        .kernel(Kernel::Mainline612)
        .modules(&["loop", "dm-mod", "dm-log-writes", "ublk_drv"])
        .memory_mib(2048)
        .timeout(Duration::from_secs(if long { 1800 } else { 600 }))
        .env(LONG_ENV, if long { "1" } else { "0" })
        .run_self("capture", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    report(&format!(
        "crash suite ublk: capture boot (the engine and two broken engines) took {:.1} s",
        run.duration.as_secs_f64()
    ));

    let t0 = Instant::now();
    let dir = run.shared_dir.join("ublk-ext4");
    let spec = CaseSpec::load(&dir)?;
    let failures = failures_dir();
    let good = run_ublk(&dir, &spec, Some(&failures), false)?;
    report(&tally_line("ublk/ext4 (bow-ublk engine + restore)", &good, t0.elapsed()));
    for f in good.tally.failures.iter().take(20) {
        println!("FAILURE: {f}");
    }
    ensure(
        good.failed_states == 0,
        format!(
            "{} crash states of the engine failed (saved under {})",
            good.failed_states,
            failures.display()
        ),
    )?;
    ensure(
        good.tally.states >= MIN_STATES,
        format!("only {} crash states of the engine (want {MIN_STATES})", good.tally.states),
    )?;
    ensure(good.restored > 0, "no crash state held a log to restore")?;
    ensure(good.tally.recovery_states > 0, "no crash state during a restore was checked")?;
    ensure(good.tally.fsck_runs > 0, "no restored state was fsck'ed")?;
    // The blocks checked are ext4's allocated ones; the engine's own record of free space
    // (FITRIM) must not reach into them, so it is at most ext4's free space.
    let free = engine_free(&run.output, "ublk-ext4: engine at the mark:")?;
    println!(
        "engine free at the mark {free} bytes, ext4 free {} bytes",
        good.free_blocks as u64 * crash::BLOCK
    );
    ensure(
        free <= good.free_blocks as u64 * crash::BLOCK,
        format!(
            "the engine counts {free} bytes free, ext4 only {}",
            good.free_blocks as u64 * crash::BLOCK
        ),
    )?;

    // The broken engines: the same checks must find states that do not restore.
    for fault in FAULTS {
        let t = Instant::now();
        let dir = run.shared_dir.join(format!("ublk-ext4-{fault}"));
        let spec = CaseSpec::load(&dir)?;
        let broken = run_ublk(&dir, &spec, None, false)?;
        report(&tally_line(&format!("ublk/ext4 broken engine ({fault})"), &broken, t.elapsed()));
        println!("broken engine {fault}: first failure {:?}", broken.tally.failures.first());
        ensure(
            broken.failed_states > 0,
            format!(
                "the engine broken with {fault} passed all {} crash states",
                broken.tally.states
            ),
        )?;
    }
    report(&format!(
        "crash suite ublk: host-side checks {:.1} s, whole test {:.1} s",
        t0.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// guest

/// A running `bow-ublk serve`, once it has printed that it serves.
type Server = testbench::guest::ReadyProcess;

fn serve(device: &Path, fault: Option<&str>) -> Result<Server, Failed> {
    let mut args = vec!["serve", "--device", device.to_str().ok_or("device path")?, "--id", "0"];
    if let Some(f) = fault {
        args.extend(["--fault", f]);
    }
    let ready = format!("serving {UBLK}");
    match Server::start(&cargo_bin("bow-ublk"), &args, &ready) {
        Ok((server, _)) => Ok(server),
        Err(e) if fault.is_some() => Err(format!(
            "{} (the broken engines need bow-ublk built with the `bow-ublk/fault` feature: \
             cargo build --workspace --bins --features bow-ublk/ublk,bow-ublk/fault)",
            e.message().unwrap_or_default()
        )
        .into()),
        Err(e) => Err(e),
    }
}

fn ctl(command: &str) -> Result<String, Failed> {
    let out = Command::new(cargo_bin("bow-ublk")).args([command, "--id", "0"]).output()?;
    if !out.status.success() {
        return Err(
            format!("bow-ublk {command}: {}", String::from_utf8_lossy(&out.stderr).trim()).into()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn stop(mut server: Server) -> Result<(), Failed> {
    ctl("stop")?;
    let status = server.child.wait()?;
    ensure(status.success(), format!("bow-ublk exited with {status} after stop"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(UBLK).exists() {
        ensure(Instant::now() < deadline, format!("{UBLK} still there 10 s after stop"))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn guest_capture(_: &[String]) -> Result<(), Failed> {
    let long = long_mode();
    let shared = guest::shared_dir();
    let seed = 0x5eed_0016;
    capture(&shared, "ublk-ext4", seed, None, long)?;
    for fault in FAULTS {
        capture(&shared, &format!("ublk-ext4-{fault}"), seed, Some(fault), long)?;
    }
    Ok(())
}

/// Fills `dev` with seeded random bytes and flushes: old data everywhere, as on a used /data.
/// On a zeroed device a backup block whose copy never became durable still holds zeros, which
/// is exactly the old content of many blocks (an unused journal block), so a broken engine's
/// torn backup would often restore correctly by accident.
fn fill_with_old_data(dev: &Path, size: u64, seed: u64) -> Result<(), Failed> {
    use std::io::Write;
    let mut rng = Rng::new(seed ^ 0x01d);
    let mut f = std::fs::OpenOptions::new().write(true).open(dev)?;
    for _ in 0..size / MIB {
        f.write_all(&rng.bytes(usize::try_from(MIB)?))?;
    }
    f.sync_all()?;
    Ok(())
}

/// One capture: the engine (broken with `fault`, if any) over log-writes over a loop device.
fn capture(
    shared: &Path,
    name: &str,
    seed: u64,
    fault: Option<&str>,
    long: bool,
) -> Result<(), Failed> {
    let t = Instant::now();
    let ublk_bytes = ublk_bytes(long);
    let out = shared.join(name);
    std::fs::create_dir_all(&out)?;
    let (_raw_f, raw) = loop_file("cu-raw.img", ublk_bytes)?;
    let (_log_f, logd) = loop_file("cu-log.img", 768 * MIB)?;
    let dev = dm_create(
        "cu-log",
        &format!(
            "0 {} log-writes {} {}",
            ublk_bytes / 512,
            majmin(raw.path())?,
            majmin(logd.path())?
        ),
    )?;
    fill_with_old_data(&dev, ublk_bytes, seed)?;
    let server = serve(&dev, fault)?;
    mkfs_ext4(Path::new(UBLK))?;
    let mnt = Path::new("/dev/shm/cu-mnt");
    std::fs::create_dir_all(mnt)?;
    let mount = || guest::sh(&format!("mount -t ext4 {UBLK} {}", mnt.display()));
    mount()?;
    populate_app_data(mnt, seed)?;
    guest::sh("sync")?;
    // TRIM state: the engine records fstrim's discards as free space (nothing goes down).
    guest::sh(&format!("fstrim {}", mnt.display()))?;
    guest::sh(&format!("umount {}", mnt.display()))?;
    // dm-log-writes logs completed writes only at the next flush, a mark at once: a flush of
    // the log device puts everything before the mark, so the image there is checkpoint start.
    std::fs::File::open(&dev)?.sync_all()?;
    println!("{name}: engine at the mark: {}", ctl("status")?);
    mark("cu-log", "ublk-checkpoint")?;
    println!("{name}: checkpoint: {}", ctl("checkpoint")?);
    mount()?;
    workload(mnt, "cu-log", seed ^ 1, long, None)?;
    mark("cu-log", "ublk-end")?;
    println!("{name}: engine after the workload: {}", ctl("status")?);
    guest::sh(&format!("umount {}", mnt.display()))?;
    stop(server)?;
    guest::sh("dmsetup remove --noudevsync cu-log")?;
    save_log(Path::new("/dev/shm/cu-log.img"), &out.join("log.bin"))?;
    let case = CaseSpec {
        kind: "ublk".into(),
        log: "log.bin".into(),
        reference: None,
        kernel_merge_reference: None,
        meta_bytes: 0,
        instance: String::new(),
        device_bytes: ublk_bytes,
        windows: vec![("ublk-checkpoint".into(), "ublk-end".into(), "rollback".into())],
        subsets: if long { 12 } else { 3 },
        seed,
        only: None,
        recovery_every: if long { 5 } else { 20 },
        max_states: 0,
        store: None,
    };
    std::fs::write(out.join("case.json"), serde_json::to_string_pretty(&case)?)?;
    raw.detach()?;
    logd.detach()?;
    let _ = std::fs::remove_file("/dev/shm/cu-log.img");
    let _ = std::fs::remove_file("/dev/shm/cu-raw.img");
    println!("{name}: capture took {:?}", t.elapsed());
    Ok(())
}
