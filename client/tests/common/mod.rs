//! checkpointd as a process on its RPC socket, for the client's host tests: the shared
//! harness (`testbench::daemon`, as service/tests/socket_daemon.rs uses it) with the client
//! library's view. Each start of the daemon is one "boot".

#![allow(dead_code, reason = "each test file uses a part")]

use checkpoint_client::{CheckpointClient, Connect};

/// A temp folder with a config (test-null backend, socket only), the metadata dir and the
/// socket; the harness's methods through `Deref`.
pub struct Setup(testbench::daemon::Setup);

impl std::ops::Deref for Setup {
    type Target = testbench::daemon::Setup;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Setup {
    /// A device with a checkpoint backend.
    pub fn new() -> Setup {
        Setup::with_backend(true)
    }

    /// A device that cannot checkpoint when `backend` is false.
    pub fn with_backend(backend: bool) -> Setup {
        let top = if backend { testbench::daemon::TEST_BACKEND } else { "" };
        Setup(testbench::daemon::Setup::new(top))
    }

    /// The client library's connection (the harness's `client` is the raw AIDL one).
    pub fn client(&self) -> CheckpointClient {
        CheckpointClient::connect(&Connect::socket(self.socket())).expect("connect")
    }

    /// `checkpointctl --socket … args` → exit code.
    pub fn ctl(&self, args: &[&str]) -> i32 {
        self.0.ctl(args).status.code().expect("exit code")
    }

    /// The boot flow's hooks up to the point where the new system runs: markBootAttempt,
    /// needsCheckpoint, prepareCheckpoint.
    pub fn boot_hooks(&self) {
        assert_eq!(self.ctl(&["checkpoint", "markBootAttempt"]), 0);
        assert_eq!(self.ctl(&["checkpoint", "needsCheckpoint"]), 1, "a checkpointed boot");
        assert_eq!(self.ctl(&["checkpoint", "prepareCheckpoint"]), 0);
    }
}
