//! The checkpoint backend contract. The real backends (dm-bow, dm-snapshot, f2fs) live in the
//! `backends` crate, which joins this trait to the OS (`blockdev`) and the dm-bow log (`bow`);
//! the policy only needs this interface.

use std::fmt;
use std::io;

use crate::error::{errno, ErrorKind};

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
    /// This kernel or device cannot carry the backend (no dm-bow target, not f2fs, ...).
    #[error("backend {backend} is not supported here: {reason}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// On-disk backup metadata (a COW store header, a dm-bow log, a recorded extent map) is
    /// malformed or disagrees with the device.
    #[error("{what}: {reason}")]
    Corrupt {
        /// What was read, e.g. "COW store of /dev/vdb".
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller asked for something no device state could satisfy (a size of 0, more than
    /// the whole filesystem): refused before anything is changed.
    #[error("{operation}: {reason}")]
    InvalidArgument {
        /// What was asked, e.g. "reserve 0 bytes at /data/.checkpointd/reserved".
        operation: String,
        /// Why it is refused.
        reason: String,
    },
    /// Not enough space for the backups.
    #[error("{operation}: needs {needed} bytes, {available} available")]
    NoSpace {
        /// What was being done.
        operation: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
}

impl BackendError {
    /// Shorthand for an [`BackendError::Io`] with its operation.
    pub fn io(operation: impl Into<String>, source: io::Error) -> Self {
        BackendError::Io { operation: operation.into(), source }
    }

    /// Classification callers branch on (the daemon maps it to an ICheckpoint code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Io { source, .. } if source.raw_os_error() == Some(errno::ENOSPC) => {
                ErrorKind::NoSpace
            }
            BackendError::Io { .. } => ErrorKind::Io,
            BackendError::InvalidState { .. } | BackendError::NotSetUp { .. } => ErrorKind::Backend,
            BackendError::Unsupported { .. } => ErrorKind::NotSupported,
            BackendError::Corrupt { .. } => ErrorKind::Corrupt,
            BackendError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            BackendError::NoSpace { .. } => ErrorKind::NoSpace,
        }
    }

    /// The OS error of an I/O failure, if there is one.
    pub fn os_errno(&self) -> Option<i32> {
        match self {
            BackendError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What an idempotent backend step did (stratisd's `CreateAction`/`DeleteAction` shape).
///
/// Every step of the [`Backend`] contract can be retried after a crash or a partial failure: a
/// step whose effect is already in place answers `Identity` instead of failing on an "illegal
/// transition", so the policy can simply call it again.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The step changed something.
    Changed,
    /// Everything was already as the step would leave it.
    Identity,
}

/// Backup space as a backend measures it. Every field is `None` when the backend cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackupSpace {
    /// Bytes still available for backups, corrected for what the kernel's own counter misses
    /// (e.g. dm-bow's `bow/free` over-reports: dm-bow-format.md §11).
    pub free_bytes: Option<u64>,
    /// Bytes of backup space consumed by the current checkpoint.
    pub used_bytes: Option<u64>,
    /// The whole backup area (free + used), where it is bounded (a COW store's size).
    pub total_bytes: Option<u64>,
    /// The backend asks to be grown once its free space falls below this, before the health
    /// monitor's thresholds (the snapshot backend's `grow_at_percent` of `total_bytes`; the
    /// monitor asks once per size). `None`: grown only at the monitor's action threshold.
    pub grow_below_free_bytes: Option<u64>,
}

/// How a restore (`restoreCheckpoint` / `restoreCheckpointPart`) is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RestoreRequest {
    /// `restoreCheckpointPart(dev, count)`: stop after this many log entries (a test hook of
    /// vold's); `None` for a whole restore.
    pub limit: Option<u64>,
}

/// What a backend's restore (rollback before mount) did, for the history and the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    /// The outcome recorded in the history.
    pub outcome: crate::RestoreOutcome,
    /// The ICheckpoint result: `Ok` or an errno-style code with vold's message (vold answers
    /// "No magic" with EINVAL when there is no log, which fs_mgr ignores).
    pub result: Result<(), (i32, String)>,
}

