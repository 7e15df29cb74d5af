//! The product story on the virtual device, shared by the end-to-end tests
//! (`tests/tests/vm_rollback.rs`) and `cargo xtask demo`: an update, failed boots ended by
//! power cuts, the rollback, and a second update that commits, with real data on /data and the
//! real backends.
//!
//!
//! Each trial is a chain of boots of one device (metadata disk + data disk that survive every
//! boot); each boot is one VM run whose guest half is a step of [`guest_step`]. What each step
//! checks is printed, so a failed chain shows where it broke. Per chain:
//! 1. `install`: /data gets realistic app data; its manifest (every file's SHA-256) is kept on
//!    the metadata disk; the update client (the example updater of the update-client library,
//!    `client/examples/updater.rs`) asks for the checkpoint (`startCheckpoint(2)`) and the
//!    slot is switched.
//! 2. `failed-boot`, three times: the boot flow (restore or merge of the previous boot's
//!    changes, the device stack, mount), the init hooks, the new system's workload, and a power
//!    cut at a random point of it (a timer thread cuts while the workload runs). From the
//!    second failed boot on, /data must equal the manifest right after the mount: each failed
//!    boot is rolled back at the next boot. Between the first two, one boot is cut in the
//!    middle of its restore (`restoreCheckpointPart`, vold's test hook) before it counts an
//!    attempt, and the next boot must finish that restore.
//! 3. `rollback`: /data equals the manifest, needsRollback, the rollback action switches to the
//!    old slot; after unmount fsck is clean.
//! 4. `old-slot`: no checkpoint; the leftovers of the checkpoint are gone; a second update.
//! 5. `second-update`: new data written, committed (optionally cut by a power cut during
//!    the commit: then /data must be exactly the old or exactly the new data).
//! 6. `after-commit`: the new data is kept; no COW file, no DM or loop device left; fsck clean.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::device::{self, Device, Fs, Profile, Rng, Transport, DATA_MOUNT, META_MOUNT};
use crate::vm::{GuestRun, Vm};
use crate::{guest, Failed};
use policy::BootControl;

const MODULES: &[&str] = &["loop", "dm-mod"];
const META_BYTES: u64 = 64 << 20;
const DATA_BYTES: u64 = 512 << 20;
const STEP_ENV: &str = "CPD_SCENARIO_STEP";
const SEED_ENV: &str = "CPD_SCENARIO_SEED";

/// How the second update's commit ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// commitChanges returns; a clean shutdown follows.
    Clean,
    /// A power cut at a random moment while commitChanges runs.
    PowerCutDuring,
}

// ================================ host half ================================

/// How the host starts the guest half of a step.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// The running test binary, entry `step` ([`crate::main`]'s `--guest step`).
    SelfEntry,
    /// Another program (e.g. `xtask guest-demo`) that calls [`guest_step`].
    Program(PathBuf, Vec<String>),
}

struct Chain<'a> {
    name: &'a str,
    launcher: &'a Launcher,
    stream: bool,
    profile: &'a Profile,
    /// The metadata and data disk images (deleted when the chain ends).
    meta: tempfile::TempPath,
    data: tempfile::TempPath,
    seed: u64,
    boots: u32,
}

impl<'a> Chain<'a> {
    /// A fresh device: an ext4 metadata disk and a /data disk formatted for the profile.
    fn new(
        name: &'a str,
        profile: &'a Profile,
        launcher: &'a Launcher,
        stream: bool,
    ) -> Result<Chain<'a>, Failed> {
        Chain::with_data_bytes(name, profile, launcher, stream, DATA_BYTES)
    }

    /// A fresh device whose /data disk has `data_bytes`.
    fn with_data_bytes(
        name: &'a str,
        profile: &'a Profile,
        launcher: &'a Launcher,
        stream: bool,
        data_bytes: u64,
    ) -> Result<Chain<'a>, Failed> {
        let meta = crate::vm::scratch_image(META_BYTES)?;
        let data = crate::vm::scratch_image(data_bytes)?;
        Fs::Ext4.mkfs_host(&meta)?;
        profile.fs.mkfs_host(&data)?;
        let seed = seed();
        println!("chain {name}: seed {seed} (set {SEED_ENV} to replay)");
        Ok(Chain { name, launcher, stream, profile, meta, data, seed, boots: 0 })
    }

    fn boot(&mut self, step: &str) -> Result<GuestRun, Failed> {
        self.boots += 1;
        if self.stream {
            println!("\n==== boot {}: {}", self.boots, title(step));
        }
        let mut vm = Vm::new(format!("{}-{:02}-{step}", self.name, self.boots))
            .kernel(self.profile.kernel)
            .modules(MODULES)
            .modules(match self.profile.transport {
                Transport::Binder => &["binder_linux devices=binder,hwbinder"],
                Transport::Socket => &[],
            })
            .memory_mib(1536)
            .timeout(Duration::from_secs(300))
            .disk(&self.meta)
            .disk(&self.data)
            .binaries(device::binaries(self.profile))
            .env(STEP_ENV, step)
            .env(SEED_ENV, self.seed.to_string());
        for (k, v) in self.profile.env() {
            vm = vm.env(k, v);
        }
        let run = match self.launcher {
            Launcher::SelfEntry => vm.stream_output(self.stream).run_self("step", &[])?,
            Launcher::Program(program, args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                vm.stream_output(self.stream).run(program, &args)?
            }
        };
        if self.stream {
            println!(
                "host: boot {} `{step}`: {:?} after {:.1} s",
                self.boots,
                run.exit,
                run.duration.as_secs_f64()
            );
        } else {
            println!(
                "--- boot {} `{step}` ({:?}, {:.1} s) ---\n{}",
                self.boots,
                run.exit,
                run.duration.as_secs_f64(),
                run.output.trim_end()
            );
        }
        Ok(run)
    }

    fn expect_ok(&mut self, step: &str) -> Result<(), Failed> {
        self.boot(step)?.expect_success()?;
        Ok(())
    }

    fn expect_cut(&mut self, step: &str) -> Result<(), Failed> {
        self.boot(step)?.expect_power_cut()?;
        Ok(())
    }
}

