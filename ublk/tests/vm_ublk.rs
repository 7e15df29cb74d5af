//! The ublk front end in the virtual device (6.12 kernel), one boot: ublk_drv loads; every
//! thread of the server is an I/O flusher (`PR_SET_IO_FLUSHER`); a
//! pass-through server and then the engine carry ext4 through mkfs, writes, fsck and remount;
//! the server is SIGKILLed under a running writer and re-attached with `UBLK_F_USER_RECOVERY`
//! (the writer sees no error, fsck is clean, every file is as written); the engine in
//! CHECKPOINT is SIGKILLed twice under a running writer and resumed from its op journal
//! (the same checks); direct writes the engine holds (completed, not yet given to it) read back
//! after a kill, and a server broken to keep them in memory only (`--fault held-not-stored`,
//! feature `fault`) loses them, so the check is shown to catch it; the engine's log restores
//! the pre-checkpoint file system with `bow::restore`; and the throughput of 4 KiB direct
//! overwrites through the engine (backing up) against the pass-through.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockcopy::device::FileDevice;
use bow::restore::{restore, RestoreOptions, RestoreOutcome};
use testbench::vm::{scratch_image, Kernel, Vm};
use testbench::{cargo_bin, guest, vm_trial, Failed};

const MNT: &str = "/dev/shm/mnt-ublk";
/// The server binary, copied to tmpfs at boot: the host's target/ is shared with other
/// builds, and a binary rebuilt under a running guest crashed its loader once.
/// The server, on the binaries' image the guest mounts at /dev/shm/bin (testbench::binimage).
const SERVER: &str = "/dev/shm/bin/bow-ublk";
const UBLK: &str = "/dev/ublkb0";
/// Size of the measured overwrite, in 4 KiB direct writes.
const BENCH_BLOCKS: u32 = 2048;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("ublk_serves_ext4_survives_a_server_kill_and_restores", host_ublk)],
        &[("ublk", guest_ublk)],
    )
}

fn host_ublk() -> Result<(), Failed> {
    let disk = scratch_image(128 << 20)?;
    let run = Vm::new("ublk")
        .kernel(Kernel::Mainline612)
        .modules(&["ublk_drv"])
        .disk(&disk)
        .binaries([("bow-ublk".to_owned(), cargo_bin("bow-ublk"))])
        .timeout(Duration::from_secs(300))
        .run_self("ublk", &[])?;
    run.expect_success()?;
    for want in [
        "ublk-control present",
        "io flusher: all ",
        "passthrough: ext4 clean, files as written",
        "kill: writer saw no error, fsck clean, files as written",
        "engine: ext4 clean, files as written",
        "engine kill: writer saw no error, fsck clean, files as written",
        "held kill: ",
        "held kill, broken server (held-not-stored): ",
        "restore: pre-checkpoint files back, checkpoint files gone, fsck clean",
    ] {
        if !run.output.contains(want) {
            return Err(format!("guest output lacks {want:?}:\n{}", run.output).into());
        }
    }
    let shown = |l: &&str| {
        l.starts_with("bench:")
            || l.starts_with("engine")
            || l.starts_with("held kill")
            || l.starts_with("bow-ublk: device")
    };
    for line in run.output.lines().filter(shown) {
        println!("{line}");
    }
    println!("VM {:.0} s", run.duration.as_secs_f64());
    Ok(())
}

/// A running `bow-ublk serve`/`recover`, once it has printed that it serves.
type Server = testbench::guest::ReadyProcess;

fn start(args: &[&str]) -> Result<Server, Failed> {
    let (server, line) = Server::start(Path::new(SERVER), args, "serving /dev/ublkb0")?;
    print!("{line}");
    Ok(server)
}

