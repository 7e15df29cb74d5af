//! A reference model of the documented semantics (docs/state-machine.md, written from
//! vold-checkpoint.md §4, §8.6, §11 plus our deliberate fixes), and a proptest that random
//! sequences of calls, boots, slot switches and power cuts get the same answers from the real
//! [`Checkpointer`] (SQLite store, file boot control) as from the model.
//!
//! The model is deliberately naive: plain fields, one `match` per method, no I/O. It shares
//! only the output vocabulary (outcome enums) with the implementation.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;

use super::fakes::{temp_dir, FakeBackend, FakeControl};
use crate::{
    AbortOutcome, BackendKind, BackendState, BootControl, BootControlError, Budget, Checkpointer,
    CommitOutcome, FileBootControl, MarkOutcome, NoBootControl, PolicyOptions, RestoreOutcome,
    RestoreRecord, RollbackAction, StartOutcome, State, Store,
};

const SUFFIXES: [&str; 2] = ["_a", "_b"];
const BACKEND: &str = "fake";

// ---------------------------------------------------------------------------------------------
// The model.

/// The bootloader's view of one slot (AVB-style A/B metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
struct MSlot {
    priority: u8,
    tries: u8,
    successful: bool,
}

/// The environment: two slots and the slot the current boot runs from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MEnv {
    current: u32,
    slots: [MSlot; 2],
}

impl MEnv {
    fn fresh() -> MEnv {
        MEnv {
            current: 0,
            slots: [
                MSlot { priority: 15, tries: 0, successful: true },
                MSlot { priority: 0, tries: 0, successful: false },
            ],
        }
    }

    fn slot(&mut self, s: u32) -> &mut MSlot {
        &mut self.slots[if s == 0 { 0 } else { 1 }]
    }

    /// Power-on: boot the bootable slot with the highest priority (slot 0 on ties); spend a
    /// try if it is not successful. Nothing bootable: the device is reflashed (fresh record).
    fn power_on(&mut self) {
        let bootable = |s: &MSlot| s.priority > 0 && (s.successful || s.tries > 0);
        let pick = match (bootable(&self.slots[0]), bootable(&self.slots[1])) {
            (true, true) => {
                Some(if self.slots[1].priority > self.slots[0].priority { 1 } else { 0 })
            }
            (true, false) => Some(0),
            (false, true) => Some(1),
            (false, false) => None,
        };
        let Some(pick) = pick else {
            *self = MEnv::fresh();
            return self.power_on();
        };
        let s = self.slot(pick);
        if !s.successful {
            s.tries -= 1;
        }
        self.current = pick;
    }

    fn set_active(&mut self, target: u32) {
        for i in 0..2u32 {
            let s = self.slot(i);
            if i == target {
                *s = MSlot { priority: 15, tries: 7, successful: false };
            } else if s.priority >= 15 {
                s.priority = 14;
            }
        }
    }

