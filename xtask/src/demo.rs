//! `cargo xtask demo`: what checkpointd does today, on the virtual device, in seven boots.
//!
//! The guest runs the real binder stack (rsb_hub with the shipped policy file, checkpointd,
//! checkpointctl over /dev/binder); the state store and the file boot-control record live on an
//! ext4 virtio disk that survives the reboots (each boot is a separate VM run with the same
//! disk). The demo's own boot script plays the bootloader (`FileBootControl::bootloader_select`)
//! and the update client's slot switch (`setActiveBootSlot`), as a boot HAL would.
//!
//! What is NOT real yet, and said so on screen: checkpointd has no data backend (dm-bow,
//! dm-snapshot, f2fs: ROADMAP item 1), so the daemon runs the `test-null` backend, which
//! protects nothing; and this kernel has no dm-bow target, so the backup-on-write log of /data
//! is produced on the host by the project's engine model (`bow::model`, the kernel's algorithm)
//! over a real ext4 image. The restore of that log runs for real, in the guest, through the
//! daemon over binder.
//!
//! Every value printed is read back at that moment; any unexpected answer fails the demo.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bow::device::{BlockDevice, FileDevice};
use bow::model::{BowEngine, BowModel, BowState, ModelConfig};
use bow::units::{BlockSize, Sectors};
use policy::{BootControl, FileBootControl};
use testbench::guest;
use testbench::vm::{GuestExit, GuestRun, Vm};

use crate::setup;

/// Environment variables the host passes to the guest half.
const STEP_ENV: &str = "CHECKPOINTD_DEMO_STEP";
const DIR_ENV: &str = "CHECKPOINTD_DEMO_DIR";
const MODULES: &[&str] = &["binder_linux devices=binder,hwbinder"];
/// Where the guest mounts the metadata disk and the data disk (the host root is read-only).
const META_MOUNT: &str = "/dev/shm/demo-metadata";
const DATA_MOUNT: &str = "/dev/shm/demo-data";
const BLOCK: u64 = 4096;
/// checkpointctl copied to tmpfs at each boot: exec from the 9p host root costs ~2 s under TCG.
const CTL: &str = "/dev/shm/checkpointctl";
/// The retry count of both updates: 2 = three boot attempts, then rollback.
const RETRY: &str = "2";

// ================================ host half ================================

/// Host half: build, prepare the disks, boot seven times, check every boot.
pub fn host() -> Result<ExitCode> {
    let started = Instant::now();
    setup::ensure()?;
    build_binaries()?;
    let dir = testbench::paths::target_dir().join("demo-images");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let meta = make_metadata_disk(&dir)?;
    banner_intro();

    title("1. An update client asks for a checkpoint (boot 1)");
    boot("update", &[&meta], &dir)?.expect_success()?;

    title("2. The new slot fails to boot, three times (boots 2-4)");
    for n in 1..=3 {
        let run = boot(&format!("failed-boot-{n}"), &[&meta], &dir)?;
        run.expect_power_cut()?;
        println!("host: boot {} ended by a power cut; nothing was committed", n + 1);
    }

    title("3. The rollback boot restores /data exactly (boot 5)");
    println!(
        "host: on a device with dm-bow, the writes of the failed boots to /data would be in \
         dm-bow's log on the raw /data device. This kernel has no dm-bow (and the daemon's \
         test-null backend logs nothing), so the host builds that log with the engine model:"
    );
    let data = DataDisk::build(&dir)?;
    boot("rollback", &[&meta, &data.raw], &dir)?.expect_success()?;
    data.compare_after_restore()?;

    title("4. Back on the old slot; a second update that commits (boots 6-7)");
    boot("old-slot", &[&meta], &dir)?.expect_success()?;
    boot("second-update", &[&meta], &dir)?.expect_success()?;

    println!(
        "\ndemo: all checks passed; wall time {:.0} s (seven boots of the virtual device under \
         QEMU TCG).",
        started.elapsed().as_secs_f64()
    );
    println!(
        "demo: still to build (ROADMAP item 1): the dm-bow / dm-snapshot / f2fs backends. Today \
         the daemon's backend is `test-null` (protects no data) and the dm-bow log above came \
         from the engine model, not from a kernel."
    );
    Ok(ExitCode::SUCCESS)
}

