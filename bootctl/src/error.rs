//! The HAL client's error type and its mapping into [`policy::BootControlError`].

use std::time::Duration;

use rsbinder::{ExceptionCode, Status, StatusCode};

use crate::aidl::android::hardware::boot::IBootControl::{COMMAND_FAILED, INVALID_SLOT};

/// An error talking to `android.hardware.boot.IBootControl`.
#[derive(Debug, thiserror::Error)]
pub enum HalError {
    /// The binder transport or the service manager could not be reached.
    #[error("cannot reach the service manager for {instance}: {status:?}")]
    ServiceManager {
        /// The instance name looked up.
        instance: String,
        /// rsbinder's status.
        status: StatusCode,
    },
    /// The instance was not registered before the wait ended.
    #[error("{instance} is not registered (waited {waited:?})")]
    NotRegistered {
        /// The instance name looked up.
        instance: String,
        /// How long the lookup waited.
        waited: Duration,
    },
    /// The name is registered with another interface.
    #[error("{instance} is not an android.hardware.boot.IBootControl")]
    WrongInterface {
        /// The instance name looked up.
        instance: String,
    },
    /// A call failed in the binder transport (dead service, bad parcel, ...).
    #[error("{method} failed in the binder transport: {status:?}")]
    Transport {
        /// The AIDL method.
        method: &'static str,
        /// rsbinder's status code.
        status: StatusCode,
    },
    /// The HAL answered with a service-specific error (`INVALID_SLOT`, `COMMAND_FAILED`, or a
    /// vendor code).
    #[error("{method} failed: {} ({code}): {message}", code_name(*.code))]
    ServiceSpecific {
        /// The AIDL method.
        method: &'static str,
        /// The code the HAL returned.
        code: i32,
        /// The HAL's message (may be empty).
        message: String,
    },
    /// The HAL answered with another binder exception (security, unsupported operation, ...).
    #[error("{method} failed with exception {exception:?}: {message}")]
    Exception {
        /// The AIDL method.
        method: &'static str,
        /// The exception.
        exception: ExceptionCode,
        /// The message that came with it.
        message: String,
    },
    /// The HAL returned a value outside what the interface allows (a negative slot number or
    /// slot count).
    #[error("{method} returned {value}, which is not a valid answer")]
    BadReply {
        /// The AIDL method.
        method: &'static str,
        /// What it returned.
        value: i32,
    },
    /// A slot number this client cannot send (AIDL slots are `int`).
    #[error("slot {slot} cannot be sent to the HAL (AIDL slot numbers are 32-bit signed)")]
    SlotOutOfRange {
        /// The slot asked for.
        slot: u32,
    },
}

fn code_name(code: i32) -> &'static str {
    match code {
        INVALID_SLOT => "INVALID_SLOT",
        COMMAND_FAILED => "COMMAND_FAILED",
        _ => "vendor code",
    }
}

impl HalError {
    /// Classifies a failed call's [`Status`].
    pub(crate) fn from_status(method: &'static str, status: &Status) -> HalError {
        match status.exception_code() {
            ExceptionCode::ServiceSpecific => HalError::ServiceSpecific {
                method,
                code: status.service_specific_error(),
                message: status_message(status),
            },
            ExceptionCode::TransactionFailed => {
                HalError::Transport { method, status: status.transaction_error() }
            }
            exception => HalError::Exception { method, exception, message: status_message(status) },
        }
    }

    /// The service-specific code, if the HAL returned one.
    pub fn service_specific_code(&self) -> Option<i32> {
        match self {
            HalError::ServiceSpecific { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the HAL itself answered (as opposed to the service being unreachable or the
    /// transport failing).
    pub fn is_hal_answer(&self) -> bool {
        matches!(
            self,
            HalError::ServiceSpecific { .. }
                | HalError::Exception { .. }
                | HalError::BadReply { .. }
        )
    }
}

/// The message the HAL wrote (empty when it wrote none).
fn status_message(status: &Status) -> String {
    status.message().unwrap_or_default().to_owned()
}

impl From<HalError> for policy::BootControlError {
    fn from(error: HalError) -> Self {
        policy::BootControlError::Hal(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let status =
            Status::new_service_specific_error(INVALID_SLOT, Some("Invalid slot 9".into()));
        let error = HalError::from_status("getSuffix", &status);
        assert_eq!(error.service_specific_code(), Some(INVALID_SLOT));
        assert!(error.is_hal_answer());
        assert_eq!(error.to_string(), "getSuffix failed: INVALID_SLOT (-1): Invalid slot 9");

        let error =
            HalError::from_status("markBootSuccessful", &Status::from(StatusCode::DeadObject));
        assert!(matches!(error, HalError::Transport { status: StatusCode::DeadObject, .. }));
        assert!(!error.is_hal_answer());

        let status = Status::from(ExceptionCode::UnsupportedOperation);
        let error = HalError::from_status("getSnapshotMergeStatus", &status);
        assert!(matches!(
            error,
            HalError::Exception { exception: ExceptionCode::UnsupportedOperation, .. }
        ));
        let vendor = Status::new_service_specific_error(42, None);
        assert!(HalError::from_status("x", &vendor).to_string().contains("vendor code (42)"));
    }

    #[test]
    fn maps_into_the_policy_error_as_boot_control_kind() {
        let error: policy::BootControlError =
            HalError::BadReply { method: "getCurrentSlot", value: -3 }.into();
        assert_eq!(error.kind(), policy::ErrorKind::BootControl);
        assert_eq!(
            error.to_string(),
            "boot control HAL: getCurrentSlot returned -3, which is not a valid answer"
        );
    }
}
