//! The ICheckpoint implementation: one object served on every transport.
//!
//! Each AIDL method is thin: check the caller, call the snake_case method of [`Daemon`], map
//! the error with [`crate::error::into_binder_status`]. No logic lives in the trait impl.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use backends::reservation::Reservations;
use checkpoint_aidl::android::system::checkpoint::{
    BackendInUse::BackendInUse, BackupEstimate::BackupEstimate, CheckpointStatus::CheckpointStatus,
    EstimateBasis::EstimateBasis, EstimateRequest::EstimateRequest,
    HistoryEvent::HistoryEvent as AidlHistoryEvent, HistoryEventKind::HistoryEventKind,
    ICheckpoint::ICheckpoint, ICheckpointListener::ICheckpointListener,
    ReservationInfo::ReservationInfo,
};
use checkpoint_estimate::{Basis, Estimate, EstimateInput};
use policy::{
    AbortOutcome, BackendError, BackupSpace, Checkpointer, CommitOutcome, Ending, EstimateRecord,
    Finished, HistoryEvent, HistoryKind, MarkOutcome, PolicyError, RestoreRequest, RollbackAction,
};
use rsbinder::{BinderResult, Strong};

use crate::boot_hal::BootHalGate;
use crate::config::{AccessConfig, DeviceConfig, RestoreConfig};
use crate::error::{into_binder_status, RefusalLog, ServiceError};
use crate::listeners::{aidl_state, ListenerEvent, Listeners, Registered};
use crate::reboot::Rebooter;
use crate::restore;
use crate::space::{self, DeviceBackend};

/// What a method needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads state: any UID in `access.query_uids` (everyone if unset).
    Query,
    /// Changes state (including the needsCheckpoint latch): `access.change_uids`.
    Change,
}

/// The UID of the caller of the current transaction: the kernel binder sender's effective UID,
/// or the peer credentials (SO_PEERCRED) of an RPC Unix socket. `None` when the transport
/// carries no UID or no transaction is in flight (fail closed).
pub fn caller_uid() -> Option<u32> {
    match rsbinder::calling_caller()? {
        rsbinder::Caller::Kernel { uid, .. } => Some(uid),
        rsbinder::Caller::Rpc(peer) => peer.uid(),
        _ => None,
    }
}

/// The daemon's state shared by all transports and tasks.
#[derive(Debug)]
pub struct Daemon {
    checkpointer: Arc<Checkpointer>,
    access: AccessConfig,
    devices: Vec<DeviceConfig>,
    listeners: Arc<Listeners>,
    rebooter: Rebooter,
    restore: RestoreConfig,
    /// Asked before the methods whose answer needs the boot control HAL.
    boot_hal: BootHalGate,
    /// The rate limit of the log lines of refused calls.
    refusals: RefusalLog,
    /// Estimation, reservation and learning (AIDL version 2).
    space: SpacePlanning,
    /// The most backup space seen in use by the tracked device's backend in this process (the
    /// store keeps it too, in steps of [`HIGH_WATER_STEP_BYTES`]).
    high_water: AtomicU64,
    /// The value last written to the store.
    high_water_stored: AtomicU64,
}

/// What estimateBackupSpace, reserveSpace and learning work on.
#[derive(Debug, Default)]
pub struct SpacePlanning {
    /// Every checkpointed device with its backend, in configuration order.
    pub devices: Vec<DeviceBackend>,
    /// The estimate's headroom: `monitor.action_free_bytes`.
    pub headroom_bytes: u64,
    /// The reservations (their records in the metadata directory); `None`: not available.
    pub reservations: Option<Reservations>,
}

/// The high-water mark is written to the store when it grew by this much (or by 1% when more)
/// since the last write: a checkpoint that writes steadily must not cost an fsync per monitor
/// poll. The process keeps the exact value; only a daemon restart loses the last step.
pub const HIGH_WATER_STEP_BYTES: u64 = 1 << 20;

/// Longest path argument (`restoreCheckpoint`, `restoreCheckpointPart`): 4095 bytes, what fits
/// in Linux's PATH_MAX (4096) with its terminating NUL; no longer path can be opened.
pub const MAX_PATH_BYTES: usize = policy::MAX_STORED_PATH_BYTES;

/// Longest `abortChanges` reason: 4 KiB (it is stored in the history and passed to the reboot).
pub const MAX_REASON_BYTES: usize = policy::MAX_STORED_TEXT_BYTES;

/// The most history a `getHistory` reply carries, counted as parcel bytes (UTF-16 strings plus
/// the fixed fields): the newest rows that fit. Kernel binder delivers a reply into the
/// caller's 1 MiB transaction buffer, shared by all its calls in flight; 256 KiB leaves room.
pub const MAX_HISTORY_REPLY_BYTES: usize = 256 * 1024;

/// The parcel size of one history entry, near enough: the fixed fields, and each string as a
/// length, UTF-16 code units and a terminator, padded to 4 bytes.
fn parcel_size(event: &AidlHistoryEvent) -> usize {
    let string = |s: &str| 4 + (s.encode_utf16().count() + 1) * 2 + 2;
    64 + string(&event.device) + string(&event.outcome) + string(&event.message)
}