fn banner_intro() {
    println!(
        "\ncheckpointd demo: userdata checkpoint and rollback for A/B updates.\n\
         Real here: the Debian kernel under QEMU, /dev/binder with rsb_hub as service manager, \
         checkpointd and checkpointctl (vdc grammar), the SQLite state store and the file \
         boot-control record on an ext4 virtio disk that survives every reboot, the dm-bow \
         log restore.\n\
         Not real yet: the daemon's data backend is `test-null` (it protects NO data: the real \
         backends are ROADMAP item 1), and this kernel has no dm-bow, so the dm-bow log of step \
         3 is produced on the host by the project's engine model. The demo's boot script plays \
         the bootloader and the update client's slot switch on the file boot-control record."
    );
}

fn title(text: &str) {
    println!("\n==== {text}");
}

fn build_binaries() -> Result<()> {
    println!("demo: cargo build -p checkpointd -p checkpointctl");
    let status = Command::new(crate::cargo())
        .args(["build", "--quiet", "-p", "checkpointd", "-p", "checkpointctl"])
        .current_dir(testbench::paths::workspace_root())
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build -p checkpointd -p checkpointctl failed");
    Ok(())
}

/// A 64 MiB ext4 image for the metadata partition (state store + boot-control record).
fn make_metadata_disk(dir: &Path) -> Result<PathBuf> {
    let image = dir.join("metadata.img");
    fs::File::create(&image)?.set_len(64 << 20)?;
    run_host(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "metadata"]).arg(&image))?;
    println!("demo: metadata disk {} (ext4, 64 MiB)", image.display());
    Ok(image)
}

/// Boots the virtual device with `disks` and runs the guest half's step `step`.
fn boot(step: &str, disks: &[&Path], dir: &Path) -> Result<GuestRun> {
    let mut vm = Vm::new(format!("demo-{step}"))
        .modules(MODULES)
        .timeout(Duration::from_secs(240))
        .stream_output(true)
        .env(STEP_ENV, step)
        .env(DIR_ENV, dir.to_string_lossy());
    for disk in disks {
        vm = vm.disk(disk);
    }
    let exe = std::env::current_exe()?;
    let run = vm.run(&exe, &["guest-demo"])?;
    println!("host: boot `{step}` took {:.1} s", run.duration.as_secs_f64());
    if !matches!(run.exit, GuestExit::Exited(0) | GuestExit::PowerCut) {
        println!("host: console log {}", run.console.display());
    }
    Ok(run)
}

