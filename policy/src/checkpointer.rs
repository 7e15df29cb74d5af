//! The checkpoint policy: vold's observable semantics (vold-checkpoint.md §4, §8.6, §11) as a
//! state machine over the durable [`Store`], with vold's known bugs fixed on purpose
//! (docs/state-machine.md, "Differences from vold, on purpose").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};

use log::{error, info, warn};

use crate::backend::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreReport, RestoreRequest,
};
use crate::bootctl::{BootControl, BootControlError};
use crate::error::PolicyError;
use crate::store::{now_ms, CurrentRow, HistoryEvent, HistoryKind, Phase, RowChange, Store};

/// The largest boot budget (`retry + 1`) stored: `i32::MAX`, the largest count the AIDL's
/// `int` fields can show. `startCheckpoint(i32::MAX)` asks for 2^31 attempts and gets this.
pub const MAX_BUDGET: u32 = 0x7fff_ffff;

/// What the policy does when a requested checkpoint runs out of boot attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RollbackAction {
    /// Nothing beyond reporting `needsRollback` (vold).
    #[default]
    None,
    /// On the rollback boot, if it runs on a slot other than the one that requested the
    /// checkpoint, make the requesting slot active again (the daemon then reboots).
    SwitchToPreviousSlot,
}

/// Policy configuration (the daemon fills it from its config file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOptions {
    /// `commitChanges` logs a warning and succeeds without committing (vold's
    /// `persist.vold.dont_commit_checkpoint=1`, a test hook).
    pub dont_commit: bool,
    /// The `retry` used by [`Checkpointer::start_default_checkpoint`]. Budget = retry + 1, so
    /// the default 2 gives 3 checkpointed boots, then the rollback boot.
    pub default_retry: i32,
    /// What to do when the budget is spent.
    pub rollback_action: RollbackAction,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            dont_commit: false,
            default_retry: 2,
            rollback_action: RollbackAction::None,
        }
    }
}

/// The boot budget of a requested checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Budget {
    /// This many boot attempts left (at least 1); vold's file `"<n>"`.
    Attempts(u32),
    /// Budget spent: the rollback state (vold's `"0"`).
    Spent,
    /// `startCheckpoint(-1)`: unlimited, rollback when booted back on the requesting slot
    /// (vold's `"-1 <suffix>"`; without a suffix it never reports rollback).
    Unlimited {
        /// Suffix of the slot current when the checkpoint was requested.
        slot_suffix: Option<String>,
    },
}

impl Budget {
    fn of(row: &CurrentRow) -> Budget {
        match row.budget_left {
            None => Budget::Unlimited { slot_suffix: row.requesting_suffix.clone() },
            Some(0) => Budget::Spent,
            Some(n) => Budget::Attempts(n),
        }
    }
}

/// Result of `startCheckpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// The checkpoint is requested for the next boot(s).
    Started {
        /// Its budget.
        budget: Budget,
    },
}

/// Result of `markBootAttempt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkOutcome {
    /// No checkpoint requested; nothing written.
    NoCheckpoint,
    /// One attempt used; `left` (≥ 1) remain.
    Decremented {
        /// Attempts left.
        left: u32,
    },
    /// The last attempt was used: the next boot is the rollback boot.
    BudgetSpent,
    /// The budget was already spent or is unlimited; only the attempt was recorded.
    Unchanged {
        /// The budget.
        budget: Budget,
    },
    /// Rollback boot with [`RollbackAction::SwitchToPreviousSlot`]: the requesting slot is
    /// active again. The daemon should reboot (reason `"checkpoint,rollback"`).
    RollbackSlotSwitched {
        /// The slot this boot runs from.
        from: u32,
        /// The slot made active.
        to: u32,
    },
}

/// Result of `commitChanges`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed: slot marked successful, these backends committed, state cleared.
    Committed {
        /// Backends committed.
        committed: Vec<String>,
        /// Block backends skipped because they were never armed in this boot.
        skipped: Vec<String>,
    },
    /// Not checkpointing: nothing to do (vold's no-op).
    NotCheckpointing,
    /// Not checkpointing, and this boot is the rollback boot: the spent budget is cleared so
    /// later boots stop reporting `needsRollback` (this process keeps reporting it).
    RollbackAcknowledged,
    /// `dont_commit` is set: nothing done.
    DontCommit,
}

/// Result of `abortChanges`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// The daemon must reboot now. vold's `sys.powerctl` would be `"reboot,<reason>"`
    /// (`"reboot"` when the reason is empty).
    Reboot {
        /// The caller's message.
        reason: String,
    },
    /// Not checkpointing: no reboot (vold's silent no-op).
    NotCheckpointing,
}

/// How a dm-bow restore ended (the daemon runs it; the policy records it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// No log on the device ("No magic"): nothing was checkpointed.
    NothingToRestore,
    /// The log was replayed: the device is back at the checkpoint.
    Restored {
        /// Log entries replayed.
        entries: u64,
    },
    /// The log failed validation; the new data was kept (roll forward).
    RolledForward,
    /// A partial restore stopped at its limit (`restoreCheckpointPart`).
    Interrupted {
        /// Log entries replayed.
        entries: u64,
    },
    /// The restore failed.
    Failed {
        /// The errno reported to the caller.
        errno: i32,
        /// The error message.
        message: String,
    },
}

