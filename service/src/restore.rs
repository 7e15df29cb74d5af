//! restoreCheckpoint / restoreCheckpointPart: the bow crate's restore on a raw device, with
//! vold's outcomes and error codes (vold-checkpoint.md §4.12, §4.13, §5.4).

use std::path::Path;
use std::time::Instant;

use bow::device::{DeviceError, FileDevice};
use bow::restore::{RestoreError, RestoreOptions, RestoreOutcome as BowOutcome};
use checkpoint_aidl::android::system::checkpoint::ICheckpoint;
use policy::{RestoreOutcome, RestoreRecord};

use crate::error::ServiceError;

fn device_errno(e: &DeviceError) -> i32 {
    match e {
        DeviceError::Io { source, .. } => source.raw_os_error().unwrap_or(ICheckpoint::EIO),
        _ => ICheckpoint::EIO,
    }
}

/// Restores `device` with `options` (their `limit` is restoreCheckpointPart's), reporting
/// `(done, total)` progress. Returns what to record in the history and the call's result: Ok
/// when the device was restored, rolled forward or had nothing to restore... except that vold answers "No magic" (EINVAL) when there
/// is no log, which fs_mgr ignores; that answer is kept for compatibility.
pub fn restore_device(
    device: &str,
    options: &RestoreOptions,
    progress: &dyn Fn(u64, u64),
) -> (RestoreRecord, Result<(), ServiceError>) {
    let started = Instant::now();
    let (outcome, result) = run(device, options, progress);
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (RestoreRecord { outcome, duration_ms }, result)
}

fn failed(code: i32, message: String) -> (RestoreOutcome, Result<(), ServiceError>) {
    (
        RestoreOutcome::Failed { errno: code, message: message.clone() },
        Err(ServiceError::Restore { code, message }),
    )
}

fn run(
    device: &str,
    options: &RestoreOptions,
    progress: &dyn Fn(u64, u64),
) -> (RestoreOutcome, Result<(), ServiceError>) {
    let dev = match FileDevice::open(Path::new(device)) {
        // The saved copies are read once, before anything is written: no use caching them.
        Ok(dev) => dev.with_direct_reads(),
        Err(e) => return failed(device_errno(&e), format!("Cannot open {device}: {e}")),
    };
    let mut report_progress = |p: bow::restore::Progress| progress(p.done, p.total);
    match bow::restore::restore(&dev, options, &mut report_progress) {
        Ok(report) => match report.outcome {
            BowOutcome::NoLog => (
                RestoreOutcome::NothingToRestore,
                Err(ServiceError::Restore {
                    code: ICheckpoint::EINVAL,
                    message: "No magic".into(),
                }),
            ),
            BowOutcome::Restored { entries, blocks_written, resumed, .. } => {
                log::info!(
                    "restored {device}: {entries} log entries, {blocks_written} blocks written{}",
                    if resumed { " (finished an interrupted restore)" } else { "" }
                );
                (RestoreOutcome::Restored { entries }, Ok(()))
            }
            BowOutcome::RolledForward { reason, .. } => {
                log::warn!(
                    "Checkpoint validation failed - rolled {device} forward (kept the new data): \
                     {reason}"
                );
                (RestoreOutcome::RolledForward, Ok(()))
            }
            BowOutcome::Refused { reason } => {
                failed(ICheckpoint::EINVAL, format!("Refused to restore {device}: {reason}"))
            }
            BowOutcome::LimitReached { entries_applied, .. } => (
                RestoreOutcome::Interrupted { entries: entries_applied },
                Err(ServiceError::Restore {
                    code: ICheckpoint::EAGAIN,
                    message: "Hit the test limit".into(),
                }),
            ),
            BowOutcome::DryRun { .. } => {
                failed(ICheckpoint::EINVAL, "unexpected dry-run outcome".to_owned())
            }
        },
        Err(RestoreError::NoLog) => (
            RestoreOutcome::NothingToRestore,
            Err(ServiceError::Restore { code: ICheckpoint::EINVAL, message: "No magic".into() }),
        ),
        Err(RestoreError::Device(e)) => {
            failed(device_errno(&e), format!("Restore of {device} failed: {e}"))
        }
        Err(e) => failed(ICheckpoint::EINVAL, format!("Restore of {device} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_fails_with_its_errno() {
        let (record, result) =
            restore_device("/nonexistent/device", &RestoreOptions::default(), &|_, _| {});
        match result {
            Err(ServiceError::Restore { code, message }) => {
                assert_eq!(code, 2, "ENOENT");
                assert!(message.starts_with("Cannot open /nonexistent/device"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(record.outcome, RestoreOutcome::Failed { errno: 2, .. }));
    }

    #[test]
    fn device_without_log_says_no_magic() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let path = file.path().to_str().expect("utf-8").to_owned();
        let (record, result) = restore_device(&path, &RestoreOptions::default(), &|_, _| {});
        assert_eq!(record.outcome, RestoreOutcome::NothingToRestore);
        match result {
            Err(ServiceError::Restore { code, message }) => {
                assert_eq!(code, ICheckpoint::EINVAL);
                assert_eq!(message, "No magic");
            }
            other => panic!("{other:?}"),
        }
    }
}
