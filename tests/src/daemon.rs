//! checkpointd as a process on its binder RPC Unix socket, for host tests and benches: a temp
//! folder with a config, the metadata dir and the socket ([`Setup`]); the daemon started from
//! it, waited for, stopped and killed when dropped ([`DaemonProcess`]); checkpointctl and Rust
//! clients against it, as root or as another UID; the daemon's thread and fd counts; the
//! percentiles the latency checks use.
//!
//! The API is paths, std types and checkpoint-aidl's generated client types only: this crate
//! must not depend on checkpointd or checkpoint-client, whose tests use it.
//!
//! `CHECKPOINTD_BIN` / `CHECKPOINTCTL_BIN` run the tests against other builds of the binaries
//! (how a fix is shown to be needed: the test fails on the code before it).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use checkpoint_aidl::android::system::checkpoint::CheckpointState::CheckpointState;
use checkpoint_aidl::android::system::checkpoint::ICheckpoint::ICheckpoint;
use checkpoint_aidl::android::system::checkpoint::ICheckpointListener::{
    BnCheckpointListener, ICheckpointListener,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsbinder::Strong;

/// Overrides the checkpointd binary.
pub const DAEMON_ENV: &str = "CHECKPOINTD_BIN";
/// Overrides the checkpointctl binary.
pub const CTL_ENV: &str = "CHECKPOINTCTL_BIN";
/// The unprivileged UID (and GID) the hostile-client tests run clients as.
pub const NOBODY: u32 = 65534;
/// A config line set with the `test-null` backend: a device that can checkpoint.
pub const TEST_BACKEND: &str = "[[backend]]\ntype = \"test-null\"\n";
/// How long the daemon has to answer on its socket after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon has to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one checkpointctl run may take before it counts as hung.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(20);

/// The checkpointd binary: `CHECKPOINTD_BIN`, else the one cargo built beside this executable,
/// else built once (see [`build_once`]).
pub fn checkpointd() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| workspace_bin(DAEMON_ENV, "checkpointd", "checkpointd"))
}

/// The checkpointctl binary: `CHECKPOINTCTL_BIN`, else beside this executable (`cargo build
/// --workspace --bins`, as `cargo xtask test` does), else built once (see [`build_once`]).
pub fn checkpointctl() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| workspace_bin(CTL_ENV, "checkpointctl", "checkpointctl"))
}

fn workspace_bin(env: &str, package: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let sibling = crate::paths::profile_dir().join(name);
    if sibling.exists() {
        return sibling;
    }
    build_once(&["-p", package], Path::new(name))
}

