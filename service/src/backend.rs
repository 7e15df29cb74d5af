//! The backends this build can configure.
//!
//! The real block and file-system backends (bow, snapshot, f2fs) are ROADMAP item 1. Until
//! they exist a configuration either has no backend — checkpoints are then not supported, as
//! vold on a device without `checkpoint=` flags — or the `test-null` backend below, which is
//! for test configurations only.

use std::sync::Mutex;

use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
};

use crate::config::CheckpointMethod;

/// A backend that protects NO data: `prepare` and `commit` only record the state, so the
/// policy (budget, latch, commit order, history) can be driven end to end on a machine without
/// dm-bow, dm-snapshot or f2fs. Rollback with it restores nothing. The daemon logs a warning
/// at start when one is configured.
#[derive(Debug)]
pub struct TestNullBackend {
    name: String,
    kind: BackendKind,
    free_bytes: Option<u64>,
    devices: Vec<String>,
    state: Mutex<BackendState>,
}

impl TestNullBackend {
    /// A test-null backend called `name` standing for checkpoints of kind `kind` on `devices`.
    pub fn new(
        name: &str,
        kind: CheckpointMethod,
        free_bytes: Option<u64>,
        devices: Vec<String>,
    ) -> Self {
        let kind = match kind {
            CheckpointMethod::Block => BackendKind::Block,
            CheckpointMethod::Fs => BackendKind::File,
        };
        TestNullBackend {
            name: name.to_owned(),
            kind,
            free_bytes,
            devices,
            state: Mutex::new(BackendState::Idle),
        }
    }

    fn set_state(&self, state: BackendState) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }
}

impl Backend for TestNullBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        self.set_state(BackendState::Armed);
        Ok(Action::Changed)
    }

    fn commit(&self) -> Result<Action, BackendError> {
        self.set_state(BackendState::Committed);
        Ok(Action::Changed)
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        Ok(BackupSpace { free_bytes: self.free_bytes, ..BackupSpace::default() })
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        let state = *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(BackendStatus {
            state,
            backup_used_bytes: Some(0),
            free_bytes: self.free_bytes,
            devices: self.devices.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_prepare_and_commit() {
        let backend =
            TestNullBackend::new("t", CheckpointMethod::Fs, Some(7), vec!["/dev/vdb".into()]);
        assert_eq!(backend.kind(), BackendKind::File);
        assert_eq!(backend.status().expect("status").state, BackendState::Idle);
        assert_eq!(backend.prepare().expect("prepare"), Action::Changed);
        assert_eq!(backend.status().expect("status").state, BackendState::Armed);
        assert_eq!(backend.commit().expect("commit"), Action::Changed);
        let status = backend.status().expect("status");
        assert_eq!(status.state, BackendState::Committed);
        assert_eq!(status.free_bytes, Some(7));
        assert_eq!(backend.free_space().expect("free"), Some(7));
    }
}
