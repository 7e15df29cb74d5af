//! The userspace-bow backend on the virtual device's 6.12 kernel, one boot, one ext4 disk:
//!
//! 1. Faults before the mount, each refused with a clear error, with /data not mounted, no
//!    device-mapper or ublk device left, no server process left, and the raw device's bytes
//!    unchanged (hashed before and after):
//!    * no ublk module (`ublk_drv` not loaded, an empty module folder bound over the kernel's
//!      so that `modprobe` fails): refused; `auto` chooses snapshot and says why; `auto`'s
//!      stack, when its setup fails anyway, falls back to snapshot, records it, and the daemon's
//!      backend reports that reason;
//!    * the server binary missing: refused; `auto` chooses snapshot;
//!    * a server that never says it serves: killed after `start_timeout_ms`, refused;
//! 2. the real `bow-ublk`: setup (and again: the same stack found), mount, prepare (twice),
//!    changes, abort; the next "boot" (unmount, teardown, restore of the engine's log) has the
//!    files of checkpoint start back and the checkpoint's gone;
//! 3. the server SIGKILLed while /data is mounted on it: the daemon's prepare finds it dead
//!    and re-attaches one with `bow-ublk recover`; SIGKILLed again in CHECKPOINT: `space()`
//!    resumes it (the engine's journal) with the same used bytes; then commit: the engine commits, the dm-linear table is switched to the raw partition, the
//!    server stops: /data stays mounted and writable, no ublk device is left, a second commit
//!    changes nothing; after unmount, nothing to restore, `e2fsck -fn` clean, every file kept.
//!
//! A second trial cuts the power in the commit after the engine's commit and the table switch
//! (a file already written through the new table), before the server is stopped: the next boot
//! restores nothing, every file synced before the cut is there, `e2fsck -fn` is clean, no
//! device-mapper or ublk device is left.
//!
//! A third does both on **f2fs** (192 MiB, so that the free space the prepare exposes to the
//! engine is enough), in two boots: the first runs step 2 (abort, then the next "boot"'s restore:
//! every file of checkpoint start back bit-exact, nothing left to restore, `fsck.f2fs
//! --dry-run` clean), arms a new checkpoint on the same disk and is cut as the second trial's;
//! the second boot checks as the second trial's, with `fsck.f2fs`.
//!
//! The guest needs `bow-ublk` built with `--features bow-ublk/ublk`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backends::records::Records;
use backends::select::{self, AutoOptions, Chosen};
use backends::snapshot::{SnapshotOptions, SnapshotStack};
use backends::userspace_bow::{
    TraceStore, UserspaceBowBackend, UserspaceBowOptions, UserspaceBowStack, UBLK_CONTROL,
};
use backends::{Action, BootStack, DeviceSpec};
use bow::restore::RestoreOptions;
use policy::{Backend, BackendError, BackendState, RestoreOutcome, RestoreRequest};
use testbench::device::Fs;
use testbench::vm::{scratch_image, Kernel, Vm};
use testbench::{cargo_bin, guest, vm_trial, Failed};

const MNT: &str = "/dev/shm/data";
const META: &str = "/dev/shm/meta";
/// The server, on the binaries' image the guest mounts at /dev/shm/bin (testbench::binimage).
const SERVER: &str = "/dev/shm/bin/bow-ublk";

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("userspace_bow_early_faults_abort_and_commit_table_switch", host),
            vm_trial("userspace_bow_power_cut_between_table_switch_and_stop", || {
                host_cut(Fs::Ext4, "cut-after-switch")
            }),
            vm_trial(
                "userspace_bow_on_f2fs_abort_then_power_cut_between_table_switch_and_stop",
                || host_cut(Fs::F2fs, "abort-then-cut"),
            ),
        ],
        &[
            ("ubow", guest_main),
            ("cut-after-switch", guest_cut),
            ("abort-then-cut", guest_abort_then_cut),
            ("after-cut", guest_after_cut),
        ],
    )
}