impl RestoreOutcome {
    /// The word stored in the history's `outcome` column.
    pub fn as_str(&self) -> &'static str {
        match self {
            RestoreOutcome::NothingToRestore => "nothing_to_restore",
            RestoreOutcome::Restored { .. } => "restored",
            RestoreOutcome::RolledForward => "rolled_forward",
            RestoreOutcome::Interrupted { .. } => "interrupted",
            RestoreOutcome::Failed { .. } => "failed",
        }
    }
}

/// A restore to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreRecord {
    /// How it ended.
    pub outcome: RestoreOutcome,
    /// How long it took.
    pub duration_ms: u64,
    /// The backend that ran it (`None`: the dm-bow log fallback).
    pub backend: Option<String>,
}

/// What a backend's (or the fallback's) restore answers.
pub type RestoreResult = Result<RestoreReport, BackendError>;

/// The restore of a device no backend covers: `(device, request, progress)`.
pub type RestoreFallback<'a> =
    dyn Fn(&str, &RestoreRequest, &dyn Fn(u64, u64)) -> RestoreResult + 'a;

/// A restore run through [`Checkpointer::restore_device`].
#[derive(Debug)]
pub struct RestoreRun {
    /// The backend that covered the device (`None`: the fallback ran).
    pub backend: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// The backend's report, or why it could not run.
    pub result: RestoreResult,
}

/// A one-word summary of the checkpoint state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Nothing requested, not checkpointing.
    Idle,
    /// A checkpoint is requested but this boot is not checkpointed (yet).
    Pending,
    /// This boot runs checkpointed.
    Checkpointing,
    /// `needsRollback` is true and this boot is not checkpointed.
    RollbackPending,
}

impl State {
    /// `"idle"`, `"pending"`, `"checkpointing"`, `"rollback_pending"`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Pending => "pending",
            State::Checkpointing => "checkpointing",
            State::RollbackPending => "rollback_pending",
        }
    }
}

/// One backend in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its name.
    pub name: String,
    /// Block or file.
    pub kind: BackendKind,
    /// Whether `prepare` succeeded for it in this boot.
    pub prepared: bool,
    /// Why it was chosen (`auto`), empty when configured explicitly.
    pub selection_reason: String,
    /// Its own status (`None` if it failed to report).
    pub status: Option<BackendStatus>,
}

/// Everything `getStatus` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Summary.
    pub state: State,
    /// The raw flag.
    pub is_checkpointing: bool,
    /// The latched `needsCheckpoint` answer, `None` before the first evaluation.
    pub needs_checkpoint: Option<bool>,
    /// `needsRollback` now.
    pub needs_rollback: bool,
    /// Budget of the requested checkpoint.
    pub budget: Option<Budget>,
    /// `retry` it was requested with.
    pub requested_retry: Option<i32>,
    /// Boot attempts recorded since it was requested.
    pub attempts_used: u32,
    /// Attempts left (`None`: unlimited or nothing requested).
    pub attempts_left: Option<u32>,
    /// Slot current when it was requested.
    pub requesting_slot: Option<u32>,
    /// That slot's suffix.
    pub requesting_suffix: Option<String>,
    /// The slot this boot runs from (`None` without boot control).
    pub current_slot: Option<u32>,
    /// Its suffix.
    pub current_suffix: Option<String>,
    /// The configured backends.
    pub backends: Vec<BackendInfo>,
    /// Sum of the backup space the backends report as used.
    pub backup_used_bytes: Option<u64>,
    /// Sum of the backup space the backends report as free.
    pub backup_free_bytes: Option<u64>,
    /// The newest recorded restore.
    pub last_restore: Option<HistoryEvent>,
    /// When the checkpoint was requested (ms since the Unix epoch).
    pub started_at_ms: Option<i64>,
}

/// A backend short of backup space (the health monitor's report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LowSpace {
    /// The backend.
    pub backend: String,
    /// Its free backup space.
    pub free_bytes: u64,
    /// The threshold it fell below (the monitor's warning or action threshold).
    pub min_free_bytes: u64,
}

/// Events for listeners (the daemon forwards them to binder listeners).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    /// The summary state may have changed.
    StateChanged {
        /// The new state.
        state: State,
    },
    /// vold's vendor-listener signal: no checkpoint this boot, or the commit succeeded.
    CheckpointingComplete,
    /// A commit succeeded.
    Committed,
    /// `abortChanges` asked for a reboot.
    RebootRequested {
        /// The reason.
        reason: String,
    },
    /// A backend is short of backup space.
    LowSpace(LowSpace),
    /// A restore was recorded.
    RestoreRecorded {
        /// The device.
        device: String,
        /// How it ended.
        outcome: RestoreOutcome,
    },
}

/// What the commit's unlocked steps did.
#[derive(Debug, Default)]
struct CommitSteps {
    committed: Vec<String>,
    skipped: Vec<String>,
    used: Option<u64>,
    slot: Option<u32>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// vold's `needsCheckpointWasCalled`.
    latch_called: bool,
    /// Set when this process cleared a state in which `needsRollback` was true, so the whole
    /// rollback boot keeps answering true.
    rollback_seen: bool,
    /// Per backend: `prepare` succeeded in this boot.
    prepared: Vec<bool>,
    subscribers: Vec<Sender<PolicyEvent>>,
}

