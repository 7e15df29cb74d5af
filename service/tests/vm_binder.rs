//! checkpointd on KERNEL binder in the virtual device: rsb_hub (with the shipped policy file) +
//! checkpointd + checkpointctl over /dev/binder.
//!
//! - an unprivileged UID can query but not change state;
//! - `startCheckpoint(2)`, then three real reboots of the guest each calling `markBootAttempt`,
//!   then `needsRollback`: the store and the file boot control live on an ext4 virtio disk;
//! - a power cut in the middle of a burst of `markBootAttempt` calls leaves the store intact
//!   and the counter at a value one of the calls produced.
//!
//! Run with `cargo xtask test` (or `TESTBENCH_VM=1 cargo test -p checkpointd --test vm_binder`
//! after `cargo build -p checkpointd -p checkpointctl`).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testbench::guest::{self, HubPolicy};
use testbench::vm::Vm;
use testbench::{vm_trial, Failed};

const MODULES: &[&str] = &["binder_linux devices=binder,hwbinder"];
/// Where the metadata disk is mounted in the guest (the host root, / and /mnt, is read-only).
const MOUNT: &str = "/dev/shm/checkpoint-meta";
/// Budget of the power-cut scenario: many attempts, so the burst never spends it.
const BURST_RETRY: i32 = 100_000;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("binder_unprivileged_uid_queries_but_cannot_change_state", host_unprivileged),
            vm_trial("binder_three_reboots_then_rollback_on_a_virtio_disk", host_reboots),
            vm_trial("binder_power_cut_during_mark_boot_attempt_burst", host_power_cut),
        ],
        &[
            ("unprivileged", guest_unprivileged),
            ("boot", guest_boot),
            ("burst", guest_burst),
            ("after_cut", guest_after_cut),
        ],
    )
}

// ---- host side ----