/// What a step of the story is, for the demo's narration.
fn title(step: &str) -> &'static str {
    match step {
        "install" => {
            "the old system (_a) has app data on /data; an update client installs an \
                      update into slot _b and asks for a checkpoint"
        }
        "failed-boot-1" => "the new slot _b boots (attempt 1 of 3), changes /data, and loses power",
        "cut-during-restore" => "_b boots again, and the power goes in the middle of the restore",
        "failed-boot-2" => "_b boots (attempt 2 of 3): first the interrupted restore is finished",
        "failed-boot-3" => "_b boots (attempt 3 of 3), changes /data, and loses power again",
        "rollback" => "the rollback boot: /data restored before it is mounted, slot _a made active",
        "old-slot" => "back on the old slot _a; later, a second update",
        "second-update" => "the second update boots, works, and commits",
        "second-update-cut-commit" => {
            "the second update commits, and the power goes during the commit"
        }
        "after-commit" => "after the commit: the new data stays, nothing of the checkpoint is left",
        _ => "",
    }
}

fn seed() -> u64 {
    std::env::var(SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    })
}

/// Runs the whole story on a fresh device: `name` names the boots' result folders, `stream`
/// prints the guest's output as it comes (the demo) instead of after each boot (tests).
pub fn chain(
    name: &str,
    profile: &Profile,
    commit: Commit,
    launcher: &Launcher,
    stream: bool,
) -> Result<(), Failed> {
    let mut c = Chain::new(name, profile, launcher, stream)?;
    c.expect_ok("install")?;
    c.expect_cut("failed-boot-1")?;
    // A boot cut in the middle of its restore, before it counted an attempt (the f2fs backend
    // has no restore of its own to cut: the kernel rolls back at mount).
    if profile.backend != "f2fs" {
        c.expect_cut("cut-during-restore")?;
    }
    c.expect_cut("failed-boot-2")?;
    c.expect_cut("failed-boot-3")?;
    c.expect_ok("rollback")?;
    c.expect_ok("old-slot")?;
    match commit {
        Commit::Clean => c.expect_ok("second-update")?,
        Commit::PowerCutDuring => c.expect_cut("second-update-cut-commit")?,
    }
    c.expect_ok("after-commit")?;
    println!("chain {name}: {} boots, all checks passed", c.boots);
    Ok(())
}

// ================================ guest half ================================

/// `abortChanges` with and without retry: an update whose new system aborts twice. The daemon's
/// reboot (configured to reset the guest) ends each aborting boot.
/// 1. `install`, as in [`chain`];
/// 2. `abort-retry`: attempt 1 changes /data, then `abortChanges(msg, retry=true)`: the next
///    boot rolls /data back and tries again, one attempt fewer;
/// 3. `abort-no-retry`: /data rolled back; attempt 2 changes /data, then
///    `abortChanges(msg, retry=false)`: the budget is spent at once;
/// 4. `after-abort`: /data rolled back again, needsRollback, fsck clean, nothing left behind.
pub fn abort_chain(name: &str, profile: &Profile, launcher: &Launcher) -> Result<(), Failed> {
    let mut profile = profile.clone();
    profile.reboot_cuts_power = true;
    let mut c = Chain::new(name, &profile, launcher, false)?;
    c.expect_ok("install")?;
    c.expect_cut("abort-retry")?;
    c.expect_cut("abort-no-retry")?;
    c.expect_ok("after-abort")?;
    println!("chain {name}: {} boots, all checks passed", c.boots);
    Ok(())
}

/// What the health monitor does when /data fills the backup area during a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The backup area may not grow, `action = "commit"`: the monitor commits before it is
    /// full; every write succeeds. snapshot: a small COW store; userspace-bow: the engine's
    /// backup space, which is /data's free space (it cannot grow).
    Commit,
    /// A small COW store that may grow (snapshot only): the monitor grows it, the checkpoint
    /// stays armed, a power cut follows, and the next boot rolls /data back through the grown
    /// store.
    Grow,
}

/// The monitor of every fill chain. It polls every 100 ms; the guest writes well under
/// 60 MiB/s (1 MiB with fsync, through a snapshot or the engine, under TCG): 6 MiB per poll,
/// inside the 10 MiB margin of the action threshold (the configuration's sizing check).
const FILL_MONITOR: &str = "[monitor]\ninterval_ms = 100\nwarn_free_bytes = 12582912\n\
                            action_free_bytes = 10485760\nmax_write_bytes_per_sec = 62914560\n\
                            action = \"commit\"\n";

