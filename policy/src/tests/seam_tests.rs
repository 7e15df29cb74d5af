//! The backend seam: no backend I/O under the state lock, commits retried after a partial
//! failure, teardown on a boot that is not checkpointing, restore routing, grow.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::fakes::temp_dir;
use crate::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    Checkpointer, CommitOutcome, FileBootControl, HistoryKind, PolicyError, PolicyOptions,
    RestoreOutcome, RestoreReport, RestoreRequest, Store,
};

/// A backend that calls back into the policy from inside every step (a regression that runs
/// a step under the state lock deadlocks here), and whose steps are idempotent.
#[derive(Debug)]
struct Probe {
    name: String,
    kind: BackendKind,
    device: String,
    policy: Arc<OnceLock<Weak<Checkpointer>>>,
    state: Mutex<BackendState>,
    fail_commits: AtomicU32,
    fail_teardown: AtomicBool,
    calls: Mutex<Vec<String>>,
    can_grow: bool,
}

impl Probe {
    fn new(name: &str, kind: BackendKind, policy: &Arc<OnceLock<Weak<Checkpointer>>>) -> Probe {
        Probe {
            name: name.into(),
            kind,
            device: format!("/dev/block/{name}"),
            policy: Arc::clone(policy),
            state: Mutex::new(BackendState::Idle),
            fail_commits: AtomicU32::new(0),
            fail_teardown: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
            can_grow: false,
        }
    }