fn host() -> Result<(), Failed> {
    let disk = scratch_image(128 << 20)?;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&disk)
        .output()?;
    if !out.status.success() {
        return Err(format!("mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let run = Vm::new("userspace_bow")
        .kernel(Kernel::Mainline612)
        .modules(&["loop", "dm-mod", "dm-snapshot"])
        .memory_mib(1024)
        .disk(&disk)
        .binaries([("bow-ublk".to_owned(), cargo_bin("bow-ublk"))])
        .timeout(Duration::from_secs(400))
        .run_self("ubow", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    println!("VM {:.0} s", run.duration.as_secs_f64());
    Ok(())
}

/// Two boots on one disk with `fs`: the first (guest entry `first`) ends in the commit cut by a
/// power cut after the engine's commit and the table switch, before the server is stopped (a
/// write already went through the new table); the next boot has nothing to restore and every
/// file of both sides of the switch.
fn host_cut(fs: Fs, first: &str) -> Result<(), Failed> {
    // f2fs leaves the engine only the free space its prepare exposes (whole free sections):
    // 12 MiB of a 128 MiB /data (docs/userspace-bow.md); 192 MiB leaves room to spare.
    let disk = scratch_image(match fs {
        Fs::Ext4 => 128 << 20,
        Fs::F2fs => 192 << 20,
    })?;
    fs.mkfs_host(&disk)?;
    let modules: &[&str] = match fs {
        Fs::Ext4 => &["loop", "dm-mod"],
        Fs::F2fs => &["loop", "dm-mod", "f2fs"],
    };
    let vm = |name: &str| {
        Vm::new(name)
            .kernel(Kernel::Mainline612)
            .modules(modules)
            .memory_mib(1024)
            .disk(&disk)
            .binaries([("bow-ublk".to_owned(), cargo_bin("bow-ublk"))])
            .timeout(Duration::from_secs(300))
    };
    let suffix = match fs {
        Fs::Ext4 => "",
        Fs::F2fs => "_f2fs",
    };
    let first = vm(&format!("userspace_bow_cut{suffix}")).run_self(first, &[fs.as_str()])?;
    print!("{}", first.output);
    first.expect_power_cut()?;
    // What the first boot synced, read by the second from the host's tree (the guest's root).
    let hashes = first.shared_dir.join("hashes");
    let second = vm(&format!("userspace_bow_after_cut{suffix}"))
        .env("UBOW_HASHES", hashes.to_string_lossy())
        .run_self("after-cut", &[fs.as_str()])?;
    print!("{}", second.output);
    second.expect_success()?;
    println!("VMs {:.0} s + {:.0} s", first.duration.as_secs_f64(), second.duration.as_secs_f64());
    Ok(())
}

/// The file system a guest entry of [`host_cut`] was given.
fn fs_arg(args: &[String]) -> Result<Fs, Failed> {
    let arg = args.first().map(String::as_str).unwrap_or_default();
    [Fs::Ext4, Fs::F2fs]
        .into_iter()
        .find(|fs| fs.as_str() == arg)
        .ok_or_else(|| format!("expected ext4 or f2fs as the guest's argument, got {arg:?}").into())
}

fn guest_cut(args: &[String]) -> Result<(), Failed> {
    let fs = fs_arg(args)?;
    let raw = guest::disk(0);
    std::fs::create_dir_all(MNT)?;
    std::fs::create_dir_all(META)?;
    let records = Records::open(Path::new(META))?;
    testbench::binimage::mount()?;
    cut_after_switch(fs, &raw, records)
}

/// f2fs's first boot: step 2 (abort, the next "boot"'s restore), then a new checkpoint on the
/// same disk whose commit the power cuts.
fn guest_abort_then_cut(args: &[String]) -> Result<(), Failed> {
    let fs = fs_arg(args)?;
    let raw = guest::disk(0);
    let spec = spec(&raw, fs);
    std::fs::create_dir_all(MNT)?;
    std::fs::create_dir_all(META)?;
    let records = Records::open(Path::new(META))?;
    testbench::binimage::mount()?;
    println!("kernel {}, /data {}", guest::sh("uname -r")?.trim(), fs.as_str());
    write_old_files(fs, &raw)?;
    abort_and_restore(fs, &UserspaceBowStack::new(options(SERVER, 20_000)), &spec, &records, &raw)?;
    // f2fs discards its free space when it unmounts the armed checkpoint: the engine must take
    // that without spending backup space (it once emptied the pool, refusing with ENOSPC).
    let dmesg = guest::sh("dmesg")?;
    ensure(
        !dmesg.contains("critical space allocation error"),
        "no request refused for want of backup space",
    )?;
    cut_after_switch(fs, &raw, records)
}

/// A checkpoint armed on `raw` (with `fs`), files changed, then the commit's first two steps by
/// hand and a file written through the new table; the power goes before the server stops.
/// The files' hashes, all synced, go to the shared folder's `hashes` for the next boot.
fn cut_after_switch(fs: Fs, raw: &Path, records: Records) -> Result<(), Failed> {
    let spec = spec(raw, fs);
    guest::sh(&format!(
        "mount -t {} {} {MNT} && head -c 1M /dev/urandom > {MNT}/old && sync && umount {MNT}",
        fs.as_str(),
        raw.display()
    ))?;
    let opts = options(SERVER, 20_000);
    let stack = UserspaceBowStack::new(opts.clone());
    let plan = stack.setup(&spec, true)?;
    backends::mount(&plan, Path::new(MNT))?;
    let backend =
        UserspaceBowBackend::new(spec.clone(), opts.clone(), RestoreOptions::default(), records)?;
    ensure(backend.prepare()? == Action::Changed, "prepare")?;
    guest::sh(&format!(
        "head -c 1M /dev/urandom | dd of={MNT}/old conv=notrunc 2>/dev/null \
         && head -c 1M /dev/urandom > {MNT}/before-switch && sync -f {MNT}"
    ))?;
    // The commit's first two steps by hand: the engine's commit, the table switch.
    let id = opts.id_for(&spec);
    bow_ublk::control::send(id, bow_ublk::control::Command::Commit)
        .map_err(|e| format!("engine commit: {e}"))?;
    let sectors = guest::sh(&format!("blockdev --getsz /dev/ublkb{id}"))?;
    let raw_dev = guest::sh(&format!("stat -L -c '%t %T' {}", raw.display()))?;
    let mut it = raw_dev.split_whitespace().map(|h| u32::from_str_radix(h, 16).unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    guest::sh(&format!(
        "dmsetup suspend cpd-data-base && dmsetup reload cpd-data-base --table \
         '0 {} linear {major}:{minor} 0' && dmsetup resume cpd-data-base",
        sectors.trim()
    ))?;
    guest::sh(&format!("head -c 1M /dev/urandom > {MNT}/after-switch && sync -f {MNT}"))?;
    let hashes = files_hashes()?;
    std::fs::write(guest::shared_dir().join("hashes"), &hashes)?;
    // The server still runs and its device exists: the power goes now.
    ensure(Path::new(&format!("/sys/block/ublkb{id}")).exists(), "switched, not stopped")?;
    guest::power_cut()
}

fn guest_after_cut(args: &[String]) -> Result<(), Failed> {
    let fs = fs_arg(args)?;
    let raw = guest::disk(0);
    std::fs::create_dir_all(MNT)?;
    std::fs::create_dir_all(META)?;
    let backend = UserspaceBowBackend::new(
        spec(&raw, fs),
        options(SERVER, 20_000),
        RestoreOptions::default(),
        Records::open(Path::new(META))?,
    )?;
    let report = backend.restore(&raw.to_string_lossy(), &RestoreRequest::default(), &|_, _| {})?;
    ensure(
        report.outcome == RestoreOutcome::NothingToRestore,
        format!("nothing to restore after the cut ({:?})", report.outcome),
    )?;
    guest::sh(&format!("mount -t {} {} {MNT}", fs.as_str(), raw.display()))?;
    let want = std::fs::read_to_string(std::env::var("UBOW_HASHES")?)?;
    let got = files_hashes()?;
    ensure(
        got.contains("before-switch") && got.contains("after-switch"),
        "the files written before and after the switch are there",
    )?;
    ensure(!want.is_empty() && got == want, "every file as synced before the cut")?;
    guest::sh(&format!("umount {MNT}"))?;
    fsck_clean(fs, &raw)?;
    let left = leftovers()?;
    ensure(left.is_empty(), format!("no dm/ublk device or server left {left:?}"))
}

/// `fs`'s read-only check of the unmounted `device` passes (testbench's `Fs::fsck`: `e2fsck
/// -fn`, or `fsck.f2fs --dry-run` with its report read, both superblocks valid and its checks
/// run: with the engine's log still in block 0, fsck.f2fs would fall back to the second
/// superblock and pass).
fn fsck_clean(fs: Fs, device: &Path) -> Result<(), Failed> {
    let report = fs.fsck(device)?;
    let detail = match fs {
        Fs::Ext4 => report.lines().last().unwrap_or_default().trim().to_owned(),
        Fs::F2fs => format!(
            "both superblocks valid, {} checks [Ok..], none failed",
            report.lines().filter(|l| l.contains("[Ok..]")).count()
        ),
    };
    ensure(true, format!("{} clean: {detail}", fs.as_str()))
}

fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        println!("  ok: {}", msg.into());
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

fn spec(raw: &Path, fs: Fs) -> DeviceSpec {
    DeviceSpec {
        raw: raw.to_owned(),
        mount_point: PathBuf::from(MNT),
        fs_type: Some(fs.as_str().into()),
        mount_options: String::new(),
        instance: "data".into(),
    }
}

fn options(server: &str, timeout_ms: u64) -> UserspaceBowOptions {
    UserspaceBowOptions {
        server: Some(PathBuf::from(server)),
        start_timeout_ms: timeout_ms,
        run_dir: PathBuf::from("/dev/shm/run"),
        ..UserspaceBowOptions::default()
    }
}

fn raw_hash(raw: &Path) -> Result<String, Failed> {
    Ok(guest::sh(&format!("sha256sum {} | cut -d' ' -f1", raw.display()))?.trim().to_owned())
}

fn mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(MNT)))
}

/// Device-mapper and ublk devices, and bow-ublk processes, present now.
fn leftovers() -> Result<Vec<String>, Failed> {
    let mut out = Vec::new();
    let dm = guest::sh("dmsetup ls 2>&1")?;
    out.extend(
        dm.lines()
            .filter(|l| !l.contains("No devices found") && !l.trim().is_empty())
            .map(|l| format!("dm: {}", l.trim())),
    );
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("ublkb") {
            out.push(format!("ublk: {name}"));
        }
    }
    // Servers (the real one, and the stand-in that execs `sleep 120`), from /proc.
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("bow-ublk") || cmdline.starts_with("sleep 120") {
            out.push(format!("process {}: {}", path.display(), cmdline.trim()));
        }
    }
    Ok(out)
}