/// The /data disk of the userspace-bow fill chain: small, so that the engine's backup space
/// (what FITRIM, or on f2fs the exposed free space, gave it) runs out after a few dozen MiB.
/// f2fs needs more: its overprovisioning and the whole free sections a pinned file needs
/// leave the engine 12 MiB of a 128 MiB /data (measured; growing the pinned file in steps
/// instead of halving one request on ENOSPC gave the same 12 MiB: the free sections are the
/// limit).
fn fill_engine_data_bytes(fs: Fs) -> u64 {
    match fs {
        Fs::Ext4 => 128 << 20,
        Fs::F2fs => 256 << 20,
    }
}
/// The least backup space the engine must start with, so that the fill crosses the monitor's
/// warning (12 MiB) and action (10 MiB) thresholds while it writes.
const FILL_ENGINE_MIN_START_BYTES: u64 = 32 << 20;
/// In-use data the userspace-bow fill chain's install adds beside the app data: the fill boot
/// rewrites it in place, so that each first write of one of its blocks needs a backup.
const FILL_BALLAST_BYTES: usize = 32 << 20;
const FILL_BALLAST: &str = "media/0/Movies/ballast.bin";
/// The file the fill boots write new data into.
const FILL_NEW: &str = "fill.bin";

/// A full /data during a checkpoint, on `backend` over `fs` (the backend's kernel). The
/// filesystem must never see an error from the backup layer (a full dm-snapshot store is
/// invalidated by the kernel and fails every later I/O; a full engine fails writes with
/// ENOSPC): the monitor acts first.
/// - snapshot, [`Fill::Commit`]: 48 MiB written through a 16 MiB COW store that never grows;
/// - snapshot, [`Fill::Grow`]: 48 MiB through a 32 MiB store that grows by its size when it is
///   half full (`grow_at_percent = 50`): the monitor grows it before the warning threshold;
/// - userspace-bow ([`Fill::Commit`]): a small /data with 32 MiB of in-use data to rewrite;
///   the boot rewrites it in place and writes a new file until the monitor commits (the table
///   switch: /data on the raw partition, no ublk device), then a power cut; the next boot has
///   nothing to roll back.
pub fn fill_chain(
    name: &str,
    backend: &str,
    fs: Fs,
    fill: Fill,
    launcher: &Launcher,
) -> Result<(), Failed> {
    let mut profile = Profile::new(backend, fs);
    profile.extra_config = FILL_MONITOR.into();
    let data_bytes = match (backend, fill) {
        ("snapshot", Fill::Commit) => {
            profile.backend_options = "cow_bytes = 16777216\ngrow_percent = 0\n".into();
            DATA_BYTES
        }
        ("snapshot", Fill::Grow) => {
            profile.backend_options =
                "cow_bytes = 33554432\ngrow_percent = 100\ngrow_at_percent = 50\n".into();
            DATA_BYTES
        }
        ("userspace-bow", Fill::Commit) => fill_engine_data_bytes(fs),
        (other, fill) => {
            return Err(format!("no full-/data chain for backend {other} with {fill:?}").into())
        }
    };
    let mut c = Chain::with_data_bytes(name, &profile, launcher, false, data_bytes)?;
    match (backend, fill) {
        ("userspace-bow", _) => {
            c.expect_ok("fill-install")?;
            c.expect_cut("fill-commit")?;
            c.expect_ok("after-fill-commit")?;
        }
        (_, Fill::Commit) => {
            c.expect_ok("install")?;
            c.expect_ok("fill-commit")?;
        }
        (_, Fill::Grow) => {
            c.expect_ok("install")?;
            c.expect_cut("fill-grow")?;
            c.expect_ok("after-fill-grow")?;
        }
    }
    println!("chain {name}: {} boots, all checks passed", c.boots);
    Ok(())
}

/// The guest's uptime, for the step's log (where a slow boot spends its time).
fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|t| format!("{t} s")))
        .unwrap_or_else(|| "?".to_owned())
}

/// The guest half: one boot of the device, the step named by the host.
pub fn guest_step() -> Result<(), Failed> {
    let step = std::env::var(STEP_ENV)?;
    let seed: u64 = std::env::var(SEED_ENV)?.parse()?;
    let profile = Profile::from_env()?;
    let entered = uptime();
    let dev = Device::power_on(profile)?;
    println!(
        "boot: slot {} ({}), backend {} (step entered at {entered}, device up at {} of uptime)",
        dev.slot,
        step,
        dev.profile.backend,
        uptime()
    );
    let done = match step.as_str() {
        "install" => install(dev, seed, 0),
        "fill-install" => install(dev, seed, FILL_BALLAST_BYTES),
        "failed-boot-1" => failed_boot(dev, seed, 1, false),
        "failed-boot-2" => failed_boot(dev, seed, 2, true),
        "failed-boot-3" => failed_boot(dev, seed, 3, true),
        "cut-during-restore" => cut_during_restore(dev, seed),
        "rollback" => rollback(dev),
        "old-slot" => old_slot(dev),
        "second-update" => second_update(dev, seed, false),
        "second-update-cut-commit" => second_update(dev, seed, true),
        "after-commit" => after_commit(dev),
        "abort-retry" => abort_boot(dev, seed, 1, true),
        "abort-no-retry" => abort_boot(dev, seed, 2, false),
        "after-abort" => after_abort(dev),
        "fill-commit" => fill_boot(dev, Fill::Commit),
        "fill-grow" => fill_boot(dev, Fill::Grow),
        "after-fill-grow" => after_fill_grow(dev),
        "after-fill-commit" => after_fill_commit(dev),
        other => Err(format!("unknown step {other}").into()),
    };
    // With the boot's start above, this splits a boot's time into kernel, device and step.
    println!("step {step} ended at {} of uptime", uptime());
    done
}

