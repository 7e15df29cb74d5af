//! Resuming after the server's death (docs/userspace-bow.md, "Resuming after a crash"): the
//! process killed at every point of a workload (after every journal append, inside one, after
//! every device write and flush), the engine recovered from its journal and the device, the
//! interrupted request reissued as the kernel does, the workload continued; then the user's
//! view, the rollback and the space accounting are checked against an uninterrupted run.
//!
//! Process death is not a power cut: everything written stays written, the process just stops.

use std::io::Write;
use std::sync::{Arc, Mutex};

use blockcopy::crashdev::XorShift;
use blockcopy::device::{BlockDevice, DeviceError, MemDevice};
use bow::model::{BowEngine, BowState};
use bow::units::{BlockSize, Sectors};

use super::{base_image, data, restored_matches, PreCheckpoint};
use crate::engine::RecoverFault;
use crate::{Allocator, Engine, EngineConfig, UserIo};

/// When the process dies: after `budget` events (device writes, flushes, journal appends).
#[derive(Debug, Default)]
struct KillState {
    budget: Option<usize>,
    events: usize,
    /// Whether the fatal event, if a journal append, leaves half its frame (a `write()` cut
    /// short).
    torn: bool,
    dead: bool,
    /// Kinds of the events that happened, in order ('j' journal, 'w' write, 'f' flush).
    kinds: String,
}

#[derive(Debug, Clone, Default)]
struct Kill(Arc<Mutex<KillState>>);

impl Kill {
    fn new(budget: Option<usize>, torn: bool) -> Kill {
        Kill(Arc::new(Mutex::new(KillState { budget, torn, ..KillState::default() })))
    }

    /// Whether the next event of `kind` happens; false from the fatal one on.
    fn event(&self, kind: char) -> Result<(), bool> {
        let mut s = self.0.lock().unwrap();
        if s.dead {
            return Err(false);
        }
        if s.budget == Some(s.events) {
            s.dead = true;
            return Err(s.torn);
        }
        s.events += 1;
        s.kinds.push(kind);
        Ok(())
    }

    fn dead(&self) -> bool {
        self.0.lock().unwrap().dead
    }

    fn kinds(&self) -> String {
        self.0.lock().unwrap().kinds.clone()
    }
}

/// The raw device of a process that may die: writes and flushes stop at death, what was
/// written stays.
#[derive(Debug)]
struct KillDevice {
    inner: MemDevice,
    kill: Kill,
}

const DEAD: DeviceError = DeviceError::Injected("the server process is dead");

impl BlockDevice for KillDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        if self.kill.dead() {
            return Err(DEAD);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.kill.event('w').map_err(|_| DEAD)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.kill.event('f').map_err(|_| DEAD)?;
        Ok(())
    }
}

/// The journal file (a tmpfs file outlives the process).
#[derive(Debug, Clone, Default)]
struct JournalFile(Arc<Mutex<Vec<u8>>>);

struct KillJournal {
    file: JournalFile,
    kill: Kill,
}

