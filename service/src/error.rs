//! The daemon's errors and the ONE function that turns them into a binder status.
//!
//! Codes (documented in ICheckpoint.aidl and docs/integration.md):
//! - a caller that may not make the call: `EX_SECURITY` (as vold's `CheckUidOrRoot`);
//! - a malformed restore path: `EX_ILLEGAL_ARGUMENT` with vold's messages;
//! - a string argument longer than its bound (docs/limits.md): `EX_ILLEGAL_ARGUMENT`;
//! - everything else: `ServiceSpecificException` with an errno-style code, by error kind;
//!   for version 2's methods: a trace or size the estimator refuses is `EINVAL`, free space
//!   that cannot be read `EIO`, a reservation larger than the free space `ENOSPC`, a second
//!   reservation while one is held `EBUSY`.
//!
//! Refused calls (a caller not allowed, a bad argument) are the caller's doing, so any local
//! UID can cause as many as it likes: their log lines go through a [`RefusalLog`], which lets
//! [`REFUSAL_LOG_BURST`] through per [`REFUSAL_LOG_WINDOW`] and then counts the rest in one
//! summary line.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

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
    /// A string argument is longer than its documented bound (docs/limits.md). The message
    /// does not echo the argument.
    #[error("{what} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// Which argument ("Path", "Reason").
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The checkpoint policy or its store failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A backend step run for the call failed (a restore that could not run).
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// registerListener over the listener caps (`[listeners]`).
    #[error(transparent)]
    Listener(#[from] crate::listeners::ListenerError),
    /// The method needs the boot control HAL, which has not been found yet (nothing changed).
    #[error(transparent)]
    BootHalNotReady(#[from] crate::boot_hal::HalNotReady),
    /// estimateBackupSpace: the estimator refused its input (a trace that does not parse or is
    /// of another device size, absurd sizes) or could not read the trace.
    #[error("{0}")]
    Estimate(#[from] checkpoint_estimate::EstimateError),
    /// Version 2's estimate and reservation need a checkpointed device (`[[device]]` or fstab
    /// with a backend), and there is none.
    #[error(
        "no checkpointed device is configured: estimate and reservation need a [[device]] or \
         fstab entry with a backend"
    )]
    NoDevice,
    /// The free space or geometry of a device could not be read.
    #[error("{0}")]
    Space(String),
    /// reserveSpace / releaseReservation failed; nothing was reserved.
    #[error("{0}")]
    Reservation(BackendError),
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

/// The ServiceSpecificException code of a failed reservation: a second one while one is held
/// is `EBUSY` (the record's state refuses it), the rest by kind (`ENOSPC`, `EINVAL`, errno).
pub fn code_for_reservation(e: &BackendError) -> i32 {
    match e {
        BackendError::InvalidState { .. } => ICheckpoint::EBUSY,
        other => code_for_backend(other),
    }
}

/// Refused-call log lines let through per window.
pub const REFUSAL_LOG_BURST: u32 = 20;

/// The window of [`REFUSAL_LOG_BURST`].
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

/// What [`RefusalLog::admit`] decided for one refused call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Log it. `suppressed` lines were dropped in the window before (say so first).
    Log {
        /// Refused calls not logged since the last summary.
        suppressed: u64,
    },
    /// The window's burst is used up: count it, do not log it.
    Suppress,
}

/// The rate limit of refused-call log lines: [`REFUSAL_LOG_BURST`] per
/// [`REFUSAL_LOG_WINDOW`]; what is dropped is counted and reported with the first line of a
/// later window (no timer: a flood that stops is summed up at the next refusal).
#[derive(Debug)]
pub struct RefusalLog {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            window: Mutex::new(Window { started: Instant::now(), logged: 0, suppressed: 0 }),
        }
    }
}