fn check(ok: bool, what: &str) -> Result<(), Failed> {
    if ok {
        println!("  check: {what} (at {})", uptime());
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

/// Kept on the metadata disk: never rolled back.
fn kept(name: &str) -> PathBuf {
    Path::new(META_MOUNT).join("scenario").join(name)
}

/// Saves /data's manifest on the metadata disk, durably: a power cut may follow at once.
fn save_manifest(name: &str) -> Result<usize, Failed> {
    use std::io::Write;
    let m = device::manifest(Path::new(DATA_MOUNT))?;
    std::fs::create_dir_all(kept(""))?;
    let mut file = std::fs::File::create(kept(name))?;
    file.write_all(m.as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(kept(""))?.sync_all()?;
    Ok(m.lines().count())
}

fn data_equals(name: &str) -> Result<usize, Failed> {
    let want = std::fs::read_to_string(kept(name))?;
    device::compare_manifests(&want, &device::manifest(Path::new(DATA_MOUNT))?)
}

/// The example updater, on the binaries' image when it is built ([`device::binaries`]).
const UPDATER: &str = "/dev/shm/bin/updater";

/// `updater [--socket …] args` in the guest: the example of the update-client library
/// (client/examples/updater.rs), built by `cargo build -p checkpoint-client --examples` (the
/// demo and `cargo xtask test` build it).
fn updater_command(dev: &Device, args: &[&str]) -> Result<Command, Failed> {
    if !Path::new(UPDATER).exists() {
        let built = crate::paths::profile_dir().join("examples").join("updater");
        return Err(format!(
            "the example updater {} was not built when this boot started: run `cargo build -p \
             checkpoint-client --examples`",
            built.display()
        )
        .into());
    }
    let mut cmd = Command::new(UPDATER);
    if dev.profile.transport == Transport::Socket {
        cmd.args(["--socket", device::SOCKET]);
    }
    cmd.args(args).stdin(Stdio::null());
    Ok(cmd)
}

/// Runs the updater, prints what it said, fails unless it exits with `want`.
fn updater_expect(dev: &Device, args: &[&str], want: i32) -> Result<String, Failed> {
    let out = updater_command(dev, args)?.output()?;
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("  $ updater {}  -> exit {code}", args.join(" "));
    for line in stdout.lines() {
        println!("    {line}");
    }
    if code != want {
        return Err(format!(
            "updater {args:?}: exit {code}, expected {want}\n--- stderr ---\n{}\
             --- checkpointd.log (tail) ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            crate::vm::tail(&device::daemon_log(), 30)
        )
        .into());
    }
    Ok(stdout)
}

/// A running `updater wait-commit` and the reader of the rest of its output.
struct Waiter {
    child: std::process::Child,
    rest: std::thread::JoinHandle<String>,
}

/// Starts `updater wait-commit` and returns once it is waiting.
fn wait_for_commit_in_background(dev: &Device) -> Result<Waiter, Failed> {
    println!("  $ updater wait-commit --timeout 120 &");
    let mut child = updater_command(dev, &["wait-commit", "--timeout", "120"])?
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("the updater's stdout")?;
    let mut reader = std::io::BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    println!("    {}", first.trim_end());
    if !first.contains("waiting for the checkpoint commit") {
        let _ = child.kill();
        return Err(format!("the updater did not start waiting: {first:?}").into());
    }
    // Its first status read follows the line at once; leave it time under TCG.
    std::thread::sleep(Duration::from_secs(1));
    let rest = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut text);
        text
    });
    Ok(Waiter { child, rest })
}

/// Waits for the background updater; its output after the first line.
fn finish_updater(mut waiter: Waiter) -> Result<String, Failed> {
    let status = waiter.child.wait()?;
    let out = waiter.rest.join().map_err(|_| "the updater's output reader panicked")?;
    for line in out.lines() {
        println!("    {line}");
    }
    println!("  (updater wait-commit -> exit {})", status.code().unwrap_or(-1));
    if !status.success() {
        return Err(format!("updater wait-commit failed ({status}): {out}").into());
    }
    Ok(out)
}

/// The old system's /data (app data, and `ballast` bytes of in-use data for a fill chain),
/// then the update client's checkpoint request and the slot switch.
fn install(dev: Device, seed: u64, ballast: usize) -> Result<(), Failed> {
    dev.boot_mount()?;
    dev.init_hooks()?;
    device::populate_app_data(Path::new(DATA_MOUNT), seed)?;
    if ballast > 0 {
        let path = Path::new(DATA_MOUNT).join(FILL_BALLAST);
        std::fs::create_dir_all(path.parent().ok_or("the ballast's folder")?)?;
        std::fs::write(&path, Rng::new(seed ^ 0xba11).bytes(ballast))?;
        guest::sh(&format!("sync -f {DATA_MOUNT}"))?;
        println!("  /data: {} MiB of in-use data to rewrite in {FILL_BALLAST}", ballast >> 20);
    }
    let files = save_manifest("before-update.sha256")?;
    println!("  /data: {files} files of app data (mail.db, thumbnails, media, an APK)");
    dev.ctl_expect(&["checkpoint", "supportsCheckpoint"], 1)?;
    let out = updater_expect(&dev, &["install", "--retry", "2"], 0)?;
    check(out.contains("3 boot attempts, state pending"), "the updater asked for 3 attempts")?;
    let status = dev.status()?;
    check(status["attempts_left"] == 3, "3 boot attempts after startCheckpoint(2)")?;
    println!("  the backend doing the work: {}", status["backends"]);
    dev.bootctl()?.set_active_boot_slot(1).map_err(|e| e.to_string())?;
    println!("  update client: slot _b active");
    dev.shutdown()
}

