//! Saved crash cases (docs/crash-consistency.md): every directory under
//! `backends/tests/crash-cases/` holds a `case.json` and its log; each must pass. A failing
//! state of the VM suite is saved the same way (under `target/crash-failures/`) and is
//! replayed by copying its directory here, or in place with
//! `CPD_CRASH_CASES=<dir>[:<dir>...] cargo test -p backends --test crash_cases`. One synthetic case is always present: a bow trace
//! written by [`synthetic_bow_log`], checked to be what its generator writes.

mod crash;

use std::fs;
use std::path::{Path, PathBuf};

use crash::{CaseSpec, Fault, LogWriter};

const CASES: &str = "tests/crash-cases";
const SYNTHETIC: &str = "synthetic-bow";
const DEVICE: u64 = 512 << 10;
const BLOCK: u64 = 4096;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(CASES)
}

/// A small bow trace in dm-log-writes layout: a file system's blocks written, `fstrim`'s
/// discards of the free space (TRIM state), then the checkpoint: overwrites of blocks in use,
/// writes into free space, a discard, flushes and a FUA write.
fn synthetic_bow_log() -> Vec<u8> {
    let mut w = LogWriter::default();
    let mut rng = blockcopy::crashdev::XorShift::new(13);
    let mut block = |seed: u64| -> Vec<u8> {
        let x = rng.next() ^ seed;
        (0..BLOCK).map(|i| (x.rotate_left(u32::try_from(i % 64).unwrap()) & 0xff) as u8).collect()
    };
    let blocks = DEVICE / BLOCK;
    // Blocks 0..40 in use.
    for b in 0..40 {
        w.write(b * BLOCK, &block(b), 0);
    }
    w.flush();
    w.mark("bow-trim");
    w.discard(40 * BLOCK, (blocks - 40) * BLOCK);
    w.flush();
    w.mark("bow-checkpoint");
    for round in 0..9u64 {
        for k in 0..3u64 {
            let b = (round * 37 + k * 11) % 40;
            w.write(b * BLOCK, &block(b + 1000 * round), 0);
        }
        let free = 40 + (round * 13) % (blocks - 44);
        let two: Vec<u8> = [block(free), block(free + 1)].concat();
        w.write(free * BLOCK, &two, 0);
        if round % 4 == 3 {
            w.discard(((round * 7) % 40) * BLOCK, BLOCK);
        }
        if round % 3 == 2 {
            w.write(((round * 5) % 40) * BLOCK, &block(round), blockdev::logwrites::flags::FUA);
        }
        w.flush();
    }
    w.write(0, &block(7), 0);
    w.mark("bow-end");
    w.finish()
}

fn synthetic_spec() -> CaseSpec {
    CaseSpec {
        kind: "bow".into(),
        log: "log.bin".into(),
        reference: None,
        kernel_merge_reference: None,
        meta_bytes: 0,
        instance: String::new(),
        device_bytes: DEVICE,
        windows: vec![("bow-trim".into(), "bow-end".into(), "rollback".into())],
        subsets: 4,
        seed: 13,
        only: None,
        recovery_every: 3,
        max_states: 0,
        store: None,
    }
}

#[test]
fn synthetic_case_is_what_its_generator_writes() {
    let dir = cases_dir().join(SYNTHETIC);
    if std::env::var_os("CPD_CRASH_REGENERATE").is_some() {
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("log.bin"), synthetic_bow_log()).unwrap();
        fs::write(dir.join("case.json"), serde_json::to_string_pretty(&synthetic_spec()).unwrap())
            .unwrap();
    }
    let saved = fs::read(dir.join("log.bin")).expect("the synthetic case is committed");
    assert!(saved == synthetic_bow_log(), "log.bin differs from synthetic_bow_log()");
    let spec = CaseSpec::load(&dir).unwrap();
    assert_eq!(spec.kind, "bow");
    assert_eq!(spec.device_bytes, DEVICE);
}

#[test]
fn every_saved_case_passes() {
    let mut dirs: Vec<PathBuf> = fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.iter().any(|d| d.ends_with(SYNTHETIC)), "the synthetic case is missing");
    // Cases elsewhere (e.g. target/crash-failures/<case>, or a VM run's captured case), named
    // by CPD_CRASH_CASES (colon-separated).
    if let Some(extra) = std::env::var_os("CPD_CRASH_CASES") {
        dirs.extend(std::env::split_paths(&extra));
    }
    for dir in dirs {
        let t = crash::run_case(&dir, Fault::None, None).unwrap();
        println!(
            "{}: {} crash states, {} during recovery, {} store checks ({} opens, {:.1} s), {} \
             failures",
            dir.display(),
            t.states,
            t.recovery_states,
            t.store_checks,
            t.store_opens,
            t.store_time.as_secs_f64(),
            t.failures.len()
        );
        for (seen, n) in &t.store_seen {
            println!("  store checks passed: {seen}: {n} crash states");
        }
        assert!(t.failures.is_empty(), "{}: {:#?}", dir.display(), t.failures);
        assert!(t.states > 0, "{}: no crash state checked", dir.display());
    }
}