    fn mark_successful(&mut self) {
        let c = self.current;
        let s = self.slot(c);
        s.successful = true;
        s.tries = 0;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum MBudget {
    Attempts(u32),
    Spent,
    Unlimited(Option<String>),
}

#[derive(Clone, Debug)]
struct MRow {
    budget: MBudget,
    requesting_slot: Option<u32>,
    switched: bool,
}

#[derive(Clone, Debug)]
struct Config {
    bootctl: bool,
    backend: Option<BackendKind>,
    dont_commit: bool,
    switch_on_rollback: bool,
}

#[derive(Clone, Debug)]
struct Model {
    cfg: Config,
    env: MEnv,
    // Durable.
    row: Option<MRow>,
    // Per boot (process).
    latch: bool,
    checkpointing: bool,
    rollback_seen: bool,
    prepared: bool,
    // Backend environment: armed survives a daemon restart within the boot.
    backend_armed: bool,
    fail_prepare: bool,
    fail_commit: bool,
    backend_commits: u32,
}

impl Model {
    fn new(cfg: Config) -> Model {
        let mut env = MEnv::fresh();
        env.power_on();
        Model {
            cfg,
            env,
            row: None,
            latch: false,
            checkpointing: false,
            rollback_seen: false,
            prepared: false,
            backend_armed: false,
            fail_prepare: false,
            fail_commit: false,
            backend_commits: 0,
        }
    }

    /// A new daemon process within the same boot.
    fn restart(&mut self) {
        self.latch = false;
        self.checkpointing = false;
        self.rollback_seen = false;
        self.prepared = false;
    }

    fn boot(&mut self) {
        self.restart();
        self.backend_armed = false;
        if self.cfg.bootctl {
            self.env.power_on();
        }
    }

    fn current_suffix(&self) -> Option<String> {
        self.cfg.bootctl.then(|| SUFFIXES[if self.env.current == 0 { 0 } else { 1 }].to_string())
    }

    fn start(&mut self, retry: i32) -> Result<Budget, i32> {
        if self.cfg.backend.is_none() {
            return Err(95);
        }
        if retry < -1 {
            return Err(22);
        }
        let budget = if retry == -1 {
            MBudget::Unlimited(self.current_suffix())
        } else {
            MBudget::Attempts(u32::try_from(retry).unwrap() + 1)
        };
        self.row = Some(MRow {
            budget: budget.clone(),
            requesting_slot: self.cfg.bootctl.then_some(self.env.current),
            switched: false,
        });
        self.rollback_seen = false;
        Ok(to_budget(&budget))
    }

    fn needs_checkpoint(&mut self) -> bool {
        if self.latch {
            return self.checkpointing;
        }
        self.latch = true;
        if self.checkpointing {
            return true;
        }
        let slot_unsuccessful =
            self.cfg.bootctl && !self.env.slots[usize::from(self.env.current == 1)].successful;
        let requested = matches!(&self.row, Some(r) if r.budget != MBudget::Spent);
        if slot_unsuccessful || requested {
            self.checkpointing = true;
        }
        self.checkpointing
    }

    fn needs_rollback(&self) -> bool {
        if self.rollback_seen {
            return true;
        }
        match &self.row {
            Some(MRow { budget: MBudget::Spent, .. }) => true,
            Some(MRow { budget: MBudget::Unlimited(Some(s)), .. }) => {
                self.current_suffix().as_ref() == Some(s)
            }
            _ => false,
        }
    }

    fn mark(&mut self) -> MarkOutcome {
        let switch_ok = self.cfg.switch_on_rollback && self.cfg.bootctl;
        let current = self.env.current;
        let Some(row) = &mut self.row else { return MarkOutcome::NoCheckpoint };
        match row.budget.clone() {
            MBudget::Attempts(1) => {
                row.budget = MBudget::Spent;
                MarkOutcome::BudgetSpent
            }
            MBudget::Attempts(n) => {
                row.budget = MBudget::Attempts(n - 1);
                MarkOutcome::Decremented { left: n - 1 }
            }
            MBudget::Spent => match row.requesting_slot {
                Some(p) if switch_ok && !row.switched && p != current => {
                    row.switched = true;
                    self.env.set_active(p);
                    MarkOutcome::RollbackSlotSwitched { from: current, to: p }
                }
                _ => MarkOutcome::Unchanged { budget: Budget::Spent },
            },
            b @ MBudget::Unlimited(_) => MarkOutcome::Unchanged { budget: to_budget(&b) },
        }
    }

    fn prepare(&mut self) {
        if self.checkpointing && self.cfg.backend.is_some() && !self.prepared && !self.fail_prepare
        {
            self.prepared = true;
            self.backend_armed = true;
        }
    }

    fn commit(&mut self) -> Result<CommitOutcome, i32> {
        if !self.checkpointing {
            let spent = matches!(&self.row, Some(r) if r.budget == MBudget::Spent);
            if spent && self.latch && !self.backend_armed {
                self.row = None;
                self.rollback_seen = true;
                return Ok(CommitOutcome::RollbackAcknowledged);
            }
            return Ok(CommitOutcome::NotCheckpointing);
        }
        if self.cfg.dont_commit {
            return Ok(CommitOutcome::DontCommit);
        }
        let was_rollback = self.needs_rollback();
        if self.cfg.bootctl {
            self.env.mark_successful();
        }
        let mut committed = Vec::new();
        let mut skipped = Vec::new();
        match self.cfg.backend {
            Some(BackendKind::Block) if !self.prepared && !self.backend_armed => {
                skipped.push(BACKEND.to_string())
            }
            Some(_) => {
                if self.fail_commit {
                    return Err(22);
                }
                self.backend_commits += 1;
                self.backend_armed = false;
                committed.push(BACKEND.to_string());
            }
            None => {}
        }
        self.checkpointing = false;
        self.row = None;
        if was_rollback {
            self.rollback_seen = true;
        }
        Ok(CommitOutcome::Committed { committed, skipped })
    }

    fn abort(&mut self, retry: bool) -> AbortOutcome {
        if !self.needs_checkpoint() {
            return AbortOutcome::NotCheckpointing;
        }
        if let Some(row) = &mut self.row {
            if !retry && matches!(row.budget, MBudget::Attempts(_)) {
                row.budget = MBudget::Spent;
            }
        }
        AbortOutcome::Reboot { reason: "abort-test".to_string() }
    }

    fn state(&self) -> State {
        if self.checkpointing {
            State::Checkpointing
        } else if self.needs_rollback() {
            State::RollbackPending
        } else if self.row.is_some() {
            State::Pending
        } else {
            State::Idle
        }
    }

    fn attempts_left(&self) -> Option<u32> {
        match self.row.as_ref().map(|r| &r.budget) {
            Some(MBudget::Attempts(n)) => Some(*n),
            Some(MBudget::Spent) => Some(0),
            _ => None,
        }
    }
}

fn to_budget(b: &MBudget) -> Budget {
    match b {
        MBudget::Attempts(n) => Budget::Attempts(*n),
        MBudget::Spent => Budget::Spent,
        MBudget::Unlimited(s) => Budget::Unlimited { slot_suffix: s.clone() },
    }
}

// ---------------------------------------------------------------------------------------------
// The real system under test.

struct World {
    cfg: Config,
    dir: tempfile::TempDir,
    cp: Option<Checkpointer>,
    control: Arc<FakeControl>,
}

impl World {
    fn new(cfg: Config) -> World {
        let dir = temp_dir();
        FileBootControl::create(&bootctl_path(dir.path()), 2).unwrap();
        let mut w = World { cfg, dir, cp: None, control: FakeControl::new() };
        w.boot();
        w
    }

    fn cp(&self) -> &Checkpointer {
        self.cp.as_ref().unwrap()
    }

    /// A boot: the bootloader picks a slot, a new daemon process opens the store.
    fn boot(&mut self) {
        self.cp = None;
        let path = bootctl_path(self.dir.path());
        if self.cfg.bootctl {
            let bc = FileBootControl::open(&path).unwrap();
            match bc.bootloader_select() {
                Ok(_) => {}
                Err(BootControlError::NoBootableSlot { .. }) => {
                    fs::remove_file(&path).unwrap();
                    FileBootControl::create(&path, 2).unwrap().bootloader_select().unwrap();
                }
                Err(e) => panic!("bootloader: {e}"),
            }
        }
        *self.control.state.lock().unwrap() = BackendState::Idle;
        self.open();
    }

    fn open(&mut self) {
        let path = bootctl_path(self.dir.path());
        let boot: Box<dyn BootControl> = if self.cfg.bootctl {
            Box::new(FileBootControl::open(&path).unwrap())
        } else {
            Box::new(NoBootControl)
        };
        let backends = match self.cfg.backend {
            Some(kind) => vec![FakeBackend::boxed(BACKEND, kind, &self.control)],
            None => Vec::new(),
        };
        let options = PolicyOptions {
            dont_commit: self.cfg.dont_commit,
            rollback_action: if self.cfg.switch_on_rollback {
                RollbackAction::SwitchToPreviousSlot
            } else {
                RollbackAction::None
            },
            ..PolicyOptions::default()
        };
        let store = Store::open(&self.dir.path().join("state")).unwrap();
        self.cp = Some(Checkpointer::new(store, boot, backends, options).unwrap());
    }

    /// The daemon restarts within the boot: same slot, the backend keeps its state.
    fn restart(&mut self) {
        self.cp = None;
        self.open();
    }

    /// A power cut: the files as they are on disk right now (without the clean close, which
    /// would checkpoint the WAL) become the next boot's files.
    fn power_cut(&mut self) {
        let new_dir = temp_dir();
        copy_tree(self.dir.path(), new_dir.path());
        self.cp = None; // the old process is gone; its files are discarded with the old dir
        self.dir = new_dir;
        self.boot();
    }

    fn env(&self) -> Option<MEnv> {
        if !self.cfg.bootctl {
            return None;
        }
        let r = FileBootControl::open(&bootctl_path(self.dir.path())).unwrap().record().unwrap();
        let slot = |i: usize| MSlot {
            priority: r.slots[i].priority,
            tries: r.slots[i].tries_left,
            successful: r.slots[i].successful,
        };
        Some(MEnv { current: r.current, slots: [slot(0), slot(1)] })
    }
}

fn bootctl_path(dir: &Path) -> PathBuf {
    dir.join(FileBootControl::DEFAULT_FILE_NAME)
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir_all(&dest).unwrap();
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operations and the comparison.

#[derive(Clone, Debug)]
enum Op {
    Start(i32),
    NeedsCheckpoint,
    NeedsRollback,
    IsCheckpointing,
    Mark,
    Prepare,
    Commit,
    Abort(bool),
    Reset,
    Status,
    Reboot,
    PowerCut,
    /// The daemon process restarts within the same boot.
    DaemonRestart,
    RecordRestore,
    /// update_engine installed the other slot and made it active.
    SwitchToOtherSlot,
    FailPrepare(bool),
    FailCommit(bool),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (-2i32..5).prop_map(Op::Start),
        4 => Just(Op::NeedsCheckpoint),
        3 => Just(Op::NeedsRollback),
        1 => Just(Op::IsCheckpointing),
        4 => Just(Op::Mark),
        2 => Just(Op::Prepare),
        3 => Just(Op::Commit),
        1 => any::<bool>().prop_map(Op::Abort),
        1 => Just(Op::Reset),
        2 => Just(Op::Status),
        4 => Just(Op::Reboot),
        2 => Just(Op::PowerCut),
        1 => Just(Op::DaemonRestart),
        1 => Just(Op::RecordRestore),
        1 => Just(Op::SwitchToOtherSlot),
        1 => any::<bool>().prop_map(Op::FailPrepare),
        1 => any::<bool>().prop_map(Op::FailCommit),
    ]
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (
        prop::bool::weighted(0.8),
        prop_oneof![
            1 => Just(None),
            3 => Just(Some(BackendKind::Block)),
            2 => Just(Some(BackendKind::File)),
        ],
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(|(bootctl, backend, dont_commit, switch_on_rollback)| Config {
            bootctl,
            backend,
            dont_commit,
            switch_on_rollback,
        })
}

/// Run one operation on both and compare. Returns a description of a mismatch.
fn step(model: &mut Model, world: &mut World, op: &Op) -> Result<(), TestCaseError> {
    let writes_before = world.cp().write_transactions();
    let mut read_only = false;
    match op {
        Op::Start(retry) => {
            let real = world.cp().start_checkpoint(*retry).map_err(|e| e.errno());
            let real = real.map(|StartOutcome::Started { budget }| budget);
            prop_assert_eq!(real, model.start(*retry));
        }
        Op::NeedsCheckpoint => {
            read_only = true;
            prop_assert_eq!(world.cp().needs_checkpoint().unwrap(), model.needs_checkpoint());
        }
        Op::NeedsRollback => {
            read_only = true;
            prop_assert_eq!(world.cp().needs_rollback().unwrap(), model.needs_rollback());
        }
        Op::IsCheckpointing => {
            read_only = true;
            prop_assert_eq!(world.cp().is_checkpointing(), model.checkpointing);
        }
        Op::Mark => {
            let expect_write = model.row.is_some();
            let real = world.cp().mark_boot_attempt().unwrap();
            prop_assert_eq!(&real, &model.mark());
            let writes = world.cp().write_transactions() - writes_before;
            prop_assert_eq!(writes, u64::from(expect_write), "markBootAttempt transactions");
        }
        Op::Prepare => {
            world.cp().prepare_checkpoint().unwrap();
            model.prepare();
            read_only = true; // prepare is in memory only
        }
        Op::Commit => {
            let real = world.cp().commit_changes().map_err(|e| e.errno());
            prop_assert_eq!(real, model.commit());
            prop_assert_eq!(world.control.commits(), model.backend_commits);
        }
        Op::Abort(retry) => {
            let real = world.cp().abort_changes("abort-test", *retry).unwrap();
            let expected = model.abort(*retry);
            prop_assert_eq!(&real, &expected);
            if let AbortOutcome::Reboot { .. } = real {
                // The daemon reboots.
                model.boot();
                world.boot();
            }
        }
        Op::Reset => {
            read_only = true;
            world.cp().reset_checkpoint();
            model.latch = false;
        }
        Op::Status => {
            read_only = true;
            let s = world.cp().status().unwrap();
            prop_assert_eq!(s.state, model.state());
            prop_assert_eq!(s.attempts_left, model.attempts_left());
            prop_assert_eq!(s.budget, model.row.as_ref().map(|r| to_budget(&r.budget)));
            prop_assert_eq!(s.is_checkpointing, model.checkpointing);
            prop_assert_eq!(s.needs_rollback, model.needs_rollback());
            prop_assert_eq!(s.needs_checkpoint, model.latch.then_some(model.checkpointing));
        }
        Op::Reboot => {
            model.boot();
            world.boot();
        }
        Op::PowerCut => {
            model.boot();
            world.power_cut();
        }
        Op::DaemonRestart => {
            model.restart();
            world.restart();
        }
        Op::RecordRestore => {
            let record = RestoreRecord {
                outcome: RestoreOutcome::Restored { entries: 3 },
                duration_ms: 1,
                backend: None,
            };
            world.cp().record_restore("/dev/block/test", record).unwrap();
            prop_assert_eq!(world.cp().write_transactions(), writes_before + 1);
            let last = world.cp().status().unwrap().last_restore.unwrap();
            prop_assert_eq!(last.outcome.as_deref(), Some("restored"));
        }
        Op::SwitchToOtherSlot => {
            if model.cfg.bootctl {
                let other = 1 - model.env.current;
                model.env.set_active(other);
                FileBootControl::open(&bootctl_path(world.dir.path()))
                    .unwrap()
                    .set_active_boot_slot(other)
                    .unwrap();
            }
        }
        Op::FailPrepare(f) => {
            model.fail_prepare = *f;
            world.control.fail_prepare.store(*f, std::sync::atomic::Ordering::SeqCst);
        }
        Op::FailCommit(f) => {
            model.fail_commit = *f;
            world.control.fail_commit.store(*f, std::sync::atomic::Ordering::SeqCst);
        }
    }
    if read_only {
        prop_assert_eq!(world.cp().write_transactions(), writes_before, "{:?} wrote", op);
    }
    prop_assert_eq!(world.env(), model.cfg.bootctl.then(|| model.env.clone()));
    prop_assert_eq!(world.cp().is_checkpointing(), model.checkpointing);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=n runs a deeper search.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn policy_matches_reference_model(
        cfg in config_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..60),
    ) {
        let mut model = Model::new(cfg.clone());
        let mut world = World::new(cfg);
        for op in &ops {
            step(&mut model, &mut world, op)?;
        }
    }
}

/// The story from the issue, through the model and the real policy: `startCheckpoint(2)`,
/// three checkpointed boots that each call `markBootAttempt`, then the rollback boot.
#[test]
fn start_2_gives_three_checkpointed_boots_then_rollback() {
    let cfg = Config {
        bootctl: true,
        backend: Some(BackendKind::Block),
        dont_commit: false,
        switch_on_rollback: false,
    };
    let mut model = Model::new(cfg.clone());
    let mut world = World::new(cfg);
    let mut ops = vec![Op::Start(2), Op::Reboot];
    for _ in 0..3 {
        ops.extend([Op::NeedsCheckpoint, Op::Mark, Op::Prepare, Op::NeedsRollback, Op::PowerCut]);
    }
    ops.extend([Op::NeedsCheckpoint, Op::NeedsRollback, Op::Mark, Op::Status]);
    for op in &ops {
        step(&mut model, &mut world, op).unwrap();
    }
    let cp = world.cp();
    assert!(!cp.needs_checkpoint().unwrap());
    assert!(cp.needs_rollback().unwrap());
    assert_eq!(cp.status().unwrap().attempts_used, 4);
    // The rollback boot completes: acknowledged, still true in this boot, false on the next.
    assert_eq!(cp.commit_changes().unwrap(), CommitOutcome::RollbackAcknowledged);
    assert!(cp.needs_rollback().unwrap());
    world.boot();
    assert!(!world.cp().needs_rollback().unwrap());
    assert!(!world.cp().needs_checkpoint().unwrap());
}