/// Runs the update workload until a timer thread cuts the power at a random moment.
fn workload_until_power_cut(seed: u64, boot: u32) -> Result<(), Failed> {
    let mut rng = Rng::new(seed ^ u64::from(boot) << 32);
    let delay = Duration::from_millis(1500 + rng.below(2500));
    println!("  workload; power cut after {} ms", delay.as_millis());
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(delay);
        guest::power_cut();
    });
    started.store(true, Ordering::SeqCst);
    for step in 0..10_000 {
        let what = device::update_step(Path::new(DATA_MOUNT), &mut rng)?;
        println!("    {what}");
        // Apps fsync now and then; what was never synced is lost at the cut anyway.
        if step % 4 == 3 {
            guest::sh(&format!("sync -f {DATA_MOUNT}"))?;
        }
    }
    Err("the workload ended before the power cut".into())
}

fn failed_boot(dev: Device, seed: u64, n: u32, rolled_back: bool) -> Result<(), Failed> {
    check(dev.slot == 1, "the bootloader boots the new slot _b")?;
    dev.boot_mount()?;
    if rolled_back {
        let files = data_equals("before-update.sha256")?;
        check(true, &format!("/data rolled back: all {files} files as before the update"))?;
    }
    dev.ctl_expect(&["checkpoint", "needsCheckpoint"], 1)?;
    dev.init_hooks()?;
    dev.expect_armed()?;
    let status = dev.status()?;
    check(status["attempts_left"] == 3 - n, &format!("{} attempts left", 3 - n))?;
    workload_until_power_cut(seed, n)
}

/// A failed boot whose restore is cut: `restoreCheckpointPart(dev, 1)` stops after one
/// entry (vold's test hook), then the power goes. The next boot must finish the restore.
fn cut_during_restore(dev: Device, _seed: u64) -> Result<(), Failed> {
    let raw = dev.data_dev.display().to_string();
    let (code, out, err) = dev.ctl(&["checkpoint", "restoreCheckpointPart", &raw, "1"])?;
    println!(
        "  $ checkpointctl checkpoint restoreCheckpointPart {raw} 1 -> exit {code} {out}{err}"
    );
    // The part limit stops the merge after one saved chunk, before its commit point: the
    // store is still armed when the power goes.
    check(
        code != 0 && format!("{out}{err}").contains("Hit the test limit"),
        "the restore stopped part-way (EAGAIN \"Hit the test limit\")",
    )?;
    println!("  power cut in the middle of the restore");
    guest::power_cut()
}

fn rollback(dev: Device) -> Result<(), Failed> {
    dev.boot_mount()?;
    let files = data_equals("before-update.sha256")?;
    check(true, &format!("/data restored: all {files} files as before the update"))?;
    dev.ctl_expect(&["checkpoint", "needsRollback"], 1)?;
    // The updater, started after the reboot, learns that its update failed (exit 3).
    let out = updater_expect(&dev, &["boot"], 3)?;
    check(out.contains("/data was rolled back"), "the updater sees the rollback")?;
    let history = dev.ctl_expect(&["history", "--limit", "1"], 0)?;
    println!("    {}", history.trim());
    dev.ctl_expect(&["checkpoint", "markBootAttempt"], 0)?;
    let record = dev.bootctl()?.record().map_err(|e| e.to_string())?;
    check(record.next_boot_slot() == Some(0), "the rollback action makes _a the next slot")?;
    finish_with_fsck(dev)
}

/// Clean shutdown, then fsck of the unmounted raw device and no kernel object left.
fn finish_with_fsck(mut dev: Device) -> Result<(), Failed> {
    let (fs, raw) = (dev.profile.fs, dev.data_dev.clone());
    if dev.profile.backend == "userspace-bow" && raw_block0_holds_a_bow_log(&raw)? {
        // dm-bow's layout while a checkpoint is armed (a commit cut by a power cut leaves one
        // armed again): block 0 of the raw device holds the backup log and the filesystem's
        // own block 0 sits elsewhere until the commit, so the raw device is no filesystem.
        // Check the filesystem as the system sees it, through the engine.
        let source = guest::sh(&format!("findmnt -n -o SOURCE {DATA_MOUNT}"))?.trim().to_owned();
        dev.stop_daemon()?;
        guest::sh(&format!("umount {DATA_MOUNT}"))?;
        let report = fs.fsck(Path::new(&source))?;
        check(
            true,
            &format!(
                "fsck clean through the engine ({source}; the raw block 0 holds the log): {}",
                report.lines().last().unwrap_or_default()
            ),
        )?;
        dev.shutdown()?;
        return device::expect_no_kernel_objects();
    }
    dev.shutdown()?;
    let report = fs.fsck(&raw)?;
    check(true, &format!("fsck clean: {}", report.lines().last().unwrap_or_default()))?;
    device::expect_no_kernel_objects()
}

/// Whether the first bytes of `raw` are a dm-bow log header's magic (`BOW\0`, or `WOB\0` while
/// a restore runs: docs/format.md).
fn raw_block0_holds_a_bow_log(raw: &Path) -> Result<bool, Failed> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(raw)?.read_exact(&mut magic)?;
    Ok(&magic == b"BOW\0" || &magic == b"WOB\0")
}

