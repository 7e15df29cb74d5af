//! The one error type of the update-client library.

use std::path::PathBuf;
use std::time::Duration;

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket file does not exist.
    #[error("socket {} does not exist (is checkpointd running with [socket] path set?)", path.display())]
    SocketMissing { path: PathBuf },
    /// The socket exists but the RPC session could not be opened.
    #[error("cannot connect to checkpointd on socket {}: {detail}", path.display())]
    SocketConnect { path: PathBuf, detail: String },
    /// The socket answers but does not serve checkpointd's interface.
    #[error("{} does not serve {name}", path.display())]
    NotServed { path: PathBuf, name: &'static str },
    /// The binder driver could not be opened.
    #[error("cannot open the binder driver: {detail} (without kernel binder, use the socket)")]
    BinderDriver { detail: String },
    /// The service manager never listed the service.
    #[error("service {name} not found after {} s (is checkpointd running?)", waited.as_secs())]
    ServiceNotFound { name: &'static str, waited: Duration },
    /// The service lookup itself failed.
    #[error("lookup of {name} failed: {detail}")]
    Lookup { name: &'static str, detail: String },
    /// A call reached the daemon and failed (the status carries its code and message).
    #[error("{method} failed: {status}")]
    Call { method: &'static str, status: rsbinder::Status },
    /// `startCheckpoint` takes -1 (unlimited) or more; refused before any call.
    #[error("retry must be -1 (unlimited) or more, not {0}")]
    InvalidRetry(i32),
    /// [`crate::CheckpointClient::subscribe`] on a connection opened without events.
    #[error("listener events need a connection opened with events (Connect::with_events)")]
    EventsNotEnabled,
    /// The checkpoint was still not committed when the time was up.
    #[error("the checkpoint was not committed within {} s (state: {state})", waited.as_secs())]
    CommitTimeout { waited: Duration, state: String },
    /// The retry budget is spent: /data was rolled back, the update failed.
    #[error("the checkpoint's retry budget is spent: /data is rolled back, the update failed")]
    RolledBack,
    /// The daemon speaks an older version of the interface than the method needs.
    #[error("{method} needs checkpointd's interface version {needed}; the daemon speaks {found}")]
    OlderService { method: &'static str, needed: i32, found: i32 },
    /// A trace file to send could not be opened or duplicated.
    #[error("cannot use the trace {}: {detail}", path.display())]
    Trace { path: PathBuf, detail: String },
}

/// The classes of [`Error`] a caller branches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// checkpointd cannot be reached (not running, no driver, wrong socket).
    Unavailable,
    /// The caller passed something invalid or used the API wrongly.
    InvalidArgument,
    /// checkpointd answered with an error (permission, backend, state store...).
    Refused,
    /// Waited long enough.
    Timeout,
    /// The update failed and /data is the old one.
    RolledBack,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::SocketMissing { .. }
            | Error::SocketConnect { .. }
            | Error::NotServed { .. }
            | Error::BinderDriver { .. }
            | Error::ServiceNotFound { .. }
            | Error::Lookup { .. } => ErrorKind::Unavailable,
            Error::InvalidRetry(_) | Error::EventsNotEnabled | Error::Trace { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::OlderService { .. } => ErrorKind::Unavailable,
            Error::Call { .. } => ErrorKind::Refused,
            Error::CommitTimeout { .. } => ErrorKind::Timeout,
            Error::RolledBack => ErrorKind::RolledBack,
        }
    }

    /// The binder status of a failed call, e.g. to read its service-specific code.
    pub fn status(&self) -> Option<&rsbinder::Status> {
        match self {
            Error::Call { status, .. } => Some(status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_kind_and_a_message_naming_what_failed() {
        let cases = [
            (
                Error::SocketMissing { path: "/run/c.sock".into() },
                ErrorKind::Unavailable,
                "/run/c.sock",
            ),
            (
                Error::ServiceNotFound { name: "svc", waited: Duration::from_secs(50) },
                ErrorKind::Unavailable,
                "not found after 50 s",
            ),
            (Error::InvalidRetry(-2), ErrorKind::InvalidArgument, "not -2"),
            (Error::EventsNotEnabled, ErrorKind::InvalidArgument, "with_events"),
            (
                Error::CommitTimeout {
                    waited: Duration::from_secs(9),
                    state: "checkpointing".into(),
                },
                ErrorKind::Timeout,
                "within 9 s (state: checkpointing)",
            ),
            (Error::RolledBack, ErrorKind::RolledBack, "rolled back"),
            (
                Error::Call {
                    method: "startCheckpoint",
                    status: rsbinder::Status::new_service_specific_error(95, None),
                },
                ErrorKind::Refused,
                "startCheckpoint failed",
            ),
        ];
        for (error, kind, text) in cases {
            assert_eq!(error.kind(), kind, "{error:?}");
            assert!(error.to_string().contains(text), "{error} lacks {text:?}");
        }
    }
}
