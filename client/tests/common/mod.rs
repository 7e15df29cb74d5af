//! checkpointd as a process on its RPC socket, for the client's host tests (the way
//! service/tests/socket_daemon.rs runs it). Each start of the daemon is one "boot".

#![allow(dead_code, reason = "each test file uses a part")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use checkpoint_client::{CheckpointClient, Connect};

/// The cargo profile dir (`target/debug`) of this test executable (`target/debug/deps/…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// A workspace binary: from this target dir (`cargo build --workspace --bins`, as `cargo
/// xtask test` does), else built once into a target dir of its own (the running `cargo test`
/// holds the lock of ours).
pub fn workspace_bin(name: &'static str) -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    static CHECKPOINTD: OnceLock<PathBuf> = OnceLock::new();
    static CHECKPOINTCTL: OnceLock<PathBuf> = OnceLock::new();
    let cell = match name {
        "checkpointd" => &CHECKPOINTD,
        "checkpointctl" => &CHECKPOINTCTL,
        other => panic!("no workspace binary {other} here"),
    };
    cell.get_or_init(|| {
        let sibling = profile_dir().join(name);
        if sibling.exists() {
            return sibling;
        }
        let dir = BUILT.get_or_init(|| {
            let target_dir = profile_dir().with_file_name("client-tests-bins");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = Command::new(cargo)
                .args(["build", "-p", "checkpointd", "-p", "checkpointctl", "--target-dir"])
                .arg(&target_dir)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p checkpointd -p checkpointctl failed");
            target_dir.join("debug")
        });
        let built = dir.join(name);
        assert!(built.exists(), "{} missing after the build", built.display());
        built
    })
}

/// A temp folder with a config (test-null backend, socket only), the metadata dir and the
/// socket.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// A device with a checkpoint backend.
    pub fn new() -> Setup {
        Setup::with_backend(true)
    }

    /// A device that cannot checkpoint when `backend` is false.
    pub fn with_backend(backend: bool) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let setup = Setup { dir };
        let backend = if backend { "[[backend]]\ntype = \"test-null\"\n" } else { "" };
        let config = format!(
            "metadata_dir = \"{}\"\n{backend}\
             [binder]\nenabled = false\n[socket]\npath = \"{}\"\n[monitor]\ninterval_ms = 0\n",
            setup.dir.path().join("metadata").display(),
            setup.socket().display()
        );
        std::fs::write(setup.config(), config).expect("write config");
        setup
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("checkpointd.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("checkpointd.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("checkpointd.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    pub fn client(&self) -> CheckpointClient {
        CheckpointClient::connect(&Connect::socket(self.socket())).expect("connect")
    }

    /// Starts the daemon and waits until its socket answers.
    pub fn boot(&self) -> Daemon {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("daemon log");
        let child = Command::new(workspace_bin("checkpointd"))
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn checkpointd");
        let mut daemon = Daemon { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket().exists()
                && CheckpointClient::connect(&Connect::socket(self.socket())).is_ok()
            {
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                daemon.child = None;
                panic!("checkpointd exited with {status}: {}", self.log_text());
            }
            assert!(Instant::now() < deadline, "no answer in 20 s: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `checkpointctl --socket … args` → exit code.
    pub fn ctl(&self, args: &[&str]) -> i32 {
        let out = Command::new(workspace_bin("checkpointctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run checkpointctl");
        out.status.code().expect("exit code")
    }

    /// The boot flow's hooks up to the point where the new system runs: markBootAttempt,
    /// needsCheckpoint, prepareCheckpoint.
    pub fn boot_hooks(&self) {
        assert_eq!(self.ctl(&["checkpoint", "markBootAttempt"]), 0);
        assert_eq!(self.ctl(&["checkpoint", "needsCheckpoint"]), 1, "a checkpointed boot");
        assert_eq!(self.ctl(&["checkpoint", "prepareCheckpoint"]), 0);
    }
}

pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// SIGTERM, then wait: the clean end of one "boot".
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().expect("wait").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("checkpointd did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