/// After a refused setup: not mounted, nothing left, the raw device's bytes as they were.
fn nothing_touched(raw: &Path, hash: &str, what: &str) -> Result<(), Failed> {
    ensure(!mounted(), format!("{what}: /data not mounted"))?;
    let left = leftovers()?;
    ensure(left.is_empty(), format!("{what}: no dm/ublk device or server left {left:?}"))?;
    ensure(raw_hash(raw)? == hash, format!("{what}: the raw device's bytes unchanged"))
}

fn refused(
    result: Result<backends::MountPlan, BackendError>,
    want: &str,
) -> Result<String, Failed> {
    match result {
        Ok(plan) => Err(format!("setup succeeded ({plan:?}), expected a refusal ({want})").into()),
        Err(e @ BackendError::Unsupported { .. }) if e.to_string().contains(want) => {
            println!("  refused: {e}");
            Ok(e.to_string())
        }
        Err(e) => Err(format!("setup failed otherwise than expected ({want}): {e}").into()),
    }
}

fn files_hashes() -> Result<String, Failed> {
    guest::sh(&format!("cd {MNT} && find . -name lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum"))
}

fn guest_main(_: &[String]) -> Result<(), Failed> {
    let raw = guest::disk(0);
    let spec = spec(&raw, Fs::Ext4);
    std::fs::create_dir_all(MNT)?;
    std::fs::create_dir_all(META)?;
    let records = Records::open(Path::new(META))?;
    testbench::binimage::mount()?;
    println!("kernel {}", guest::sh("uname -r")?.trim());

    write_old_files(Fs::Ext4, &raw)?;
    let hash = raw_hash(&raw)?;

    // ---- 1a. no ublk module ----
    ensure(!Path::new(UBLK_CONTROL).exists(), "ublk_drv not loaded yet")?;
    let release = guest::sh("uname -r")?.trim().to_owned();
    guest::sh(&format!(
        "mkdir -p /dev/shm/empty && mount --bind /dev/shm/empty /lib/modules/{release}"
    ))?;
    let stack = UserspaceBowStack::new(options(SERVER, 10_000));
    refused(stack.setup(&spec, true), "modprobe")?;
    nothing_touched(&raw, &hash, "no ublk module")?;
    let auto = AutoOptions { userspace_bow: options(SERVER, 10_000), ..AutoOptions::default() };
    let (chosen, why) = select::choose(&auto);
    ensure(
        matches!(chosen, Chosen::Snapshot(_)) && why.contains("userspace-bow cannot run"),
        format!("auto without ublk: {why}"),
    )?;
    // auto chose userspace-bow (the probe passed earlier, say) but its setup fails: snapshot.
    let fallback = UserspaceBowStack::new(options(SERVER, 10_000))
        .with_fallback(SnapshotStack::new(SnapshotOptions::default()), records.clone());
    let plan = fallback.setup(&spec, true)?;
    ensure(
        plan.note.as_deref().is_some_and(|n| n.contains("using snapshot")),
        format!("the boot flow is told why: {:?}", plan.note),
    )?;
    ensure(
        plan.device.to_string_lossy().contains("cpd-data-base"),
        format!("fallback stack {plan:?}"),
    )?;
    let daemon_view = UserspaceBowBackend::new(
        spec.clone(),
        options(SERVER, 10_000),
        RestoreOptions::default(),
        records.clone(),
    )?
    .with_fallback(SnapshotOptions::default())?;
    let reason = daemon_view.selection_reason().to_owned();
    ensure(
        reason.contains("could not be set up") && reason.contains("using snapshot"),
        format!("the daemon sees the boot's fallback: {reason}"),
    )?;
    ensure(
        fallback.setup(&spec, true)?.action == Action::Identity,
        "the fallback rerun finds its stack",
    )?;
    let _ = fallback.teardown_stack(&spec)?;
    std::fs::remove_file(records.path("userspace_bow_fallback", "data"))?;
    nothing_touched(&raw, &hash, "auto's fallback, torn down")?;
    guest::sh(&format!("umount /lib/modules/{release}"))?;

    // ---- 1b. the server binary missing ----
    let stack = UserspaceBowStack::new(options("/dev/shm/no-such-bow-ublk", 10_000));
    refused(stack.setup(&spec, true), "does not exist")?;
    nothing_touched(&raw, &hash, "no server binary")?;
    let auto = AutoOptions {
        userspace_bow: options("/dev/shm/no-such-bow-ublk", 10_000),
        ..AutoOptions::default()
    };
    let (chosen, why) = select::choose(&auto);
    ensure(
        matches!(chosen, Chosen::Snapshot(_)) && why.contains("does not exist"),
        format!("auto without the server: {why}"),
    )?;

    // ---- 1c. a server that never comes up (ublk_drv is loaded by this setup) ----
    std::fs::write("/dev/shm/fake-server", "#!/bin/sh\necho starting >&2\nexec sleep 120\n")?;
    guest::sh("chmod 755 /dev/shm/fake-server")?;
    let stack = UserspaceBowStack::new(options("/dev/shm/fake-server", 1500));
    let started = Instant::now();
    refused(stack.setup(&spec, true), "did not report serving within 1500 ms")?;
    ensure(
        started.elapsed() < Duration::from_secs(30),
        format!("refused after {:?}", started.elapsed()),
    )?;
    ensure(Path::new(UBLK_CONTROL).exists(), "the setup loaded ublk_drv")?;
    nothing_touched(&raw, &hash, "server not up in time")?;
    let auto = AutoOptions { userspace_bow: options(SERVER, 10_000), ..AutoOptions::default() };
    let (chosen, why) = select::choose(&auto);
    ensure(matches!(chosen, Chosen::UserspaceBow(..)), format!("auto with ublk: {why}"))?;
    // auto's choice, but the server does not come up: this boot falls back to snapshot.
    let fallback = UserspaceBowStack::new(options("/dev/shm/fake-server", 1500))
        .with_fallback(SnapshotStack::new(SnapshotOptions::default()), records.clone());
    let plan = fallback.setup(&spec, true)?;
    ensure(
        plan.note.as_deref().is_some_and(|n| n.contains("did not report serving")),
        format!("auto falls back when the server is late: {:?}", plan.note),
    )?;
    let _ = fallback.teardown_stack(&spec)?;
    std::fs::remove_file(records.path("userspace_bow_fallback", "data"))?;
    nothing_touched(&raw, &hash, "auto's fallback after a late server, torn down")?;

    // ---- 2. the real server: setup, prepare, changes, abort, rollback ----
    let stack = UserspaceBowStack::new(options(SERVER, 20_000));
    let backend = || real_backend(&spec, &records);
    abort_and_restore(Fs::Ext4, &stack, &spec, &records, &raw)?;

    // ---- 3. commit: the table switch ----
    checkpointed_session(&stack, &spec, &backend()?, true)?;
    let b = backend()?;
    // In CHECKPOINT too: the monitor's space() finds the server dead and resumes the engine.
    let used = b.space()?.used_bytes;
    let pids = server_pids("")?;
    ensure(pids.len() == 1, format!("one server {pids:?}"))?;
    guest::sh(&format!(
        "kill -9 {p} && while kill -0 {p} 2>/dev/null; do sleep 0.05; done",
        p = pids[0]
    ))?;
    let resumed = b.space()?;
    ensure(
        resumed.used_bytes == used && server_pids("recover")?.len() == 1,
        format!(
            "space() after a SIGKILL in CHECKPOINT: recovered, used {:?} as before",
            resumed.used_bytes
        ),
    )?;
    // Its private mount namespace dropped the copy of /data (on the linear device over ublk).
    let theirs =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", server_pids("recover")?[0]))?;
    ensure(
        !theirs.lines().any(|l| l.split(' ').nth(4) == Some(MNT)),
        "the recovered server's namespace holds no copy of /data",
    )?;
    guest::sh(&format!("head -c 1M /dev/urandom > {MNT}/after-recover && sync -f {MNT}"))?;
    std::fs::remove_file(TraceStore::new(records.clone(), &spec).path())?;
    ensure(b.commit()? == Action::Changed, "commit")?;
    ensure(mounted(), "/data still mounted after the commit")?;
    // The whole checkpoint's writes, the ones before the SIGKILL rebuilt from the journal.
    kept_trace(&spec, &records, &raw, 4 << 20, "after commit")?;
    let ublk: Vec<String> = leftovers()?.into_iter().filter(|l| !l.starts_with("dm:")).collect();
    ensure(ublk.is_empty(), format!("no ublk device and no server after the commit {ublk:?}"))?;
    let deps = guest::sh("dmsetup deps -o devname cpd-data-base")?;
    let raw_name = raw.file_name().unwrap_or_default().to_string_lossy().into_owned();
    ensure(
        deps.contains(&format!("({raw_name})")),
        format!("the linear device maps {raw_name}: {}", deps.trim()),
    )?;
    guest::sh(&format!("head -c 1M /dev/urandom > {MNT}/after-commit && sync -f {MNT}"))?;
    ensure(true, "/data writable on the raw partition")?;
    ensure(b.commit()? == Action::Identity, "a second commit changes nothing")?;
    ensure(b.status()?.state == BackendState::Idle, "status after commit: idle")?;
    let kept = files_hashes()?;
    next_boot(&stack, &spec, &b, &raw)?;
    let report = b.restore(&raw.to_string_lossy(), &RestoreRequest::default(), &|_, _| {})?;
    ensure(
        report.outcome == RestoreOutcome::NothingToRestore,
        format!("nothing to restore after commit ({:?})", report.outcome),
    )?;
    guest::sh(&format!("e2fsck -fn {} >/dev/null", raw.display()))?;
    ensure(true, "e2fsck -fn clean")?;
    guest::sh(&format!("mount -t ext4 {} {MNT}", raw.display()))?;
    ensure(files_hashes()? == kept, "every file kept after the commit")?;
    guest::sh(&format!("umount {MNT}"))?;
    let left = leftovers()?;
    ensure(left.is_empty(), format!("nothing left at the end {left:?}"))?;
    Ok(())
}

