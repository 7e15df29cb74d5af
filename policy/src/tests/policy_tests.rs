//! Checkpointer unit tests: errors and their codes, commit order, the vold bugs we fix, the
//! rollback action, events, status and history.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::fakes::{temp_dir, FakeBackend, FakeControl};
use crate::{
    errno, AbortOutcome, Action, Backend, BackendError, BackendKind, BackendState, BackendStatus,
    BackupSpace, BootControl, BootControlError, Budget, Checkpointer, CommitOutcome, ErrorKind,
    FileBootControl, HistoryKind, LowSpace, MarkOutcome, NoBootControl, PolicyError, PolicyEvent,
    PolicyOptions, RestoreOutcome, RestoreRecord, RollbackAction, StartOutcome, State, Store,
    StoreError, MAX_PRIORITY,
};

/// A device: state dir, a two-slot boot record, one fake backend.
struct Rig {
    dir: tempfile::TempDir,
    control: Arc<FakeControl>,
    kind: BackendKind,
    options: PolicyOptions,
}

impl Rig {
    fn new(kind: BackendKind) -> Rig {
        let dir = temp_dir();
        FileBootControl::create(&dir.path().join("bootctl"), 2).unwrap();
        Rig { dir, control: FakeControl::new(), kind, options: PolicyOptions::default() }
    }

    fn bootctl(&self) -> FileBootControl {
        FileBootControl::open(&self.dir.path().join("bootctl")).unwrap()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A new daemon process in the current boot.
    fn open(&self) -> Checkpointer {
        let backends = vec![FakeBackend::boxed("fake", self.kind, &self.control)];
        Checkpointer::new(
            Store::open(&self.state_dir()).unwrap(),
            Box::new(self.bootctl()),
            backends,
            self.options.clone(),
        )
        .unwrap()
    }

    /// Power on: the bootloader picks a slot, the backend starts idle, the daemon starts.
    fn boot(&self) -> Checkpointer {
        self.bootctl().bootloader_select().unwrap();
        *self.control.state.lock().unwrap() = BackendState::Idle;
        self.open()
    }
}

#[test]
fn every_error_kind_maps_to_its_documented_errno() {
    let table = [
        (ErrorKind::NotSupported, 95),
        (ErrorKind::InvalidArgument, 22),
        (ErrorKind::Io, 5),
        (ErrorKind::Corrupt, 117),
        (ErrorKind::Incompatible, 71),
        (ErrorKind::BootControl, 22),
        (ErrorKind::Backend, 22),
        (ErrorKind::Busy, 11),
        (ErrorKind::NoSpace, 28),
    ];
    for (kind, code) in table {
        assert_eq!(kind.errno(), code, "{kind:?}");
    }
    let p = PathBuf::from("/metadata/checkpointd/checkpointd.db");
    let errors: Vec<(PolicyError, ErrorKind, i32)> = vec![
        (PolicyError::NotSupported, ErrorKind::NotSupported, errno::ENOTSUP),
        (PolicyError::InvalidRetry { retry: -2 }, ErrorKind::InvalidArgument, errno::EINVAL),
        (
            PolicyError::MarkBootSuccessful(BootControlError::NotPresent),
            ErrorKind::BootControl,
            errno::EINVAL,
        ),
        (
            PolicyError::BootControl(BootControlError::NotPresent),
            ErrorKind::BootControl,
            errno::EINVAL,
        ),
        (
            PolicyError::BackendCommit {
                backend: "bow".into(),
                source: BackendError::NotSetUp { backend: "bow".into() },
            },
            ErrorKind::Backend,
            errno::EINVAL,
        ),
        (
            StoreError::Corrupt { path: p.clone(), detail: "x".into() }.into(),
            ErrorKind::Corrupt,
            errno::EUCLEAN,
        ),
        (
            StoreError::FutureVersion { path: p.clone(), found: 9, supported: 2 }.into(),
            ErrorKind::Incompatible,
            errno::EPROTO,
        ),
        (StoreError::Locked { path: p.clone() }.into(), ErrorKind::Busy, errno::EAGAIN),
        (
            StoreError::CreateDir {
                path: p.clone(),
                source: std::io::Error::from_raw_os_error(13),
            }
            .into(),
            ErrorKind::Io,
            13,
        ),
        (
            StoreError::Sqlite {
                path: p.clone(),
                operation: "write",
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    None,
                ),
            }
            .into(),
            ErrorKind::NoSpace,
            28,
        ),
        (
            StoreError::Sqlite {
                path: p.clone(),
                operation: "write",
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                    None,
                ),
            }
            .into(),
            ErrorKind::Io,
            errno::EIO,
        ),
        (
            StoreError::Sqlite {
                path: p,
                operation: "read",
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    None,
                ),
            }
            .into(),
            ErrorKind::Corrupt,
            errno::EUCLEAN,
        ),
    ];
    for (err, kind, code) in errors {
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(err.errno(), code, "{err}");
    }
    let io = BackendError::Io { operation: "x".into(), source: std::io::Error::other("y") };
    assert_eq!(io.kind(), ErrorKind::Io);
}