    /// Queries the policy the way a backend (or another thread) may during a step.
    fn call_back(&self, step: &str) {
        self.calls.lock().unwrap().push(step.to_string());
        if let Some(cp) = self.policy.get().and_then(Weak::upgrade) {
            cp.status().expect("status from inside a backend step");
            cp.needs_rollback().expect("needsRollback from inside a backend step");
            cp.history(1).expect("history from inside a backend step");
            let _ = cp.restore_backend("/dev/none");
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn set(&self, s: BackendState) -> Action {
        let mut state = self.state.lock().unwrap();
        if *state == s {
            Action::Identity
        } else {
            *state = s;
            Action::Changed
        }
    }
}

impl Backend for Probe {
    fn kind(&self) -> BackendKind {
        self.kind
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn covers(&self, device: &str) -> bool {
        device == self.device
    }
    fn restore(
        &self,
        device: &str,
        _request: &RestoreRequest,
        progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        self.call_back(&format!("restore {device}"));
        progress(1, 1);
        Ok(RestoreReport { outcome: RestoreOutcome::Restored { entries: 7 }, result: Ok(()) })
    }
    fn prepare(&self) -> Result<Action, BackendError> {
        self.call_back("prepare");
        Ok(self.set(BackendState::Armed))
    }
    fn commit(&self) -> Result<Action, BackendError> {
        self.call_back("commit");
        if self.fail_commits.load(Ordering::SeqCst) > 0 {
            self.fail_commits.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::io("commit", std::io::Error::from_raw_os_error(5)));
        }
        Ok(self.set(BackendState::Committed))
    }
    fn abort(&self) -> Result<Action, BackendError> {
        self.call_back("abort");
        Ok(Action::Identity)
    }
    fn teardown(&self) -> Result<Action, BackendError> {
        self.call_back("teardown");
        if self.fail_teardown.load(Ordering::SeqCst) {
            return Err(BackendError::io("teardown", std::io::Error::from_raw_os_error(16)));
        }
        Ok(Action::Changed)
    }
    fn grow(&self) -> Result<Action, BackendError> {
        self.call_back("grow");
        Ok(if self.can_grow { Action::Changed } else { Action::Identity })
    }
    fn space(&self) -> Result<BackupSpace, BackendError> {
        self.call_back("space");
        Ok(BackupSpace { free_bytes: Some(1 << 20), used_bytes: Some(0), ..BackupSpace::default() })
    }
    fn status(&self) -> Result<BackendStatus, BackendError> {
        Ok(BackendStatus {
            state: *self.state.lock().unwrap(),
            backup_used_bytes: Some(4096),
            free_bytes: Some(1 << 20),
            devices: vec![self.device.clone()],
        })
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    cp: Arc<Checkpointer>,
    probes: Vec<Arc<Probe>>,
}

/// A booted device on an unsuccessful slot... or not: `checkpoint` requests a checkpoint
/// before the daemon of this boot starts.
fn rig(probes: Vec<(&str, BackendKind, bool)>, checkpoint: bool) -> Rig {
    let dir = temp_dir();
    FileBootControl::create(&dir.path().join("bootctl"), 2).unwrap();
    let cell = Arc::new(OnceLock::new());
    let probes: Vec<Arc<Probe>> = probes
        .into_iter()
        .map(|(name, kind, can_grow)| Arc::new(Probe { can_grow, ..Probe::new(name, kind, &cell) }))
        .collect();
    let open = |probes: &[Arc<Probe>]| {
        let backends: Vec<Box<dyn Backend>> =
            probes.iter().map(|p| Box::new(Arc::clone(p)) as Box<dyn Backend>).collect();
        Checkpointer::new(
            Store::open(&dir.path().join("state")).unwrap(),
            Box::new(FileBootControl::open(&dir.path().join("bootctl")).unwrap()),
            backends,
            PolicyOptions::default(),
        )
        .unwrap()
    };
    if checkpoint {
        open(&probes).start_checkpoint(2).unwrap();
    }
    let cp = Arc::new(open(&probes));
    cell.set(Arc::downgrade(&cp)).unwrap();
    Rig { _dir: dir, cp, probes }
}

/// Runs `f` on another thread; a deadlock fails the test after 20 s instead of hanging it.
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not return within 20 s: a backend step deadlocked"))
}

#[test]
fn backend_steps_run_without_the_state_lock() {
    let rig = rig(vec![("b", BackendKind::Block, true)], true);
    let cp = Arc::clone(&rig.cp);
    within_deadline("needsCheckpoint + prepareCheckpoint", move || {
        assert!(cp.needs_checkpoint().unwrap());
        cp.prepare_checkpoint().unwrap();
    });
    let cp = Arc::clone(&rig.cp);
    let grown = within_deadline("grow", move || cp.grow_backend("b").unwrap());
    assert_eq!(grown, Action::Changed);
    let cp = Arc::clone(&rig.cp);
    within_deadline("backend_space", move || cp.backend_space());
    let cp = Arc::clone(&rig.cp);
    within_deadline("restore", move || {
        cp.restore_device("/dev/block/b", &RestoreRequest::default(), &|_, _| {}, &|_, _, _| {
            panic!("a covered device must not fall back")
        })
    });
    let cp = Arc::clone(&rig.cp);
    let outcome = within_deadline("commitChanges", move || cp.commit_changes().unwrap());
    assert_eq!(outcome, CommitOutcome::Committed { committed: vec!["b".into()], skipped: vec![] });
    assert_eq!(
        rig.probes[0].calls(),
        ["prepare", "grow", "space", "restore /dev/block/b", "commit"],
        "every step reached the backend"
    );
}

#[test]
fn abort_calls_each_backend_without_the_state_lock() {
    let rig = rig(vec![("b", BackendKind::File, false)], true);
    let cp = Arc::clone(&rig.cp);
    within_deadline("abortChanges", move || cp.abort_changes("test", false).unwrap());
    assert_eq!(rig.probes[0].calls(), ["abort"]);
}

#[test]
fn a_commit_that_failed_part_way_succeeds_when_retried() {
    let rig = rig(vec![("one", BackendKind::File, false), ("two", BackendKind::File, false)], true);
    rig.probes[1].fail_commits.store(1, Ordering::SeqCst);
    assert!(rig.cp.needs_checkpoint().unwrap());
    rig.cp.prepare_checkpoint().unwrap();
    let err = rig.cp.commit_changes().unwrap_err();
    assert!(
        matches!(&err, PolicyError::BackendCommit { backend, .. } if backend == "two"),
        "{err}"
    );
    assert!(rig.cp.is_checkpointing(), "a failed commit keeps the checkpoint");
    assert_eq!(*rig.probes[0].state.lock().unwrap(), BackendState::Committed);
    // The retry: backend one is already committed and answers Identity; two commits now.
    let outcome = rig.cp.commit_changes().unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Committed { committed: vec!["one".into(), "two".into()], skipped: vec![] }
    );
    assert!(!rig.cp.is_checkpointing());
    let kinds: Vec<HistoryKind> = rig.cp.history(3).unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [HistoryKind::Commit, HistoryKind::CommitFailed, HistoryKind::Start]);
}