/// Files from before any checkpoint: `old1`..`old6`, 512 KiB each, on the raw device.
fn write_old_files(fs: Fs, raw: &Path) -> Result<(), Failed> {
    guest::sh(&format!(
        "mount -t {} {} {MNT} && for i in 1 2 3 4 5 6; do head -c 512K /dev/urandom > {MNT}/old$i; done \
         && sync && umount {MNT}",
        fs.as_str(),
        raw.display()
    ))?;
    Ok(())
}

/// The backend over the real server at `SERVER`, as the daemon builds it.
fn real_backend(spec: &DeviceSpec, records: &Records) -> Result<UserspaceBowBackend, Failed> {
    Ok(UserspaceBowBackend::new(
        spec.clone(),
        options(SERVER, 20_000),
        RestoreOptions::default(),
        records.clone(),
    )?)
}

/// Step 2: the real server's stack set up and mounted, the checkpoint armed, files changed,
/// abort (its write trace kept); then the next "boot": unmount, teardown, restore of the
/// engine's log. Every file of checkpoint start is back bit-exact, the checkpoint is gone (a
/// second restore finds nothing), `fs`'s check is clean. Ends with /data unmounted.
fn abort_and_restore(
    fs: Fs,
    stack: &UserspaceBowStack,
    spec: &DeviceSpec,
    records: &Records,
    raw: &Path,
) -> Result<(), Failed> {
    let backend = || real_backend(spec, records);
    let before = checkpointed_session(stack, spec, &backend()?, false)?;
    println!("  abort: {:?}", backend()?.abort()?);
    // The failed attempt's writes (1 MiB rewritten, 2 MiB new, in 4 KiB blocks) kept as a trace.
    kept_trace(spec, records, raw, 3 << 20, "after abort")?;
    next_boot(stack, spec, &backend()?, raw)?;
    let restore = || {
        backend()?
            .restore(&raw.to_string_lossy(), &RestoreRequest::default(), &|_, _| {})
            .map_err(Failed::from)
    };
    match restore()?.outcome {
        RestoreOutcome::Restored { entries } => {
            ensure(entries > 0, format!("restored {entries} log entries"))?
        }
        other => return Err(format!("restore after abort: {other:?}").into()),
    }
    let again = restore()?.outcome;
    ensure(
        again == RestoreOutcome::NothingToRestore,
        format!("the checkpoint is gone: a second restore finds {again:?}"),
    )?;
    fsck_clean(fs, raw)?;
    guest::sh(&format!("mount -t {} {} {MNT}", fs.as_str(), raw.display()))?;
    ensure(
        files_hashes()? == before,
        "after abort and restore: every file as at checkpoint start",
    )?;
    guest::sh(&format!("umount {MNT}"))?;
    Ok(())
}