#[test]
fn start_without_backends_is_not_supported() {
    let dir = temp_dir();
    let cp = Checkpointer::new(
        Store::open(dir.path()).unwrap(),
        Box::new(NoBootControl),
        Vec::new(),
        PolicyOptions::default(),
    )
    .unwrap();
    let writes = cp.write_transactions(); // the store's creation
    assert!(!cp.supports_checkpoint());
    assert!(!cp.supports_block_checkpoint() && !cp.supports_file_checkpoint());
    let err = cp.start_checkpoint(1).unwrap_err();
    assert_eq!(err.to_string(), "Checkpoints not supported");
    assert_eq!(err.errno(), errno::ENOTSUP);
    // Without backends and boot control nothing is ever checkpointed.
    assert!(!cp.needs_checkpoint().unwrap());
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::NotCheckpointing);
    assert_eq!(cp.write_transactions(), writes);
}

#[test]
fn retry_below_minus_one_is_invalid_and_changes_nothing() {
    let rig = Rig::new(BackendKind::Block);
    let cp = rig.boot();
    assert!(cp.supports_checkpoint() && cp.supports_block_checkpoint());
    assert!(!cp.supports_file_checkpoint());
    let writes = cp.write_transactions();
    let err = cp.start_checkpoint(-2).unwrap_err();
    assert!(err.to_string().starts_with("Retry count must be more than -1"), "{err}");
    assert_eq!(err.errno(), errno::EINVAL);
    assert_eq!(cp.write_transactions(), writes);
    assert_eq!(cp.status().unwrap().state, State::Idle);
}

#[test]
fn default_retry_gives_three_checkpointed_boots() {
    let rig = Rig::new(BackendKind::File);
    let cp = rig.boot();
    let StartOutcome::Started { budget } = cp.start_default_checkpoint().unwrap();
    assert_eq!(budget, Budget::Attempts(3));
    drop(cp);
    let mut checkpointed = 0;
    for _ in 0..5 {
        let cp = rig.boot();
        if cp.needs_checkpoint().unwrap() {
            checkpointed += 1;
        }
        cp.mark_boot_attempt().unwrap();
    }
    assert_eq!(checkpointed, 3);
}

#[test]
fn latemount_order_gives_retry_attempts() {
    // /data mounted after post-fs: markBootAttempt runs before the first needsCheckpoint.
    let rig = Rig::new(BackendKind::File);
    rig.boot().start_checkpoint(1).unwrap();
    let cp = rig.boot();
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::Decremented { left: 1 });
    assert!(cp.needs_checkpoint().unwrap());
    drop(cp);
    let cp = rig.boot();
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::BudgetSpent);
    assert!(!cp.needs_checkpoint().unwrap());
    assert!(cp.needs_rollback().unwrap());
}

#[test]
fn needs_checkpoint_is_latched_against_a_later_start() {
    // b/138952436: a checkpoint requested during a normal boot must not flip this boot.
    let rig = Rig::new(BackendKind::Block);
    let cp = rig.boot();
    assert!(!cp.needs_checkpoint().unwrap());
    assert!(cp.checkpointing_complete());
    cp.start_checkpoint(1).unwrap();
    assert!(!cp.needs_checkpoint().unwrap());
    assert_eq!(cp.status().unwrap().state, State::Pending);
    assert_eq!(cp.abort_changes("x", false).unwrap(), AbortOutcome::NotCheckpointing);
    cp.reset_checkpoint();
    assert!(cp.needs_checkpoint().unwrap());
    assert!(cp.is_checkpointing());
}

