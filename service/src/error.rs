//! The daemon's errors and the ONE function that turns them into a binder status.
//!
//! Codes (documented in ICheckpoint.aidl and docs/integration.md):
//! - a caller that may not make the call: `EX_SECURITY` (as vold's `CheckUidOrRoot`);
//! - a malformed restore path: `EX_ILLEGAL_ARGUMENT` with vold's messages;
//! - everything else: `ServiceSpecificException` with an errno-style code, by error kind.

use checkpoint_aidl::android::system::checkpoint::ICheckpoint;
use policy::{BackendError, ErrorKind, PolicyError};
use rsbinder::{ExceptionCode, Status};

/// An error of one service call, with the context the caller sees.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The caller's UID may not make this call.
    #[error("UID {uid} is not allowed to call {method}")]
    PermissionDenied {
        /// The caller's UID (`u32::MAX` when the transport carries none).
        uid: u32,
        /// The AIDL method.
        method: &'static str,
    },
    /// A restore path failed vold's validation; the message is vold's.
    #[error("{0}")]
    InvalidPath(String),
    /// An argument is out of range (other than retry, which the policy checks).
    #[error("{0}")]
    InvalidArgument(String),
    /// The checkpoint policy or its store failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A backend step run for the call failed (a restore that could not run).
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The method needs the boot control HAL, which has not been found yet (nothing changed).
    #[error(transparent)]
    BootHalNotReady(#[from] crate::boot_hal::HalNotReady),
    /// A restore failed; `code` is an ICheckpoint error code.
    #[error("{message}")]
    Restore {
        /// The ICheckpoint error code (EINVAL, EAGAIN, an errno).
        code: i32,
        /// vold-style message.
        message: String,
    },
}

/// The ServiceSpecificException code for an error kind. `os_errno` is the OS error of an I/O
/// failure, if one is known (vold reports `errno` for I/O failures). The table itself is
/// `policy::errno::code`, the one place that knows the codes (the policy, the store and the
/// backends classify with `ErrorKind`); the test below pins it to ICheckpoint's constants.
pub fn code_for_kind(kind: ErrorKind, os_errno: Option<i32>) -> i32 {
    policy::errno::code(kind, os_errno)
}

/// The ServiceSpecificException code of a backend error.
pub fn code_for_backend(e: &BackendError) -> i32 {
    code_for_kind(e.kind(), e.os_errno())
}

/// Maps a failed call of `method` to its binder status, logging it at the right level: refused
/// callers and bad arguments are expected outcomes (`warn!`/`info!`), store and backend
/// failures are `error!`.
pub fn into_binder_status(method: &str, err: ServiceError) -> Status {
    match &err {
        ServiceError::PermissionDenied { .. } => {
            log::warn!("{method}: {err}");
            Status::from((ExceptionCode::Security, err.to_string().as_str()))
        }
        ServiceError::InvalidPath(_) => {
            log::info!("{method}: {err}");
            Status::from((ExceptionCode::IllegalArgument, err.to_string().as_str()))
        }
        ServiceError::InvalidArgument(_) => {
            log::info!("{method}: {err}");
            Status::new_service_specific_error(ICheckpoint::EINVAL, Some(err.to_string()))
        }
        ServiceError::Policy(e) => {
            let kind = e.kind();
            let code = code_for_kind(kind, e.os_errno());
            match kind {
                ErrorKind::NotSupported | ErrorKind::InvalidArgument => {
                    log::info!("{method}: {e}");
                }
                _ => log::error!("{method}: {e}"),
            }
            Status::new_service_specific_error(code, Some(e.to_string()))
        }
        ServiceError::Backend(e) => {
            log::error!("{method}: {e}");
            Status::new_service_specific_error(code_for_backend(e), Some(e.to_string()))
        }
        ServiceError::BootHalNotReady(_) => {
            log::warn!("{method}: {err}");
            Status::new_service_specific_error(ICheckpoint::EAGAIN, Some(err.to_string()))
        }
        ServiceError::Restore { code, message } => {
            if *code == ICheckpoint::EAGAIN {
                log::info!("{method}: {message}");
            } else {
                log::error!("{method}: {message}");
            }
            Status::new_service_specific_error(*code, Some(message.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind, with the code documented in ICheckpoint.aidl. The exhaustive match makes a
    /// new kind fail to compile until it is added here.
    #[test]
    fn every_policy_error_kind_maps_to_its_documented_code() {
        let all = [
            ErrorKind::NotSupported,
            ErrorKind::InvalidArgument,
            ErrorKind::Io,
            ErrorKind::Corrupt,
            ErrorKind::Incompatible,
            ErrorKind::BootControl,
            ErrorKind::Backend,
            ErrorKind::Busy,
            ErrorKind::NoSpace,
        ];
        for kind in all {
            let expected = match kind {
                ErrorKind::NotSupported => ICheckpoint::ENOTSUP,
                ErrorKind::InvalidArgument => ICheckpoint::EINVAL,
                ErrorKind::Io => ICheckpoint::EIO,
                ErrorKind::Corrupt => ICheckpoint::EUCLEAN,
                ErrorKind::Incompatible => ICheckpoint::EPROTO,
                ErrorKind::BootControl => ICheckpoint::EINVAL,
                ErrorKind::Backend => ICheckpoint::EINVAL,
                ErrorKind::Busy => ICheckpoint::EAGAIN,
                ErrorKind::NoSpace => ICheckpoint::ENOSPC,
            };
            assert_eq!(code_for_kind(kind, None), expected, "{kind:?}");
        }
        // An I/O error reports the OS errno when known (vold reports errno).
        assert_eq!(code_for_kind(ErrorKind::Io, Some(28)), 28);
        assert_eq!(code_for_kind(ErrorKind::Io, Some(0)), 5);
    }

    #[test]
    fn policy_errors_become_service_specific_with_message() {
        let status = into_binder_status("startCheckpoint", PolicyError::NotSupported.into());
        assert_eq!(status.exception_code(), ExceptionCode::ServiceSpecific);
        assert_eq!(status.service_specific_error(), ICheckpoint::ENOTSUP);
        assert_eq!(status.message(), Some("Checkpoints not supported"));

        let status =
            into_binder_status("startCheckpoint", PolicyError::InvalidRetry { retry: -2 }.into());
        assert_eq!(status.service_specific_error(), ICheckpoint::EINVAL);
        assert!(status.message().unwrap_or("").starts_with("Retry count must be more than -1"));
    }

    #[test]
    fn refused_caller_is_a_security_exception() {
        let status = into_binder_status(
            "commitChanges",
            ServiceError::PermissionDenied { uid: 2000, method: "commitChanges" },
        );
        assert_eq!(status.exception_code(), ExceptionCode::Security);
        assert_eq!(status.message(), Some("UID 2000 is not allowed to call commitChanges"));
    }

    #[test]
    fn bad_path_is_an_illegal_argument() {
        let status = into_binder_status(
            "restoreCheckpoint",
            ServiceError::InvalidPath("Path foo is relative".into()),
        );
        assert_eq!(status.exception_code(), ExceptionCode::IllegalArgument);
    }

    #[test]
    fn restore_codes_pass_through() {
        let status = into_binder_status(
            "restoreCheckpointPart",
            ServiceError::Restore {
                code: ICheckpoint::EAGAIN,
                message: "Hit the test limit".into(),
            },
        );
        assert_eq!(status.service_specific_error(), ICheckpoint::EAGAIN);
    }
}