/// vold's `checkArgumentPath` (VoldNativeService.cpp), with its messages.
pub fn check_argument_path(path: &str) -> Result<(), ServiceError> {
    // First, and without echoing it: a 16 MiB path must not come back in the error message.
    if path.len() > MAX_PATH_BYTES {
        return Err(ServiceError::TooLong { what: "Path", len: path.len(), max: MAX_PATH_BYTES });
    }
    if path.is_empty() {
        return Err(ServiceError::InvalidPath("Missing path".to_owned()));
    }
    if !path.starts_with('/') {
        return Err(ServiceError::InvalidPath(format!("Path {path} is relative")));
    }
    if path.contains("/../") || path.ends_with("/..") {
        return Err(ServiceError::InvalidPath(format!("Path {path} is shady")));
    }
    if path.contains(['\0', '\n']) {
        return Err(ServiceError::InvalidPath(format!("Path {path} is malformed")));
    }
    Ok(())
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn aidl_kind(kind: HistoryKind) -> HistoryEventKind {
    match kind {
        HistoryKind::Start => HistoryEventKind::CHECKPOINT_STARTED,
        HistoryKind::BootAttempt => HistoryEventKind::BOOT_ATTEMPT,
        HistoryKind::Commit => HistoryEventKind::COMMITTED,
        HistoryKind::CommitFailed => HistoryEventKind::COMMIT_FAILED,
        HistoryKind::Abort => HistoryEventKind::ABORTED,
        HistoryKind::Restore => HistoryEventKind::RESTORED,
        HistoryKind::RollbackAcknowledged => HistoryEventKind::ROLLBACK_ACKNOWLEDGED,
        HistoryKind::RollbackSlotSwitch => HistoryEventKind::ROLLBACK_SLOT_SWITCH,
        HistoryKind::Recovery => HistoryEventKind::RECOVERY,
        // Frozen V1 has no name for these: OTHER, with `outcome` saying what happened.
        HistoryKind::LowSpace | HistoryKind::Unrecognised => HistoryEventKind::OTHER,
    }
}

/// A backend in `CheckpointStatus.backends`: its name, and for `auto` why it was chosen
/// (the frozen V1 status has no other place for it), e.g. `snapshot (auto: no dm-bow target)`.
pub fn backend_label(backend: &policy::BackendInfo) -> String {
    if backend.selection_reason.is_empty() {
        backend.name.clone()
    } else {
        format!("{} ({})", backend.name, backend.selection_reason)
    }
}

/// The AIDL form of a history entry.
pub fn aidl_history_event(event: &HistoryEvent) -> AidlHistoryEvent {
    AidlHistoryEvent {
        id: event.id,
        timestampMs: event.at_ms,
        kind: aidl_kind(event.kind),
        requestedRetry: event.requested_retry.unwrap_or(-2),
        attemptsLeft: event.budget_left.unwrap_or(-1),
        slot: event.slot.map_or(-1, to_i32),
        device: event.device.clone().unwrap_or_default(),
        outcome: match &event.unrecognised {
            // A row this daemon does not understand: said so, with what it could not read.
            Some(_) => "unrecognised".to_owned(),
            None => event.outcome.clone().unwrap_or_default(),
        },
        message: match &event.unrecognised {
            Some(why) => format!(
                "{why}; outcome {:?}, message {:?}",
                event.outcome.as_deref().unwrap_or(""),
                event.message.as_deref().unwrap_or("")
            ),
            None => event.message.clone().unwrap_or_default(),
        },
        backupBytes: event.backup_used_bytes.map_or(-1, to_i64),
        estimatedBytes: event.estimated_bytes.map_or(-1, to_i64),
    }
}

/// The stored word of a basis (`EstimateRecord::basis`).
pub fn basis_name(basis: Basis) -> &'static str {
    match basis {
        Basis::Trace => "trace",
        Basis::History => "history",
        Basis::Declared => "declared",
        Basis::HistoryAndDeclared => "history_and_declared",
        Basis::Default => "default",
    }
}

/// The AIDL form of an estimate for `mount_point`.
pub fn aidl_estimate(mount_point: String, e: &Estimate) -> BackupEstimate {
    BackupEstimate {
        mountPoint: mount_point,
        backend: e.backend.name().to_owned(),
        basis: match e.basis {
            Basis::Trace => EstimateBasis::TRACE,
            Basis::History => EstimateBasis::HISTORY,
            Basis::Declared => EstimateBasis::DECLARED,
            Basis::HistoryAndDeclared => EstimateBasis::HISTORY_AND_DECLARED,
            Basis::Default => EstimateBasis::DEFAULT,
        },
        predictedBytes: to_i64(e.predicted_bytes),
        neededBytes: to_i64(e.needed_bytes),
        freeBytes: to_i64(e.free_bytes),
        newDataBytes: e.new_data_bytes.map_or(-1, to_i64),
        shortfallBytes: to_i64(e.shortfall_bytes),
        dataBytes: to_i64(e.breakdown.data_bytes),
        overheadBytes: to_i64(e.breakdown.overhead_bytes),
        marginBytes: to_i64(e.breakdown.margin_bytes),
        headroomBytes: to_i64(e.breakdown.headroom_bytes),
        historySamples: to_i32(e.history_samples),
    }
}