#[test]
fn synthetic_case_checks_enough_states() {
    let t = crash::run_case(&cases_dir().join(SYNTHETIC), Fault::None, None).unwrap();
    assert!(t.states >= 40, "only {} crash states", t.states);
    assert!(t.recovery_states >= 40, "only {} crash states during the restore", t.recovery_states);
}

/// The suite fails when recovery is wrong: a restore that skips one write, and one whose
/// first flush is dropped (caught by a crash during that restore), each fail the case.
#[test]
fn broken_restore_fails_the_synthetic_case() {
    let dir = cases_dir().join(SYNTHETIC);
    let spec = CaseSpec { recovery_every: 1, ..CaseSpec::load(&dir).unwrap() };
    for fault in [Fault::SkipWrite(0), Fault::SkipWrite(3), Fault::DropFlush(0)] {
        let t = crash::run_bow(&dir, &spec, fault, None).unwrap();
        println!("{fault:?}: {} failures, first {:?}", t.failures.len(), t.failures.first());
        assert!(!t.failures.is_empty(), "a restore with {fault:?} passed");
    }
}

#[test]
fn enumeration_keeps_flushed_writes_and_fua() {
    let mut w = LogWriter::default();
    w.mark("a");
    w.write(0, &[1; 4096], 0); // 1
    w.flush(); // 2
    w.write(4096, &[2; 4096], 0); // 3
    w.write(8192, &[3; 4096], blockdev::logwrites::flags::FUA); // 4
    w.write(12288, &[4; 4096], 0); // 5
    w.flush(); // 6
    w.mark("b"); // 7
    let path = tempfile::NamedTempFile::new().unwrap();
    fs::write(path.path(), w.finish()).unwrap();
    let log = crash::OpLog::load(path.path()).unwrap();
    let states = crash::enumerate(&log, 0, 7, 20, 1);
    // Prefix states at the window start, each flush and the FUA write.
    for p in [0, 2, 4, 6] {
        assert!(states.iter().any(|s| s.point == p && s.extra.is_empty()), "prefix at {p}");
    }
    for s in &states {
        // No state keeps a write past a flush it does not include.
        let next_flush = log.ops[s.point + 1..].iter().find(|o| o.is_flush()).map(|o| o.index);
        assert!(s.extra.iter().all(|&i| i > s.point && next_flush.is_none_or(|f| i < f)), "{s:?}");
        // A FUA write before a kept later write is kept.
        if s.point == 2 && s.extra.contains(&5) {
            assert!(s.extra.contains(&4), "{s:?} drops the completed FUA write");
        }
    }
    assert!(states.iter().any(|s| s.point == 2 && !s.extra.is_empty()), "random subsets");
}

/// A failing state is saved as a case that replays that one state: it fails again with the
/// same broken restore and passes with the real one.
#[test]
fn a_saved_failure_replays_its_one_state() {
    let dir = cases_dir().join(SYNTHETIC);
    let saved_root = tempfile::tempdir().unwrap();
    let spec = CaseSpec { recovery_every: 0, ..CaseSpec::load(&dir).unwrap() };
    let t = crash::run_bow(&dir, &spec, Fault::SkipWrite(0), Some(saved_root.path())).unwrap();
    assert!(!t.failures.is_empty(), "the broken restore was not caught");
    let saved: Vec<PathBuf> = fs::read_dir(saved_root.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    assert!(!saved.is_empty(), "no case saved");
    let case = &saved[0];
    assert!(CaseSpec::load(case).unwrap().only.is_some(), "the saved case names its state");
    let again = crash::run_case(case, Fault::SkipWrite(0), None).unwrap();
    assert_eq!(again.states, 1, "one state replayed");
    assert!(!again.failures.is_empty(), "the saved state fails again");
    let fixed = crash::run_case(case, Fault::None, None).unwrap();
    assert_eq!((fixed.states, fixed.failures.len()), (1, 0), "{:?}", fixed.failures);
}