#[test]
fn commit_marks_the_slot_successful_before_committing_backends() {
    #[derive(Debug)]
    struct Probe {
        record: PathBuf,
        saw_successful: Arc<AtomicBool>,
    }
    impl Backend for Probe {
        fn kind(&self) -> BackendKind {
            BackendKind::File
        }
        fn name(&self) -> &str {
            "probe"
        }
        fn prepare(&self) -> Result<Action, BackendError> {
            Ok(Action::Changed)
        }
        fn commit(&self) -> Result<Action, BackendError> {
            let bc = FileBootControl::open(&self.record).unwrap();
            let ok = bc.is_slot_marked_successful(bc.current_slot().unwrap()).unwrap();
            self.saw_successful.store(ok, Ordering::SeqCst);
            Ok(Action::Changed)
        }
        fn space(&self) -> Result<BackupSpace, BackendError> {
            Ok(BackupSpace { free_bytes: None, ..BackupSpace::default() })
        }
        fn status(&self) -> Result<BackendStatus, BackendError> {
            Ok(BackendStatus {
                state: BackendState::Armed,
                backup_used_bytes: Some(4096),
                free_bytes: None,
                devices: vec![],
            })
        }
    }
    let rig = Rig::new(BackendKind::File);
    let bc = rig.bootctl();
    bc.set_active_boot_slot(1).unwrap();
    bc.bootloader_select().unwrap();
    let saw = Arc::new(AtomicBool::new(false));
    let probe = Probe { record: bc.path().to_path_buf(), saw_successful: Arc::clone(&saw) };
    let cp = Checkpointer::new(
        Store::open(&rig.state_dir()).unwrap(),
        Box::new(rig.bootctl()),
        vec![Box::new(probe)],
        PolicyOptions::default(),
    )
    .unwrap();
    assert!(cp.needs_checkpoint().unwrap(), "unsuccessful slot: implicit A/B checkpoint");
    let out = cp.commit_changes().unwrap();
    assert_eq!(out, CommitOutcome::Committed { committed: vec!["probe".into()], skipped: vec![] });
    assert!(saw.load(Ordering::SeqCst));
    assert!(!cp.is_checkpointing());
    let h = cp.history(1).unwrap().remove(0);
    assert_eq!((h.kind, h.backup_used_bytes), (HistoryKind::Commit, Some(4096)));
}

#[derive(Debug)]
struct FailingMark(FileBootControl);

impl BootControl for FailingMark {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        self.0.slot_count()
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        self.0.current_slot()
    }
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        self.0.slot_suffix(slot)
    }
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        self.0.is_slot_marked_successful(slot)
    }
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        Err(BootControlError::Io {
            operation: "write",
            path: "/dev/block/by-name/misc".into(),
            source: std::io::Error::from_raw_os_error(5),
        })
    }
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        self.0.set_active_boot_slot(slot)
    }
}

#[test]
fn failed_mark_successful_aborts_the_commit_and_keeps_the_checkpoint() {
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(1).unwrap();
    rig.bootctl().bootloader_select().unwrap();
    let cp = Checkpointer::new(
        Store::open(&rig.state_dir()).unwrap(),
        Box::new(FailingMark(rig.bootctl())),
        vec![FakeBackend::boxed("fake", BackendKind::Block, &rig.control)],
        PolicyOptions::default(),
    )
    .unwrap();
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    let err = cp.commit_changes().unwrap_err();
    assert!(err.to_string().starts_with("Error marking booted successfully"), "{err}");
    assert_eq!((err.kind(), err.errno()), (ErrorKind::BootControl, errno::EINVAL));
    assert_eq!(rig.control.commits(), 0, "no backend committed");
    assert!(cp.is_checkpointing());
    assert_eq!(cp.status().unwrap().budget, Some(Budget::Attempts(2)));
    assert_eq!(cp.history(1).unwrap()[0].kind, HistoryKind::CommitFailed);
    drop(cp);
    // The store is consistent (no transient phase left behind).
    assert_eq!(rig.open().history(1).unwrap()[0].kind, HistoryKind::CommitFailed);
}

#[test]
fn failed_backend_commit_keeps_the_checkpoint_and_a_retry_succeeds() {
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(0).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    rig.control.fail_commit.store(true, Ordering::SeqCst);
    let err = cp.commit_changes().unwrap_err();
    assert_eq!((err.kind(), err.errno()), (ErrorKind::Backend, errno::EINVAL));
    assert!(err.to_string().contains("fake"), "{err}");
    assert!(cp.is_checkpointing());
    rig.control.fail_commit.store(false, Ordering::SeqCst);
    assert!(matches!(cp.commit_changes().unwrap(), CommitOutcome::Committed { .. }));
    assert_eq!(cp.status().unwrap().state, State::Idle);
}