/// The AIDL form of a reservation on `device`.
fn aidl_reservation(
    device: &DeviceBackend,
    info: &backends::reservation::ReservationInfo,
) -> ReservationInfo {
    ReservationInfo {
        mountPoint: device.spec.mount_point.display().to_string(),
        path: info.path.display().to_string(),
        bytes: to_i64(info.bytes),
        createdUnixSecs: to_i64(info.created_unix_secs),
    }
}

impl Daemon {
    /// The daemon state around `checkpointer`.
    pub fn new(
        checkpointer: Arc<Checkpointer>,
        access: AccessConfig,
        devices: Vec<DeviceConfig>,
        listeners: Arc<Listeners>,
        rebooter: Rebooter,
        restore: RestoreConfig,
    ) -> Self {
        Daemon {
            checkpointer,
            access,
            devices,
            listeners,
            rebooter,
            restore,
            boot_hal: BootHalGate::default(),
            refusals: RefusalLog::default(),
            space: SpacePlanning::default(),
            high_water: AtomicU64::new(0),
            high_water_stored: AtomicU64::new(0),
        }
    }

    /// Sets what version 2's estimate, reservation and learning work on.
    pub fn with_space(mut self, space: SpacePlanning) -> Self {
        self.space = space;
        self
    }

    /// Makes the methods that need the boot control HAL wait for it (bounded) first:
    /// `needsCheckpoint` and `abortChanges` (they may latch this boot's answer),
    /// `needsRollback` and `startCheckpoint` (slot suffixes), `commitChanges` (marks the slot),
    /// and `markBootAttempt` when a rollback may switch slots.
    pub fn with_boot_hal(mut self, gate: BootHalGate) -> Self {
        self.boot_hal = gate;
        self
    }

    /// The policy.
    pub fn checkpointer(&self) -> &Arc<Checkpointer> {
        &self.checkpointer
    }

    /// The registered listeners.
    pub fn listeners(&self) -> Arc<Listeners> {
        Arc::clone(&self.listeners)
    }

    /// Whether `uid` may make a call needing `access`.
    pub fn is_allowed(&self, uid: u32, access: Access) -> bool {
        match access {
            Access::Change => self.access.change_uids.contains(&uid),
            Access::Query => {
                self.access.change_uids.contains(&uid)
                    || self.access.query_uids.as_ref().is_none_or(|uids| uids.contains(&uid))
            }
        }
    }

    /// Checks the current caller.
    pub fn check_caller(&self, access: Access, method: &'static str) -> Result<(), ServiceError> {
        match caller_uid() {
            Some(uid) if self.is_allowed(uid, access) => Ok(()),
            uid => Err(ServiceError::PermissionDenied { uid: uid.unwrap_or(u32::MAX), method }),
        }
    }

    fn reboot(&self, reason: &str) {
        if let Err(e) = self.rebooter.reboot(reason) {
            log::error!("reboot (reason `{reason}`) failed: {e}");
        }
    }

    /// startCheckpoint.
    pub fn start_checkpoint(&self, retry: i32) -> Result<(), ServiceError> {
        self.boot_hal.ready_for("startCheckpoint")?;
        let outcome = self.checkpointer.start_checkpoint(retry)?;
        log::info!("checkpoint requested (retry {retry}): {outcome:?}");
        self.track_checkpoint();
        Ok(())
    }

    /// Learning: the checkpoint just requested is tracked with the last estimate made before
    /// it. Advisory: a failure is logged, the call still succeeds.
    fn track_checkpoint(&self) {
        let started = match self.checkpointer.status() {
            Ok(status) => status.started_at_ms,
            Err(e) => {
                log::warn!("cannot track the new checkpoint's consumption: {e}");
                return;
            }
        };
        let Some(started) = started else { return };
        match self.checkpointer.with_store(|store| store.track_checkpoint(started)) {
            Ok(()) => {
                self.high_water.store(0, Ordering::Relaxed);
                self.high_water_stored.store(0, Ordering::Relaxed);
            }
            Err(e) => log::warn!("cannot track the new checkpoint's consumption: {e}"),
        }
    }

    /// needsCheckpoint.
    pub fn needs_checkpoint(&self) -> Result<bool, ServiceError> {
        self.boot_hal.ready_for("needsCheckpoint")?;
        Ok(self.checkpointer.needs_checkpoint()?)
    }

    /// needsRollback.
    pub fn needs_rollback(&self) -> Result<bool, ServiceError> {
        self.boot_hal.ready_for("needsRollback")?;
        Ok(self.checkpointer.needs_rollback()?)
    }

    /// isCheckpointing.
    pub fn is_checkpointing(&self) -> bool {
        self.checkpointer.is_checkpointing()
    }

    /// commitChanges.
    pub fn commit_changes(&self) -> Result<(), ServiceError> {
        self.boot_hal.ready_for("commitChanges")?;
        // What the backups hold just before the commit releases them.
        let final_used = self.tracked_used();
        match self.checkpointer.commit_changes()? {
            CommitOutcome::Committed { committed, skipped } => {
                log::info!("checkpoint committed (backends {committed:?}, skipped {skipped:?})");
                self.finish_tracking(Ending::Committed, final_used);
            }
            CommitOutcome::RollbackAcknowledged => {
                log::info!("rollback acknowledged");
                self.finish_tracking(Ending::RolledBack, None);
            }
            CommitOutcome::DontCommit => log::warn!("commit skipped: policy.dont_commit is set"),
            other => log::debug!("commitChanges: {other:?}"),
        }
        Ok(())
    }

