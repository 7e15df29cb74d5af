//! Error classification shared by the whole crate, and the vold-compatible error codes.
//!
//! Every error type of this crate has a `kind()`; [`PolicyError::errno`] turns a kind into the
//! code vold puts into its `ServiceSpecificException` (vold-checkpoint.md §3.1, §4.13). The
//! daemon maps errors to binder in one place with these two functions.

use crate::backend::BackendError;
use crate::bootctl::BootControlError;
use crate::store::StoreError;

/// Linux errno values used as ServiceSpecificException codes (identical on Android).
pub mod errno {
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Try again (the store is locked by another process).
    pub const EAGAIN: i32 = 11;
    /// No space left on device (backup space exhausted).
    pub const ENOSPC: i32 = 28;
    /// Invalid argument (vold's code for argument, boot-HAL and commit errors).
    pub const EINVAL: i32 = 22;
    /// Protocol error (a store written by a newer checkpointd).
    pub const EPROTO: i32 = 71;
    /// Operation not supported ("Checkpoints not supported").
    pub const ENOTSUP: i32 = 95;
    /// Structure needs cleaning (a corrupt store or boot record).
    pub const EUCLEAN: i32 = 117;
    /// Permission denied (an OS errno passed through).
    pub const EACCES: i32 = 13;

    /// THE mapping to the vold-compatible ServiceSpecificException code, used for every error
    /// of the policy, the store and the backends (and by the daemon's binder mapping): an I/O
    /// error reports the OS errno when one is known (vold reports `errno`), every other kind
    /// its fixed code ([`super::ErrorKind::errno`]).
    pub fn code(kind: super::ErrorKind, os_errno: Option<i32>) -> i32 {
        match kind {
            super::ErrorKind::Io => os_errno.filter(|e| *e > 0).unwrap_or(EIO),
            other => other.errno(),
        }
    }
}

/// What kind of failure an error is; callers branch on this, not on messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No checkpoint backend is configured (vold: no `checkpoint=` fstab flag).
    NotSupported,
    /// A caller passed an invalid argument.
    InvalidArgument,
    /// An I/O error in the store or a record file.
    Io,
    /// The store or a record file is corrupt.
    Corrupt,
    /// The store was written by a newer version of checkpointd.
    Incompatible,
    /// The boot control HAL (or its file-based stand-in) failed.
    BootControl,
    /// A checkpoint backend failed.
    Backend,
    /// The store is locked by another process.
    Busy,
    /// Out of space (the backup area or the metadata file system).
    NoSpace,
}

impl ErrorKind {
    /// The vold-compatible ServiceSpecificException code for this kind. `Io` maps to `EIO`
    /// here; [`PolicyError::errno`] prefers the OS errno when one is known.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::NotSupported => errno::ENOTSUP,
            ErrorKind::InvalidArgument | ErrorKind::BootControl | ErrorKind::Backend => {
                errno::EINVAL
            }
            ErrorKind::Io => errno::EIO,
            ErrorKind::Corrupt => errno::EUCLEAN,
            ErrorKind::Incompatible => errno::EPROTO,
            ErrorKind::Busy => errno::EAGAIN,
            ErrorKind::NoSpace => errno::ENOSPC,
        }
    }
}

/// An error from a [`crate::Checkpointer`] operation. `Display` is the message a caller sees.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `startCheckpoint` without any configured backend.
    #[error("Checkpoints not supported")]
    NotSupported,
    /// `startCheckpoint` with `retry < -1`.
    #[error("Retry count must be more than -1 (got {retry})")]
    InvalidRetry {
        /// The rejected value.
        retry: i32,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `markBootSuccessful` failed during a commit.
    #[error("Error marking booted successfully: {0}")]
    MarkBootSuccessful(#[source] BootControlError),
    /// Another boot control call failed where the policy cannot continue.
    #[error("Boot control failed: {0}")]
    BootControl(#[source] BootControlError),
    /// A backend failed to commit; the checkpoint stays active.
    #[error("Failed to commit backend {backend}: {source}")]
    BackendCommit {
        /// The backend's name.
        backend: String,
        /// What went wrong.
        #[source]
        source: BackendError,
    },
    /// Another backend step failed (the health monitor's `grow`).
    #[error("backend {backend}: {operation} failed: {source}")]
    BackendStep {
        /// The backend's name.
        backend: String,
        /// The step.
        operation: &'static str,
        /// What went wrong.
        #[source]
        source: BackendError,
    },
    /// No backend has this name.
    #[error("no backend is called {0}")]
    UnknownBackend(String),
}

impl PolicyError {
    /// The classification callers branch on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PolicyError::NotSupported => ErrorKind::NotSupported,
            PolicyError::InvalidRetry { .. } => ErrorKind::InvalidArgument,
            PolicyError::Store(e) => e.kind(),
            PolicyError::MarkBootSuccessful(_) | PolicyError::BootControl(_) => {
                ErrorKind::BootControl
            }
            PolicyError::BackendCommit { .. } => ErrorKind::Backend,
            PolicyError::BackendStep { source, .. } => source.kind(),
            PolicyError::UnknownBackend(_) => ErrorKind::InvalidArgument,
        }
    }

    /// The OS error behind it, if one is known.
    pub fn os_errno(&self) -> Option<i32> {
        match self {
            PolicyError::Store(e) => e.os_errno(),
            PolicyError::BackendCommit { source, .. } | PolicyError::BackendStep { source, .. } => {
                source.os_errno()
            }
            _ => None,
        }
    }

    /// The vold-compatible ServiceSpecificException code (vold-checkpoint.md §4.13): ENOTSUP
    /// for "not supported", EINVAL for bad arguments, boot-HAL and backend failures (as vold),
    /// the OS errno for I/O errors when known ([`errno::code`]).
    pub fn errno(&self) -> i32 {
        errno::code(self.kind(), self.os_errno())
    }
}