/// userspace-bow after its commit: no ublk device left, /data's linear device over the raw
/// partition itself, and /data writable (a file written, synced and removed again).
fn check_off_the_engine(dev: &Device) -> Result<(), Failed> {
    let ublk = guest::sh("ls /sys/block | grep '^ublkb' || true")?;
    check(ublk.trim().is_empty(), "no ublk device left after the commit")?;
    let raw = guest::sh(&format!("stat -L -c '%t:%T' {}", dev.data_dev.display()))?;
    let (major, minor) = raw.trim().split_once(':').ok_or("stat of the raw device")?;
    let raw = format!(
        "{}:{}",
        u32::from_str_radix(major, 16).map_err(|e| e.to_string())?,
        u32::from_str_radix(minor, 16).map_err(|e| e.to_string())?
    );
    let source = guest::sh(&format!("findmnt -n -o MAJ:MIN {DATA_MOUNT}"))?;
    let deps = guest::sh(&format!(
        "dmsetup deps -o devno -j {} -m {} 2>&1",
        source.trim().split(':').next().unwrap_or_default(),
        source.trim().split(':').nth(1).unwrap_or_default()
    ))?;
    check(
        deps.contains(&format!("({})", raw.replace(':', ", "))),
        &format!("/data's device now maps the raw partition {raw} ({})", deps.trim()),
    )?;
    guest::sh(&format!(
        "head -c 1M /dev/urandom > {DATA_MOUNT}/.after-commit && sync -f {DATA_MOUNT} \
         && rm {DATA_MOUNT}/.after-commit && sync -f {DATA_MOUNT}"
    ))?;
    check(true, "/data writable on the raw partition")
}

fn cow_file_exists(dev: &Device) -> bool {
    dev.profile.backend == "snapshot" && Path::new(DATA_MOUNT).join(".checkpointd/cow").exists()
}

fn old_slot(dev: Device) -> Result<(), Failed> {
    check(dev.slot == 0, "the bootloader boots the old slot _a")?;
    dev.boot_mount()?;
    data_equals("before-update.sha256")?;
    dev.init_hooks()?;
    dev.ctl_expect(&["checkpoint", "commitChanges"], 0)?;
    check(!cow_file_exists(&dev), "no COW file left on /data")?;
    println!("  a second update:");
    updater_expect(&dev, &["install", "--retry", "2"], 0)?;
    dev.bootctl()?.set_active_boot_slot(1).map_err(|e| e.to_string())?;
    finish_with_fsck(dev)
}

fn second_update(dev: Device, seed: u64, cut_commit: bool) -> Result<(), Failed> {
    check(dev.slot == 1, "the bootloader boots _b")?;
    dev.boot_mount()?;
    dev.ctl_expect(&["checkpoint", "needsCheckpoint"], 1)?;
    dev.init_hooks()?;
    dev.expect_armed()?;
    let mut rng = Rng::new(seed ^ 0x005e_c00d);
    for _ in 0..40 {
        device::update_step(Path::new(DATA_MOUNT), &mut rng)?;
    }
    guest::sh(&format!("sync -f {DATA_MOUNT}"))?;
    let files = save_manifest("after-update.sha256")?;
    println!("  the new system changed /data ({files} files now); boot completed");
    if cut_commit {
        let delay = Duration::from_millis(Rng::new(seed).below(1500));
        println!("  commitChanges, cut by a power cut after {} ms", delay.as_millis());
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            guest::power_cut();
        });
        let _ = dev.ctl(&["checkpoint", "commitChanges"]);
        std::thread::sleep(Duration::from_secs(30));
        return Err("no power cut".into());
    }
    // The updater waits for the commit before what it must not do earlier (a Virtual A/B
    // merge); the boot's commit hook commits.
    let waiter = wait_for_commit_in_background(&dev)?;
    dev.ctl_expect(&["checkpoint", "commitChanges"], 0)?;
    let out = finish_updater(waiter)?;
    check(out.contains("committed; the merge may start"), "the waiting updater saw the commit")?;
    dev.ctl_expect(&["checkpoint", "needsRollback"], 0)?;
    check(dev.status()?["state"] == "none", "no checkpoint after commitChanges")?;
    check(!cow_file_exists(&dev), "the COW file is gone")?;
    if dev.profile.backend == "userspace-bow" {
        check_off_the_engine(&dev)?;
    }
    finish_with_fsck(dev)
}

fn after_commit(dev: Device) -> Result<(), Failed> {
    dev.boot_mount()?;
    let state = dev.status()?["state"].as_str().unwrap_or_default().to_owned();
    // After a clean commit the new data stays. After a commit cut by a power cut, /data is
    // exactly the new data (the commit reached the backend) or exactly the old data (the
    // checkpoint was still armed and the boot flow rolled it back): never a mix.
    match data_equals("after-update.sha256") {
        Ok(files) => check(true, &format!("the new data is kept: {files} files ({state})"))?,
        Err(new_err) => match data_equals("before-update.sha256") {
            Ok(files) => check(
                state != "none",
                &format!("commit did not complete: /data rolled back whole ({files} files)"),
            )?,
            Err(old_err) => {
                return Err(format!(
                    "/data is neither the new nor the old data:\nnew: {}\nold: {}",
                    new_err.message().unwrap_or_default(),
                    old_err.message().unwrap_or_default()
                )
                .into())
            }
        },
    }
    dev.init_hooks()?;
    if state == "none" {
        check(!cow_file_exists(&dev), "no COW file on /data")?;
    }
    finish_with_fsck(dev)
}