impl Write for KillJournal {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.kill.event('j') {
            Ok(()) => {
                self.file.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(torn) => {
                if torn {
                    self.file.0.lock().unwrap().extend_from_slice(&buf[..buf.len() / 2]);
                }
                Err(std::io::Error::other("the server process is dead"))
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A journal after recovery: appends go on, nothing dies.
struct PlainJournal(JournalFile);

impl Write for PlainJournal {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request the server handles.
#[derive(Debug, Clone)]
enum Step {
    Batch(Vec<UserIo>),
    Flush,
    Checkpoint,
}

struct Workload {
    bs: BlockSize,
    blocks: u64,
    steps: Vec<Step>,
}

/// TRIM phase (discards of a large free range, a write taking some back), a flush, the
/// checkpoint, then batches of writes (blocks in use, free space, block 0) and discards with
/// flushes between them. Enough free space that nothing runs out (a reissued write that ran
/// out of space would retry what the uninterrupted run did not).
fn workload(bs: BlockSize, seed: u64, batches: usize) -> Workload {
    let blocks = 256;
    let bss = bs.sectors();
    let bytes = u64::from(bs.bytes());
    let mut rng = XorShift::new(seed);
    let mut steps = vec![
        Step::Batch(vec![
            UserIo::Discard { sector: Sectors(100 * bss), len: 120 * bytes },
            UserIo::Discard { sector: Sectors(230 * bss), len: 20 * bytes },
        ]),
        Step::Batch(vec![UserIo::Write {
            sector: Sectors(150 * bss),
            data: data(2, bs, 1).into(),
        }]),
        Step::Flush,
        Step::Checkpoint,
    ];
    for _ in 0..batches {
        let n = 1 + rng.next() % 5;
        let ios = (0..n)
            .map(|_| {
                let pick = rng.next() % 10;
                let (block, count) = match pick {
                    0 => (0, 1),                                    // block 0
                    1 | 2 => (100 + rng.next() % 110, 1),           // free space
                    _ => (1 + rng.next() % 98, 1 + rng.next() % 2), // blocks in use
                };
                if rng.next() % 12 == 0 {
                    UserIo::Discard { sector: Sectors(block * bss), len: count * bytes }
                } else {
                    UserIo::Write {
                        sector: Sectors(block * bss),
                        data: data(count, bs, rng.next()).into(),
                    }
                }
            })
            .collect();
        steps.push(Step::Batch(ios));
        if rng.next() % 3 == 0 {
            steps.push(Step::Flush);
        }
    }
    Workload { bs, blocks, steps }
}

/// Runs `step`; Err when the process died during it.
fn run_step<D: BlockDevice>(engine: &mut Engine<D>, step: &Step) -> Result<(), String> {
    match step {
        Step::Batch(ios) => {
            let batch = engine.submit(ios.clone()).map_err(|e| e.to_string())?;
            let report = batch.commit().map_err(|e| e.to_string())?;
            for r in report.results {
                r.map_err(|e| format!("an I/O failed: {e}"))?;
            }
        }
        Step::Flush => engine.flush().map_err(|e| e.to_string())?,
        Step::Checkpoint => {
            engine.set_state(BowState::Checkpoint).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// What the user should read back: `None` for a block whose contents the user gave up (a
/// discard).
fn expected_view(w: &Workload) -> Vec<Option<Vec<u8>>> {
    let bsz = w.bs.as_usize();
    let bss = w.bs.sectors();
    let mut view: Vec<Option<Vec<u8>>> =
        base_image(w.blocks, w.bs).chunks(bsz).map(|b| Some(b.to_vec())).collect();
    for step in &w.steps {
        let Step::Batch(ios) = step else { continue };
        for io in ios {
            match io {
                UserIo::Write { sector, data } => {
                    for (i, chunk) in (0u64..).zip(data.chunks(bsz)) {
                        view[usize::try_from(sector.0 / bss + i).unwrap()] = Some(chunk.to_vec());
                    }
                }
                UserIo::Discard { sector, len } => {
                    for i in 0..len / u64::from(w.bs.bytes()) {
                        view[usize::try_from(sector.0 / bss + i).unwrap()] = None;
                    }
                }
            }
        }
    }
    view
}

/// The end of an uninterrupted run: what every resumed run must match.
struct Reference {
    events: String,
    space: crate::SpaceReport,
    table: String,
    backups: u64,
    pre: PreCheckpoint,
    /// The live engine's decision state before and after each step.
    states: Vec<(String, String)>,
}

fn config(w: &Workload, allocator: Allocator) -> EngineConfig {
    EngineConfig { block_size: w.bs, allocator }
}

fn pre_checkpoint(
    engine: &Engine<impl BlockDevice>,
    image: Vec<u8>,
    bs: BlockSize,
) -> PreCheckpoint {
    let bss = bs.sectors();
    let used = engine
        .range_map()
        .ranges()
        .iter()
        .filter(|r| r.kind != bow::model::RangeType::Trimmed)
        .flat_map(|r| r.start / bss..r.end / bss)
        .collect();
    PreCheckpoint { image, used }
}

fn reference(w: &Workload, allocator: Allocator) -> Reference {
    let kill = Kill::new(None, false);
    let dev =
        KillDevice { inner: MemDevice::from_bytes(base_image(w.blocks, w.bs)), kill: kill.clone() };
    let journal = KillJournal { file: JournalFile::default(), kill: kill.clone() };
    let mut engine = Engine::with_journal(dev, config(w, allocator), Box::new(journal)).unwrap();
    let mut pre = None;
    let mut states = Vec::new();
    for step in &w.steps {
        if matches!(step, Step::Checkpoint) {
            pre = Some(pre_checkpoint(&engine, engine.device().inner.snapshot(), w.bs));
        }
        let before = engine.decision_state();
        run_step(&mut engine, step).unwrap();
        states.push((before, engine.decision_state()));
    }
    Reference {
        events: kill.kinds(),
        space: engine.space(),
        table: engine.range_map().table_status(),
        backups: engine.stats().backups,
        pre: pre.unwrap(),
        states,
    }
}

/// How one kill point ended.
#[derive(Debug, Default)]
struct KillOutcome {
    /// The recovery kept the state before the interrupted step.
    dropped_last: bool,
    torn_tail: bool,
}

/// Kills the server at event `budget` (`torn`: inside a journal append), recovers, reissues,
/// continues and checks everything. Err says what went wrong.
fn kill_and_resume(
    w: &Workload,
    allocator: Allocator,
    reference: &Reference,
    budget: usize,
    torn: bool,
    fault: Option<RecoverFault>,
) -> Result<KillOutcome, String> {
    let kill = Kill::new(Some(budget), torn);
    let file = JournalFile::default();
    let dev =
        KillDevice { inner: MemDevice::from_bytes(base_image(w.blocks, w.bs)), kill: kill.clone() };
    let journal = KillJournal { file: file.clone(), kill: kill.clone() };
    let mut engine = Engine::with_journal(dev, config(w, allocator), Box::new(journal)).unwrap();
    let mut died_at = None;
    for (i, step) in w.steps.iter().enumerate() {
        let result = run_step(&mut engine, step);
        if kill.dead() {
            died_at = Some(i);
            break;
        }
        result.map_err(|e| format!("step {i} failed without a death: {e}"))?;
    }
    let died_at = died_at.ok_or("the process never died")?;
    // What the dead server left: the device as written, the journal file.
    let disk = engine.into_device().inner.snapshot();
    let bytes = file.0.lock().unwrap().clone();
    let recovered =
        Engine::recover_with(MemDevice::from_bytes(disk), config(w, allocator), &bytes, fault)
            .map_err(|e| format!("recovery refused: {e}"))?;
    // The rebuilt state is the live engine's, before or after the step it died in.
    let rebuilt = recovered.engine.decision_state();
    let (before, after) = &reference.states[died_at];
    if fault.is_none() && rebuilt != *before && rebuilt != *after {
        return Err(format!(
            "died in step {died_at}: the rebuilt state is neither the one before nor after it"
        ));
    }
    let outcome =
        KillOutcome { dropped_last: recovered.dropped_last, torn_tail: recovered.torn_tail > 0 };
    let mut engine = recovered.engine;
    // The server cuts the journal to what the engine describes and goes on appending.
    let cut = JournalFile(Arc::new(Mutex::new(bytes[..recovered.journal_len].to_vec())));
    engine.resume_journal(Box::new(PlainJournal(cut.clone())));
    // The kernel reissues the interrupted request (UBLK_F_USER_RECOVERY_REISSUE), whatever part
    // of it the dead server had done: its user writes may already be on disk.
    match &w.steps[died_at] {
        Step::Checkpoint if engine.state() == BowState::Checkpoint => {}
        step => run_step(&mut engine, step).map_err(|e| format!("reissue: {e}"))?,
    }
    for step in &w.steps[died_at + 1..] {
        run_step(&mut engine, step).map_err(|e| format!("after recovery: {e}"))?;
    }
    // (a) the user's view.
    let bsz = w.bs.as_usize();
    let bss = w.bs.sectors();
    for (b, want) in (0u64..).zip(expected_view(w)) {
        let Some(want) = want else { continue };
        let mut got = vec![0; bsz];
        engine.read(Sectors(b * bss), &mut got).map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!("died in step {died_at}: block {b} reads wrong"));
        }
    }
    // (c) the continued checkpoint's accounting is the uninterrupted run's.
    if engine.space() != reference.space
        || engine.range_map().table_status() != reference.table
        || engine.stats().backups != reference.backups
    {
        return Err(format!(
            "died in step {died_at}: space {:?} / {} backups, uninterrupted {:?} / {}",
            engine.space(),
            engine.stats().backups,
            reference.space,
            reference.backups
        ));
    }
    // The journal still rebuilds the engine exactly (a second death now).
    let final_state = engine.decision_state();
    let image = engine.device().snapshot();
    let again = Engine::recover(
        MemDevice::from_bytes(image.clone()),
        config(w, allocator),
        &cut.0.lock().unwrap(),
    )
    .map_err(|e| format!("second recovery: {e}"))?;
    if again.engine.decision_state() != final_state {
        return Err(format!("died in step {died_at}: a second recovery differs"));
    }
    // (b) the rollback gives back the image at checkpoint start.
    restored_matches(image, &reference.pre, w.bs)
        .map_err(|e| format!("died in step {died_at}: {e}"))?;
    Ok(outcome)
}

#[derive(Debug, Default)]
struct Tally {
    kill_points: usize,
    dropped_last: usize,
    torn: usize,
    failed: usize,
    first_failure: Option<String>,
}

/// Every kill point of `w`: before each event, and inside each journal append.
fn every_kill_point(w: &Workload, allocator: Allocator, fault: Option<RecoverFault>) -> Tally {
    let reference = reference(w, allocator);
    let mut tally = Tally::default();
    let kinds: Vec<char> = reference.events.chars().collect();
    // The engine's journal header is written when it is made, before any step: not a kill
    // point of a running server.
    for (budget, &kind) in kinds.iter().enumerate().skip(1) {
        let torn_too = kind == 'j';
        for torn in [false, true] {
            if torn && !torn_too {
                continue;
            }
            tally.kill_points += 1;
            match kill_and_resume(w, allocator, &reference, budget, torn, fault) {
                Ok(o) => {
                    tally.dropped_last += usize::from(o.dropped_last);
                    tally.torn += usize::from(o.torn_tail);
                }
                Err(e) => {
                    tally.failed += 1;
                    tally.first_failure.get_or_insert(format!(
                        "{allocator:?} {:?} kill at event {budget} ({}) torn {torn}: {e}",
                        w.bs, kind
                    ));
                }
            }
        }
    }
    tally
}

#[test]
fn a_server_killed_at_every_point_resumes_with_nothing_lost() {
    let mut total = Tally::default();
    for (i, bs) in [BlockSize::B4096, BlockSize::B512].into_iter().enumerate() {
        for (j, allocator) in [Allocator::FarEnd, Allocator::DmBow].into_iter().enumerate() {
            {
                let seed = 3 + 8 * u64::try_from(2 * i + j).unwrap();
                let w = workload(bs, seed, 16);
                let t = every_kill_point(&w, allocator, None);
                assert_eq!(t.failed, 0, "{:?}", t.first_failure);
                total.kill_points += t.kill_points;
                total.dropped_last += t.dropped_last;
                total.torn += t.torn;
            }
        }
    }
    println!(
        "kill points resumed exactly: {} ({} rebuilt without the interrupted step, {} with a \
         torn journal frame)",
        total.kill_points, total.dropped_last, total.torn
    );
    assert!(total.kill_points > 500, "too few kill points: {}", total.kill_points);
    // Both sides of the commit point were reached.
    assert!(total.dropped_last > 100 && total.torn > 50, "{total:?}");
}

#[test]
fn a_recovery_that_skips_the_block0_check_is_caught() {
    let w = workload(BlockSize::B4096, 3, 14);
    let t = every_kill_point(&w, Allocator::FarEnd, Some(RecoverFault::SkipBlock0Check));
    println!(
        "recovery without the block-0 check: {} of {} kill points wrong; first: {:?}",
        t.failed, t.kill_points, t.first_failure
    );
    assert!(t.failed > 0, "the broken recovery went unnoticed over {} kill points", t.kill_points);
}

#[test]
fn a_journal_from_another_device_or_a_foreign_block0_is_refused() {
    let w = workload(BlockSize::B4096, 5, 6);
    let kill = Kill::new(None, false);
    let file = JournalFile::default();
    let dev =
        KillDevice { inner: MemDevice::from_bytes(base_image(w.blocks, w.bs)), kill: kill.clone() };
    let journal = KillJournal { file: file.clone(), kill };
    let mut engine =
        Engine::with_journal(dev, config(&w, Allocator::FarEnd), Box::new(journal)).unwrap();
    for step in &w.steps {
        run_step(&mut engine, step).unwrap();
    }
    let disk = engine.into_device().inner.snapshot();
    let bytes = file.0.lock().unwrap().clone();
    // Another allocator than the journal's.
    let e =
        Engine::recover(MemDevice::from_bytes(disk.clone()), config(&w, Allocator::DmBow), &bytes)
            .unwrap_err();
    assert!(e.to_string().contains("another engine"), "{e}");
    // A device whose block 0 holds no log: neither the log before the last step nor after.
    let mut foreign = disk.clone();
    let bsz = w.bs.as_usize();
    foreign[..bsz].copy_from_slice(&base_image(w.blocks, w.bs)[..bsz]);
    let e = Engine::recover(MemDevice::from_bytes(foreign), config(&w, Allocator::FarEnd), &bytes)
        .unwrap_err();
    assert!(e.to_string().contains("neither"), "{e}");
    // The journal of a server that got further than this device: refused too.
    let e = Engine::recover(
        MemDevice::from_bytes(base_image(w.blocks, w.bs)),
        config(&w, Allocator::FarEnd),
        &bytes,
    )
    .unwrap_err();
    assert!(e.to_string().contains("neither"), "{e}");
    // The right pair resumes.
    let r = Engine::recover(MemDevice::from_bytes(disk), config(&w, Allocator::FarEnd), &bytes)
        .unwrap();
    assert_eq!(r.engine.state(), BowState::Checkpoint);
    assert!(!r.dropped_last);
}

#[test]
fn a_commit_interrupted_before_its_copy_is_redone() {
    let w = workload(BlockSize::B4096, 7, 4);
    let reference = reference(&w, Allocator::FarEnd);
    // Events: the workload's, then the commit's journal frame, its block-0 write, its flush.
    let n = reference.events.len();
    for (budget, wrote) in [(n + 1, false), (n + 2, true)] {
        let kill = Kill::new(Some(budget), false);
        let file = JournalFile::default();
        let dev = KillDevice {
            inner: MemDevice::from_bytes(base_image(w.blocks, w.bs)),
            kill: kill.clone(),
        };
        let journal = KillJournal { file: file.clone(), kill: kill.clone() };
        let mut engine =
            Engine::with_journal(dev, config(&w, Allocator::FarEnd), Box::new(journal)).unwrap();
        for step in &w.steps {
            run_step(&mut engine, step).unwrap();
        }
        let mut sector0_now = vec![0; w.bs.as_usize()];
        engine.read(Sectors(0), &mut sector0_now).unwrap();
        assert!(engine.set_state(BowState::Committed).is_err());
        assert!(kill.dead());
        let disk = engine.into_device().inner.snapshot();
        let bsz = w.bs.as_usize();
        assert_eq!(disk[..bsz] == sector0_now[..], wrote, "budget {budget}");
        let bytes = file.0.lock().unwrap().clone();
        let r = Engine::recover(MemDevice::from_bytes(disk), config(&w, Allocator::FarEnd), &bytes)
            .unwrap();
        assert_eq!(r.engine.state(), BowState::Committed);
        let mut block0 = vec![0; bsz];
        r.engine.device().read_at(&mut block0, 0).unwrap();
        assert_eq!(block0, sector0_now, "block 0 after the redone commit copy");
    }
}
