//! The checkpoint backend trait. Real backends (dm-bow, dm-snapshot, f2fs) live elsewhere and
//! come later (ROADMAP item 1); the policy only needs this interface.

use std::fmt;
use std::io;

use crate::error::ErrorKind;

/// Where a backend's checkpoint starts, which decides how the policy commits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// A block-level checkpoint (vold `checkpoint=block`): armed by `prepare` (FITRIM, then
    /// dm-bow state 1). It is only committed if it was armed (see docs/state-machine.md).
    Block,
    /// A filesystem-level checkpoint (vold `checkpoint=fs`, f2fs `checkpoint=disable`): active
    /// from mount, always committed.
    File,
}

impl BackendKind {
    /// `"block"` or `"file"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Block => "block",
            BackendKind::File => "file",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend's own view of its checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Set up but not armed (dm-bow state 0).
    Idle,
    /// Backing up writes (dm-bow state 1, f2fs `checkpoint=disable`).
    Armed,
    /// Committed (dm-bow state 2, f2fs remounted `checkpoint=enable`).
    Committed,
    /// The backend cannot tell (device missing, ...).
    Unknown,
}

impl BackendState {
    /// `"idle"`, `"armed"`, `"committed"` or `"unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Idle => "idle",
            BackendState::Armed => "armed",
            BackendState::Committed => "committed",
            BackendState::Unknown => "unknown",
        }
    }
}

/// What a backend reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// Its checkpoint state.
    pub state: BackendState,
    /// Bytes of backup space consumed by the current checkpoint, if known.
    pub backup_used_bytes: Option<u64>,
    /// Bytes still available for backups, if known.
    pub free_bytes: Option<u64>,
    /// The devices or mount points it covers.
    pub devices: Vec<String>,
}

/// An error from a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An operation on a device or file failed.
    #[error("{operation}: {source}")]
    Io {
        /// What was being done, e.g. "write 2 to /sys/block/dm-3/bow/state".
        operation: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backend is not in a state that allows the operation.
    #[error("backend {backend} is {state}, cannot {operation}")]
    InvalidState {
        /// The backend's name.
        backend: String,
        /// Its current state.
        state: String,
        /// The refused operation.
        operation: &'static str,
    },
    /// The backend's device was never set up in this boot.
    #[error("backend {backend} is not set up")]
    NotSetUp {
        /// The backend's name.
        backend: String,
    },
}

impl BackendError {
    /// Classification: I/O errors are `Io`, the rest `Backend`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Io { .. } => ErrorKind::Io,
            BackendError::InvalidState { .. } | BackendError::NotSetUp { .. } => ErrorKind::Backend,
        }
    }
}

/// A checkpoint mechanism under one or more filesystems.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Block or file checkpoint.
    fn kind(&self) -> BackendKind;
    /// A short stable name ("bow", "snapshot", "f2fs"), recorded in the store.
    fn name(&self) -> &str;
    /// Arm the checkpoint for this boot (vold `prepareCheckpoint` at post-fs-data).
    fn prepare(&self) -> Result<(), BackendError>;
    /// Make this boot's changes permanent.
    fn commit(&self) -> Result<(), BackendError>;
    /// Bytes still available for backups, if the backend can tell.
    fn free_space(&self) -> Result<Option<u64>, BackendError>;
    /// The backend's own view of its state.
    fn status(&self) -> Result<BackendStatus, BackendError>;
}