fn ctl(command: &str) -> Result<String, Failed> {
    let out = Command::new(SERVER).args([command, "--id", "0"]).output()?;
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
    if !status.success() {
        return Err(format!("bow-ublk exited with {status} after stop").into());
    }
    // The device goes away with its server.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(UBLK).exists() {
        if Instant::now() > deadline {
            return Err(format!("{UBLK} still there 10 s after stop").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Files of random data in tmpfs (the reference copies), `count` of them, `kib` KiB each.
fn make_sources(prefix: &str, count: u32, kib: u32) -> Result<(), Failed> {
    guest::sh(&format!(
        "mkdir -p /dev/shm/src && for i in $(seq 1 {count}); do \
         head -c {}K /dev/urandom > /dev/shm/src/{prefix}$i; done",
        kib
    ))?;
    Ok(())
}

/// The SHA-256 of every file named `prefix*` in `dir`, as `name hash` lines, sorted.
fn hashes(dir: &str, prefix: &str) -> Result<String, Failed> {
    let out = guest::sh(&format!("cd {dir} && sha256sum {prefix}* | sort -k2"))?;
    Ok(out)
}

fn check_same(dir: &str, prefix: &str, what: &str) -> Result<(), Failed> {
    let want = hashes("/dev/shm/src", prefix)?;
    let got = hashes(dir, prefix)?;
    if want != got || want.is_empty() {
        return Err(format!(
            "{what}: files differ from what was written\nwant:\n{want}got:\n{got}"
        )
        .into());
    }
    Ok(())
}

fn fsck_clean(dev: &str) -> Result<(), Failed> {
    guest::sh(&format!("fsck.ext4 -fn {dev}"))
        .map(|_| ())
        .map_err(|e| format!("fsck: {e:?}").into())
}

fn mount(dev: &str) -> Result<(), Failed> {
    guest::sh(&format!("mkdir -p {MNT} && mount -t ext4 {dev} {MNT}"))?;
    Ok(())
}

fn umount() -> Result<(), Failed> {
    guest::sh(&format!("umount {MNT}"))?;
    Ok(())
}

/// Seconds to overwrite the first BENCH_BLOCKS blocks of `file` with 4 KiB direct writes.
fn overwrite_seconds(file: &str) -> Result<f64, Failed> {
    let t = Instant::now();
    guest::sh(&format!(
        "dd if=/dev/urandom of={file} bs=4k count={BENCH_BLOCKS} oflag=direct conv=notrunc,fsync 2>/dev/null"
    ))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to write a new file of BENCH_BLOCKS blocks with 4 KiB direct writes: the file
/// system allocates it from free space (for the engine: space the FITRIM recorded, no backup).
fn new_file_seconds(file: &str) -> Result<f64, Failed> {
    let t = Instant::now();
    guest::sh(&format!(
        "dd if=/dev/urandom of={file} bs=4k count={BENCH_BLOCKS} oflag=direct conv=fsync 2>/dev/null"
    ))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for BENCH_BLOCKS random 4 KiB direct writes at queue depth 16 (each block of the
/// second half of `file` once, then an fsync).
fn random_qd16_seconds(file: &str) -> Result<f64, Failed> {
    let t = Instant::now();
    guest::sh(&format!(
        "fio --name=qd16 --filename={file} --rw=randwrite --bs=4k --iodepth=16 \
         --ioengine=libaio --direct=1 --offset={}k --size={}k --end_fsync=1 --output=/dev/null",
        BENCH_BLOCKS * 4,
        BENCH_BLOCKS * 4
    ))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Every thread of the server is marked as serving I/O (`PR_SET_IO_FLUSHER`: its allocations
/// do no I/O, and dirty-page throttling waits only for the device it writes to), so it never
/// waits for the write-back of the device it serves.
fn check_io_flusher(server: &Server) -> Result<(), Failed> {
    use blockdev::process::{stat_flags, PF_LOCAL_THROTTLE, PF_MEMALLOC_NOIO};
    let mark = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE;
    let tasks = format!("/proc/{}/task", server.child.id());
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks)? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        let flags = stat_flags(&stat).ok_or_else(|| format!("unreadable stat {stat:?}"))?;
        if flags & mark != mark {
            return Err(format!(
                "a server thread is not an I/O flusher (flags {flags:#x}): {stat}"
            )
            .into());
        }
        threads += 1;
    }
    // The main thread, the control thread and a queue thread at least.
    if threads < 3 {
        return Err(format!("only {threads} server threads in {tasks}").into());
    }
    println!("io flusher: all {threads} server threads");
    Ok(())
}

fn io_errors_in_dmesg() -> Result<String, Failed> {
    let log = guest::sh("dmesg")?;
    Ok(log
        .lines()
        .filter(|l| {
            l.contains("I/O error") || l.contains("EXT4-fs error") || l.contains("Buffer I/O")
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

fn guest_ublk(_: &[String]) -> Result<(), Failed> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err("ublk_drv loaded but /dev/ublk-control is missing".into());
    }
    println!("ublk-control present ({})", guest::sh("uname -r")?.trim());
    testbench::binimage::mount()?;
    let disk = guest::disk(0);
    let disk = disk.to_str().ok_or("disk path")?.to_owned();
    let checked = ublk_checks(&disk);
    if checked.is_err() {
        clean_up_after_failure(&disk);
    }
    checked
}

/// After a failed check: the failing step's server was killed when it went out of scope,
/// leaving /dev/ublkb0 waiting for a new one with ext4 mounted on it, and the guest's
/// power-off would wait on that I/O until the VM's timeout. A recovered server (an engine
/// in TRIM state passes everything through, so it serves a pass-through's device too) lets
/// the unmount finish, and `stop` deletes the device. Best effort: the failure is reported
/// either way.
fn clean_up_after_failure(disk: &str) {
    // Kept alive until the device is gone.
    let _recovered = if Path::new(UBLK).exists() && ctl("status").is_err() {
        start(&["recover", "--id", "0", "--device", disk])
            .inspect_err(|e| eprintln!("clean-up: no server re-attached: {e:?}"))
            .ok()
    } else {
        None
    };
    let _ = guest::sh(&format!("umount {MNT}"));
    let _ = ctl("stop");
}

fn ublk_checks(disk: &str) -> Result<(), Failed> {
    let disk = disk.to_owned();

    // ---- pass-through: mkfs, files, fsck, remount ----
    let server = start(&["serve", "--device", &disk, "--passthrough", "--id", "0"])?;
    check_io_flusher(&server)?;
    guest::sh(&format!("mkfs.ext4 -q -F {UBLK}"))?;
    mount(UBLK)?;
    make_sources("a", 8, 512)?;
    guest::sh(&format!(
        "cp /dev/shm/src/a* {MNT}/ && head -c {}K /dev/zero > {MNT}/bench && sync",
        BENCH_BLOCKS * 8
    ))?;
    let passthrough_s = overwrite_seconds(&format!("{MNT}/bench"))?;
    let passthrough_qd16_s = random_qd16_seconds(&format!("{MNT}/bench"))?;
    // The same blocks again, and a new file: the baselines of the engine's rewrites and of its
    // writes into free space.
    let passthrough_rewrite_s = overwrite_seconds(&format!("{MNT}/bench"))?;
    let passthrough_fresh_s = new_file_seconds(&format!("{MNT}/fresh"))?;
    guest::sh(&format!("rm {MNT}/fresh && sync"))?;
    umount()?;
    fsck_clean(UBLK)?;
    mount(UBLK)?;
    check_same(MNT, "a", "passthrough")?;
    println!("passthrough: ext4 clean, files as written");

    // ---- SIGKILL under a running writer, then recovery ----
    make_sources("k", 24, 256)?;
    let mut writer = Command::new("/bin/sh")
        .args(["-c", &format!("for f in /dev/shm/src/k*; do cp $f {MNT}/ && sync || exit 1; done")])
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut server = server;
    server.child.kill()?;
    server.child.wait()?;
    let writer_done_early = writer.try_wait()?.is_some();
    // The kernel holds the requests while no server runs; the writer waits.
    std::thread::sleep(Duration::from_millis(500));
    let server = start(&["recover", "--id", "0", "--device", &disk, "--passthrough"])?;
    let status = writer.wait()?;
    if !status.success() {
        return Err(format!("the writer failed across the server kill: {status}").into());
    }
    umount()?;
    fsck_clean(UBLK)?;
    mount(UBLK)?;
    check_same(MNT, "k", "after the kill")?;
    check_same(MNT, "a", "after the kill")?;
    let errors = io_errors_in_dmesg()?;
    if !errors.is_empty() {
        return Err(format!("the kernel logged I/O errors:\n{errors}").into());
    }
    println!(
        "kill: writer saw no error, fsck clean, files as written (writer {} when the server died)",
        if writer_done_early { "had finished" } else { "was running" }
    );
    umount()?;
    stop(server)?;

    // ---- the engine: TRIM (FITRIM records free space) → CHECKPOINT ----
    // The engine with direct writes (not the default: the crash suite and the backend's
    // tests run the page-cache path), so kills, fsck, hashes and the restore check it too.
    let server = start(&["serve", "--device", &disk, "--id", "0", "--direct-writes"])?;
    mount(UBLK)?;
    guest::sh(&format!("fstrim {MNT}"))?;
    umount()?;
    println!("engine before the checkpoint: {}", ctl("status")?);
    println!("engine checkpoint: {}", ctl("checkpoint")?);
    mount(UBLK)?;
    let engine_s = overwrite_seconds(&format!("{MNT}/bench"))?;
    let engine_qd16_s = random_qd16_seconds(&format!("{MNT}/bench"))?;
    // Blocks this checkpoint already backed up: nothing to copy again.
    let engine_rewrite_s = overwrite_seconds(&format!("{MNT}/bench"))?;
    let engine_fresh_s = new_file_seconds(&format!("{MNT}/fresh"))?;
    // The user writes of batches that copied nothing (the rewrites, the new file: at least
    // twice BENCH_BLOCKS blocks) went to the raw device with O_DIRECT (src/direct.rs); the
    // checks below (hashes, fsck, kills, the restore) hold with them.
    let status = ctl("status")?;
    let direct = status
        .split_whitespace()
        .find_map(|field| field.strip_prefix("direct="))
        .and_then(|v| v.parse::<u64>().ok());
    if direct.is_none_or(|bytes| bytes < 2 * u64::from(BENCH_BLOCKS) * 4096) {
        return Err(format!("the engine wrote too little directly: {status}").into());
    }
    println!("engine after rewrites and a new file: {status}");
    make_sources("c", 8, 256)?;
    guest::sh(&format!("cp /dev/shm/src/c* {MNT}/ && cp /dev/shm/src/c1 {MNT}/a1.new && mv {MNT}/a1.new {MNT}/a2 && rm {MNT}/a3 && sync"))?;
    umount()?;
    fsck_clean(UBLK)?;
    mount(UBLK)?;
    check_same(MNT, "c", "engine")?;
    println!("engine: ext4 clean, files as written");

    // ---- the engine in CHECKPOINT SIGKILLed under a running writer, twice, and resumed ----
    make_sources("e", 24, 256)?;
    let mut writer = Command::new("/bin/sh")
        .args(["-c", &format!("for f in /dev/shm/src/e*; do cp $f {MNT}/ && sync || exit 1; done")])
        .spawn()?;
    let mut server = server;
    let mut kills = Vec::new();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        server.child.kill()?;
        server.child.wait()?;
        let running = writer.try_wait()?.is_none();
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        server = start(&["recover", "--id", "0", "--device", &disk, "--direct-writes"])?;
        kills.push(format!(
            "writer {}, recover {:.2} s",
            if running { "running" } else { "finished" },
            t.elapsed().as_secs_f64()
        ));
    }
    let status = writer.wait()?;
    if !status.success() {
        return Err(format!("the writer failed across the engine's kills: {status}").into());
    }
    let resumed = ctl("status")?;
    println!("engine after the kills: {resumed}");
    if !resumed.starts_with("state=1 ") {
        return Err(format!("the resumed engine is not in CHECKPOINT: {resumed}").into());
    }
    umount()?;
    fsck_clean(UBLK)?;
    mount(UBLK)?;
    for prefix in ["e", "c", "k"] {
        check_same(MNT, prefix, "after the engine's kills")?;
    }
    let errors = io_errors_in_dmesg()?;
    if !errors.is_empty() {
        return Err(format!("the kernel logged I/O errors:\n{errors}").into());
    }
    println!(
        "engine kill: writer saw no error, fsck clean, files as written ({})",
        kills.join("; ")
    );

    // ---- held writes (completed, not yet the engine's) across a kill ----
    // Direct first touches of a1 with no flush after them: the engine holds them. The server
    // killed, the next one must give them to the engine before it serves the reads. The same
    // with the server broken on purpose (held writes in memory only): the data must be lost,
    // or this check could not catch a server that forgets them. That second round writes a4,
    // untouched since the checkpoint: first touches again, held until a flush (rewrites of
    // a1's blocks, backed up by then, need no backup and are drained early, without a flush,
    // whenever the server runs out of requests: `Served::drain_early`).
    make_sources("h", 2, 256)?;
    // ext4 commits its journal every 5 s, and the commit's flush drains held writes: a commit
    // between a source's writes and the `pending` query emptied it (a CI run failed so, with
    // the writes slowed by a slow host). A 10-minute commit interval keeps the journal quiet
    // for the rest of the test (its unmounts still write everything out).
    guest::sh(&format!("mount -o remount,commit=600 {MNT}"))?;
    let mut server = server;
    for (src, fault, file) in [("h1", None, "a1"), ("h2", Some("held-not-stored"), "a4")] {
        if let Some(fault) = fault {
            server.child.kill()?;
            server.child.wait()?;
            server = start(&[
                "recover",
                "--id",
                "0",
                "--device",
                &disk,
                "--direct-writes",
                "--fault",
                fault,
            ])?;
        }
        guest::sh(&format!(
            "dd if=/dev/shm/src/{src} of={MNT}/{file} bs=4k conv=notrunc oflag=direct status=none"
        ))?;
        let pending = ctl("pending")?;
        let held: u64 = pending
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("pending_writes="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no pending_writes in {pending:?}"))?;
        if held == 0 {
            return Err(format!("the direct writes of {src} were not held: {pending}").into());
        }
        server.child.kill()?;
        server.child.wait()?;
        server = start(&["recover", "--id", "0", "--device", &disk, "--direct-writes"])?;
        guest::sh("echo 3 > /proc/sys/vm/drop_caches")?;
        let same =
            guest::sh(&format!("cmp -n 262144 /dev/shm/src/{src} {MNT}/{file} && echo same"))
                .is_ok_and(|out| out.contains("same"));
        match (fault, same) {
            (None, true) => println!(
                "held kill: {held} held writes completed before the kill read back after it"
            ),
            (None, false) => {
                return Err(format!("{held} held writes of {src} were lost across a kill").into())
            }
            (Some(fault), false) => {
                println!("held kill, broken server ({fault}): {held} held writes lost, caught")
            }
            (Some(fault), true) => {
                return Err(format!(
                    "the server broken with {fault} kept its held writes across a kill: the \
                     check cannot tell"
                )
                .into())
            }
        }
    }
    let errors = io_errors_in_dmesg()?;
    if !errors.is_empty() {
        return Err(format!("the kernel logged I/O errors:\n{errors}").into());
    }
    umount()?;
    let status = ctl("status")?;
    println!("engine after the checkpoint's writes: {status}");
    stop(server)?;
    println!(
        "bench: {BENCH_BLOCKS} x 4 KiB direct overwrites: pass-through {passthrough_s:.2} s, \
         engine in CHECKPOINT {engine_s:.2} s: engine/pass-through throughput {:.2}x",
        passthrough_s / engine_s
    );
    println!(
        "bench: {BENCH_BLOCKS} x 4 KiB random direct writes at queue depth 16 (first touch): \
         pass-through {passthrough_qd16_s:.2} s, engine in CHECKPOINT {engine_qd16_s:.2} s: \
         engine/pass-through throughput {:.2}x",
        passthrough_qd16_s / engine_qd16_s
    );
    println!(
        "bench: {BENCH_BLOCKS} x 4 KiB direct rewrites of blocks already backed up: pass-through \
         {passthrough_rewrite_s:.2} s, engine in CHECKPOINT {engine_rewrite_s:.2} s: \
         engine/pass-through throughput {:.2}x",
        passthrough_rewrite_s / engine_rewrite_s
    );
    println!(
        "bench: a new file of {BENCH_BLOCKS} x 4 KiB direct writes (free space): pass-through \
         {passthrough_fresh_s:.2} s, engine in CHECKPOINT {engine_fresh_s:.2} s: \
         engine/pass-through throughput {:.2}x",
        passthrough_fresh_s / engine_fresh_s
    );

    // ---- roll back from the engine's log with bow::restore ----
    let dev = FileDevice::open(Path::new(&disk))?;
    let report = restore(&dev, &RestoreOptions::default(), &mut |_| {})?;
    drop(dev);
    if matches!(report.outcome, RestoreOutcome::NoLog) {
        return Err("the engine left no log on the device".into());
    }
    println!("restore: {:?}", report.outcome);
    fsck_clean(&disk)?;
    mount(&disk)?;
    check_same(MNT, "a", "after the restore")?;
    check_same(MNT, "k", "after the restore")?;
    let left = guest::sh(&format!("ls {MNT}"))?;
    if left.lines().any(|l| l.starts_with('c') || l.starts_with('e') || l == "fresh") {
        return Err(
            format!("files written during the checkpoint survived the restore:\n{left}").into()
        );
    }
    umount()?;
    println!("restore: pre-checkpoint files back, checkpoint files gone, fsck clean");
    Ok(())
}