    /// abortChanges: the reboot happens through the configured action.
    pub fn abort_changes(&self, reason: &str, retry: bool) -> Result<(), ServiceError> {
        if reason.len() > MAX_REASON_BYTES {
            return Err(ServiceError::TooLong {
                what: "Reason",
                len: reason.len(),
                max: MAX_REASON_BYTES,
            });
        }
        self.boot_hal.ready_for("abortChanges")?;
        match self.checkpointer.abort_changes(reason, retry)? {
            AbortOutcome::Reboot { reason } => {
                log::info!("checkpoint aborted (retry {retry}); rebooting with reason `{reason}`");
                self.reboot(&reason);
            }
            AbortOutcome::NotCheckpointing => {
                log::info!("abortChanges: this boot is not checkpointing; nothing to do");
            }
        }
        Ok(())
    }

    /// prepareCheckpoint.
    pub fn prepare_checkpoint(&self) -> Result<(), ServiceError> {
        Ok(self.checkpointer.prepare_checkpoint()?)
    }

    /// restoreCheckpoint / restoreCheckpointPart (`count` 0 = no limit): through the backend
    /// seam (the backend covering `device`, else the dm-bow log restore), recorded in the
    /// history.
    pub fn restore_checkpoint(&self, device: &str, count: i32) -> Result<(), ServiceError> {
        check_argument_path(device)?;
        let limit = u64::try_from(count).map_err(|_| {
            ServiceError::InvalidArgument(format!("Restore count must not be negative ({count})"))
        })?;
        let listeners = Arc::clone(&self.listeners);
        // At most one report per 100 ms (and always the last), so a long restore does not
        // flood the listeners with oneway calls.
        let last_report = Mutex::new(None::<std::time::Instant>);
        let progress = move |done: u64, total: u64| {
            let mut last = last_report.lock().unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(100));
            if done < total && !due {
                return;
            }
            *last = Some(std::time::Instant::now());
            let (done, total) = (to_i64(done), to_i64(total));
            listeners.notify(ListenerEvent::RestoreProgress { done, total });
        };
        let request = RestoreRequest { limit: (limit > 0).then_some(limit) };
        let config = &self.restore;
        let run = self.checkpointer.restore_device(device, &request, &progress, &|d, r, p| {
            restore::restore_log(config, d, r, p)
        });
        let (record, result) = restore::call_result(run);
        if let Err(e) = self.checkpointer.record_restore(device, record) {
            log::error!("cannot record the restore of {device} in the history: {e}");
        }
        result
    }

    /// markBootAttempt.
    pub fn mark_boot_attempt(&self) -> Result<(), ServiceError> {
        // vold's markBootAttempt needs no HAL (init runs it at post-fs, before Android's
        // default HAL starts); only our rollback slot switch does.
        if self.checkpointer.options().rollback_action == RollbackAction::SwitchToPreviousSlot {
            self.boot_hal.ready_for("markBootAttempt")?;
        }
        match self.checkpointer.mark_boot_attempt()? {
            MarkOutcome::RollbackSlotSwitched { from, to } => {
                log::warn!("boot budget spent: switched from slot {from} to slot {to}; rebooting");
                self.reboot("checkpoint,rollback");
            }
            MarkOutcome::BudgetSpent => log::warn!("boot budget spent: rollback needed"),
            other => log::info!("boot attempt counted: {other:?}"),
        }
        Ok(())
    }

    /// resetCheckpoint.
    pub fn reset_checkpoint(&self) {
        self.checkpointer.reset_checkpoint();
    }

    /// The device `mount_point` names (empty: /data, else the only device).
    fn device(&self, mount_point: &str) -> Result<&DeviceBackend, ServiceError> {
        let devices = &self.space.devices;
        if devices.is_empty() {
            return Err(ServiceError::NoDevice);
        }
        if mount_point.len() > MAX_PATH_BYTES {
            return Err(ServiceError::TooLong {
                what: "Mount point",
                len: mount_point.len(),
                max: MAX_PATH_BYTES,
            });
        }
        let wanted = if mount_point.is_empty() { "/data" } else { mount_point };
        if let Some(d) = devices.iter().find(|d| d.spec.mount_point == Path::new(wanted)) {
            return Ok(d);
        }
        match devices.as_slice() {
            [only] if mount_point.is_empty() => Ok(only),
            _ => Err(ServiceError::InvalidArgument(format!(
                "No checkpointed device is mounted at {wanted} (configured: {})",
                devices
                    .iter()
                    .map(|d| d.spec.mount_point.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The device learning tracks: the default device of estimateBackupSpace.
    fn tracked_device(&self) -> Option<&DeviceBackend> {
        self.device("").ok()
    }

    /// estimateBackupSpace: the estimator over the daemon's inputs (`space.rs`); the answer is
    /// kept as the last estimate for learning.
    pub fn estimate_backup_space(
        &self,
        request: EstimateRequest,
    ) -> Result<BackupEstimate, ServiceError> {
        let device = self.device(&request.mountPoint)?;
        let declared = space::declared_sizes(&request.declaredBytes)?;
        let trace = request.trace.map(|fd| space::read_trace(fd.into())).transpose()?;
        let mut measured = space::measure(device)?;
        if let Some((bytes, extents)) = self.held_reservation(device) {
            measured.free = space::count_reservation(measured.free, bytes, &extents);
        }
        let rows = self.checkpointer.with_store(|store| store.consumption(space::HISTORY_ROWS));
        let rows = rows.map_err(PolicyError::from)?;
        let history = space::past_checkpoints(&rows, &device.spec.mount_point);
        let input = EstimateInput {
            backend: device.estimate_backend(),
            device_size: measured.device_size,
            block_size: measured.block_size,
            free: &measured.free,
            history: &history,
            trace: trace.as_ref(),
            declared_bytes: &declared,
        };
        let estimate = checkpoint_estimate::estimate(
            &input,
            &device.estimate_config(self.space.headroom_bytes),
        )?;
        let mount_point = device.spec.mount_point.display().to_string();
        log::info!(
            "estimate for {mount_point} ({}, basis {:?}): {} bytes needed, {} free, shortfall {}",
            estimate.backend,
            estimate.basis,
            estimate.needed_bytes,
            estimate.free_bytes,
            estimate.shortfall_bytes
        );
        let record = EstimateRecord {
            at_ms: 0,
            mount_point: mount_point.clone(),
            backend: estimate.backend.name().to_owned(),
            device_size: measured.device_size,
            basis: basis_name(estimate.basis).to_owned(),
            predicted_bytes: estimate.predicted_bytes,
            needed_bytes: estimate.needed_bytes,
        };
        if let Err(e) = self.checkpointer.with_store(|store| store.record_estimate(&record)) {
            log::warn!("cannot keep the estimate for learning: {e}");
        }
        Ok(aidl_estimate(mount_point, &estimate))
    }

    /// The reservation held on `device` (bytes, extents on the device), if any: the estimate
    /// counts it as free, since the backend takes it over at checkpoint start.
    fn held_reservation(&self, device: &DeviceBackend) -> Option<(u64, Vec<(u64, u64)>)> {
        let reservations = self.space.reservations.as_ref()?;
        let held = reservations.status(&device.spec).ok()??;
        if held.condition != backends::reservation::Condition::Held {
            return None;
        }
        let extents = reservations
            .record(&device.spec)
            .ok()
            .flatten()
            .map(|r| r.extents.iter().map(|e| (e.physical, e.length)).collect())
            .unwrap_or_default();
        Some((held.bytes, extents))
    }

    fn reservations(&self) -> Result<(&Reservations, &DeviceBackend), ServiceError> {
        let device = self.device("")?;
        let reservations = self.space.reservations.as_ref().ok_or(ServiceError::NoDevice)?;
        Ok((reservations, device))
    }

    /// reserveSpace on the default device (/data).
    pub fn reserve_space(&self, bytes: i64) -> Result<ReservationInfo, ServiceError> {
        let bytes = u64::try_from(bytes).ok().filter(|b| *b > 0).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "Reservation size must be more than 0 bytes (got {bytes})"
            ))
        })?;
        let (reservations, device) = self.reservations()?;
        let info = reservations.reserve(&device.spec, bytes).map_err(ServiceError::Reservation)?;
        log::info!("reserved {} bytes at {}", info.bytes, info.path.display());
        Ok(aidl_reservation(device, &info))
    }

    /// releaseReservation on the default device.
    pub fn release_reservation(&self) -> Result<(), ServiceError> {
        let (reservations, device) = self.reservations()?;
        let action = reservations.release(&device.spec).map_err(ServiceError::Reservation)?;
        log::info!("reservation on {} released: {action:?}", device.spec.mount_point.display());
        Ok(())
    }

    /// Every backend's backup space (the health monitor's poll), noting the tracked device's
    /// use for learning.
    pub fn backend_space(&self) -> Vec<(String, Result<BackupSpace, BackendError>)> {
        let spaces = self.checkpointer.backend_space();
        if let Some(device) = self.tracked_device() {
            let used = spaces
                .iter()
                .find(|(name, _)| *name == device.backend_name)
                .and_then(|(_, space)| space.as_ref().ok()?.used_bytes);
            if let Some(used) = used {
                self.note_used(used);
            }
        }
        spaces
    }

    /// Raises the high-water mark (only while checkpointing); the store is written in steps.
    fn note_used(&self, used: u64) {
        if !self.checkpointer.is_checkpointing() {
            return;
        }
        let before = self.high_water.fetch_max(used, Ordering::Relaxed);
        let stored = self.high_water_stored.load(Ordering::Relaxed);
        let step = HIGH_WATER_STEP_BYTES.max(stored / 100);
        if used > before && (stored == 0 || used >= stored.saturating_add(step)) {
            match self.checkpointer.with_store(|store| store.note_high_water(used)) {
                Ok(_) => self.high_water_stored.store(used, Ordering::Relaxed),
                Err(e) => log::warn!("cannot note the backup space in use: {e}"),
            }
        }
    }

    /// The tracked device's backend's use now, raised to this process's high-water mark.
    fn tracked_used(&self) -> Option<u64> {
        let device = self.tracked_device()?;
        let now = self
            .checkpointer
            .backend_space()
            .into_iter()
            .find(|(name, _)| *name == device.backend_name)
            .and_then(|(_, space)| space.ok()?.used_bytes);
        let seen = self.high_water.load(Ordering::Relaxed);
        match now {
            Some(n) => Some(n.max(seen)),
            None => (seen > 0).then_some(seen),
        }
    }

    /// Learning: records what the tracked checkpoint consumed against its estimate.
    fn finish_tracking(&self, ending: Ending, final_used: Option<u64>) {
        let Some(device) = self.tracked_device() else { return };
        let device_size = match space::device_size(device) {
            Ok(size) => size,
            Err(e) => {
                log::warn!("cannot record the checkpoint's consumption: {e}");
                return;
            }
        };
        let mount_point = device.spec.mount_point.display().to_string();
        let finished = Finished {
            ending,
            mount_point: &mount_point,
            backend: device.estimate_backend().name(),
            device_size,
            final_used_bytes: final_used,
        };
        match self.checkpointer.with_store(|store| store.finish_tracking(&finished)) {
            Ok(Some(row)) => log::info!(
                "checkpoint {}: consumed {} bytes of backup space (estimated: {})",
                row.outcome,
                row.actual_bytes,
                row.estimated_bytes.map_or("none".to_owned(), |b| format!("{b} bytes"))
            ),
            Ok(None) => log::info!("checkpoint {}: its consumption is unknown", ending.as_str()),
            Err(e) => log::warn!("cannot record the checkpoint's consumption: {e}"),
        }
        self.high_water.store(0, Ordering::Relaxed);
        self.high_water_stored.store(0, Ordering::Relaxed);
    }

    /// Version 2's part of the status.
    fn add_v2_status(&self, status: &mut CheckpointStatus) {
        status.backendsInUse = self
            .space
            .devices
            .iter()
            .map(|d| BackendInUse {
                mountPoint: d.spec.mount_point.display().to_string(),
                name: d.backend_name.clone(),
                r#type: d.backend.type_name().to_owned(),
                reason: if d.reason.is_empty() {
                    "configured".to_owned()
                } else {
                    d.reason.clone()
                },
            })
            .collect();
        if let Ok((reservations, device)) = self.reservations() {
            match reservations.status(&device.spec) {
                Ok(info) => status.reservation = info.map(|i| aidl_reservation(device, &i)),
                Err(e) => log::warn!("getStatus: cannot read the reservation: {e}"),
            }
        }
        let learned = self.checkpointer.with_store(|store| {
            Ok::<_, policy::StoreError>((
                store.last_estimate()?,
                store.tracking()?,
                store.consumption(1)?.into_iter().next(),
            ))
        });
        match learned {
            Ok((last, tracking, finished)) => {
                if let Some(e) = last {
                    status.lastEstimateNeededBytes = to_i64(e.needed_bytes);
                    status.lastEstimatePredictedBytes = to_i64(e.predicted_bytes);
                    status.lastEstimateTimestampMs = e.at_ms;
                }
                if let Some(t) = tracking {
                    status.checkpointEstimatedBytes = t.estimate.map_or(-1, |(_, n, _)| to_i64(n));
                    let seen = self.high_water.load(Ordering::Relaxed);
                    let high = t.high_water_bytes.map_or(seen, |h| h.max(seen));
                    status.backupBytesHighWater =
                        if t.high_water_bytes.is_some() || seen > 0 { to_i64(high) } else { -1 };
                }
                if let Some(c) = finished {
                    status.lastActualBytes = to_i64(c.actual_bytes);
                    status.lastEstimatedBytes = c.estimated_bytes.map_or(-1, to_i64);
                }
            }
            Err(e) => log::warn!("getStatus: cannot read the learning records: {e}"),
        }
    }

    /// getStatus.
    pub fn status(&self) -> Result<CheckpointStatus, ServiceError> {
        let status = self.checkpointer.status()?;
        let budget = match status.requested_retry {
            Some(-1) => -1,
            Some(retry) => retry.saturating_add(1),
            None => 0,
        };
        let mut devices: Vec<String> =
            self.devices.iter().map(|d| d.device.display().to_string()).collect();
        for backend in &status.backends {
            if let Some(backend_status) = &backend.status {
                for device in &backend_status.devices {
                    if !devices.contains(device) {
                        devices.push(device.clone());
                    }
                }
            }
        }
        let mut out = CheckpointStatus {
            state: aidl_state(status.state),
            isCheckpointing: status.is_checkpointing,
            needsRollback: status.needs_rollback,
            budget,
            attemptsUsed: to_i32(status.attempts_used),
            attemptsLeft: status.attempts_left.map_or(-1, to_i32),
            slotSuffix: status.requesting_suffix.unwrap_or_default(),
            currentSlotSuffix: status.current_suffix.unwrap_or_default(),
            backends: status.backends.iter().map(backend_label).collect(),
            devices,
            backupBytesUsed: status.backup_used_bytes.map_or(-1, to_i64),
            backupBytesFree: status.backup_free_bytes.map_or(-1, to_i64),
            lastRestore: status.last_restore.as_ref().map(aidl_history_event),
            ..CheckpointStatus::default()
        };
        self.add_v2_status(&mut out);
        Ok(out)
    }

    /// registerListener: within the caps of `[listeners]`; the same binder again counts once.
    pub fn register_listener(
        &self,
        listener: Strong<dyn ICheckpointListener>,
    ) -> Result<(), ServiceError> {
        // check_caller ran first, so the UID is known; u32::MAX only if it vanished since.
        let uid = caller_uid().unwrap_or(u32::MAX);
        if self.listeners.add(uid, listener)? == Registered::AlreadyRegistered {
            log::debug!("registerListener from UID {uid}: already registered");
        }
        Ok(())
    }

    /// getHistory (`limit` <= 0: everything): the newest `limit` rows, as many of them as fit
    /// in [`MAX_HISTORY_REPLY_BYTES`].
    pub fn history(&self, limit: i32) -> Result<Vec<AidlHistoryEvent>, ServiceError> {
        let limit = usize::try_from(limit).ok().filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut budget = MAX_HISTORY_REPLY_BYTES;
        let mut out = Vec::new();
        for event in self.checkpointer.history(limit)?.iter().map(aidl_history_event) {
            let Some(left) = budget.checked_sub(parcel_size(&event)) else { break };
            budget = left;
            out.push(event);
        }
        Ok(out)
    }
}

/// The object served on kernel binder and on the RPC socket.
#[derive(Debug, Clone)]
pub struct CheckpointService {
    daemon: Arc<Daemon>,
}

impl CheckpointService {
    /// A service object over `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        CheckpointService { daemon }
    }

    /// The binder to publish.
    pub fn into_binder(self) -> Strong<dyn ICheckpoint> {
        checkpoint_aidl::android::system::checkpoint::ICheckpoint::BnCheckpoint::new_binder(self)
    }

    fn call<T>(
        &self,
        access: Access,
        method: &'static str,
        inner: impl FnOnce(&Daemon) -> Result<T, ServiceError>,
    ) -> BinderResult<T> {
        self.daemon
            .check_caller(access, method)
            .and_then(|()| inner(&self.daemon))
            .map_err(|e| into_binder_status(method, e, &self.daemon.refusals))
    }
}

