//! Test doubles: an in-memory backend whose behaviour the test controls, and temp dirs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace};

/// A temporary directory, on tmpfs when available so fsyncs are cheap.
pub fn temp_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("policy-test").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("create a temp dir")
}

/// What the test controls and observes of a [`FakeBackend`].
#[derive(Debug)]
pub struct FakeControl {
    pub state: Mutex<BackendState>,
    pub fail_prepare: AtomicBool,
    pub fail_commit: AtomicBool,
    pub prepares: AtomicU32,
    pub commits: AtomicU32,
    pub free_bytes: Mutex<Option<u64>>,
    pub backup_used_bytes: Mutex<Option<u64>>,
}

impl FakeControl {
    pub fn new() -> Arc<FakeControl> {
        Arc::new(FakeControl {
            state: Mutex::new(BackendState::Idle),
            fail_prepare: AtomicBool::new(false),
            fail_commit: AtomicBool::new(false),
            prepares: AtomicU32::new(0),
            commits: AtomicU32::new(0),
            free_bytes: Mutex::new(None),
            backup_used_bytes: Mutex::new(None),
        })
    }

    pub fn state(&self) -> BackendState {
        *self.state.lock().unwrap()
    }

    pub fn commits(&self) -> u32 {
        self.commits.load(Ordering::SeqCst)
    }
}

/// A backend that behaves like dm-bow's state machine (idle → armed → committed).
#[derive(Debug)]
pub struct FakeBackend {
    pub name: String,
    pub kind: BackendKind,
    pub control: Arc<FakeControl>,
}

impl FakeBackend {
    pub fn boxed(name: &str, kind: BackendKind, control: &Arc<FakeControl>) -> Box<dyn Backend> {
        Box::new(FakeBackend { name: name.to_string(), kind, control: Arc::clone(control) })
    }
}

impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prepare(&self) -> Result<Action, BackendError> {
        self.control.prepares.fetch_add(1, Ordering::SeqCst);
        if self.control.fail_prepare.load(Ordering::SeqCst) {
            return Err(BackendError::Io {
                operation: format!("FITRIM on {}", self.name),
                source: std::io::Error::from_raw_os_error(crate::errno::EIO),
            });
        }
        *self.control.state.lock().unwrap() = BackendState::Armed;
        Ok(Action::Changed)
    }
    fn commit(&self) -> Result<Action, BackendError> {
        if self.control.fail_commit.load(Ordering::SeqCst) {
            return Err(BackendError::InvalidState {
                backend: self.name.clone(),
                state: self.control.state().as_str().to_string(),
                operation: "commit",
            });
        }
        self.control.commits.fetch_add(1, Ordering::SeqCst);
        *self.control.state.lock().unwrap() = BackendState::Committed;
        Ok(Action::Changed)
    }
    fn space(&self) -> Result<BackupSpace, BackendError> {
        Ok(BackupSpace {
            free_bytes: *self.control.free_bytes.lock().unwrap(),
            ..BackupSpace::default()
        })
    }
    fn status(&self) -> Result<BackendStatus, BackendError> {
        Ok(BackendStatus {
            state: self.control.state(),
            backup_used_bytes: *self.control.backup_used_bytes.lock().unwrap(),
            free_bytes: *self.control.free_bytes.lock().unwrap(),
            devices: vec![format!("/dev/fake/{}", self.name)],
        })
    }
}