fn run_host(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The /data image of step 3: the original, the new system's version, and the raw device
/// (the original with the new system's writes applied through the dm-bow engine model).
struct DataDisk {
    original: PathBuf,
    raw: PathBuf,
    free: Vec<(u64, u64)>,
}

impl DataDisk {
    fn build(dir: &Path) -> Result<DataDisk> {
        let files = dir.join("data-files");
        write_user_files(&files)?;
        let original = dir.join("data-original.img");
        fs::File::create(&original)?.set_len(32 << 20)?;
        run_host(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-L", "userdata", "-d"])
                .arg(&files)
                .arg(&original),
        )?;
        let manifest = run_host(
            Command::new("sh")
                .current_dir(&files)
                .args(["-c", "find . -type f | sort | xargs sha256sum"]),
        )?;
        fs::write(dir.join("original.sha256"), &manifest)?;
        println!(
            "host: /data before the update: ext4 image {} (mkfs.ext4 -d), files:",
            original.display()
        );
        print_indented(&manifest);

        let updated = dir.join("data-updated.img");
        fs::copy(&original, &updated)?;
        new_system_changes(dir, &updated)?;
        let changed = changed_blocks(&original, &updated)?;
        ensure!(changed.first() == Some(&0), "the update did not change block 0 (superblock)");
        println!(
            "host: the new system changes {} of {} blocks (block 0 = the superblock among them): \
             settings.db rewritten in place, notes.txt deleted, migrated.db created",
            changed.len(),
            fs::metadata(&original)?.len() / BLOCK
        );

        let raw = dir.join("data-raw.img");
        fs::copy(&original, &raw)?;
        let free = free_blocks(&original)?;
        run_model(&raw, &updated, &free, &changed)?;
        let inspect = run_host(
            Command::new(testbench::cargo_bin("checkpointctl")).args(["log", "inspect"]).arg(&raw),
        )?;
        println!("host: $ checkpointctl log inspect {}", raw.display());
        print_indented(&head(&inspect, 8));
        Ok(DataDisk { original, raw, free })
    }

    /// After the guest restored the raw image: every block in use by the original file system
    /// must hold the original bytes again.
    fn compare_after_restore(&self) -> Result<()> {
        let a = fs::File::open(&self.original)?;
        let b = fs::File::open(&self.raw)?;
        let blocks = a.metadata()?.len() / BLOCK;
        let mut used = 0u64;
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        for block in 0..blocks {
            if self.free.iter().any(|&(start, len)| block >= start && block < start + len) {
                continue;
            }
            a.read_exact_at(&mut x, block * BLOCK)?;
            b.read_exact_at(&mut y, block * BLOCK)?;
            ensure!(x == y, "block {block} (in use before the update) differs after the restore");
            used += 1;
        }
        println!(
            "host: after the restore, all {used} blocks the original file system used are \
             byte-identical to the original image (the other {} were free)",
            blocks - used
        );
        Ok(())
    }
}

/// Deterministic pseudo-random bytes (xorshift), so the demo's files are the same every run.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn write_user_files(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir.join("DCIM"))?;
    fs::create_dir_all(dir.join("app"))?;
    fs::write(dir.join("DCIM/holiday.jpg"), pseudo_random(300 << 10, 1))?;
    fs::write(dir.join("app/settings.db"), pseudo_random(64 << 10, 2))?;
    fs::write(dir.join("app/cache.bin"), pseudo_random(1 << 20, 3))?;
    fs::write(dir.join("notes.txt"), "buy milk\ncall the garage\n")?;
    Ok(())
}

/// What the new system does to /data, with real ext4 tools on the image: rewrite a file in
/// place (its data blocks), delete one, create one (debugfs updates bitmaps, inodes,
/// directories, group descriptors and the superblock).
fn new_system_changes(dir: &Path, image: &Path) -> Result<()> {
    let blocks =
        run_host(Command::new("debugfs").args(["-R", "blocks /app/settings.db"]).arg(image))?;
    let file = fs::OpenOptions::new().write(true).open(image)?;
    let new_content = pseudo_random(64 << 10, 4);
    for (i, block) in blocks.split_whitespace().enumerate() {
        let block: u64 = block.parse().with_context(|| format!("debugfs blocks: {blocks}"))?;
        let start = i * 4096;
        file.write_all_at(&new_content[start..start + 4096], block * BLOCK)?;
    }
    file.sync_all()?;
    let migrated = dir.join("migrated.db");
    fs::write(&migrated, pseudo_random(512 << 10, 5))?;
    let cmds = dir.join("debugfs.cmds");
    fs::write(
        &cmds,
        format!("rm /notes.txt\ncd /app\nwrite {} migrated.db\n", migrated.display()),
    )?;
    run_host(Command::new("debugfs").args(["-w", "-f"]).arg(&cmds).arg(image))?;
    Ok(())
}

/// Blocks whose contents differ between two images of the same size.
fn changed_blocks(a: &Path, b: &Path) -> Result<Vec<u64>> {
    let (a, b) = (fs::read(a)?, fs::read(b)?);
    ensure!(a.len() == b.len(), "images differ in size");
    Ok((0u64..)
        .zip(a.chunks(4096).zip(b.chunks(4096)))
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect())
}

/// Free block ranges `(start, count)` of an ext4 image (dumpe2fs's "Free blocks:" lines).
fn free_blocks(image: &Path) -> Result<Vec<(u64, u64)>> {
    let text = run_host(Command::new("dumpe2fs").arg(image).stderr(Stdio::null()))?;
    parse_free_blocks(&text)
}