#[test]
fn failed_prepare_does_not_make_every_commit_fail() {
    // vold: a failed FITRIM leaves isBow true and every commit writes "2" to a state-0 bow.
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(2).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    rig.control.fail_prepare.store(true, Ordering::SeqCst);
    cp.prepare_checkpoint().unwrap();
    assert!(!cp.status().unwrap().backends[0].prepared);
    let out = cp.commit_changes().unwrap();
    assert_eq!(out, CommitOutcome::Committed { committed: vec![], skipped: vec!["fake".into()] });
    assert_eq!(rig.control.commits(), 0);
    assert_eq!(cp.status().unwrap().state, State::Idle);
}

#[test]
fn block_backend_armed_before_a_daemon_restart_is_still_committed() {
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(2).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    drop(cp); // the daemon restarts within the same boot; the backend stays armed
    let cp = rig.open();
    assert!(cp.needs_checkpoint().unwrap());
    let out = cp.commit_changes().unwrap();
    assert_eq!(out, CommitOutcome::Committed { committed: vec!["fake".into()], skipped: vec![] });
}

#[test]
fn dont_commit_is_a_logged_no_op() {
    let mut rig = Rig::new(BackendKind::File);
    rig.options.dont_commit = true;
    rig.boot().start_checkpoint(1).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    let writes = cp.write_transactions();
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::DontCommit);
    assert!(cp.is_checkpointing());
    assert_eq!(cp.write_transactions(), writes);
    assert_eq!(rig.control.commits(), 0);
}

#[test]
fn unlimited_checkpoint_rolls_back_when_the_bootloader_falls_back() {
    // vold wrote "0 <suffix>" for -1 from 2018 to 2025, so this never reported rollback.
    let rig = Rig::new(BackendKind::Block);
    let cp = rig.boot(); // slot 0 (_a)
    let StartOutcome::Started { budget } = cp.start_checkpoint(-1).unwrap();
    assert_eq!(budget, Budget::Unlimited { slot_suffix: Some("_a".into()) });
    assert!(cp.needs_rollback().unwrap(), "still on the requesting slot");
    drop(cp);
    rig.bootctl().set_active_boot_slot(1).unwrap(); // the update
    for _ in 0..crate::MAX_TRIES {
        let cp = rig.boot();
        assert_eq!(rig.bootctl().current_slot().unwrap(), 1);
        assert!(cp.needs_checkpoint().unwrap());
        assert!(!cp.needs_rollback().unwrap());
        assert_eq!(
            cp.mark_boot_attempt().unwrap(),
            MarkOutcome::Unchanged { budget: Budget::Unlimited { slot_suffix: Some("_a".into()) } }
        );
    }
    // Tries exhausted: back on slot 0, the rollback boot.
    let cp = rig.boot();
    assert_eq!(rig.bootctl().current_slot().unwrap(), 0);
    assert!(cp.needs_rollback().unwrap());
    assert!(cp.needs_checkpoint().unwrap());
    assert!(matches!(cp.commit_changes().unwrap(), CommitOutcome::Committed { .. }));
    assert!(cp.needs_rollback().unwrap(), "true for the whole rollback boot");
    drop(cp);
    assert!(!rig.boot().needs_rollback().unwrap());
}

#[test]
fn rollback_state_is_cleared_after_the_rollback_boot_completes() {
    // vold keeps "0" forever: needsRollback stays true on every later boot.
    let rig = Rig::new(BackendKind::File);
    rig.boot().start_checkpoint(0).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::BudgetSpent);
    drop(cp); // crash before commit
              // The rollback boot crashes before completing: still pending on the next one.
    let cp = rig.boot();
    assert!(!cp.needs_checkpoint().unwrap());
    assert!(cp.needs_rollback().unwrap());
    drop(cp);
    let cp = rig.boot();
    assert_eq!(cp.status().unwrap().state, State::RollbackPending);
    assert!(cp.needs_rollback().unwrap());
    assert!(!cp.needs_checkpoint().unwrap());
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::RollbackAcknowledged);
    assert!(cp.needs_rollback().unwrap());
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::NotCheckpointing);
    assert_eq!(cp.history(1).unwrap()[0].kind, HistoryKind::RollbackAcknowledged);
    drop(cp);
    let cp = rig.boot();
    assert!(!cp.needs_rollback().unwrap());
    assert_eq!(cp.status().unwrap().state, State::Idle);
}