/// setup (twice), mount, prepare (twice), changes through the engine; returns the files'
/// hashes at checkpoint start.
fn checkpointed_session(
    stack: &UserspaceBowStack,
    spec: &DeviceSpec,
    backend: &UserspaceBowBackend,
    kill_server: bool,
) -> Result<String, Failed> {
    let t = Instant::now();
    let plan = stack.setup(spec, true)?;
    ensure(
        plan.action == Action::Changed,
        format!("setup: {} in {:?}", plan.device.display(), t.elapsed()),
    )?;
    ensure(stack.setup(spec, true)?.action == Action::Identity, "a second setup finds the stack")?;
    backends::mount(&plan, Path::new(MNT))?;
    let before = files_hashes()?;
    if kill_server {
        // The daemon finds the server dead (the device holds its I/O) and re-attaches one.
        let serving = server_pids("serve")?;
        ensure(serving.len() == 1, format!("one server {serving:?}"))?;
        guest::sh(&format!(
            "kill -9 {} && while kill -0 {} 2>/dev/null; do sleep 0.05; done",
            serving[0], serving[0]
        ))?;
        let ublk = guest::sh("ls /sys/block | grep '^ublkb' || true")?;
        ensure(
            server_pids("")?.is_empty() && !ublk.trim().is_empty(),
            format!("the server was SIGKILLed, its device {} stays", ublk.trim()),
        )?;
        ensure(backend.prepare()? == Action::Changed, "prepare, after re-attaching a server")?;
        let recovered = server_pids("recover")?;
        ensure(recovered.len() == 1, format!("the daemon ran `bow-ublk recover` {recovered:?}"))?;
    } else {
        ensure(backend.prepare()? == Action::Changed, "prepare")?;
    }
    ensure(backend.prepare()? == Action::Identity, "a second prepare changes nothing")?;
    let armed = backend.status()?;
    ensure(
        armed.state == BackendState::Armed,
        format!("armed, {:?} bytes free", armed.free_bytes),
    )?;
    guest::sh(&format!(
        "head -c 1M /dev/urandom | dd of={MNT}/old1 conv=notrunc 2>/dev/null && rm {MNT}/old2 \
         && head -c 2M /dev/urandom > {MNT}/new1 && sync -f {MNT}"
    ))?;
    let space = backend.space()?;
    ensure(
        space.used_bytes.unwrap_or(0) > 0 && space.free_bytes.unwrap_or(0) > 0,
        format!(
            "exact space from the engine: used {:?}, free {:?}",
            space.used_bytes, space.free_bytes
        ),
    )?;
    Ok(before)
}