impl rsbinder::Interface for CheckpointService {}

#[allow(non_snake_case, reason = "method names are the AIDL's")]
impl ICheckpoint for CheckpointService {
    fn startCheckpoint(&self, retry: i32) -> BinderResult<()> {
        self.call(Access::Change, "startCheckpoint", |d| d.start_checkpoint(retry))
    }

    fn needsCheckpoint(&self) -> BinderResult<bool> {
        self.call(Access::Change, "needsCheckpoint", Daemon::needs_checkpoint)
    }

    fn needsRollback(&self) -> BinderResult<bool> {
        self.call(Access::Query, "needsRollback", Daemon::needs_rollback)
    }

    fn isCheckpointing(&self) -> BinderResult<bool> {
        self.call(Access::Query, "isCheckpointing", |d| Ok(d.is_checkpointing()))
    }

    fn commitChanges(&self) -> BinderResult<()> {
        self.call(Access::Change, "commitChanges", Daemon::commit_changes)
    }

    fn abortChanges(&self, reason: &str, retry: bool) -> BinderResult<()> {
        self.call(Access::Change, "abortChanges", |d| d.abort_changes(reason, retry))
    }

    fn prepareCheckpoint(&self) -> BinderResult<()> {
        self.call(Access::Change, "prepareCheckpoint", Daemon::prepare_checkpoint)
    }