#[test]
fn rollback_action_makes_the_requesting_slot_active_again() {
    let mut rig = Rig::new(BackendKind::Block);
    rig.options.rollback_action = RollbackAction::SwitchToPreviousSlot;
    let cp = rig.boot(); // on slot 0: update_engine installs slot 1
    cp.start_checkpoint(0).unwrap();
    drop(cp);
    rig.bootctl().set_active_boot_slot(1).unwrap();
    let cp = rig.boot();
    assert_eq!(rig.bootctl().current_slot().unwrap(), 1);
    assert!(cp.needs_checkpoint().unwrap());
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::BudgetSpent);
    assert_eq!(rig.bootctl().record().unwrap().slots[1].priority, MAX_PRIORITY);
    drop(cp);
    let cp = rig.boot(); // slot 1 still has tries: the rollback boot runs on it
    assert!(cp.needs_rollback().unwrap());
    assert_eq!(
        cp.mark_boot_attempt().unwrap(),
        MarkOutcome::RollbackSlotSwitched { from: 1, to: 0 }
    );
    assert_eq!(rig.bootctl().record().unwrap().slots[0].priority, MAX_PRIORITY);
    // Only once.
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::Unchanged { budget: Budget::Spent });
    let kinds: Vec<_> = cp.history(3).unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [HistoryKind::BootAttempt, HistoryKind::RollbackSlotSwitch, HistoryKind::BootAttempt]
    );
    drop(cp);
    let cp = rig.boot();
    assert_eq!(rig.bootctl().current_slot().unwrap(), 0);
    assert!(cp.needs_rollback().unwrap());
}

#[test]
fn abort_without_retry_spends_the_budget_and_asks_for_a_reboot() {
    let rig = Rig::new(BackendKind::File);
    rig.boot().start_checkpoint(3).unwrap();
    let cp = rig.boot();
    let events = cp.subscribe();
    assert!(cp.needs_checkpoint().unwrap());
    let out = cp.abort_changes("abort-staged-install", true).unwrap();
    assert_eq!(out, AbortOutcome::Reboot { reason: "abort-staged-install".into() });
    assert_eq!(cp.status().unwrap().attempts_left, Some(4));
    let out = cp.abort_changes("apexd_initiated", false).unwrap();
    assert_eq!(out, AbortOutcome::Reboot { reason: "apexd_initiated".into() });
    assert!(cp.needs_rollback().unwrap());
    let got: Vec<PolicyEvent> = events.try_iter().collect();
    assert!(got.contains(&PolicyEvent::RebootRequested { reason: "apexd_initiated".into() }));
    let last = cp.history(1).unwrap().remove(0);
    assert_eq!(last.kind, HistoryKind::Abort);
    assert_eq!(last.message.as_deref(), Some("apexd_initiated"));
    assert_eq!(last.budget_left, Some(0));
}

#[test]
fn abort_cannot_cancel_an_unlimited_checkpoint() {
    let rig = Rig::new(BackendKind::File);
    rig.boot().start_checkpoint(-1).unwrap();
    let cp = rig.boot();
    assert!(matches!(cp.abort_changes("", false).unwrap(), AbortOutcome::Reboot { .. }));
    assert!(matches!(cp.status().unwrap().budget, Some(Budget::Unlimited { .. })));
}

#[test]
fn state_changes_are_one_transaction_and_reads_write_nothing() {
    let rig = Rig::new(BackendKind::Block);
    let cp = rig.boot();
    let w = || cp.write_transactions();
    let base = w();
    cp.needs_checkpoint().unwrap();
    cp.needs_rollback().unwrap();
    cp.is_checkpointing();
    cp.status().unwrap();
    cp.history(10).unwrap();
    cp.reset_checkpoint();
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::NoCheckpoint);
    cp.prepare_checkpoint().unwrap();
    cp.commit_changes().unwrap();
    assert_eq!(w(), base, "nothing requested: nothing written");
    cp.start_checkpoint(2).unwrap();
    assert_eq!(w(), base + 1);
    cp.mark_boot_attempt().unwrap();
    assert_eq!(w(), base + 2);
    cp.record_restore(
        "/dev/block/vdb",
        RestoreRecord { outcome: RestoreOutcome::NothingToRestore, duration_ms: 1, backend: None },
    )
    .unwrap();
    assert_eq!(w(), base + 3);
    cp.reset_checkpoint();
    assert!(cp.needs_checkpoint().unwrap());
    assert_eq!(w(), base + 3, "needsCheckpoint's latch lives in memory");
    cp.prepare_checkpoint().unwrap();
    cp.commit_changes().unwrap();
    assert_eq!(w(), base + 5, "commit: the transient 'committing' mark, then the clear");
}