fn disk_image(name: &str) -> Result<(tempfile::TempDir, PathBuf), Failed> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join(name);
    let file = fs::File::create(&image)?;
    file.set_len(64 << 20)?;
    drop(file);
    let out = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).output()?;
    if !out.status.success() {
        return Err(format!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok((dir, image))
}

fn host_unprivileged() -> Result<(), Failed> {
    let run = Vm::new("binder_unprivileged")
        .modules(MODULES)
        .binaries(binaries())
        .run_self("unprivileged", &[])?;
    run.expect_success()?;
    Ok(())
}

/// The value a guest printed as `key=value`.
fn printed(output: &str, key: &str) -> Option<String> {
    output.lines().rev().find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

fn host_reboots() -> Result<(), Failed> {
    let (_dir, image) = disk_image("meta.img")?;
    let boot = |step: &str| -> Result<String, Failed> {
        let run = Vm::new(format!("binder_reboots_{step}"))
            .modules(MODULES)
            .binaries(binaries())
            .disk(&image)
            .run_self("boot", &[step])?;
        run.expect_success()?;
        Ok(run.output.clone())
    };
    let out = boot("start")?;
    if printed(&out, "state").as_deref() != Some("pending") {
        return Err(format!("after startCheckpoint(2):\n{out}").into());
    }
    for n in 1..=3 {
        let out = boot("attempt")?;
        let rollback = printed(&out, "needsRollback");
        let needs = printed(&out, "needsCheckpoint");
        let left = printed(&out, "attempts_left");
        let ok = if n < 3 {
            rollback.as_deref() == Some("0")
                && needs.as_deref() == Some("1")
                && left == Some((3 - n).to_string())
        } else {
            rollback.as_deref() == Some("1")
        };
        if !ok {
            return Err(format!("boot {n}: unexpected answers:\n{out}").into());
        }
    }
    let out = boot("final")?;
    if printed(&out, "needsRollback").as_deref() != Some("1")
        || printed(&out, "state").as_deref() != Some("rollback-needed")
    {
        return Err(format!("after three attempts the guest must roll back:\n{out}").into());
    }
    Ok(())
}

fn host_power_cut() -> Result<(), Failed> {
    let (_dir, image) = disk_image("meta.img")?;
    let run = Vm::new("binder_power_cut_burst")
        .modules(MODULES)
        .binaries(binaries())
        .disk(&image)
        .timeout(Duration::from_secs(240))
        .run_self("burst", &[])?;
    run.expect_power_cut()?;
    let done: u64 = printed(&run.output, "burst_started")
        .ok_or_else(|| format!("the burst did not start:\n{}", run.output))
        .map(|_| ())
        .and_then(|()| {
            // Completed calls were appended, one line each, to the shared folder (9p: the host
            // sees every line written before the cut).
            let log = run.shared_dir.join("completed");
            let text = fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            Ok(u64::try_from(text.lines().count()).unwrap_or(0))
        })?;
    if done == 0 {
        return Err("no markBootAttempt completed before the cut".into());
    }
    let after = Vm::new("binder_power_cut_after")
        .modules(MODULES)
        .binaries(binaries())
        .disk(&image)
        .run_self("after_cut", &[])?;
    after.expect_success()?;
    let left: u64 = printed(&after.output, "attempts_left")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no attempts_left after the cut:\n{}", after.output))?;
    let budget = u64::try_from(BURST_RETRY).unwrap_or(0) + 1;
    // `done` calls returned before the cut; one more may have been committed by the store
    // without its reply reaching the client. Any other value is a lost or invented update.
    let candidates = [budget - done, budget - done - 1];
    if !candidates.contains(&left) {
        return Err(format!(
            "after {done} completed calls the counter must be {} or {}, found {left}:\n{}",
            candidates[0], candidates[1], after.output
        )
        .into());
    }
    println!("power cut after {done} completed markBootAttempt calls: attempts_left={left}");
    Ok(())
}

// ---- guest side ----

/// rsb_hub + checkpointd running in the guest.
struct Stack {
    hub: Child,
    daemon: Option<Child>,
}

impl Stack {
    fn stop(mut self) -> Result<(), Failed> {
        if let Some(mut daemon) = self.daemon.take() {
            terminate(&mut daemon)?;
        }
        terminate(&mut self.hub)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in self.daemon.iter_mut().chain(std::iter::once(&mut self.hub)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &mut Child) -> Result<(), Failed> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            return Err(format!("process {} did not stop on SIGTERM", child.id()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_file(name: &str) -> Result<fs::File, Failed> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(guest::shared_dir().join(name))?)
}

fn hub_policy() -> PathBuf {
    testbench::paths::workspace_root().join("init/rsb_hub/50-checkpointd.toml")
}

/// Starts rsb_hub with the shipped policy and checkpointd with `config`, and waits until
/// checkpointctl reaches the service over kernel binder.
fn start_stack(config: &str) -> Result<Stack, Failed> {
    let hub = guest::start_rsb_hub(HubPolicy::File(&hub_policy()), log_file("rsb_hub.log")?)?;
    let mut stack = Stack { hub, daemon: None };
    if let Some(status) = stack.hub.try_wait()? {
        let log = fs::read_to_string(guest::shared_dir().join("rsb_hub.log")).unwrap_or_default();
        return Err(format!("rsb_hub exited with {status}:\n{log}").into());
    }
    let config_path = Path::new("/dev/shm/checkpointd.toml");
    fs::write(config_path, config)?;
    let daemon = Command::new(bin("checkpointd"))
        .arg("--config")
        .arg(config_path)
        .env("RUST_LOG", "info")
        .stdout(log_file("checkpointd.log")?)
        .stderr(log_file("checkpointd.log")?)
        .spawn()?;
    stack.daemon = Some(daemon);
    let (code, err) = ctl(&["--timeout", "30", "checkpoint", "supportsCheckpoint"])?;
    if code != 0 && code != 1 {
        let log =
            fs::read_to_string(guest::shared_dir().join("checkpointd.log")).unwrap_or_default();
        return Err(format!("checkpointd not reachable (exit {code}: {err}):\n{log}").into());
    }
    Ok(stack)
}

fn config(metadata_dir: &str, extra: &str) -> String {
    format!(
        "metadata_dir = \"{metadata_dir}\"\n{extra}\n\
         [[backend]]\ntype = \"test-null\"\n[binder]\nenabled = true\n[monitor]\ninterval_ms = 0\n"
    )
}

/// Host: the daemon and checkpointctl, on the read-only disk the guest runs them from
/// (`testbench::binimage`: far faster than from the 9p root).
fn binaries() -> Vec<(String, PathBuf)> {
    ["checkpointd", "checkpointctl"]
        .into_iter()
        .map(|n| (n.to_owned(), testbench::cargo_bin(n)))
        .collect()
}

/// Guest: `name` on the binaries' disk, mounted on first use.
fn bin(name: &str) -> PathBuf {
    match testbench::binimage::mount() {
        Ok(dir) => dir.join(name),
        Err(e) => panic!("mounting the binaries' disk: {e:?}"),
    }
}

fn ctl_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("checkpointctl"));
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// checkpointctl as root: (exit code, stderr).
fn ctl(args: &[&str]) -> Result<(i32, String), Failed> {
    let out = ctl_command(args).output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn status_json() -> Result<serde_json::Value, Failed> {
    let out = ctl_command(&["status", "--json"]).output()?;
    if !out.status.success() {
        return Err(format!("status failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn expect(args: &[&str], want: i32) -> Result<(), Failed> {
    let (code, err) = ctl(args)?;
    if code != want {
        return Err(format!("checkpointctl {args:?}: exit {code}, expected {want}: {err}").into());
    }
    Ok(())
}

fn guest_unprivileged(_: &[String]) -> Result<(), Failed> {
    let stack = start_stack(&config("/dev/shm/checkpointd-meta", ""))?;
    // Let other UIDs open the binder device: access is checked by checkpointd per call.
    guest::sh("chmod 666 /dev/binder")?;
    let as_nobody = |args: &[&str]| -> Result<(i32, String), Failed> {
        let out = ctl_command(args).uid(65534).gid(65534).output()?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    for (args, want) in [
        (&["checkpoint", "supportsCheckpoint"][..], 1),
        (&["checkpoint", "needsRollback"], 0),
        (&["status"], 0),
        (&["history"], 0),
    ] {
        let (code, err) = as_nobody(args)?;
        if code != want {
            return Err(format!("nobody: {args:?} exit {code}, expected {want}: {err}").into());
        }
    }
    for method in [&["startCheckpoint", "2"][..], &["markBootAttempt"], &["commitChanges"]] {
        let mut args = vec!["checkpoint"];
        args.extend_from_slice(method);
        let (code, err) = as_nobody(&args)?;
        if code != 25 || !err.contains("UID 65534 is not allowed") {
            return Err(format!("nobody: {method:?} must be refused, got {code}: {err}").into());
        }
    }
    if status_json()?["state"] != "none" {
        return Err("a refused call changed the state".into());
    }
    // Root may.
    expect(&["checkpoint", "startCheckpoint", "2"], 0)?;
    if status_json()?["state"] != "pending" {
        return Err("startCheckpoint as root did not take effect".into());
    }
    println!("unprivileged checks passed");
    stack.stop()
}

fn mount_disk() -> Result<(), Failed> {
    let disk = guest::disk(0);
    guest::sh(&format!("mkdir -p {MOUNT} && mount -t ext4 {} {MOUNT}", disk.display()))?;
    Ok(())
}

fn guest_boot(args: &[String]) -> Result<(), Failed> {
    let step = args.first().map(String::as_str).unwrap_or("");
    mount_disk()?;
    let meta = format!("{MOUNT}/checkpointd");
    let bootctl = format!("{meta}/bootctl");
    fs::create_dir_all(&meta)?;
    // The bootloader's part of every boot: pick the slot, spend a try if it is not successful.
    let boot = policy::FileBootControl::open_or_create(Path::new(&bootctl), 2)?;
    let slot = boot.bootloader_select()?;
    println!("booted slot {slot}");
    let stack = start_stack(&config(&meta, "[boot_control]\ntype = \"file\"\n"))?;
    match step {
        "start" => expect(&["checkpoint", "startCheckpoint", "2"], 0)?,
        "attempt" => {
            expect(&["checkpoint", "markBootAttempt"], 0)?;
            let (needs, _) = ctl(&["checkpoint", "needsCheckpoint"])?;
            println!("needsCheckpoint={needs}");
        }
        "final" => {}
        other => return Err(format!("unknown step {other}").into()),
    }
    let (rollback, _) = ctl(&["checkpoint", "needsRollback"])?;
    println!("needsRollback={rollback}");
    let status = status_json()?;
    println!("state={}", status["state"].as_str().unwrap_or("?"));
    println!("attempts_left={}", status["attempts_left"]);
    stack.stop()?;
    guest::sh(&format!("umount {MOUNT}"))?;
    Ok(())
}

fn guest_burst(_: &[String]) -> Result<(), Failed> {
    use checkpoint_aidl::android::system::checkpoint::ICheckpoint::ICheckpoint;
    mount_disk()?;
    let meta = format!("{MOUNT}/checkpointd");
    let _stack = start_stack(&config(&meta, ""))?;
    expect(&["checkpoint", "startCheckpoint", &BURST_RETRY.to_string()], 0)?;
    // Make the request durable before the burst, so the cut can only hit the burst.
    guest::sh("sync")?;

    rsbinder::ProcessState::init_default().map_err(|e| format!("binder: {e}"))?;
    let service: rsbinder::Strong<dyn ICheckpoint> =
        rsbinder::hub::wait_for_interface(checkpoint_aidl::SERVICE_NAME)
            .map_err(|e| format!("lookup: {e:?}"))?;
    let completed = guest::shared_dir().join("completed");
    let mut log = fs::OpenOptions::new().create(true).append(true).open(&completed)?;
    println!("burst_started=1");
    // Cut the power from another thread while the calls run.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(1500));
        guest::power_cut();
    });
    let mut n = 0u64;
    loop {
        service.markBootAttempt().map_err(|e| format!("markBootAttempt: {e}"))?;
        n += 1;
        // One line per completed call; 9p writes reach the host at once.
        use std::io::Write;
        writeln!(log, "{n}")?;
    }
}

fn guest_after_cut(_: &[String]) -> Result<(), Failed> {
    mount_disk()?;
    let meta = format!("{MOUNT}/checkpointd");
    // Opening the store runs SQLite's integrity check; a damaged store refuses to start.
    let stack = start_stack(&config(&meta, ""))?;
    let status = status_json()?;
    println!("attempts_left={}", status["attempts_left"]);
    println!("state={}", status["state"].as_str().unwrap_or("?"));
    stack.stop()
}
