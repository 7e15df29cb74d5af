//! Helpers for code running inside the virtual device (guest entries of VM tests).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::status;
use crate::Failed;

/// Whether this process runs inside the virtual device under the harness.
pub fn in_guest() -> bool {
    std::env::var_os("TESTBENCH_GUEST").is_some()
}

/// The writable folder shared with the host (also the guest program's working dir).
///
/// # Panics
/// Outside the virtual device.
pub fn shared_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("TESTBENCH_SHARED")
            .expect("guest::shared_dir() called outside the virtual device"),
    )
}

/// The block device of the `i`-th disk attached with `Vm::disk` (e.g. `/dev/vdb`), found by the
/// serial number the harness gave it. Waits up to 10 s for it to appear.
///
/// # Panics
/// When no such disk shows up.
pub fn disk(i: usize) -> PathBuf {
    let serial = format!("{}{i}", status::DISK_SERIAL_PREFIX);
    disk_by_serial(&serial).unwrap_or_else(|| {
        panic!("guest::disk({i}): no block device with serial {serial} (was it attached with .disk()?)")
    })
}

/// The block device whose serial number is `serial`, waiting up to 10 s for it to appear.
pub fn disk_by_serial(serial: &str) -> Option<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(dev) = find_disk_by_serial(serial) {
            return Some(dev);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find_disk_by_serial(serial: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let got = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if got.trim() == serial {
            let dev = PathBuf::from("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Runs `sh -c <cmd>`; returns its stdout, or an error with its status, stdout and stderr.
pub fn sh(cmd: &str) -> Result<String, Failed> {
    let out = Command::new("/bin/sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("running `{cmd}`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "`{cmd}` failed ({})\n--- stdout ---\n{stdout}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    )
    .into())
}

/// Cuts the power: resets the machine at once, without syncing anything.
///
/// The host sees [`status::GuestExit::PowerCut`]. Data not yet written to an attached disk
/// (page cache, unflushed writes) is lost, as on a real power loss; a later boot with the same
/// disk images sees what was durable.
pub fn power_cut() -> ! {
    // Tell the host this reset is intended. The marker lives on the 9p shared folder; fsyncing
    // that one file does not flush any block device.
    if let Some(dir) = std::env::var_os("TESTBENCH_SHARED") {
        let marker = PathBuf::from(dir).join(status::TB_DIR).join(status::POWER_CUT);
        if let Ok(f) = File::create(marker) {
            let _ = f.sync_all();
        }
    }
    let _ = fs::write("/proc/sys/kernel/sysrq", "1");
    if let Ok(mut trigger) = OpenOptions::new().write(true).open("/proc/sysrq-trigger") {
        let _ = trigger.write_all(b"b");
    }
    // The reset is immediate; if it did not happen, the host's timeout reports it.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Who rsb_hub (rsbinder's service manager on Linux) lets register and find services.
#[derive(Debug, Clone, Copy)]
pub enum HubPolicy<'a> {
    /// A policy file (`--config`); rsb_hub wants it and its folders writable only by the owner.
    File(&'a std::path::Path),
    /// `--insecure-allow-all`: for tests of other services only.
    AllowAll,
}

/// Copies an rsb_hub policy file into a root-owned folder of the guest (`/run`, tmpfs, 0755)
/// and returns the copy. rsb_hub refuses a policy whose file or folders others may write, so
/// the checkout's own file fails when the checkout sits under a world-writable folder such as
/// /tmp; an installed copy works from any checkout location, as the file installed on a device.
fn install_hub_policy(path: &std::path::Path) -> Result<PathBuf, Failed> {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from("/run/testbench/rsb_hub");
    fs::create_dir_all(&dir)?;
    for d in [Path::new("/run/testbench"), dir.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    let name = path.file_name().ok_or_else(|| format!("{} has no file name", path.display()))?;
    let copy = dir.join(name);
    fs::copy(path, &copy)?;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))?;
    Ok(copy)
}

/// Starts rsb_hub on `/dev/binder` and waits for its `READY=1` (sd_notify through
/// `$NOTIFY_SOCKET`), after which it holds the context-manager handle and services may
/// register: no sleep-and-hope. rsb_hub opens only `/dev/binderfs/<name>`, and this kernel has
/// no binderfs, so the `/dev/binderfs/binder -> /dev/binder` link is made first. Output goes to
/// `log`. Load `binder_linux devices=binder,...` before calling.
pub fn start_rsb_hub(policy: HubPolicy<'_>, log: File) -> Result<std::process::Child, Failed> {
    sh("mkdir -p /dev/binderfs && ln -sf /dev/binder /dev/binderfs/binder")?;
    let notify_path = std::path::Path::new("/dev/shm/rsb_hub.notify");
    let _ = fs::remove_file(notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut cmd = Command::new(crate::tool("rsb_hub"));
    match policy {
        HubPolicy::File(path) => cmd.arg("--config").arg(install_hub_policy(path)?),
        HubPolicy::AllowAll => cmd.arg("--insecure-allow-all"),
    };
    let mut hub = cmd
        .env("NOTIFY_SOCKET", notify_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut buf = [0u8; 512];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") => {
                return Ok(hub);
            }
            Ok(_) => {}
            Err(e) => {
                let exited = hub.try_wait()?;
                let _ = hub.kill();
                return Err(
                    format!("rsb_hub never said READY=1 ({e}; exit status {exited:?})").into()
                );
            }
        }
    }
}

/// A long-running guest process (a server) that says it is ready on its first stdout line.
/// Killed when dropped, so a test that fails half-way does not keep the guest up until the
/// harness's timeout.
#[derive(Debug)]
pub struct ReadyProcess {
    pub child: std::process::Child,
    /// Kept open: a server that writes more must not get EPIPE.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl ReadyProcess {
    /// Starts `program args` and waits for its first line, which must contain `ready`;
    /// returns the process and that line. Otherwise the process is reaped and the error says
    /// how it ended and what it printed.
    pub fn start(program: &Path, args: &[&str], ready: &str) -> Result<(Self, String), Failed> {
        use std::io::BufRead;
        let mut child = Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {} {args:?}: {e}", program.display()))?;
        let stdout = child.stdout.take().ok_or("the child has no stdout")?;
        let mut stdout = std::io::BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains(ready) {
            let status = child.wait()?;
            let name = program.display();
            return Err(format!("{name} {args:?} did not come up ({status}): {line:?}").into());
        }
        Ok((ReadyProcess { child, _stdout: stdout }, line))
    }
}

impl Drop for ReadyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