#[test]
fn power_cut_during_a_commit_leaves_the_checkpoint_requested() {
    /// Snapshots the state directory from inside `commit`: the files a power cut would leave.
    #[derive(Debug)]
    struct CutDuringCommit {
        from: PathBuf,
        to: PathBuf,
    }
    impl Backend for CutDuringCommit {
        fn kind(&self) -> BackendKind {
            BackendKind::File
        }
        fn name(&self) -> &str {
            "cut"
        }
        fn prepare(&self) -> Result<Action, BackendError> {
            Ok(Action::Changed)
        }
        fn commit(&self) -> Result<Action, BackendError> {
            fs::create_dir_all(&self.to).unwrap();
            for e in fs::read_dir(&self.from).unwrap() {
                let e = e.unwrap();
                fs::copy(e.path(), self.to.join(e.file_name())).unwrap();
            }
            Ok(Action::Changed)
        }
        fn space(&self) -> Result<BackupSpace, BackendError> {
            Ok(BackupSpace { free_bytes: None, ..BackupSpace::default() })
        }
        fn status(&self) -> Result<BackendStatus, BackendError> {
            Err(BackendError::NotSetUp { backend: "cut".into() })
        }
    }
    let rig = Rig::new(BackendKind::File);
    rig.boot().start_checkpoint(1).unwrap();
    let snapshot = rig.dir.path().join("after-cut");
    rig.bootctl().bootloader_select().unwrap();
    let cp = Checkpointer::new(
        Store::open(&rig.state_dir()).unwrap(),
        Box::new(rig.bootctl()),
        vec![Box::new(CutDuringCommit { from: rig.state_dir(), to: snapshot.clone() })],
        PolicyOptions::default(),
    )
    .unwrap();
    assert!(cp.needs_checkpoint().unwrap());
    cp.mark_boot_attempt().unwrap();
    assert!(matches!(cp.commit_changes().unwrap(), CommitOutcome::Committed { .. }));
    // Boot from the files as they were during the commit.
    let after = Checkpointer::new(
        Store::open(&snapshot).unwrap(),
        Box::new(NoBootControl),
        vec![FakeBackend::boxed("fake", BackendKind::File, &rig.control)],
        PolicyOptions::default(),
    )
    .unwrap();
    assert_eq!(after.status().unwrap().budget, Some(Budget::Attempts(1)));
    assert!(after.needs_checkpoint().unwrap());
    let h = after.history(1).unwrap().remove(0);
    assert_eq!((h.kind, h.outcome.as_deref()), (HistoryKind::Recovery, Some("commit_interrupted")));
}

#[test]
fn status_reports_slots_backends_space_and_the_last_restore() {
    let rig = Rig::new(BackendKind::Block);
    *rig.control.free_bytes.lock().unwrap() = Some(50 << 20);
    *rig.control.backup_used_bytes.lock().unwrap() = Some(8192);
    let cp = rig.boot();
    cp.start_checkpoint(2).unwrap();
    cp.record_restore(
        "/dev/block/vdb",
        RestoreRecord {
            outcome: RestoreOutcome::Restored { entries: 12 },
            duration_ms: 40,
            backend: None,
        },
    )
    .unwrap();
    let s = cp.status().unwrap();
    assert_eq!(s.state, State::Pending);
    assert_eq!((s.requested_retry, s.attempts_left, s.attempts_used), (Some(2), Some(3), 0));
    assert_eq!((s.current_slot, s.current_suffix.as_deref()), (Some(0), Some("_a")));
    assert_eq!((s.requesting_slot, s.requesting_suffix.as_deref()), (Some(0), Some("_a")));
    assert_eq!((s.backup_used_bytes, s.backup_free_bytes), (Some(8192), Some(50 << 20)));
    assert_eq!(s.backends[0].name, "fake");
    assert_eq!(s.needs_checkpoint, None);
    let r = s.last_restore.unwrap();
    assert_eq!(
        (r.device.as_deref(), r.outcome.as_deref()),
        (Some("/dev/block/vdb"), Some("restored"))
    );
    assert!(r.message.unwrap().contains("12 entries"));
    assert!(s.started_at_ms.unwrap() > 0);
}