/// The policy. `Send + Sync`: share it as `Arc<Checkpointer>`.
///
/// Two locks, always taken in this order:
/// * `op` serialises the operations that change state or drive backends (start, mark,
///   prepare, commit, abort, grow): vold's `isCheckpointingLock`. It is held across backend
///   I/O, so two commits (a caller's and the health monitor's) never interleave.
/// * `inner` guards the store and the per-process flags, and is held only for a state or
///   store transition, never while a backend does I/O: queries
///   (`needsRollback`, `getStatus`, history) answer while a long commit runs, and a backend
///   may call back into the policy's queries without deadlocking.
///
/// [`Self::is_checkpointing`] reads an atomic flag, as vold reads its volatile.
#[derive(Debug)]
pub struct Checkpointer {
    inner: Mutex<Inner>,
    op: Mutex<()>,
    /// Serialises restores (vold holds its VolumeManager lock for the whole restore).
    restore_lock: Mutex<()>,
    /// vold's `isCheckpointing` (read without the lock, as vold does).
    checkpointing: AtomicBool,
    boot: Box<dyn BootControl>,
    backends: Vec<Box<dyn Backend>>,
    options: PolicyOptions,
}

impl Checkpointer {
    /// A policy over an open store. Nothing is evaluated yet: the latch starts unset and
    /// `isCheckpointing` false, as at vold's start.
    pub fn new(
        store: Store,
        boot: Box<dyn BootControl>,
        backends: Vec<Box<dyn Backend>>,
        options: PolicyOptions,
    ) -> Result<Self, PolicyError> {
        if let Some(row) = store.current() {
            info!(
                "checkpoint requested (retry {}): budget {:?}, {} boot attempts recorded",
                row.requested_retry,
                Budget::of(row),
                row.attempts_used
            );
        }
        let prepared = vec![false; backends.len()];
        Ok(Checkpointer {
            inner: Mutex::new(Inner {
                store,
                latch_called: false,
                rollback_seen: false,
                prepared,
                subscribers: Vec::new(),
            }),
            op: Mutex::new(()),
            restore_lock: Mutex::new(()),
            checkpointing: AtomicBool::new(false),
            boot,
            backends,
            options,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves no half-written durable state (every change
        // is one SQLite transaction), so the data is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The operation lock (see the type's documentation); taken before `inner`, never after.
    fn op(&self) -> MutexGuard<'_, ()> {
        self.op.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The options in force.
    pub fn options(&self) -> &PolicyOptions {
        &self.options
    }

    /// True iff any backend is configured (vold: any `checkpoint=` fstab flag).
    pub fn supports_checkpoint(&self) -> bool {
        !self.backends.is_empty()
    }

    /// True iff a block backend is configured.
    pub fn supports_block_checkpoint(&self) -> bool {
        self.backends.iter().any(|b| b.kind() == BackendKind::Block)
    }

    /// True iff a file backend is configured.
    pub fn supports_file_checkpoint(&self) -> bool {
        self.backends.iter().any(|b| b.kind() == BackendKind::File)
    }

    /// `startCheckpoint(retry)`: request a checkpoint for the next boot(s); replaces any
    /// requested or spent one. Does not touch the latch or `isCheckpointing`.
    pub fn start_checkpoint(&self, retry: i32) -> Result<StartOutcome, PolicyError> {
        if !self.supports_checkpoint() {
            return Err(PolicyError::NotSupported);
        }
        if retry < -1 {
            return Err(PolicyError::InvalidRetry { retry });
        }
        let slot = self.current_slot();
        let suffix = slot.and_then(|s| self.suffix_of(s)).filter(|s| !s.is_empty());
        // Budget = retry + 1, at most MAX_BUDGET: the frozen AIDL reports attempts as `int`,
        // so a budget of 2^31 (retry = i32::MAX) would show as i32::MAX before and after a
        // boot attempt (no visible decrement). A budget this large is "unlimited" in practice.
        let budget_left = match u32::try_from(retry) {
            Ok(r) => Some(r.saturating_add(1).min(MAX_BUDGET)),
            Err(_) => None, // retry == -1
        };
        let row = CurrentRow {
            requested_retry: retry,
            budget_left,
            attempts_used: 0,
            requesting_slot: slot,
            requesting_suffix: suffix,
            rollback_slot_switched: false,
            phase: Phase::Active,
            backends: self.backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(","),
            started_at_ms: now_ms(),
        };
        let mut event = HistoryEvent::new(HistoryKind::Start);
        event.requested_retry = Some(retry);
        event.budget_left = budget_left.map(i64::from);
        event.slot = slot;
        let _op = self.op();
        let mut inner = self.lock();
        inner.store.apply(RowChange::Set(&row), &[event])?;
        inner.rollback_seen = false;
        let budget = Budget::of(&row);
        info!("checkpoint requested: retry {retry}, budget {budget:?}");
        self.emit_state(&mut inner);
        Ok(StartOutcome::Started { budget })
    }

    /// [`Self::start_checkpoint`] with [`PolicyOptions::default_retry`].
    pub fn start_default_checkpoint(&self) -> Result<StartOutcome, PolicyError> {
        self.start_checkpoint(self.options.default_retry)
    }

    /// `needsCheckpoint`: evaluated once per process (the latch), then the latched flag. True
    /// iff the current slot is not marked successful or a checkpoint is requested whose budget
    /// is not spent. Never writes to the store. Never fails today (boot control errors count
    /// as "slot successful", as in vold).
    pub fn needs_checkpoint(&self) -> Result<bool, PolicyError> {
        let mut inner = self.lock();
        Ok(self.needs_checkpoint_locked(&mut inner))
    }

    fn needs_checkpoint_locked(&self, inner: &mut Inner) -> bool {
        if inner.latch_called {
            return self.checkpointing.load(Ordering::SeqCst);
        }
        inner.latch_called = true;
        if self.checkpointing.load(Ordering::SeqCst) {
            return true;
        }
        let slot_unsuccessful = self.boot.is_present()
            && self
                .boot
                .current_slot()
                .and_then(|s| self.boot.is_slot_marked_successful(s))
                .map_err(|e| warn!("boot control: {e}; treating the slot as successful"))
                == Ok(false);
        let requested = inner.store.current().is_some_and(|row| row.budget_left != Some(0));
        if slot_unsuccessful || requested {
            self.checkpointing.store(true, Ordering::SeqCst);
            info!(
                "this boot is checkpointed ({})",
                if slot_unsuccessful { "slot not marked successful" } else { "requested" }
            );
            self.emit_state(inner);
            true
        } else {
            self.emit(inner, PolicyEvent::CheckpointingComplete);
            false
        }
    }

    /// `needsRollback`: the budget is spent, or an unlimited checkpoint finds the device back
    /// on the slot that requested it; stays true for the rest of the process once this boot
    /// cleared such a state. Never writes.
    pub fn needs_rollback(&self) -> Result<bool, PolicyError> {
        let inner = self.lock();
        Ok(self.needs_rollback_locked(&inner))
    }

    fn needs_rollback_locked(&self, inner: &Inner) -> bool {
        inner.rollback_seen || inner.store.current().is_some_and(|row| self.row_needs_rollback(row))
    }

    fn row_needs_rollback(&self, row: &CurrentRow) -> bool {
        match (row.budget_left, &row.requesting_suffix) {
            (Some(0), _) => true,
            (None, Some(suffix)) => self
                .current_slot()
                .and_then(|s| self.suffix_of(s))
                .is_some_and(|current| &current == suffix),
            _ => false,
        }
    }

    /// `isCheckpointing`: the raw flag (false before the first `needsCheckpoint`).
    pub fn is_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::SeqCst)
    }

    /// vold's vendor `CHECKPOINTING_COMPLETE`: the latch is evaluated and this boot is not (or
    /// no longer) checkpointing.
    pub fn checkpointing_complete(&self) -> bool {
        let inner = self.lock();
        inner.latch_called && !self.is_checkpointing()
    }

    /// `markBootAttempt` (init `post-fs`): use one attempt of a positive budget; a spent or
    /// unlimited budget is unchanged (the attempt is still recorded). On the rollback boot,
    /// runs the configured [`RollbackAction`].
    pub fn mark_boot_attempt(&self) -> Result<MarkOutcome, PolicyError> {
        let _op = self.op();
        let mut inner = self.lock();
        let Some(row) = inner.store.current().cloned() else {
            return Ok(MarkOutcome::NoCheckpoint);
        };
        let current_slot = self.current_slot();
        let mut next = row.clone();
        next.attempts_used = row.attempts_used.saturating_add(1);
        let mut attempt = HistoryEvent::new(HistoryKind::BootAttempt);
        attempt.requested_retry = Some(row.requested_retry);
        attempt.slot = current_slot;
        let mut events = Vec::new();
        let outcome = match row.budget_left {
            Some(n) if n >= 2 => {
                next.budget_left = Some(n - 1);
                MarkOutcome::Decremented { left: n - 1 }
            }
            Some(1) => {
                next.budget_left = Some(0);
                info!("last checkpointed boot attempt: the next boot rolls back");
                MarkOutcome::BudgetSpent
            }
            Some(_) => match self.rollback_switch_target(&row, current_slot) {
                Some((from, to)) => {
                    self.boot.set_active_boot_slot(to).map_err(PolicyError::BootControl)?;
                    warn!("rollback boot on slot {from}: made the previous slot {to} active");
                    next.rollback_slot_switched = true;
                    let mut sw = HistoryEvent::new(HistoryKind::RollbackSlotSwitch);
                    sw.requested_retry = Some(row.requested_retry);
                    sw.budget_left = Some(0);
                    sw.slot = Some(to);
                    events.push(sw);
                    MarkOutcome::RollbackSlotSwitched { from, to }
                }
                None => MarkOutcome::Unchanged { budget: Budget::Spent },
            },
            None => MarkOutcome::Unchanged { budget: Budget::of(&row) },
        };
        attempt.budget_left = next.budget_left.map(i64::from);
        events.insert(0, attempt);
        inner.store.apply(RowChange::Set(&next), &events)?;
        if matches!(outcome, MarkOutcome::Decremented { .. } | MarkOutcome::BudgetSpent) {
            self.emit_state(&mut inner);
        }
        Ok(outcome)
    }

    fn rollback_switch_target(&self, row: &CurrentRow, current: Option<u32>) -> Option<(u32, u32)> {
        if self.options.rollback_action != RollbackAction::SwitchToPreviousSlot
            || row.rollback_slot_switched
        {
            return None;
        }
        match (current, row.requesting_slot) {
            (Some(from), Some(to)) if from != to => Some((from, to)),
            _ => None,
        }
    }

    /// `prepareCheckpoint` (post-fs-data): when checkpointing, arm every backend not yet armed
    /// in this boot. A backend that fails is logged and left unarmed (it will not be committed);
    /// like vold, the call still succeeds.
    ///
    /// On a boot that took its decision (`needsCheckpoint` evaluated) and is not checkpointing,
    /// with no backend armed, every backend's `teardown` drops what an earlier checkpoint left
    /// behind (a COW file after a rollback); failures are logged. Backend I/O runs without the
    /// state lock.
    pub fn prepare_checkpoint(&self) -> Result<(), PolicyError> {
        info!(target: "Checkpoint", "cp_prepareCheckpoint called");
        let _op = self.op();
        if !self.is_checkpointing() {
            let decided = self.lock().latch_called;
            if decided && !self.any_backend_armed() {
                self.teardown_backends();
            }
            return Ok(());
        }
        let todo: Vec<usize> = {
            let inner = self.lock();
            (0..self.backends.len()).filter(|i| !inner.prepared[*i]).collect()
        };
        for i in todo {
            let backend = &self.backends[i];
            match backend.prepare() {
                Ok(action) => {
                    self.lock().prepared[i] = true;
                    info!("backend {} armed ({action:?})", backend.name());
                }
                Err(e) => error!("backend {}: prepare failed, left unarmed: {e}", backend.name()),
            }
        }
        Ok(())
    }

    fn teardown_backends(&self) {
        for backend in &self.backends {
            match backend.teardown() {
                Ok(Action::Changed) => {
                    info!("backend {}: released what an earlier checkpoint left", backend.name())
                }
                Ok(Action::Identity) => {}
                Err(e) => error!("backend {}: teardown failed: {e}", backend.name()),
            }
        }
    }

    /// `commitChanges`: when checkpointing, mark the slot successful, commit the backends in
    /// order (block backends only if armed), then clear the state. Any error leaves the
    /// checkpoint in place, and a retry commits again (backends already committed answer
    /// [`Action::Identity`]). When not checkpointing on the rollback boot, acknowledges the
    /// rollback (clears the spent budget).
    ///
    /// The state lock is held only to mark the row `committing` and to finish; the boot
    /// control and the backends run between, under the operation lock alone.
    pub fn commit_changes(&self) -> Result<CommitOutcome, PolicyError> {
        let _op = self.op();
        if !self.is_checkpointing() {
            return self.acknowledge_rollback();
        }
        if self.options.dont_commit {
            warn!("dont_commit is set: not committing the checkpoint");
            return Ok(CommitOutcome::DontCommit);
        }
        let (before, rollback_was_needed, prepared) = {
            let mut inner = self.lock();
            let before = inner.store.current().cloned();
            let rollback_was_needed = self.needs_rollback_locked(&inner);
            if let Some(row) = &before {
                // Transient marker: a crash from here to the end is rolled back at the next open.
                let marked = CurrentRow { phase: Phase::Committing, ..row.clone() };
                inner.store.apply(RowChange::Set(&marked), &[])?;
            }
            (before, rollback_was_needed, inner.prepared.clone())
        };
        let mut steps = CommitSteps::default();
        let result = self.commit_steps(&prepared, &mut steps);
        let mut inner = self.lock();
        if let Err(e) = result {
            error!("checkpoint commit failed: {e}");
            let mut failed = HistoryEvent::new(HistoryKind::CommitFailed);
            failed.message = Some(e.to_string());
            failed.requested_retry = before.as_ref().map(|r| r.requested_retry);
            let change = match &before {
                Some(row) => RowChange::Set(row),
                None => RowChange::Keep,
            };
            if let Err(store_err) = inner.store.apply(change, &[failed]) {
                error!("cannot record the failed commit: {store_err}");
            }
            return Err(e);
        }
        // vold order: clear the flag, then delete the state.
        self.checkpointing.store(false, Ordering::SeqCst);
        let mut event = HistoryEvent::new(HistoryKind::Commit);
        event.requested_retry = before.as_ref().map(|r| r.requested_retry);
        event.slot = steps.slot;
        event.outcome = Some("ok".into());
        event.backup_used_bytes = steps.used;
        if !steps.skipped.is_empty() {
            event.message = Some(format!("not armed, skipped: {}", steps.skipped.join(",")));
        }
        inner.store.apply(RowChange::Clear, &[event])?;
        if rollback_was_needed {
            inner.rollback_seen = true;
        }
        info!("Checkpoint has been committed.");
        self.emit(&mut inner, PolicyEvent::Committed);
        self.emit(&mut inner, PolicyEvent::CheckpointingComplete);
        self.emit_state(&mut inner);
        Ok(CommitOutcome::Committed { committed: steps.committed, skipped: steps.skipped })
    }

    /// `commitChanges` on a boot that is not checkpointing (the caller holds the operation
    /// lock): the rollback acknowledgement, or vold's no-op.
    fn acknowledge_rollback(&self) -> Result<CommitOutcome, PolicyError> {
        {
            let inner = self.lock();
            let spent = inner.store.current().is_some_and(|row| row.budget_left == Some(0));
            // Acknowledge only a boot that took its checkpoint decision (the latch)...
            if !spent || !inner.latch_called {
                return Ok(CommitOutcome::NotCheckpointing);
            }
        }
        // ... and has no armed backend (an armed backend means a checkpointed boot whose
        // daemon restarted). The backends are asked without the state lock.
        if self.any_backend_armed() {
            return Ok(CommitOutcome::NotCheckpointing);
        }
        let slot = self.current_slot();
        let mut inner = self.lock();
        let row = inner.store.current().cloned();
        let mut ack = HistoryEvent::new(HistoryKind::RollbackAcknowledged);
        ack.requested_retry = row.as_ref().map(|r| r.requested_retry);
        ack.slot = slot;
        inner.store.apply(RowChange::Clear, &[ack])?;
        inner.rollback_seen = true;
        info!("rollback boot completed: spent checkpoint cleared");
        self.emit_state(&mut inner);
        Ok(CommitOutcome::RollbackAcknowledged)
    }

    /// Asks every backend for its state; call without the state lock.
    fn any_backend_armed(&self) -> bool {
        self.backends.iter().any(|b| {
            let armed = b.status().is_ok_and(|s| s.state == BackendState::Armed);
            if armed {
                warn!("backend {} is armed although this boot is not checkpointing", b.name());
            }
            armed
        })
    }

    /// The commit's I/O: boot control, then the backends in order. Runs without the state lock.
    fn commit_steps(&self, prepared: &[bool], steps: &mut CommitSteps) -> Result<(), PolicyError> {
        if self.boot.is_present() {
            self.boot.mark_boot_successful().map_err(PolicyError::MarkBootSuccessful)?;
            info!("Marked slot as booted successfully.");
        } else {
            error!("no boot control: not marking the slot successful");
        }
        steps.slot = self.current_slot();
        for (i, backend) in self.backends.iter().enumerate() {
            let status = backend.status().ok();
            // Armed: a daemon restarted within the boot. Committed: a commit retried after a
            // crash or a partial failure (the backend answers Identity).
            let live = status
                .as_ref()
                .is_some_and(|s| matches!(s.state, BackendState::Armed | BackendState::Committed));
            if backend.kind() == BackendKind::Block && !prepared[i] && !live {
                warn!("backend {} was never armed in this boot: not committing it", backend.name());
                steps.skipped.push(backend.name().to_string());
                continue;
            }
            if let Some(b) = status.and_then(|s| s.backup_used_bytes) {
                steps.used = Some(steps.used.unwrap_or(0).saturating_add(b));
            }
            let action = backend.commit().map_err(|source| PolicyError::BackendCommit {
                backend: backend.name().to_string(),
                source,
            })?;
            if action == Action::Identity {
                info!("backend {} was already committed", backend.name());
            }
            steps.committed.push(backend.name().to_string());
        }
        Ok(())
    }

    /// `abortChanges(message, retry)`: when checkpointing (the latched answer), with
    /// `retry == false` a positive budget becomes spent; every backend's `abort` then leaves its
    /// device for the next boot's restore, and the daemon must reboot. Not checkpointing: no
    /// reboot. Store and backend errors are logged, as in vold; the reboot still happens.
    pub fn abort_changes(&self, message: &str, retry: bool) -> Result<AbortOutcome, PolicyError> {
        let _op = self.op();
        {
            let mut inner = self.lock();
            if !self.needs_checkpoint_locked(&mut inner) {
                return Ok(AbortOutcome::NotCheckpointing);
            }
            let row = inner.store.current().cloned();
            let mut event = HistoryEvent::new(HistoryKind::Abort);
            event.message = Some(message.to_string());
            event.outcome = Some(if retry { "retry" } else { "no_retry" }.to_string());
            event.slot = self.current_slot();
            event.requested_retry = row.as_ref().map(|r| r.requested_retry);
            let next = row
                .filter(|r| !retry && r.budget_left.is_some_and(|n| n > 0))
                .map(|r| CurrentRow { budget_left: Some(0), ..r });
            event.budget_left = match &next {
                Some(r) => r.budget_left.map(i64::from),
                None => inner.store.current().and_then(|r| r.budget_left).map(i64::from),
            };
            let change = match &next {
                Some(r) => RowChange::Set(r),
                None => RowChange::Keep,
            };
            if let Err(e) = inner.store.apply(change, &[event]) {
                error!("abortChanges: cannot record the abort: {e}");
            }
        }
        for backend in &self.backends {
            if let Err(e) = backend.abort() {
                error!("backend {}: abort failed: {e}", backend.name());
            }
        }
        warn!("checkpoint aborted ({message:?}, retry {retry}): rebooting");
        let mut inner = self.lock();
        self.emit_state(&mut inner);
        self.emit(&mut inner, PolicyEvent::RebootRequested { reason: message.to_string() });
        Ok(AbortOutcome::Reboot { reason: message.to_string() })
    }

    /// `resetCheckpoint`: clear the latch only, so the next `needsCheckpoint` re-evaluates.
    pub fn reset_checkpoint(&self) {
        self.lock().latch_called = false;
    }

    /// The name of the backend that answers `restoreCheckpoint(device)`: the first whose
    /// [`Backend::covers`] is true. `None`: no backend covers it (the caller falls back to
    /// vold's dm-bow log restore).
    pub fn restore_backend(&self, device: &str) -> Option<&str> {
        self.backends.iter().find(|b| b.covers(device)).map(|b| b.name())
    }

    /// `restoreCheckpoint(Part)` through the backend seam: the backend that covers `device`
    /// restores it; a device no backend covers goes to `fallback` (the daemon passes the
    /// dm-bow log restore, so any device with a dm-bow log is restored as vold would).
    /// Restores are serialised among themselves and take neither the state nor the operation
    /// lock. The caller records the outcome ([`Self::record_restore`]).
    pub fn restore_device(
        &self,
        device: &str,
        request: &RestoreRequest,
        progress: &dyn Fn(u64, u64),
        fallback: &RestoreFallback<'_>,
    ) -> RestoreRun {
        let _serialised = self.restore_lock.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        let backend = self.backends.iter().find(|b| b.covers(device));
        let result = match backend {
            Some(b) => {
                info!("restore of {device}: backend {}", b.name());
                b.restore(device, request, progress)
            }
            None => fallback(device, request, progress),
        };
        RestoreRun {
            backend: backend.map(|b| b.name().to_string()),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            result,
        }
    }

    /// Record a restore the daemon ran (one transaction).
    pub fn record_restore(&self, device: &str, record: RestoreRecord) -> Result<(), PolicyError> {
        let mut event = HistoryEvent::new(HistoryKind::Restore);
        event.device = Some(device.to_string());
        event.outcome = Some(record.outcome.as_str().to_string());
        let by = record.backend.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
        event.message = Some(match &record.outcome {
            RestoreOutcome::Restored { entries } | RestoreOutcome::Interrupted { entries } => {
                format!("{entries} entries in {} ms{by}", record.duration_ms)
            }
            RestoreOutcome::Failed { errno, message } => {
                format!("errno {errno}: {message} ({} ms{by})", record.duration_ms)
            }
            _ => format!("{} ms{by}", record.duration_ms),
        });
        let mut inner = self.lock();
        inner.store.apply(RowChange::Keep, &[event])?;
        self.emit(
            &mut inner,
            PolicyEvent::RestoreRecorded { device: device.to_string(), outcome: record.outcome },
        );
        Ok(())
    }

    /// Every backend's backup space, by name, asked without any lock (the health monitor's
    /// poll).
    pub fn backend_space(&self) -> Vec<(String, Result<BackupSpace, BackendError>)> {
        self.backends.iter().map(|b| (b.name().to_string(), b.space())).collect()
    }

    /// Asks backend `name` to make more backup space ([`Backend::grow`]), under the operation
    /// lock (never during a commit) and only while checkpointing (else `Identity`).
    pub fn grow_backend(&self, name: &str) -> Result<Action, PolicyError> {
        let _op = self.op();
        let backend = self
            .backends
            .iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| PolicyError::UnknownBackend(name.to_string()))?;
        if !self.is_checkpointing() {
            return Ok(Action::Identity);
        }
        backend.grow().map_err(|source| PolicyError::BackendStep {
            backend: name.to_string(),
            operation: "grow",
            source,
        })
    }

    /// Records a health-monitor event (history `low_space`, one transaction) and sends it to
    /// the listeners ([`PolicyEvent::LowSpace`]). `outcome` is a short word (`warning`,
    /// `grown`, `commit`, ...), `message` the detail.
    pub fn record_low_space(
        &self,
        low: &LowSpace,
        outcome: &str,
        message: &str,
    ) -> Result<(), PolicyError> {
        let mut event = HistoryEvent::new(HistoryKind::LowSpace);
        event.device = Some(low.backend.clone());
        event.outcome = Some(outcome.to_string());
        event.message = Some(format!(
            "{message} ({} bytes free, threshold {})",
            low.free_bytes, low.min_free_bytes
        ));
        let mut inner = self.lock();
        event.requested_retry = inner.store.current().map(|r| r.requested_retry);
        let result = inner.store.apply(RowChange::Keep, &[event]);
        self.emit(&mut inner, PolicyEvent::LowSpace(low.clone()));
        Ok(result?)
    }

    /// Everything `getStatus` reports. Never writes.
    pub fn status(&self) -> Result<Status, PolicyError> {
        let inner = self.lock();
        let row = inner.store.current().cloned();
        let needs_rollback = self.needs_rollback_locked(&inner);
        let last_restore = inner.store.last_event(HistoryKind::Restore)?;
        let state = self.state_locked(&inner);
        let needs_checkpoint = inner.latch_called.then(|| self.is_checkpointing());
        let prepared = inner.prepared.clone();
        drop(inner);
        let backends: Vec<BackendInfo> = self
            .backends
            .iter()
            .zip(prepared)
            .map(|(b, prepared)| BackendInfo {
                name: b.name().to_string(),
                kind: b.kind(),
                prepared,
                selection_reason: b.selection_reason().to_string(),
                status: b.status().map_err(|e| warn!("backend {}: {e}", b.name())).ok(),
            })
            .collect();
        let sum = |f: fn(&BackendStatus) -> Option<u64>| {
            backends
                .iter()
                .filter_map(|b| b.status.as_ref().and_then(f))
                .reduce(u64::saturating_add)
        };
        let current_slot = self.current_slot();
        Ok(Status {
            state,
            is_checkpointing: self.is_checkpointing(),
            needs_checkpoint,
            needs_rollback,
            budget: row.as_ref().map(Budget::of),
            requested_retry: row.as_ref().map(|r| r.requested_retry),
            attempts_used: row.as_ref().map_or(0, |r| r.attempts_used),
            attempts_left: row.as_ref().and_then(|r| r.budget_left),
            requesting_slot: row.as_ref().and_then(|r| r.requesting_slot),
            requesting_suffix: row.as_ref().and_then(|r| r.requesting_suffix.clone()),
            current_slot,
            current_suffix: current_slot.and_then(|s| self.suffix_of(s)),
            backup_used_bytes: sum(|s| s.backup_used_bytes),
            backup_free_bytes: sum(|s| s.free_bytes),
            backends,
            last_restore,
            started_at_ms: row.as_ref().map(|r| r.started_at_ms),
        })
    }

    /// Runs `f` on the state store under the policy's lock: the daemon's learning records
    /// (estimates, what each checkpoint consumed) live in the same store, one owner.
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.lock().store)
    }

    /// Up to `limit` history events, newest first.
    pub fn history(&self, limit: usize) -> Result<Vec<HistoryEvent>, PolicyError> {
        Ok(self.lock().store.history(limit)?)
    }

    /// A receiver of [`PolicyEvent`]s; dropped receivers are forgotten.
    pub fn subscribe(&self) -> Receiver<PolicyEvent> {
        let (tx, rx) = channel();
        self.lock().subscribers.push(tx);
        rx
    }

    /// Write transactions committed to the store by this process (see
    /// [`Store::write_transactions`]).
    pub fn write_transactions(&self) -> u64 {
        self.lock().store.write_transactions()
    }

    fn state_locked(&self, inner: &Inner) -> State {
        if self.is_checkpointing() {
            State::Checkpointing
        } else if self.needs_rollback_locked(inner) {
            State::RollbackPending
        } else if inner.store.current().is_some() {
            State::Pending
        } else {
            State::Idle
        }
    }

    fn emit_state(&self, inner: &mut Inner) {
        let state = self.state_locked(inner);
        self.emit(inner, PolicyEvent::StateChanged { state });
    }

    fn emit(&self, inner: &mut Inner, event: PolicyEvent) {
        inner.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    fn current_slot(&self) -> Option<u32> {
        if !self.boot.is_present() {
            return None;
        }
        self.boot.current_slot().map_err(|e| warn!("boot control: current slot: {e}")).ok()
    }

    fn suffix_of(&self, slot: u32) -> Option<String> {
        self.boot
            .slot_suffix(slot)
            .map_err(|e: BootControlError| warn!("boot control: suffix of slot {slot}: {e}"))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootctl::NoBootControl;

    /// The smallest block backend: every step succeeds.
    #[derive(Debug)]
    struct Null;

    impl Backend for Null {
        fn kind(&self) -> BackendKind {
            BackendKind::Block
        }
        fn name(&self) -> &str {
            "null"
        }
        fn prepare(&self) -> Result<crate::backend::Action, BackendError> {
            Ok(crate::backend::Action::Changed)
        }
        fn commit(&self) -> Result<crate::backend::Action, BackendError> {
            Ok(crate::backend::Action::Changed)
        }
        fn space(&self) -> Result<BackupSpace, BackendError> {
            Ok(BackupSpace::default())
        }
        fn status(&self) -> Result<BackendStatus, BackendError> {
            Err(BackendError::NotSetUp { backend: "null".into() })
        }
    }

    #[test]
    fn a_budget_of_2_pow_31_is_capped_so_each_attempt_shows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let policy = Checkpointer::new(
            store,
            Box::new(NoBootControl),
            vec![Box::new(Null)],
            PolicyOptions::default(),
        )
        .expect("policy");
        policy.start_checkpoint(i32::MAX).expect("start");
        let first = policy.status().expect("status").attempts_left.expect("limited");
        assert_eq!(first, MAX_BUDGET);
        assert!(i32::try_from(first).is_ok(), "must fit the AIDL's int");
        assert_eq!(
            policy.mark_boot_attempt().expect("mark"),
            MarkOutcome::Decremented { left: MAX_BUDGET - 1 }
        );
        let second = policy.status().expect("status").attempts_left.expect("limited");
        assert_eq!(second, first - 1, "the attempt must show in the status");
        // Smaller budgets are exact.
        policy.start_checkpoint(5).expect("start");
        assert_eq!(policy.status().expect("status").attempts_left, Some(6));
    }
}
