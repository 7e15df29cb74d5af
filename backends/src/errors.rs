//! One place that turns the OS crate's errors into [`BackendError`]s, keeping the errno (the
//! daemon maps it to an ICheckpoint code) and saying what was being done.

use std::io;

use blockdev::dm::DmError;
use blockdev::units::UnitError;
use blockdev::ErrorKind as OsKind;
use policy::BackendError;

/// An `io::Error` carrying `errno` when there is one, else the message.
fn io_of(errno: Option<i32>, message: String) -> io::Error {
    match errno {
        Some(e) => io::Error::from_raw_os_error(e),
        None => io::Error::other(message),
    }
}

/// A device-mapper failure while doing `operation` (for `backend`, in unsupported cases).
pub(crate) fn dm(backend: &str, operation: impl Into<String>, e: DmError) -> BackendError {
    let operation = operation.into();
    if e.kind() == OsKind::Unsupported {
        return BackendError::Unsupported {
            backend: backend.to_owned(),
            reason: format!("{operation}: {e}"),
        };
    }
    let errno = e.errno().map(|e| e as i32);
    BackendError::Io { operation: format!("{operation}: {e}"), source: io_of(errno, e.to_string()) }
}

/// A filesystem ioctl failure (FITRIM, FIEMAP, FIFREEZE, ...).
pub(crate) fn fs(operation: impl Into<String>, e: blockdev::fs::FsError) -> BackendError {
    let errno = match &e {
        blockdev::fs::FsError::Os { errno, .. } => Some(*errno as i32),
        _ => None,
    };
    if let blockdev::fs::FsError::UnmappableExtent { .. } = e {
        return BackendError::Corrupt { what: operation.into(), reason: e.to_string() };
    }
    BackendError::Io {
        operation: format!("{}: {e}", operation.into()),
        source: io_of(errno, e.to_string()),
    }
}

/// A mount, remount or umount failure.
pub(crate) fn mount(e: blockdev::mount::MountError) -> BackendError {
    let errno = e.errno as i32;
    BackendError::Io { operation: e.to_string(), source: io::Error::from_raw_os_error(errno) }
}

/// A block-device ioctl failure.
pub(crate) fn blk(operation: impl Into<String>, e: blockdev::blk::BlkError) -> BackendError {
    BackendError::Io {
        operation: format!("{}: {e}", operation.into()),
        source: io::Error::from_raw_os_error(e.errno as i32),
    }
}

/// A plain `io::Error` while doing `operation`.
pub(crate) fn io(operation: impl Into<String>, e: io::Error) -> BackendError {
    BackendError::Io { operation: operation.into(), source: e }
}

/// A unit conversion that cannot fail for sane devices, reported as corrupt input if it does.
pub(crate) fn units(what: impl Into<String>, e: UnitError) -> BackendError {
    BackendError::Corrupt { what: what.into(), reason: e.to_string() }
}