#[test]
fn low_space_is_recorded_and_emitted() {
    let rig = Rig::new(BackendKind::Block);
    let cp = rig.boot();
    *rig.control.free_bytes.lock().unwrap() = Some(10 << 20);
    let space = cp.backend_space();
    assert_eq!(space.len(), 1);
    assert_eq!(space[0].0, "fake");
    assert_eq!(space[0].1.as_ref().unwrap().free_bytes, Some(10 << 20));
    let events = cp.subscribe();
    let low = LowSpace { backend: "fake".into(), free_bytes: 10 << 20, min_free_bytes: 100 << 20 };
    cp.record_low_space(&low, "warning", "backup space low").unwrap();
    assert_eq!(events.try_iter().collect::<Vec<_>>(), [PolicyEvent::LowSpace(low)]);
    let h = cp.history(1).unwrap();
    assert_eq!(h[0].kind, HistoryKind::LowSpace);
    assert_eq!(h[0].outcome.as_deref(), Some("warning"));
    assert_eq!(h[0].device.as_deref(), Some("fake"));
    assert!(h[0].message.as_deref().unwrap().contains("10485760 bytes free"), "{h:?}");
}

#[test]
fn subscribers_see_state_changes_and_dropped_ones_are_forgotten() {
    let rig = Rig::new(BackendKind::File);
    let cp = rig.boot();
    let dropped = cp.subscribe();
    drop(dropped);
    let events = cp.subscribe();
    cp.start_checkpoint(1).unwrap();
    assert_eq!(events.try_recv().unwrap(), PolicyEvent::StateChanged { state: State::Pending });
    drop(cp);
    let cp = rig.boot();
    let events = cp.subscribe();
    assert!(cp.needs_checkpoint().unwrap());
    cp.commit_changes().unwrap();
    let got: Vec<_> = events.try_iter().collect();
    assert_eq!(
        got,
        [
            PolicyEvent::StateChanged { state: State::Checkpointing },
            PolicyEvent::Committed,
            PolicyEvent::CheckpointingComplete,
            PolicyEvent::StateChanged { state: State::Idle },
        ]
    );
}

#[test]
fn a_store_that_cannot_be_created_is_an_io_error() {
    let dir = temp_dir();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let err = Store::open(&file.join("sub")).unwrap_err();
    let err = PolicyError::from(err);
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(err.errno(), 20, "ENOTDIR from the OS");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn rollback_is_not_acknowledged_before_the_checkpoint_decision() {
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(0).unwrap();
    let cp = rig.boot();
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    assert_eq!(cp.mark_boot_attempt().unwrap(), MarkOutcome::BudgetSpent);
    drop(cp);
    // The daemon restarts within this checkpointed boot: its backend is still armed.
    let cp = rig.open();
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::NotCheckpointing, "latch unset");
    assert!(!cp.needs_checkpoint().unwrap());
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::NotCheckpointing, "bow armed");
    assert!(cp.needs_rollback().unwrap());
    drop(cp);
    // The real rollback boot acknowledges it.
    let cp = rig.boot();
    assert!(!cp.needs_checkpoint().unwrap());
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::RollbackAcknowledged);
}

#[test]
fn checkpointer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<Checkpointer>();
    assert_send::<Store>(); // moved into the Checkpointer, which owns it behind its mutex
}

#[test]
fn concurrent_commits_commit_once() {
    // b/138952436: two concurrent commits made the second bow-state write fail.
    let rig = Rig::new(BackendKind::Block);
    rig.boot().start_checkpoint(1).unwrap();
    let cp = Arc::new(rig.boot());
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    let outcomes: Vec<CommitOutcome> = (0..8)
        .map(|_| {
            let cp = Arc::clone(&cp);
            std::thread::spawn(move || cp.commit_changes().unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let committed = outcomes.iter().filter(|o| matches!(o, CommitOutcome::Committed { .. }));
    assert_eq!(committed.count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == CommitOutcome::NotCheckpointing).count(), 7);
    assert_eq!(rig.control.commits(), 1);
}