/// A checkpointed boot whose new system changes /data and then aborts (attempt `n`).
fn abort_boot(dev: Device, seed: u64, n: u32, retry: bool) -> Result<(), Failed> {
    check(dev.slot == 1, "the bootloader boots the new slot _b")?;
    dev.boot_mount()?;
    if n > 1 {
        let files = data_equals("before-update.sha256")?;
        check(true, &format!("/data rolled back after the abort: all {files} files"))?;
    }
    dev.init_hooks()?;
    dev.expect_armed()?;
    let status = dev.status()?;
    check(status["attempts_left"] == 3 - n, &format!("{} attempts left", 3 - n))?;
    let mut rng = Rng::new(seed ^ u64::from(n));
    for _ in 0..25 {
        device::update_step(Path::new(DATA_MOUNT), &mut rng)?;
    }
    let flag = if retry { "1" } else { "0" };
    println!("  the new system aborts (retry {retry}); the daemon reboots the device");
    let (code, out, err) =
        dev.ctl(&["checkpoint", "abortChanges", "update verification failed", flag])?;
    std::thread::sleep(Duration::from_secs(30));
    Err(format!("abortChanges did not reboot (exit {code}: {out}{err})\n{}", device::daemon_log())
        .into())
}

fn after_abort(dev: Device) -> Result<(), Failed> {
    dev.boot_mount()?;
    let files = data_equals("before-update.sha256")?;
    check(true, &format!("/data rolled back after the abort without retry: all {files} files"))?;
    dev.ctl_expect(&["checkpoint", "needsRollback"], 1)?;
    finish_with_fsck(dev)
}

/// What a fill boot wrote: the status samples to print, and the contents each written file
/// must have.
struct Filled {
    samples: Vec<String>,
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// One status sample of the fill: state and backup space (also the smallest free space seen).
fn fill_sample(dev: &Device, mib: u64, min_free: &mut Option<u64>) -> Result<String, Failed> {
    let st = dev.status()?;
    if let Some(free) = st["backup_bytes_free"].as_u64() {
        *min_free = Some(min_free.map_or(free, |m| m.min(free)));
    }
    Ok(format!(
        "{mib} MiB: {} (backup used {}, free {})",
        st["state"], st["backup_bytes_used"], st["backup_bytes_free"]
    ))
}

/// snapshot: 48 MiB into a new file, 1 MiB at a time with fsync, while the monitor watches a
/// 16 MiB COW store.
fn fill_new_file(dev: &Device, min_free: &mut Option<u64>) -> Result<Filled, Failed> {
    use std::io::Write;
    let mut rng = Rng::new(7);
    let path = Path::new(DATA_MOUNT).join(FILL_NEW);
    let mut file = std::fs::File::create(&path)?;
    let (mut samples, mut want) = (Vec::new(), Vec::new());
    for mib in 1..=48u64 {
        let chunk = rng.bytes(1 << 20);
        file.write_all(&chunk)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("write of MiB {mib} failed: {e}"))?;
        want.extend_from_slice(&chunk);
        if mib % 8 == 0 {
            samples.push(fill_sample(dev, mib, min_free)?);
        }
    }
    check(true, "48 MiB written, every write and fsync succeeded")?;
    Ok(Filled { samples, files: vec![(path, want)] })
}

/// Whether a ublk device exists (userspace-bow's engine still serves /data).
fn ublk_device_exists() -> Result<bool, Failed> {
    Ok(std::fs::read_dir("/sys/block")?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("ublkb")))
}

/// userspace-bow: 1 MiB steps with fsync, alternately the first rewrite in place of the next
/// MiB of the ballast (the engine backs its old blocks up) and 1 MiB more of a new file (free
/// blocks taken), until the monitor's commit took the engine away (no ublk device), then 4 MiB
/// more onto the raw partition. Writing as much as the whole /data without a commit fails.
fn fill_over_in_use(dev: &Device, min_free: &mut Option<u64>) -> Result<Filled, Failed> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1 << 20;
    /// Near the monitor's thresholds the space is sampled after every MiB, not every 4.
    const CLOSE_SAMPLES_BELOW: u64 = 24 << 20;
    let root = Path::new(DATA_MOUNT);
    let mut rng = Rng::new(7);
    let ballast_path = root.join(FILL_BALLAST);
    let mut ballast_want = std::fs::read(&ballast_path)?;
    let ballast = std::fs::OpenOptions::new().write(true).open(&ballast_path)?;
    let new_path = root.join(FILL_NEW);
    let mut new_file = std::fs::File::create(&new_path)?;
    let mut new_want = Vec::new();
    let (mut samples, mut rewritten, mut committed_at) = (Vec::new(), 0usize, None);
    // More than /data holds: the engine must have run out long before.
    let limit = fill_engine_data_bytes(dev.profile.fs) >> 20;
    for mib in 1..=limit {
        let chunk = rng.bytes(MIB);
        let written = if mib % 2 == 1 && rewritten + MIB <= ballast_want.len() {
            let at = rewritten;
            rewritten += MIB;
            ballast_want[at..at + MIB].copy_from_slice(&chunk);
            ballast.write_all_at(&chunk, at as u64).and_then(|()| ballast.sync_data())
        } else {
            new_want.extend_from_slice(&chunk);
            new_file.write_all(&chunk).and_then(|()| new_file.sync_data())
        };
        written.map_err(|e| format!("write of MiB {mib} failed: {e}"))?;
        if committed_at.is_none() && !ublk_device_exists()? {
            committed_at = Some(mib);
            samples.push(format!("{mib} MiB: the engine is gone (the monitor committed)"));
            samples.push(fill_sample(dev, mib, min_free)?);
        } else if mib % 4 == 0 || min_free.is_some_and(|f| f < CLOSE_SAMPLES_BELOW) {
            samples.push(fill_sample(dev, mib, min_free)?);
        }
        if committed_at.is_some_and(|at| mib >= at + 4) {
            check(
                true,
                &format!(
                    "{mib} MiB written ({} MiB rewritten in place, {} MiB new), every write and \
                     fsync succeeded; the last 4 MiB after the commit",
                    rewritten >> 20,
                    new_want.len() >> 20
                ),
            )?;
            return Ok(Filled {
                samples,
                files: vec![(ballast_path, ballast_want), (new_path, new_want)],
            });
        }
    }
    for line in &samples {
        println!("    {line}");
    }
    Err(format!(
        "{limit} MiB written and the engine still serves /data: the monitor never committed"
    )
    .into())
}