impl RefusalLog {
    /// Whether the refusal seen at `now` may be logged.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(w.started) >= REFUSAL_LOG_WINDOW {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < REFUSAL_LOG_BURST {
            w.logged += 1;
            Admission::Log { suppressed: std::mem::take(&mut w.suppressed) }
        } else {
            w.suppressed += 1;
            Admission::Suppress
        }
    }

    /// Logs `line` at `level` if admitted now.
    fn log(&self, level: log::Level, method: &str, line: &dyn std::fmt::Display) {
        match self.admit(Instant::now()) {
            Admission::Log { suppressed } => {
                if suppressed > 0 {
                    log::warn!(
                        "{suppressed} more refused calls were not logged (at most \
                         {REFUSAL_LOG_BURST} per {} s)",
                        REFUSAL_LOG_WINDOW.as_secs()
                    );
                }
                log::log!(level, "{method}: {line}");
            }
            Admission::Suppress => {}
        }
    }
}

/// Maps a failed call of `method` to its binder status, logging it at the right level: refused
/// callers and bad arguments are expected outcomes (`warn!`/`info!`, through `refusals`, rate
/// limited), store and backend failures are `error!`.
pub fn into_binder_status(method: &str, err: ServiceError, refusals: &RefusalLog) -> Status {
    match &err {
        ServiceError::PermissionDenied { .. } => {
            refusals.log(log::Level::Warn, method, &err);
            Status::from((ExceptionCode::Security, err.to_string().as_str()))
        }
        ServiceError::InvalidPath(_) | ServiceError::TooLong { .. } => {
            refusals.log(log::Level::Info, method, &err);
            Status::from((ExceptionCode::IllegalArgument, err.to_string().as_str()))
        }
        ServiceError::InvalidArgument(_) => {
            refusals.log(log::Level::Info, method, &err);
            Status::new_service_specific_error(ICheckpoint::EINVAL, Some(err.to_string()))
        }
        ServiceError::Policy(e) => {
            let kind = e.kind();
            let code = code_for_kind(kind, e.os_errno());
            match kind {
                ErrorKind::NotSupported | ErrorKind::InvalidArgument => {
                    refusals.log(log::Level::Info, method, e);
                }
                _ => log::error!("{method}: {e}"),
            }
            Status::new_service_specific_error(code, Some(e.to_string()))
        }
        ServiceError::Backend(e) => {
            log::error!("{method}: {e}");
            Status::new_service_specific_error(code_for_backend(e), Some(e.to_string()))
        }
        ServiceError::Listener(e) => {
            refusals.log(log::Level::Warn, method, e);
            Status::new_service_specific_error(ICheckpoint::EBUSY, Some(e.to_string()))
        }
        ServiceError::BootHalNotReady(_) => {
            log::warn!("{method}: {err}");
            Status::new_service_specific_error(ICheckpoint::EAGAIN, Some(err.to_string()))
        }
        ServiceError::Estimate(e) => {
            if e.kind() == checkpoint_estimate::ErrorKind::Io {
                log::error!("{method}: {e}");
                Status::new_service_specific_error(ICheckpoint::EIO, Some(e.to_string()))
            } else {
                refusals.log(log::Level::Info, method, e);
                Status::new_service_specific_error(ICheckpoint::EINVAL, Some(e.to_string()))
            }
        }
        ServiceError::NoDevice => {
            refusals.log(log::Level::Info, method, &err);
            Status::new_service_specific_error(ICheckpoint::ENOTSUP, Some(err.to_string()))
        }
        ServiceError::Space(message) => {
            log::error!("{method}: {message}");
            Status::new_service_specific_error(ICheckpoint::EIO, Some(message.clone()))
        }
        ServiceError::Reservation(e) => {
            let code = code_for_reservation(e);
            if [ICheckpoint::EBUSY, ICheckpoint::ENOSPC, ICheckpoint::EINVAL].contains(&code) {
                refusals.log(log::Level::Info, method, e);
            } else {
                log::error!("{method}: {e}");
            }
            Status::new_service_specific_error(code, Some(e.to_string()))
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
        let status = into_binder_status(
            "startCheckpoint",
            PolicyError::NotSupported.into(),
            &RefusalLog::default(),
        );
        assert_eq!(status.exception_code(), ExceptionCode::ServiceSpecific);
        assert_eq!(status.service_specific_error(), ICheckpoint::ENOTSUP);
        assert_eq!(status.message(), Some("Checkpoints not supported"));

        let status = into_binder_status(
            "startCheckpoint",
            PolicyError::InvalidRetry { retry: -2 }.into(),
            &RefusalLog::default(),
        );
        assert_eq!(status.service_specific_error(), ICheckpoint::EINVAL);
        assert!(status.message().unwrap_or("").starts_with("Retry count must be more than -1"));
    }

    #[test]
    fn refused_caller_is_a_security_exception() {
        let status = into_binder_status(
            "commitChanges",
            ServiceError::PermissionDenied { uid: 2000, method: "commitChanges" },
            &RefusalLog::default(),
        );
        assert_eq!(status.exception_code(), ExceptionCode::Security);
        assert_eq!(status.message(), Some("UID 2000 is not allowed to call commitChanges"));
    }

    #[test]
    fn bad_path_is_an_illegal_argument() {
        let status = into_binder_status(
            "restoreCheckpoint",
            ServiceError::InvalidPath("Path foo is relative".into()),
            &RefusalLog::default(),
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
            &RefusalLog::default(),
        );
        assert_eq!(status.service_specific_error(), ICheckpoint::EAGAIN);
    }

    #[test]
    fn an_overlong_argument_is_an_illegal_argument_without_echo() {
        let status = into_binder_status(
            "abortChanges",
            ServiceError::TooLong { what: "Reason", len: 5000, max: 4096 },
            &RefusalLog::default(),
        );
        assert_eq!(status.exception_code(), ExceptionCode::IllegalArgument);
        assert_eq!(status.message(), Some("Reason is 5000 bytes long, more than the 4096 allowed"));
    }

    #[test]
    fn estimate_refusals_are_einval_and_read_failures_eio() {
        let refused = checkpoint_estimate::EstimateError::Invalid {
            what: "free bytes",
            value: 9,
            why: "too many",
        };
        let status = into_binder_status(
            "estimateBackupSpace",
            ServiceError::Estimate(refused),
            &RefusalLog::default(),
        );
        assert_eq!(status.exception_code(), ExceptionCode::ServiceSpecific);
        assert_eq!(status.service_specific_error(), ICheckpoint::EINVAL);
        let status = into_binder_status(
            "estimateBackupSpace",
            ServiceError::Space("statvfs /data: EIO".into()),
            &RefusalLog::default(),
        );
        assert_eq!(status.service_specific_error(), ICheckpoint::EIO);
        let status =
            into_binder_status("reserveSpace", ServiceError::NoDevice, &RefusalLog::default());
        assert_eq!(status.service_specific_error(), ICheckpoint::ENOTSUP);
    }

    #[test]
    fn reservation_errors_map_by_what_refused_them() {
        let busy = BackendError::InvalidState {
            backend: "reservation".into(),
            state: "held".into(),
            operation: "reserve again (release it first)",
        };
        let full = BackendError::NoSpace { operation: "reserve".into(), needed: 9, available: 1 };
        let zero = BackendError::io("reserve 0 bytes", std::io::Error::from_raw_os_error(22));
        for (e, code) in [(busy, ICheckpoint::EBUSY), (full, ICheckpoint::ENOSPC), (zero, 22)] {
            let message = e.to_string();
            let status = into_binder_status(
                "reserveSpace",
                ServiceError::Reservation(e),
                &RefusalLog::default(),
            );
            assert_eq!(status.service_specific_error(), code, "{message}");
            assert_eq!(status.message(), Some(message.as_str()));
        }
    }

    #[test]
    fn refusal_lines_are_limited_per_window_and_the_rest_counted() {
        let refusals = RefusalLog::default();
        let start = Instant::now();
        let admitted =
            (0..1000).filter(|_| matches!(refusals.admit(start), Admission::Log { .. })).count();
        assert_eq!(admitted, usize::try_from(REFUSAL_LOG_BURST).unwrap());
        // Still in the window: suppressed.
        assert_eq!(refusals.admit(start + REFUSAL_LOG_WINDOW / 2), Admission::Suppress);
        // The next window logs again, first reporting what was dropped.
        let later = start + REFUSAL_LOG_WINDOW;
        let dropped = 1000 - u64::from(REFUSAL_LOG_BURST) + 1;
        assert_eq!(refusals.admit(later), Admission::Log { suppressed: dropped });
        assert_eq!(refusals.admit(later), Admission::Log { suppressed: 0 });
    }
}