/// The write trace the backend kept: the estimator's format, this device's size, at least
/// `min_written` bytes of writes; `checkpointctl estimate` reads it as it is.
fn kept_trace(
    spec: &DeviceSpec,
    records: &Records,
    raw: &Path,
    min_written: u64,
    when: &str,
) -> Result<(), Failed> {
    let path = TraceStore::new(records.clone(), spec).path();
    let bytes = std::fs::read(&path).map_err(|e| format!("{when}: {}: {e}", path.display()))?;
    let trace = checkpoint_estimate::Trace::read_from(bytes.as_slice())
        .map_err(|e| format!("{when}: {} does not parse: {e}", path.display()))?;
    let size = guest::sh(&format!("blockdev --getsize64 {}", raw.display()))?;
    trace.check_device(size.trim().parse().map_err(|e| format!("device size {size:?}: {e}"))?)?;
    ensure(
        trace.written_bytes() >= min_written,
        format!(
            "{when}: trace kept in {} ({} bytes, {} records, {} bytes written)",
            path.display(),
            bytes.len(),
            trace.records().len(),
            trace.written_bytes()
        ),
    )
}

/// The pids of bow-ublk processes whose command line has `word` (any with "").
fn server_pids(word: &str) -> Result<Vec<String>, Failed> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("bow-ublk") && cmdline.contains(word) {
            out.push(path.file_name().unwrap_or_default().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// A clean shutdown's part: unmount, the stack torn down (server stopped, devices removed).
fn next_boot(
    stack: &UserspaceBowStack,
    spec: &DeviceSpec,
    _backend: &UserspaceBowBackend,
    _raw: &Path,
) -> Result<(), Failed> {
    guest::sh(&format!("umount {MNT}"))?;
    ensure(stack.teardown_stack(spec)? == Action::Changed, "teardown removed the stack")?;
    let left = leftovers()?;
    ensure(left.is_empty(), format!("teardown leaves nothing {left:?}"))
}