fn parse_free_blocks(dumpe2fs: &str) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for line in dumpe2fs.lines() {
        let Some(list) = line.trim().strip_prefix("Free blocks:") else { continue };
        for range in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
            ensure!(b >= a, "bad free range {range}");
            out.push((a, b - a + 1));
        }
    }
    Ok(out)
}

/// dm-bow, modelled: TRIM the free blocks, enter CHECKPOINT, apply the new system's writes.
fn run_model(raw: &Path, updated: &Path, free: &[(u64, u64)], changed: &[u64]) -> Result<()> {
    let mut model = BowModel::new(FileDevice::open(raw)?, ModelConfig::new(BlockSize::B4096));
    let mut trimmed = 0;
    for &(start, count) in free {
        model.discard(Sectors(start * 8), count * BLOCK)?;
        trimmed += count;
    }
    model.set_state(BowState::Checkpoint)?;
    let new = fs::File::open(updated)?;
    let mut buf = vec![0u8; 4096];
    for &block in changed {
        new.read_exact_at(&mut buf, block * BLOCK)?;
        model.write(Sectors(block * 8), &buf)?;
    }
    model.flush()?;
    // The new system must read its own data back through dm-bow (block 0 is redirected).
    for &block in changed {
        let mut seen = vec![0u8; 4096];
        model.read(Sectors(block * 8), &mut seen)?;
        new.read_exact_at(&mut buf, block * BLOCK)?;
        ensure!(seen == buf, "the model returned other data for block {block}");
    }
    let device = model.into_device();
    device.flush()?;
    println!(
        "host: dm-bow engine model (bow::model; this kernel has no dm-bow) over {}: {trimmed} \
         free blocks trimmed (dumpe2fs), state 1 (CHECKPOINT), the {} changed blocks written; \
         the new system reads its data back through the model",
        raw.display(),
        changed.len()
    );
    Ok(())
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn head(text: &str, lines: usize) -> String {
    let mut out: Vec<&str> = text.lines().take(lines).collect();
    let total = text.lines().count();
    if total > lines {
        out.push("...");
    }
    out.join("\n")
}

// ================================ guest half ================================

/// Guest half: one boot of the device, the step named by the host.
pub fn guest() -> Result<ExitCode> {
    let step = std::env::var(STEP_ENV)
        .context("CHECKPOINTD_DEMO_STEP not set (run `cargo xtask demo`)")?;
    let device = Device::power_on()?;
    match step.as_str() {
        "update" => device.update()?,
        s if s.starts_with("failed-boot-") => {
            device.failed_boot(s["failed-boot-".len()..].parse()?)?
        }
        "rollback" => device.rollback()?,
        "old-slot" => device.old_slot()?,
        "second-update" => device.second_update()?,
        other => bail!("unknown demo step {other}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// One powered-on device: the metadata disk mounted, the bootloader step done, rsb_hub and
/// checkpointd running.
struct Device {
    bootctl: FileBootControl,
    slot: u32,
    hub: Child,
    daemon: Child,
}

impl Device {
    fn power_on() -> Result<Device> {
        sh(&format!(
            "mkdir -p {META_MOUNT} && mount -t ext4 {} {META_MOUNT}",
            guest::disk(0).display()
        ))?;
        let meta = Path::new(META_MOUNT).join("checkpointd");
        fs::create_dir_all(&meta)?;
        let bootctl = FileBootControl::open_or_create(&meta.join("bootctl"), 2)?;
        let slot = bootctl.bootloader_select()?;
        println!(
            "bootloader (the demo's boot script): boots slot {}; {}",
            suffix(slot),
            record_line(&bootctl)?
        );
        fs::copy(testbench::cargo_bin("checkpointctl"), CTL)?;
        let config = Path::new("/dev/shm/checkpointd.toml");
        fs::write(config, daemon_config(&meta))?;
        let hub = start_hub()?;
        let daemon = Command::new(testbench::cargo_bin("checkpointd"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(log_file("checkpointd.log")?)
            .stderr(log_file("checkpointd.log")?)
            .spawn()?;
        let device = Device { bootctl, slot, hub, daemon };
        let (code, err) = ctl_raw(&["--timeout", "30", "checkpoint", "supportsCheckpoint"])?;
        ensure!(
            code == 1,
            "checkpointd not reachable over binder (exit {code}: {err}):\n{}",
            daemon_log()
        );
        println!(
            "rsb_hub + checkpointd up on /dev/binder (metadata on {} ext4)",
            guest::disk(0).display()
        );
        Ok(device)
    }

    fn update(self) -> Result<()> {
        print_virtual_device()?;
        println!("update client, before writing the new slot:");
        ctl(&["checkpoint", "supportsCheckpoint"], 1)?;
        println!("update client writes slot _b (not done here: no system image), then:");
        ctl(&["checkpoint", "startCheckpoint", RETRY], 0)?;
        let status = self.status()?;
        check(status["state"] == "pending", "state pending after startCheckpoint")?;
        check(status["attempts_left"] == 3, "3 boot attempts after startCheckpoint(2)")?;
        self.bootctl.set_active_boot_slot(1)?;
        println!("update client: setActiveBootSlot(_b); {}", record_line(&self.bootctl)?);
        self.shutdown()
    }

    fn failed_boot(self, n: u32) -> Result<()> {
        check(self.slot == 1, "the bootloader boots the new slot _b")?;
        println!("init hooks of failed boot {n} of _b:");
        ctl(&["checkpoint", "needsCheckpoint"], 1)?;
        ctl(&["checkpoint", "markBootAttempt"], 0)?;
        ctl(&["checkpoint", "prepareCheckpoint"], 0)?;
        let status = self.status_line()?;
        let left = status["attempts_left"].as_u64().unwrap_or(0);
        check(left == u64::from(3 - n), &format!("attempts left after boot {n}: {}", 3 - n))?;
        println!("the new system fails before boot completed: power cut (no sync, no commit)");
        guest::power_cut()
    }

    fn rollback(self) -> Result<()> {
        check(self.slot == 1, "the bootloader still boots _b (its own tries are not spent)")?;
        ctl(&["checkpoint", "needsRollback"], 1)?;
        let status = self.status()?;
        check(status["state"] == "rollback-needed", "state rollback-needed")?;
        println!("mount_all, as fs_mgr does for a checkpoint=block /data: restore, then mount");
        let disk = guest::disk(1);
        let disk = disk.to_string_lossy();
        sh(&format!("mkdir -p {DATA_MOUNT}"))?;
        let mount =
            Command::new("mount").args(["-t", "ext4", "-o", "ro", &disk, DATA_MOUNT]).output()?;
        check(
            !mount.status.success(),
            "the raw /data (block 0 holds the dm-bow log) does not mount",
        )?;
        println!(
            "  $ mount -t ext4 -o ro {disk} {DATA_MOUNT}  -> fails: {}",
            first_line(&mount.stderr)
        );
        ctl(&["checkpoint", "restoreCheckpoint", &disk], 0)?;
        let fsck = sh(&format!("e2fsck -fn {disk} 2>&1"))?;
        println!("  $ e2fsck -fn {disk}  -> exit 0, {}", fsck.lines().last().unwrap_or_default());
        sh(&format!("mount -t ext4 -o ro {disk} {DATA_MOUNT}"))?;
        let dir = std::env::var(DIR_ENV)?;
        let verify = sh(&format!("cd {DATA_MOUNT} && sha256sum -c {dir}/original.sha256"))?;
        println!("  $ sha256sum -c original.sha256  (the hashes taken before the update)");
        print_indented(&verify);
        let label = sh(&format!("e2label {disk}"))?;
        check(!Path::new(DATA_MOUNT).join("app/migrated.db").exists(), "migrated.db is gone")?;
        check(Path::new(DATA_MOUNT).join("notes.txt").exists(), "notes.txt is back")?;
        println!("  label {:?}; notes.txt back; app/migrated.db gone", label.trim());
        sh(&format!("umount {DATA_MOUNT}"))?;
        let history = ctl_out(&["history", "--limit", "1"])?;
        println!("  $ checkpointctl history --limit 1\n    {}", history.trim());
        println!("init hooks of the rollback boot:");
        ctl(&["checkpoint", "needsCheckpoint"], 1)?;
        ctl(&["checkpoint", "markBootAttempt"], 0)?;
        let log = daemon_log();
        let line = log.lines().find(|l| l.contains("switched from slot")).unwrap_or_default();
        check(!line.is_empty(), "the daemon ran the rollback action")?;
        println!("  checkpointd: {}", line.split("] ").last().unwrap_or(line));
        println!("  boot {}", record_line(&self.bootctl)?);
        let record = self.bootctl.record()?;
        check(record.next_boot_slot() == Some(0), "the next boot is slot _a")?;
        println!("reboot (reboot.action = none in this demo: the next VM run is that reboot)");
        self.shutdown()
    }

    fn old_slot(self) -> Result<()> {
        check(self.slot == 0, "the bootloader boots the old slot _a")?;
        println!("init hooks on _a (re-activated, so it runs checkpointed once more):");
        ctl(&["checkpoint", "needsCheckpoint"], 1)?;
        ctl(&["checkpoint", "markBootAttempt"], 0)?;
        ctl(&["checkpoint", "prepareCheckpoint"], 0)?;
        println!("boot completed:");
        ctl(&["checkpoint", "commitChanges"], 0)?;
        let status = self.status_line()?;
        check(status["budget"] == 0, "the spent checkpoint is cleared (no checkpoint requested)")?;
        println!(
            "  (needsRollback stays true until this boot ends, on purpose: late callers of the \
             rollback boot still see it; docs/state-machine.md)"
        );
        check(self.bootctl.record()?.slots[0].successful, "slot _a marked successful")?;
        println!("  boot {}", record_line(&self.bootctl)?);
        println!("a second update (slot _b rewritten):");
        ctl(&["checkpoint", "startCheckpoint", RETRY], 0)?;
        self.bootctl.set_active_boot_slot(1)?;
        println!("update client: setActiveBootSlot(_b); {}", record_line(&self.bootctl)?);
        self.shutdown()
    }

    fn second_update(self) -> Result<()> {
        check(self.slot == 1, "the bootloader boots _b")?;
        println!("init hooks:");
        ctl(&["checkpoint", "needsCheckpoint"], 1)?;
        ctl(&["checkpoint", "markBootAttempt"], 0)?;
        ctl(&["checkpoint", "prepareCheckpoint"], 0)?;
        let status = self.status_line()?;
        check(status["attempts_left"] == 2, "attempts left: 2")?;
        println!("boot completed, the update client commits:");
        ctl(&["checkpoint", "commitChanges"], 0)?;
        ctl(&["checkpoint", "needsRollback"], 0)?;
        let status = self.status()?;
        check(status["state"] == "none", "idle after commitChanges")?;
        let record = self.bootctl.record()?;
        check(record.slots[1].successful, "slot _b marked successful")?;
        println!("  boot {}", record_line(&self.bootctl)?);
        let history = ctl_out(&["history", "--limit", "20"])?;
        println!("  $ checkpointctl history");
        print_indented(&history);
        self.shutdown()
    }

    /// `checkpointctl status`, printed; returns `status --json`.
    fn status(&self) -> Result<serde_json::Value> {
        println!("  $ checkpointctl status");
        print_indented(&ctl_out(&["status"])?);
        Ok(serde_json::from_str(&ctl_out(&["status", "--json"])?)?)
    }

    /// `status --json`, summarised in one line.
    fn status_line(&self) -> Result<serde_json::Value> {
        let status: serde_json::Value = serde_json::from_str(&ctl_out(&["status", "--json"])?)?;
        println!(
            "  status: state={} attempts_left={} needs_rollback={}",
            status["state"].as_str().unwrap_or("?"),
            status["attempts_left"],
            status["needs_rollback"]
        );
        Ok(status)
    }

    /// Clean shutdown: stop the daemon and rsb_hub, unmount the metadata disk.
    fn shutdown(mut self) -> Result<()> {
        terminate(&mut self.daemon)?;
        terminate(&mut self.hub)?;
        sh(&format!("umount {META_MOUNT}"))?;
        Ok(())
    }
}

fn daemon_config(meta: &Path) -> String {
    format!(
        "metadata_dir = \"{}\"\n\
         health_check_interval_secs = 0\n\
         [[backend]]\ntype = \"test-null\"\n\
         [policy]\nrollback_action = \"switch-to-previous-slot\"\n\
         [boot_control]\ntype = \"file\"\n\
         [binder]\nenabled = true\n",
        meta.display()
    )
}

fn suffix(slot: u32) -> &'static str {
    ["_a", "_b"].get(usize::try_from(slot).unwrap_or(9)).copied().unwrap_or("_?")
}

fn record_line(bootctl: &FileBootControl) -> Result<String> {
    let record = bootctl.record()?;
    let slots: Vec<String> = record
        .slots
        .iter()
        .map(|s| {
            format!(
                "{} priority={} tries={} {}",
                s.suffix,
                s.priority,
                s.tries_left,
                if s.successful { "successful" } else { "unproven" }
            )
        })
        .collect();
    Ok(format!("record: current={} | {}", suffix(record.current), slots.join(" | ")))
}

fn start_hub() -> Result<Child> {
    let policy = testbench::paths::workspace_root().join("init/rsb_hub/50-checkpointd.toml");
    guest::start_rsb_hub(guest::HubPolicy::File(&policy), log_file("rsb_hub.log")?)
        .map_err(|e| anyhow::anyhow!("{}", e.message().unwrap_or("starting rsb_hub failed")))
}

fn terminate(child: &mut Child) -> Result<()> {
    sh(&format!("kill -TERM {}", child.id()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "process {} did not stop on SIGTERM", child.id());
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_file(name: &str) -> Result<fs::File> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(guest::shared_dir().join(name))?)
}

fn daemon_log() -> String {
    fs::read_to_string(guest::shared_dir().join("checkpointd.log")).unwrap_or_default()
}

/// checkpointctl as root: (exit code, stderr).
fn ctl_raw(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(CTL).args(args).stdin(Stdio::null()).output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Runs `checkpointctl args`, prints it with its exit status, fails unless it is `want`.
fn ctl(args: &[&str], want: i32) -> Result<()> {
    let (code, err) = ctl_raw(args)?;
    println!("  $ checkpointctl {}  -> exit {code}", args.join(" "));
    ensure!(code == want, "checkpointctl {args:?}: exit {code}, expected {want}: {err}");
    Ok(())
}

/// Runs `checkpointctl args` (must exit 0) and returns its stdout.
fn ctl_out(args: &[&str]) -> Result<String> {
    let out = Command::new(CTL).args(args).stdin(Stdio::null()).output()?;
    ensure!(
        out.status.success(),
        "checkpointctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(ok: bool, what: &str) -> Result<()> {
    ensure!(ok, "check failed: {what}");
    println!("  check: {what}: yes");
    Ok(())
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).lines().next().unwrap_or_default().to_owned()
}

/// What the virtual device offers, read in the guest just now: the kernel, the device-mapper
/// ioctl interface (DM_VERSION on /dev/mapper/control) and the binder device.
fn print_virtual_device() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let version = sh("dmsetup version")?;
    let driver = version
        .lines()
        .find_map(|l| l.strip_prefix("Driver version:"))
        .context("dmsetup version printed no driver version")?;
    let binder = fs::read_to_string("/sys/class/misc/binder/dev").unwrap_or_default();
    println!(
        "virtual device: kernel {}, device-mapper ioctl interface {} (DM_VERSION), /dev/binder \
         (char {})",
        release.trim(),
        driver.trim(),
        binder.trim()
    );
    Ok(())
}

fn sh(cmd: &str) -> Result<String> {
    guest::sh(cmd).map_err(|e| anyhow::anyhow!("{}", e.message().unwrap_or("failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_block_lines_of_dumpe2fs_are_parsed() {
        let text = "Group 0: (Blocks 0-8191)\n  Free blocks: 1200-1300, 5000, 6000-8191\n  \
                    Free inodes: 12-2048\n";
        assert_eq!(parse_free_blocks(text).unwrap(), vec![(1200, 101), (5000, 1), (6000, 2192)]);
    }

    #[test]
    fn pseudo_random_is_deterministic() {
        assert_eq!(pseudo_random(64, 7), pseudo_random(64, 7));
        assert_ne!(pseudo_random(64, 7), pseudo_random(64, 8));
    }
}