/// Runs `cargo build <args>` (with `--release` when this executable is a release build) into a
/// target dir of its own — the running `cargo test` holds the lock of ours — and returns
/// `built` inside its profile dir. Concurrent callers wait on that dir's cargo lock.
pub fn build_once(args: &[&str], built: &Path) -> PathBuf {
    let profile_dir = crate::paths::profile_dir();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let target_dir = crate::paths::target_dir().join("testbench-bins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.arg("build").args(args).arg("--target-dir").arg(&target_dir);
    if release {
        command.arg("--release");
    }
    let status = command.status().expect("run cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
    let path = target_dir.join(if release { "release" } else { "debug" }).join(built);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// Fails the test unless it runs as root (as CI runs these tests); `why` says what needs it.
pub fn require_root(why: &str) {
    assert!(nix::unistd::geteuid().is_root(), "{why}: run the tests as root (as CI does)");
}

/// Makes `command` run as `uid` (with the same GID), forked with setuid by std.
pub fn as_uid(command: &mut Command, uid: u32) -> &mut Command {
    command.uid(uid).gid(uid)
}

/// Runs `command` with its output captured, killing it after `limit`: `None` if it had to be
/// killed. (Output is read as it comes, so a chatty command cannot block on a full pipe.)
pub fn run_within(mut command: Command, limit: Duration) -> Option<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Some(Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
}

/// A Rust client of the daemon on `socket`, with a session of its own.
pub fn connect(socket: &Path) -> Result<Strong<dyn ICheckpoint>, rsbinder::StatusCode> {
    let uri = checkpoint_aidl::socket_uri(socket);
    rsbinder::connect::<dyn ICheckpoint>(uri.with_service(checkpoint_aidl::SERVICE_NAME))
}

/// How the daemon is started; `Default` is a plain start at `RUST_LOG=info`.
#[derive(Debug, Default, Clone)]
pub struct Launch {
    /// An open-file limit (`ulimit -n`, as a unit without LimitNOFILE gets from systemd).
    pub nofile: Option<u32>,
    /// `RUST_LOG` (default `info`; a bench measuring latency asks for less).
    pub log_level: Option<String>,
    /// More environment, e.g. `NOTIFY_SOCKET`.
    pub env: Vec<(String, PathBuf)>,
}

/// A temp folder (readable by other UIDs, for their clients) with a config, the metadata dir,
/// the daemon's log and the socket.
#[derive(Debug)]
pub struct Setup {
    /// The folder; tests may put more in it (images, markers).
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// A config that serves only the socket, with `top` (backends, devices, other tables)
    /// after `metadata_dir`.
    pub fn new(top: &str) -> Setup {
        Setup::with_tables(top, "", "")
    }

    /// As [`Setup::new`], with `socket` added to the `[socket]` table and `monitor` to the
    /// `[monitor]` table.
    pub fn with_tables(top: &str, socket: &str, monitor: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        let setup = Setup { dir };
        setup.write_config(top, socket, monitor);
        setup
    }

    /// Rewrites the config (the same layout as [`Setup::with_tables`]).
    pub fn write_config(&self, top: &str, socket: &str, monitor: &str) {
        let config = format!(
            "metadata_dir = \"{}\"\n{top}\n\
             [binder]\nenabled = false\n[socket]\npath = \"{}\"\n{socket}\n\
             [monitor]\ninterval_ms = 0\n{monitor}",
            self.metadata().display(),
            self.socket().display()
        );
        std::fs::write(self.config(), config).expect("write config");
    }

    /// `name` inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self) -> PathBuf {
        self.path("checkpointd.toml")
    }

    pub fn metadata(&self) -> PathBuf {
        self.path("metadata")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("checkpointd.sock")
    }

    /// The daemon's stderr, every start appended.
    pub fn log(&self) -> PathBuf {
        self.path("checkpointd.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Starts the daemon (one "boot") and waits until the socket answers.
    pub fn boot(&self) -> DaemonProcess {
        self.boot_with(&Launch::default())
    }

    /// [`Setup::boot`] with `launch`.
    pub fn boot_with(&self, launch: &Launch) -> DaemonProcess {
        let mut daemon = self.spawn(launch);
        self.wait_for_socket(&mut daemon);
        daemon
    }

    /// Starts the daemon without waiting for it (a stale socket removed first).
    pub fn spawn(&self, launch: &Launch) -> DaemonProcess {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("daemon log file");
        let mut command = match launch.nofile {
            Some(nofile) => {
                let mut sh = Command::new("/bin/sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {nofile} && exec \"$0\" --config \"$1\""))
                    .arg(checkpointd())
                    .arg(self.config());
                sh
            }
            None => {
                let mut daemon = Command::new(checkpointd());
                daemon.arg("--config").arg(self.config());
                daemon
            }
        };
        command.env("RUST_LOG", launch.log_level.as_deref().unwrap_or("info"));
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        let child = command.stderr(Stdio::from(log)).spawn().expect("spawn checkpointd");
        DaemonProcess { child: Some(child) }
    }

    /// Waits up to [`START_TIMEOUT`] until a client connects; fails the test with the log if
    /// the daemon exits or does not answer.
    pub fn wait_for_socket(&self, daemon: &mut DaemonProcess) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = None;
        loop {
            if self.socket().exists() {
                match self.client() {
                    Ok(_) => return,
                    Err(e) => last = Some(e),
                }
            }
            if let Some(status) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                daemon.child = None;
                panic!("checkpointd exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "checkpointd did not answer on its socket in {START_TIMEOUT:?} (last error: \
                 {last:?}); log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops `daemon` (SIGTERM) and boots it again: a reboot.
    pub fn restart(&self, daemon: DaemonProcess) -> DaemonProcess {
        daemon.stop();
        self.boot()
    }

    /// Runs the daemon expecting it to refuse to start: exit code 1 within 10 s, no socket
    /// created. Returns its stderr.
    pub fn start_fails(&self) -> String {
        let mut command = Command::new(checkpointd());
        command.arg("--config").arg(self.config());
        let out = run_within(command, Duration::from_secs(10)).unwrap_or_else(|| {
            panic!("checkpointd started (it was still running after 10 s); it must refuse")
        });
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "checkpointd should refuse to start: {stderr}");
        assert!(!self.socket().exists(), "no socket may be created");
        stderr
    }

    /// A root client with a session of its own.
    pub fn client(&self) -> Result<Strong<dyn ICheckpoint>, rsbinder::StatusCode> {
        connect(&self.socket())
    }

    /// A root client whose session can receive listener calls; keep the `rsbinder::Client`
    /// for as long as the listener must hear.
    pub fn callback_client(&self) -> (rsbinder::Client, Strong<dyn ICheckpoint>) {
        let client =
            rsbinder::Client::open_with(checkpoint_aidl::socket_uri(&self.socket()), |o, _| {
                o.incoming_connections = Some(1);
            })
            .expect("client with a callback connection");
        let service = client
            .try_get(checkpoint_aidl::SERVICE_NAME)
            .expect("lookup")
            .expect("the service is registered");
        (client, service)
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(checkpointctl());
        command.arg("--socket").arg(self.socket()).args(args);
        command
    }

    /// `checkpointctl --socket … args` as root; a run longer than [`CTL_TIMEOUT`] fails.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_within(self.ctl_command(args), CTL_TIMEOUT).expect("checkpointctl hung")
    }

    /// `checkpointctl args` as `uid`: (exit code, stdout, stderr).
    pub fn ctl_as(&self, uid: u32, args: &[&str]) -> (i32, String, String) {
        let mut command = self.ctl_command(args);
        as_uid(&mut command, uid);
        let out = run_within(command, CTL_TIMEOUT).expect("checkpointctl hung");
        (
            out.status.code().expect("exit code"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `checkpointctl args`, which must succeed; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "checkpointctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// `checkpointctl args`, which must succeed and print JSON.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ctl_ok(args)).expect("JSON")
    }

    /// `checkpointctl checkpoint <args>` (vdc's command line): (exit code, stderr).
    pub fn vdc(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["checkpoint"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        (out.status.code().expect("exit code"), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `checkpointctl watch` as `uid`; returns it once it has registered its listener, or
    /// `Err(message)` if the daemon refused it. Bounded: a daemon whose registerListener hangs
    /// gives an error after 20 s, not a hang.
    pub fn watch_as(&self, uid: u32) -> Result<ClientProcess, String> {
        let mut command = self.ctl_command(&["--timeout", "10", "watch"]);
        as_uid(&mut command, uid);
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run checkpointctl watch");
        let stderr = child.stderr.take().expect("stderr");
        let watcher = ClientProcess(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stderr).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("watching") => Ok(watcher),
            Ok(line) => Err(line),
            Err(_) => Err("checkpointctl watch got no answer in 20 s".to_owned()),
        }
    }
}

/// The daemon; SIGKILLed if the test ends before [`DaemonProcess::stop`].
#[derive(Debug)]
pub struct DaemonProcess {
    child: Option<Child>,
}

impl DaemonProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then wait up to [`STOP_TIMEOUT`]: the clean shutdown of one "boot". Fails the
    /// test (after a SIGKILL, by the drop) if the daemon does not stop.
    pub fn stop(mut self) {
        if self.child.is_some() {
            self.signal(Signal::SIGTERM);
            assert!(self.wait_exit(STOP_TIMEOUT).is_some(), "checkpointd did not stop on SIGTERM");
        }
    }

    /// Sends `signal` to the daemon (if it still runs).
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(i32::try_from(child.id()).expect("pid")), signal);
        }
    }

    /// Waits up to `within` for the daemon to exit: its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// (threads, open fds) of the daemon now.
    pub fn usage(&self) -> (usize, usize) {
        threads_and_fds(self.pid())
    }

    /// Waits up to `within` until the daemon's threads and fds are back within `slack` of
    /// `baseline`; returns the counts it ended with (the caller checks them).
    pub fn back_to(
        &self,
        baseline: (usize, usize),
        slack: usize,
        within: Duration,
    ) -> (usize, usize) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.usage();
            if now.0 <= baseline.0 + slack && now.1 <= baseline.1 + slack {
                return now;
            }
            if Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client process; SIGKILLed when dropped.
#[derive(Debug)]
pub struct ClientProcess(pub Child);

impl ClientProcess {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(i32::try_from(self.0.id()).expect("pid")), signal);
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (threads, open fds) of process `pid`, from /proc (0 when it is gone).
pub fn threads_and_fds(pid: u32) -> (usize, usize) {
    let count =
        |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |e| e.count());
    (count("task"), count("fd"))
}

/// The most threads and fds a process had while it was sampled (every 20 ms).
#[derive(Debug)]
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

impl PeakSampler {
    pub fn start(pid: u32) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = (0, 0);
            while !stopped.load(Ordering::SeqCst) {
                let now = threads_and_fds(pid);
                peak = (peak.0.max(now.0), peak.1.max(now.1));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        PeakSampler { stop, thread }
    }

    /// Stops sampling: (peak threads, peak fds).
    pub fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

/// The `p`th percentile (0..=100, nearest rank below) of `samples`, which need not be sorted.
/// Panics on no samples: a latency check without samples has measured nothing.
pub fn percentile<T: Ord + Copy>(samples: &[T], p: usize) -> T {
    assert!(!samples.is_empty(), "a percentile of no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Holds `count` connections to `socket`, re-opening up to 200 a second of those the daemon
/// closes (or that never opened), for `for_at_most`. Prints `holding N` once they are open:
/// the line the process that started this one waits for. Runs in a process of another UID
/// (a test binary run again, as a hostile client).
pub fn hold_connections(socket_path: &Path, count: usize, for_at_most: Duration) {
    use nix::sys::socket::{
        connect, recv, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::{AsRawFd, OwnedFd};

    let address = UnixAddr::new(socket_path).expect("socket address");
    let open = || -> Option<OwnedFd> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .ok()?;
        // A full backlog (EAGAIN) is retried on the next round.
        connect(fd.as_raw_fd(), &address).ok().map(|()| fd)
    };
    let mut held: Vec<Option<OwnedFd>> = (0..count).map(|_| open()).collect();
    println!("holding {}", held.iter().flatten().count());
    let stop = Instant::now() + for_at_most;
    while Instant::now() < stop {
        std::thread::sleep(Duration::from_millis(250));
        // A peek that does not say "nothing yet" (EAGAIN) is an end of stream or an error.
        let closed: Vec<usize> = held
            .iter()
            .enumerate()
            .filter(|(_, fd)| {
                fd.as_ref().is_none_or(|fd| {
                    let mut byte = [0u8; 1];
                    recv(fd.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK)
                        != Err(nix::errno::Errno::EAGAIN)
                })
            })
            .map(|(i, _)| i)
            .collect();
        // A steady retry, not a flood: a CPU-burning client slows everyone on a 2-core machine
        // whatever the daemon does; holding its resources is what is tested.
        for i in closed.into_iter().take(50) {
            held[i] = open();
        }
    }
}

/// A listener that sends each event it hears as a line: `state N`, `progress DONE/TOTAL`,
/// `low-space FREE`.
pub fn event_listener() -> (Strong<dyn ICheckpointListener>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    (BnCheckpointListener::new_binder(EventLines(Mutex::new(tx))), rx)
}

struct EventLines(Mutex<mpsc::Sender<String>>);

impl rsbinder::Interface for EventLines {}

#[allow(non_snake_case, reason = "AIDL names")]
impl ICheckpointListener for EventLines {
    fn onStateChanged(&self, state: CheckpointState) -> rsbinder::BinderResult<()> {
        let _ = self.0.lock().expect("lock").send(format!("state {}", state.0));
        Ok(())
    }
    fn onRestoreProgress(&self, done: i64, total: i64) -> rsbinder::BinderResult<()> {
        let _ = self.0.lock().expect("lock").send(format!("progress {done}/{total}"));
        Ok(())
    }
    fn onLowSpace(&self, free: i64) -> rsbinder::BinderResult<()> {
        let _ = self.0.lock().expect("lock").send(format!("low-space {free}"));
        Ok(())
    }
}