    fn restoreCheckpoint(&self, device: &str) -> BinderResult<()> {
        self.call(Access::Change, "restoreCheckpoint", |d| d.restore_checkpoint(device, 0))
    }

    fn restoreCheckpointPart(&self, device: &str, count: i32) -> BinderResult<()> {
        self.call(Access::Change, "restoreCheckpointPart", |d| d.restore_checkpoint(device, count))
    }

    fn markBootAttempt(&self) -> BinderResult<()> {
        self.call(Access::Change, "markBootAttempt", Daemon::mark_boot_attempt)
    }

    fn supportsCheckpoint(&self) -> BinderResult<bool> {
        self.call(Access::Query, "supportsCheckpoint", |d| Ok(d.checkpointer.supports_checkpoint()))
    }

    fn supportsBlockCheckpoint(&self) -> BinderResult<bool> {
        self.call(Access::Query, "supportsBlockCheckpoint", |d| {
            Ok(d.checkpointer.supports_block_checkpoint())
        })
    }

    fn supportsFileCheckpoint(&self) -> BinderResult<bool> {
        self.call(Access::Query, "supportsFileCheckpoint", |d| {
            Ok(d.checkpointer.supports_file_checkpoint())
        })
    }

    fn resetCheckpoint(&self) -> BinderResult<()> {
        self.call(Access::Change, "resetCheckpoint", |d| {
            d.reset_checkpoint();
            Ok(())
        })
    }