/// A checkpoint mechanism under one or more filesystems.
///
/// The contract (docs/backends.md): each step is idempotent and answers an [`Action`]; the
/// policy never holds its own lock while a backend does I/O. The steps that run before /data is
/// mounted (building the device stack) belong to the boot flow (`backends::BootStack`), not to
/// this trait: the daemon only sees a mounted, possibly checkpointed, device.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Block or file checkpoint.
    fn kind(&self) -> BackendKind;
    /// A short stable name ("bow", "snapshot", "f2fs"), recorded in the store.
    fn name(&self) -> &str;
    /// Why this backend was chosen (e.g. "auto: dm-bow target absent, using snapshot"), for the
    /// log and getStatus. Empty when it was configured explicitly.
    fn selection_reason(&self) -> &str {
        ""
    }
    /// Whether `restoreCheckpoint(device)` is this backend's to answer.
    fn covers(&self, _device: &str) -> bool {
        false
    }
    /// Before mount: roll `device` back to the start of an uncommitted checkpoint (dm-bow log
    /// restore, snapshot merge), or finish an interrupted rollback. Idempotent: a rerun after a
    /// crash gives the same device.
    fn restore(
        &self,
        device: &str,
        _request: &RestoreRequest,
        _progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        Err(BackendError::NotSetUp { backend: format!("{} (restore of {device})", self.name()) })
    }
    /// Arm the checkpoint for this boot (vold `prepareCheckpoint` at post-fs-data).
    fn prepare(&self) -> Result<Action, BackendError>;
    /// Make this boot's changes permanent and drop the backups.
    fn commit(&self) -> Result<Action, BackendError>;
    /// `abortChanges`: leave the device so that the next boot's restore rolls it back. The
    /// default has nothing to do (the backups stay where they are).
    fn abort(&self) -> Result<Action, BackendError> {
        Ok(Action::Identity)
    }
    /// On a boot that is not checkpointing: release what an earlier checkpoint left behind
    /// (a COW file after a rollback, a stale kernel object). The default has nothing to drop.
    fn teardown(&self) -> Result<Action, BackendError> {
        Ok(Action::Identity)
    }
    /// Makes more backup space if the backend can (a COW store grown by extending its file,
    /// remapping and reloading); the health monitor calls it when space runs low, before its
    /// low-space action. The default cannot grow.
    fn grow(&self) -> Result<Action, BackendError> {
        Ok(Action::Identity)
    }
    /// Free and used backup space.
    fn space(&self) -> Result<BackupSpace, BackendError>;
    /// Bytes still available for backups, if the backend can tell.
    fn free_space(&self) -> Result<Option<u64>, BackendError> {
        Ok(self.space()?.free_bytes)
    }
    /// The backend's own view of its state.
    fn status(&self) -> Result<BackendStatus, BackendError>;
}

/// A shared backend is a backend (the daemon and a test may hold the same object).
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn kind(&self) -> BackendKind {
        (**self).kind()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
    fn selection_reason(&self) -> &str {
        (**self).selection_reason()
    }
    fn covers(&self, device: &str) -> bool {
        (**self).covers(device)
    }
    fn restore(
        &self,
        device: &str,
        request: &RestoreRequest,
        progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        (**self).restore(device, request, progress)
    }
    fn prepare(&self) -> Result<Action, BackendError> {
        (**self).prepare()
    }
    fn commit(&self) -> Result<Action, BackendError> {
        (**self).commit()
    }
    fn abort(&self) -> Result<Action, BackendError> {
        (**self).abort()
    }
    fn teardown(&self) -> Result<Action, BackendError> {
        (**self).teardown()
    }
    fn grow(&self) -> Result<Action, BackendError> {
        (**self).grow()
    }
    fn space(&self) -> Result<BackupSpace, BackendError> {
        (**self).space()
    }
    fn free_space(&self) -> Result<Option<u64>, BackendError> {
        (**self).free_space()
    }
    fn status(&self) -> Result<BackendStatus, BackendError> {
        (**self).status()
    }
}
