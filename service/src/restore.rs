//! restoreCheckpoint / restoreCheckpointPart: the answer of the backend seam
//! ([`policy::Checkpointer::restore_device`]) turned into the call's result and the history
//! record. Which backend restores a device, and how, is the backend's business; a device no
//! backend covers gets vold's dm-bow log restore ([`restore_log`]), so `restoreCheckpoint` on
//! any device with a dm-bow log behaves as vold's.

use policy::{RestoreOutcome, RestoreRecord, RestoreReport, RestoreRequest, RestoreRun};

use crate::config::RestoreConfig;
use crate::error::{code_for_backend, ServiceError};

/// The history record and the call result of a restore run.
pub fn call_result(run: RestoreRun) -> (RestoreRecord, Result<(), ServiceError>) {
    let (outcome, result) = match run.result {
        Ok(RestoreReport { outcome, result }) => {
            (outcome, result.map_err(|(code, message)| ServiceError::Restore { code, message }))
        }
        Err(e) => (
            RestoreOutcome::Failed { errno: code_for_backend(&e), message: e.to_string() },
            Err(ServiceError::Backend(e)),
        ),
    };
    (RestoreRecord { outcome, duration_ms: run.duration_ms, backend: run.backend }, result)
}

/// The fallback for devices no backend covers: the dm-bow log restore of the backends crate,
/// with the `[restore]` memory and queue settings.
pub fn restore_log(
    config: &RestoreConfig,
    device: &str,
    request: &RestoreRequest,
    progress: &dyn Fn(u64, u64),
) -> policy::RestoreResult {
    let options = config.options(request.limit.unwrap_or(0));
    Ok(backends::bow::restore_log(device, &options, progress))
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint_aidl::android::system::checkpoint::ICheckpoint;
    use policy::BackendError;

    fn run(result: policy::RestoreResult) -> RestoreRun {
        RestoreRun { backend: Some("snapshot".into()), duration_ms: 3, result }
    }

    #[test]
    fn a_report_keeps_its_outcome_and_code() {
        let (record, result) = call_result(run(Ok(RestoreReport {
            outcome: RestoreOutcome::Interrupted { entries: 4 },
            result: Err((ICheckpoint::EAGAIN, "Hit the test limit".into())),
        })));
        assert_eq!(record.outcome, RestoreOutcome::Interrupted { entries: 4 });
        assert_eq!(record.backend.as_deref(), Some("snapshot"));
        assert!(matches!(
            result,
            Err(ServiceError::Restore { code: ICheckpoint::EAGAIN, ref message }) if message == "Hit the test limit"
        ));
        let (record, result) = call_result(run(Ok(RestoreReport {
            outcome: RestoreOutcome::Restored { entries: 9 },
            result: Ok(()),
        })));
        assert_eq!(record.outcome, RestoreOutcome::Restored { entries: 9 });
        assert!(result.is_ok());
    }

    #[test]
    fn a_backend_error_is_failed_with_its_mapped_code() {
        let e = BackendError::io("open /dev/vdb", std::io::Error::from_raw_os_error(2));
        let (record, result) = call_result(run(Err(e)));
        match record.outcome {
            RestoreOutcome::Failed { errno, message } => {
                assert_eq!(errno, 2, "the OS errno of an I/O error");
                assert!(message.contains("open /dev/vdb"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(result, Err(ServiceError::Backend(_))));
    }

    #[test]
    fn missing_device_fails_with_its_errno() {
        let config = RestoreConfig::default();
        let report =
            restore_log(&config, "/nonexistent/device", &RestoreRequest::default(), &|_, _| {})
                .expect("the log restore reports, it does not fail");
        match report.result {
            Err((code, message)) => {
                assert_eq!(code, 2, "ENOENT");
                assert!(message.contains("/nonexistent/device"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(report.outcome, RestoreOutcome::Failed { errno: 2, .. }));
    }

    #[test]
    fn device_without_log_says_no_magic() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let path = file.path().to_str().expect("utf-8").to_owned();
        let report =
            restore_log(&RestoreConfig::default(), &path, &RestoreRequest::default(), &|_, _| {})
                .expect("report");
        assert_eq!(report.outcome, RestoreOutcome::NothingToRestore);
        assert_eq!(report.result, Err((ICheckpoint::EINVAL, "No magic".to_owned())));
    }
}