    fn getStatus(&self) -> BinderResult<CheckpointStatus> {
        self.call(Access::Query, "getStatus", Daemon::status)
    }

    fn registerListener(&self, listener: &Strong<dyn ICheckpointListener>) -> BinderResult<()> {
        self.call(Access::Query, "registerListener", |d| d.register_listener(listener.clone()))
    }

    fn getHistory(&self, limit: i32) -> BinderResult<Vec<AidlHistoryEvent>> {
        self.call(Access::Query, "getHistory", |d| d.history(limit))
    }

    fn estimateBackupSpace(&self, request: &EstimateRequest) -> BinderResult<BackupEstimate> {
        // The descriptor is duplicated out of the request (the parcel keeps its own).
        let request = EstimateRequest {
            trace: match &request.trace {
                Some(fd) => Some(fd.try_clone().map_err(|e| {
                    into_binder_status(
                        "estimateBackupSpace",
                        ServiceError::InvalidArgument(format!("Trace: cannot duplicate it: {e:?}")),
                        &self.daemon.refusals,
                    )
                })?),
                None => None,
            },
            declaredBytes: request.declaredBytes.clone(),
            mountPoint: request.mountPoint.clone(),
        };
        self.call(Access::Query, "estimateBackupSpace", |d| d.estimate_backup_space(request))
    }