#[test]
fn a_block_backend_committed_before_a_daemon_restart_is_committed_again_not_skipped() {
    // The first daemon committed the block backend, then died before clearing the state; the
    // next daemon of the same boot has not prepared it, but it reports Committed.
    let rig = rig(vec![("blk", BackendKind::Block, false)], true);
    *rig.probes[0].state.lock().unwrap() = BackendState::Committed;
    assert!(rig.cp.needs_checkpoint().unwrap());
    let outcome = rig.cp.commit_changes().unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Committed { committed: vec!["blk".into()], skipped: vec![] }
    );
}

#[test]
fn prepare_on_a_boot_that_is_not_checkpointing_tears_the_backends_down() {
    let rig = rig(vec![("a", BackendKind::Block, false), ("f", BackendKind::File, false)], false);
    // Before the boot's decision, prepare does nothing at all.
    rig.cp.prepare_checkpoint().unwrap();
    assert!(rig.probes.iter().all(|p| p.calls().is_empty()));
    assert!(!rig.cp.needs_checkpoint().unwrap());
    rig.probes[0].fail_teardown.store(true, Ordering::SeqCst);
    rig.cp.prepare_checkpoint().unwrap(); // a failed teardown is logged; prepare still succeeds
    assert_eq!(rig.probes[0].calls(), ["teardown"]);
    assert_eq!(rig.probes[1].calls(), ["teardown"], "one failure does not stop the others");
}

#[test]
fn prepare_does_not_tear_down_an_armed_backend_or_a_checkpointing_boot() {
    let rig = rig(vec![("a", BackendKind::Block, false)], false);
    // A daemon restarted within a checkpointed boot whose slot has since been marked: the
    // backend is still armed, so nothing is torn down.
    *rig.probes[0].state.lock().unwrap() = BackendState::Armed;
    assert!(!rig.cp.needs_checkpoint().unwrap());
    rig.cp.prepare_checkpoint().unwrap();
    assert!(rig.probes[0].calls().is_empty(), "{:?}", rig.probes[0].calls());

    let rig = crate::tests::seam_tests::rig(vec![("a", BackendKind::Block, false)], true);
    assert!(rig.cp.needs_checkpoint().unwrap());
    rig.cp.prepare_checkpoint().unwrap();
    assert_eq!(rig.probes[0].calls(), ["prepare"]);
}

#[test]
fn restores_go_to_the_covering_backend_and_others_fall_back() {
    let rig = rig(vec![("snap", BackendKind::Block, false)], false);
    assert_eq!(rig.cp.restore_backend("/dev/block/snap"), Some("snap"));
    assert_eq!(rig.cp.restore_backend("/dev/block/other"), None);
    let fallback_calls = Mutex::new(Vec::new());
    let fallback = |device: &str, _: &RestoreRequest, _: &dyn Fn(u64, u64)| {
        fallback_calls.lock().unwrap().push(device.to_string());
        Ok(RestoreReport {
            outcome: RestoreOutcome::NothingToRestore,
            result: Err((22, "No magic".to_string())),
        })
    };
    let progress = Mutex::new(Vec::new());
    let report = |d: &str| {
        rig.cp.restore_device(
            d,
            &RestoreRequest::default(),
            &|done, total| progress.lock().unwrap().push((done, total)),
            &fallback,
        )
    };
    let covered = report("/dev/block/snap");
    assert_eq!(covered.backend.as_deref(), Some("snap"));
    assert_eq!(covered.result.unwrap().outcome, RestoreOutcome::Restored { entries: 7 });
    assert_eq!(*progress.lock().unwrap(), [(1, 1)]);
    let other = report("/dev/block/other");
    assert_eq!(other.backend, None);
    assert_eq!(other.result.unwrap().result, Err((22, "No magic".to_string())));
    assert_eq!(*fallback_calls.lock().unwrap(), ["/dev/block/other"]);
    assert_eq!(rig.probes[0].calls(), ["restore /dev/block/snap"]);
}

#[test]
fn grow_runs_only_while_checkpointing_and_names_unknown_backends() {
    let rig = rig(vec![("g", BackendKind::Block, true)], true);
    assert_eq!(rig.cp.grow_backend("g").unwrap(), Action::Identity, "not checkpointing yet");
    assert!(rig.probes[0].calls().is_empty());
    assert!(rig.cp.needs_checkpoint().unwrap());
    assert_eq!(rig.cp.grow_backend("g").unwrap(), Action::Changed);
    assert!(
        matches!(rig.cp.grow_backend("nope"), Err(PolicyError::UnknownBackend(n)) if n == "nope")
    );
}