/// A full /data while checkpointing ([`fill_chain`]): the backend's writer, then the proofs
/// that the monitor acted before the backup layer ran out.
fn fill_boot(dev: Device, fill: Fill) -> Result<(), Failed> {
    let engine = dev.profile.backend == "userspace-bow";
    dev.boot_mount()?;
    let df = guest::sh(&format!("df -B1 --output=size,avail {DATA_MOUNT} | tail -1"))?;
    println!("  /data before the checkpoint: size, available (bytes): {}", df.trim());
    dev.init_hooks()?;
    dev.expect_armed()?;
    let st = dev.status()?;
    check(
        st["is_checkpointing"] == true,
        &format!("checkpointing, {} bytes of backup space free", st["backup_bytes_free"]),
    )?;
    if engine {
        let free = st["backup_bytes_free"].as_u64().unwrap_or(0);
        check(
            free >= FILL_ENGINE_MIN_START_BYTES,
            &format!(
                "the engine starts with at least {} MiB of backup space (the fill crosses the \
                 monitor's thresholds while it writes)",
                FILL_ENGINE_MIN_START_BYTES >> 20
            ),
        )?;
    }
    let dmesg_before = guest::sh("dmesg")?.lines().count();
    let mut min_free = st["backup_bytes_free"].as_u64();
    let filled = if engine {
        fill_over_in_use(&dev, &mut min_free)?
    } else {
        fill_new_file(&dev, &mut min_free)?
    };
    for line in &filled.samples {
        println!("    {line}");
    }
    // The kernel logs a request failed by the device ("I/O error", or "critical space
    // allocation error" for ENOSPC), an invalidated snapshot, and filesystem errors.
    let dmesg = guest::sh("dmesg")?;
    let errors: Vec<&str> = dmesg
        .lines()
        .skip(dmesg_before)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("invalidating snapshot")
        })
        .collect();
    check(
        errors.is_empty(),
        &format!(
            "no I/O error, no ENOSPC from the backup layer, no filesystem error in dmesg{}",
            if errors.is_empty() { String::new() } else { format!(":\n{}", errors.join("\n")) }
        ),
    )?;
    if let Some(min) = min_free {
        check(
            min > 0,
            &format!("the backup space never ran out (least free in the samples: {min} bytes)"),
        )?;
    }
    let history = dev.ctl_expect(&["history", "--limit", "10"], 0)?;
    println!("{history}");
    // V1 of the interface has no name for the monitor's history kind (OTHER); its rows say
    // what happened in their messages.
    let (acted, grown) =
        (history.contains("Low space for checkpointing"), history.contains("backup area grown"));
    let warned = history.contains("backup space low");
    match fill {
        Fill::Commit => check(
            warned && acted && !grown,
            "the monitor warned and acted (commit), it did not grow",
        )?,
        // Half full, the store is grown at its own threshold (16 MiB free of 32), above the
        // warning's 12 MiB: without `grow_at_percent` the monitor would warn first.
        Fill::Grow => check(
            grown && !acted && !warned,
            "the monitor grew the store at its growth threshold, before any warning; no commit",
        )?,
    }
    if fill == Fill::Grow {
        check(dev.status()?["is_checkpointing"] == true, "still checkpointing: the store grew")?;
        println!("  power cut; the next boot must roll /data back through the grown store");
        guest::power_cut()
    }
    check(dev.status()?["state"] == "none", "the monitor committed the checkpoint")?;
    if engine {
        check_off_the_engine(&dev)?;
    }
    guest::sh("sync && echo 3 > /proc/sys/vm/drop_caches")?;
    for (path, want) in &filled.files {
        let have = std::fs::read(path)?;
        check(
            have == *want,
            &format!("{}: all {} MiB as written", path.display(), want.len() >> 20),
        )?;
    }
    if !engine {
        return finish_with_fsck(dev);
    }
    let files = save_manifest("after-fill.sha256")?;
    println!("  power cut after the commit ({files} files); the next boot must keep them all");
    guest::power_cut()
}

/// After a fill the monitor committed and a power cut: nothing to roll back.
fn after_fill_commit(dev: Device) -> Result<(), Failed> {
    dev.boot_mount()?;
    let files = data_equals("after-fill.sha256")?;
    check(true, &format!("nothing rolled back: all {files} files as after the fill"))?;
    dev.ctl_expect(&["checkpoint", "needsRollback"], 0)?;
    check(dev.status()?["state"] == "none", "no checkpoint")?;
    finish_with_fsck(dev)
}

fn after_fill_grow(dev: Device) -> Result<(), Failed> {
    dev.boot_mount()?;
    let files = data_equals("before-update.sha256")?;
    check(true, &format!("/data rolled back through the grown store: all {files} files"))?;
    check(!Path::new(DATA_MOUNT).join("fill.bin").exists(), "fill.bin is gone")?;
    finish_with_fsck(dev)
}