    fn reserveSpace(&self, bytes: i64) -> BinderResult<ReservationInfo> {
        self.call(Access::Change, "reserveSpace", |d| d.reserve_space(bytes))
    }

    fn releaseReservation(&self) -> BinderResult<()> {
        self.call(Access::Change, "releaseReservation", Daemon::release_reservation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_paths_are_checked_as_vold_does() {
        assert!(check_argument_path("/dev/block/by-name/userdata").is_ok());
        for (path, message) in [
            ("", "Missing path".to_owned()),
            ("dev/vdb", "Path dev/vdb is relative".to_owned()),
            ("/dev/../etc/passwd", "Path /dev/../etc/passwd is shady".to_owned()),
            ("/dev/block/..", "Path /dev/block/.. is shady".to_owned()),
            ("/dev/vdb\n", "Path /dev/vdb\n is malformed".to_owned()),
            ("/dev/v\0db", "Path /dev/v\0db is malformed".to_owned()),
        ] {
            match check_argument_path(path) {
                Err(ServiceError::InvalidPath(m)) => assert_eq!(m, message),
                other => panic!("{path:?}: {other:?}"),
            }
        }
        // Names that merely contain dots are fine.
        assert!(check_argument_path("/dev/..hidden/x").is_ok());
        assert!(check_argument_path("/dev/x..").is_ok());
    }

    #[test]
    fn a_path_longer_than_path_max_is_refused_without_echo() {
        let longest = format!("/{}", "p".repeat(MAX_PATH_BYTES - 1));
        assert!(check_argument_path(&longest).is_ok());
        // Too long and malformed: the length is reported, not the path.
        let too_long = format!("{longest}\n");
        match check_argument_path(&too_long) {
            Err(e @ ServiceError::TooLong { what: "Path", len: 4096, max: 4095 }) => {
                assert_eq!(e.to_string(), "Path is 4096 bytes long, more than the 4095 allowed");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A daemon over a test-null backend and one `[[device]]` at `mount` (not mounted: the
    /// high-water mark needs no file system).
    fn daemon_in(dir: &Path) -> Arc<Daemon> {
        let config = crate::config::Config::parse(&format!(
            "metadata_dir = \"{}\"\n[[device]]\ndevice = \"/dev/null-raw\"\n\
             mount_point = \"{}\"\ncheckpoint = \"block\"\n[[backend]]\ntype = \"test-null\"\n\
             [binder]\nenabled = false\n[socket]\npath = \"{}\"\n",
            dir.join("metadata").display(),
            dir.display(),
            dir.join("s.sock").display()
        ))
        .expect("config");
        crate::daemon::build(&config).expect("daemon").daemon
    }

    #[test]
    fn the_high_water_mark_is_kept_while_checkpointing_and_stored_in_steps() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let daemon = daemon_in(dir.path());
            daemon.note_used(50 << 20);
            assert_eq!(daemon.high_water.load(Ordering::Relaxed), 0, "not checkpointing");
            daemon.start_checkpoint(2).expect("start");
        }
        // The next boot runs under the checkpoint.
        let daemon = daemon_in(dir.path());
        assert!(daemon.needs_checkpoint().expect("needsCheckpoint"));
        let stored = |d: &Daemon| {
            d.checkpointer
                .with_store(|s| s.tracking())
                .expect("read")
                .expect("tracked")
                .high_water_bytes
        };
        daemon.note_used(10 << 20);
        assert_eq!(stored(&daemon), Some(10 << 20), "the first sample is stored");
        daemon.note_used((10 << 20) + 4096);
        assert_eq!(stored(&daemon), Some(10 << 20), "less than a step: memory only");
        daemon.note_used(8 << 20);
        assert_eq!(daemon.high_water.load(Ordering::Relaxed), (10 << 20) + 4096, "the maximum");
        daemon.note_used(12 << 20);
        assert_eq!(stored(&daemon), Some(12 << 20), "a step: stored");
        // The end takes the in-memory maximum even if it was never stored.
        daemon.note_used((12 << 20) + 4096);
        assert_eq!(daemon.tracked_used(), Some((12 << 20) + 4096));
        daemon.commit_changes().expect("commit");
        let finished = daemon.checkpointer.with_store(|s| s.consumption(1)).expect("read");
        assert_eq!(finished[0].actual_bytes, (12 << 20) + 4096);
        assert_eq!(finished[0].outcome, "committed");
    }

    #[test]
    fn the_parcel_size_of_a_history_entry_counts_utf16() {
        let mut event = aidl_history_event(&HistoryEvent::new(HistoryKind::Restore));
        let empty = parcel_size(&event);
        event.device = "/dev/é".to_owned(); // 6 UTF-16 units, 7 UTF-8 bytes
        assert_eq!(parcel_size(&event), empty + 12);
    }
}
