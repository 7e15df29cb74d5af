//! The crash-consistency suite on a real kernel (docs/crash-consistency.md).
//!
//! One boot captures dm-log-writes logs of checkpointed /data workloads, with the log **under
//! the whole device stack**:
//! * `snapshot` on ext4: raw loop device → log-writes (log on a second loop device) → two
//!   dm-linear partitions (metadata: the backend records and the daemon's state store; data:
//!   the snapshot backend's whole stack and ext4). One log orders both, so a crash state cuts
//!   both at the same moment. The checkpoints are driven through `policy::Checkpointer`, as
//!   the daemon drives them. Phases are marked from userspace: `armed` (checkpoint started),
//!   the app-data update and fsx-like operations, `workload-end`, `commit-begin` /
//!   `commit-end`.
//! * `bow` (no dm-bow in this kernel): the same workload on ext4 directly over log-writes,
//!   marks `bow-trim` (before fstrim), `bow-checkpoint`, `bow-end`; the host replays it through
//!   the engine model.
//!
//! The host then enumerates the crash states and runs the next boot's recovery on each (the
//! offline merge; bow's restore), checks exactness, fsck, the record and the state store,
//! crashes the recovery itself for a sample, prints the counts, saves failures as cases, and
//! shows that a merge or restore broken on purpose (one write skipped, one flush dropped) and
//! a store cleared before the backend's commit are caught.
//! `CPD_CRASH_LONG=1` (`cargo xtask test --long`) runs longer workloads and more subsets.

mod crash;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::f2fs::{F2fsBackend, F2fsOptions, F2fsStack};
use backends::records::Records;
use backends::snapshot::{RollbackMethod, SnapshotBackend, SnapshotOptions, SnapshotStack};
use backends::{Action, BootStack, DeviceSpec};
use blockdev::dm::DeviceMapper;
use blockdev::loopdev::{LoopDevice, LoopOptions};
use blockdev::names::{object_name, Role};
use crash::capture::{
    dm_create, ensure, failures_dir, flush_through_journal, fsx, long_mode, loop_file, majmin,
    mark, mkfs_ext4, report, save_log, workload, LONG_ENV,
};
use crash::{CaseSpec, Fault, StoreSpec, Tally};
use policy::{
    Backend, BackendState, Checkpointer, CommitOutcome, MarkOutcome, NoBootControl, PolicyOptions,
    RestoreOutcome, RestoreRecord, RestoreRequest, Store,
};
use testbench::device::{compare_manifests, manifest, populate_app_data, Fs, Rng};
use testbench::vm::Vm;
use testbench::{guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;
const META_BYTES: u64 = 16 * MIB;
const DATA_BYTES: u64 = 128 * MIB;
/// The bow capture's device; the long run writes about three times as much.
fn bow_bytes(long: bool) -> u64 {
    if long {
        96 * MIB
    } else {
        48 * MIB
    }
}
const F2FS_BYTES: u64 = 160 * MIB;
/// The floor of kernel-level crash states in the default run (the CI requirement).
const MIN_STATES: usize = 500;
/// `startCheckpoint(retry)` of the committed checkpoint (budget 3; one boot attempt used).
const STORE_RETRY: i32 = 2;
/// `startCheckpoint(retry)` of the checkpoint rolled back by the kernel's merge (budget 1,
/// spent by its one boot attempt).
const KERNEL_MERGE_RETRY: i32 = 0;
/// Written and fsynced at the end of the snapshot workload: the new data's witness.
const UPDATE_FILE: &str = "update-done";

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("crash_states_of_real_kernel_logs_snapshot_bow_f2fs", host_crash)],
        &[("capture", guest_capture)],
    )
}

fn tally_line(what: &str, t: &Tally, took: Duration) -> String {
    format!(
        "crash suite {what}: {} crash states checked ({} during recovery), {} fsck runs, {} store checks ({} store opens, {:.1} s), {} failures, {:.1} s",
        t.states,
        t.recovery_states,
        t.fsck_runs,
        t.store_checks,
        t.store_opens,
        t.store_time.as_secs_f64(),
        t.failures.len(),
        took.as_secs_f64()
    )
}

fn host_crash() -> Result<(), Failed> {
    let long = long_mode();
    let started = Instant::now();
    let run = Vm::new("crash_capture")
        .modules(&["loop", "dm-mod", "dm-snapshot", "dm-log-writes", "f2fs"])
        .memory_mib(2048)
        .timeout(Duration::from_secs(if long { 1800 } else { 600 }))
        .env(LONG_ENV, if long { "1" } else { "0" })
        .run_self("capture", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    report(&format!("crash suite: capture boot took {:.1} s", run.duration.as_secs_f64()));
    // The f2fs states were checked in the guest (the kernel's mount is the recovery).
    let f2fs_states: usize = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("f2fs crash states checked in the guest: "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or("the guest did not report its f2fs crash states")?;
    report(&format!("crash suite f2fs checkpoint=disable (kernel mount): {f2fs_states} crash states, 0 failures"));
    let failures = failures_dir();
    let mut all_failures = Vec::new();

    let t0 = Instant::now();
    let snap_dir = run.shared_dir.join("snapshot-ext4");
    let snap = crash::run_case(&snap_dir, Fault::None, Some(&failures))?;
    report(&tally_line("snapshot/ext4 (offline merge)", &snap, t0.elapsed()));
    all_failures.extend(snap.failures.iter().cloned());

    let t1 = Instant::now();
    let bow_dir = run.shared_dir.join("bow-ext4");
    let bow = crash::run_case(&bow_dir, Fault::None, Some(&failures))?;
    report(&tally_line("bow/ext4 (engine model + restore)", &bow, t1.elapsed()));
    all_failures.extend(bow.failures.iter().cloned());

    for f in all_failures.iter().take(20) {
        println!("FAILURE: {f}");
    }
    ensure(
        all_failures.is_empty(),
        format!("{} crash states failed (saved under {})", all_failures.len(), failures.display()),
    )?;
    ensure(
        snap.states >= MIN_STATES,
        format!("only {} kernel-level snapshot crash states (want {MIN_STATES})", snap.states),
    )?;
    ensure(bow.states >= 100, format!("only {} bow crash states", bow.states))?;
    // Every snapshot state has the daemon's store on its metadata partition, and the commit
    // window reaches each of its store states: before the row went `committing`, between the
    // record leaving `armed` and the row being cleared, and after.
    ensure(
        snap.store_checks == snap.states,
        format!("{} store checks for {} snapshot crash states", snap.store_checks, snap.states),
    )?;
    for (seen, n) in &snap.store_seen {
        println!("store checks passed: {seen}: {n} crash states");
    }
    for want in ["record armed, store pending", "store committing", "store cleared"] {
        ensure(
            snap.store_seen.keys().any(|k| k.starts_with("commit:") && k.contains(want)),
            format!("no crash state of the commit window with {want}: {:?}", snap.store_seen),
        )?;
    }

    // The suite fails when recovery is wrong.
    broken_recovery_is_caught(&snap_dir, &bow_dir)?;
    report(&format!(
        "crash suite: total {} crash states, host-side checks {:.1} s, whole test {:.1} s",
        snap.states + bow.states + f2fs_states,
        t0.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// A merge and a restore broken on purpose must each fail the suite: one write skipped, one
/// flush dropped (caught by the crash states during the recovery).
fn broken_recovery_is_caught(snap_dir: &Path, bow_dir: &Path) -> Result<(), Failed> {
    let spec = CaseSpec::load(snap_dir)?;
    // A few states are enough to show it: the first ones of the rollback window.
    let quick = CaseSpec { subsets: 0, recovery_every: 1, ..spec };
    let case = crash::SnapshotCase::load(snap_dir, quick)?;
    for fault in [Fault::SkipWrite(0), Fault::DropFlush(0)] {
        let t = crash::run_snapshot(&case, fault, None, true)?;
        println!("broken merge {fault:?}: {:?}", t.failures.first());
        ensure(!t.failures.is_empty(), format!("a merge with {fault:?} passed the suite"))?;
    }
    // A daemon that clears its store before the backend's commit: checked over the commit
    // window only (with the correct merge), it must fail on the store.
    let commit_only = CaseSpec {
        windows: spec_commit_window(snap_dir)?,
        subsets: 0,
        recovery_every: 0,
        ..CaseSpec::load(snap_dir)?
    };
    let case = crash::SnapshotCase::load(snap_dir, commit_only)?;
    let t = crash::run_snapshot(&case, Fault::StoreClearedFirst, None, true)?;
    println!("store cleared before the backend's commit: {:?}", t.failures.first());
    ensure(
        t.failures.first().is_some_and(|f| f.contains("state store")),
        format!("a store cleared before the backend's commit passed the suite: {:?}", t.failures),
    )?;
    let bspec = CaseSpec::load(bow_dir)?;
    for fault in [Fault::SkipWrite(0), Fault::DropFlush(0)] {
        let s = CaseSpec { recovery_every: 1, ..bspec.clone() };
        let t = crash::run_bow(bow_dir, &s, fault, None)?;
        println!(
            "broken bow restore {fault:?}: {} failures, first {:?}",
            t.failures.len(),
            t.failures.first()
        );
        ensure(!t.failures.is_empty(), format!("a bow restore with {fault:?} passed the suite"))?;
    }
    report("crash suite: broken merge and broken restore (a write skipped, a flush dropped), store cleared before the backend's commit: all caught");
    Ok(())
}

/// The snapshot case's `commit` window alone.
fn spec_commit_window(snap_dir: &Path) -> Result<Vec<(String, String, String)>, Failed> {
    let windows: Vec<_> =
        CaseSpec::load(snap_dir)?.windows.into_iter().filter(|w| w.2 == "commit").collect();
    ensure(windows.len() == 1, "the snapshot case has one commit window")?;
    Ok(windows)
}

// ---------------------------------------------------------------------------------------------
// guest

fn guest_capture(_: &[String]) -> Result<(), Failed> {
    let long = long_mode();
    let shared = guest::shared_dir();
    let seed = 0x5eed_0013;
    capture_snapshot(&shared.join("snapshot-ext4"), seed, long)?;
    capture_bow(&shared.join("bow-ext4"), seed, long)?;
    f2fs_capture_and_check(seed, long)?;
    Ok(())
}

/// The daemon's policy as `checkpointd` builds it (service/src/daemon.rs): the store in the
/// metadata directory, no boot control (the virtual device has none here), one backend.
/// Dropping it and calling again is the next boot's daemon.
fn daemon(metadata: &Path, backend: &Arc<SnapshotBackend>) -> Result<Checkpointer, Failed> {
    let store = Store::open(metadata)?;
    let backends: Vec<Box<dyn Backend>> = vec![Box::new(Arc::clone(backend))];
    Ok(Checkpointer::new(store, Box::new(NoBootControl), backends, PolicyOptions::default())?)
}

/// Writes `bytes` to `path` and fsyncs the file and its directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Failed> {
    fs::write(path, bytes)?;
    fs::File::open(path)?.sync_all()?;
    fs::File::open(path.parent().ok_or("no parent")?)?.sync_all()?;
    Ok(())
}

fn capture_snapshot(out: &Path, seed: u64, long: bool) -> Result<(), Failed> {
    fs::create_dir_all(out)?;
    let t = Instant::now();
    let (_raw_f, raw) = loop_file("cw-raw.img", META_BYTES + DATA_BYTES)?;
    let (_log_f, logd) = loop_file("cw-log.img", 1024 * MIB)?;
    dm_create(
        "cw-log",
        &format!(
            "0 {} log-writes {} {}",
            (META_BYTES + DATA_BYTES) / 512,
            majmin(raw.path())?,
            majmin(logd.path())?
        ),
    )?;
    let log_node = guest::sh("dmsetup info -c --noheadings -o major,minor cw-log")?;
    let log_mm = log_node.trim().to_owned();
    let meta_dev = dm_create("cw-meta", &format!("0 {} linear {log_mm} 0", META_BYTES / 512))?;
    let data_dev = dm_create(
        "cw-data",
        &format!("0 {} linear {log_mm} {}", DATA_BYTES / 512, META_BYTES / 512),
    )?;
    mkfs_ext4(&meta_dev)?;
    mkfs_ext4(&data_dev)?;
    let meta_mnt = Path::new("/dev/shm/cw-metadata");
    fs::create_dir_all(meta_mnt)?;
    guest::sh(&format!("mount -t ext4 {} {}", meta_dev.display(), meta_mnt.display()))?;
    let records = Records::open(meta_mnt)?;
    let mnt = PathBuf::from("/dev/shm/cw-data-mnt");
    fs::create_dir_all(&mnt)?;
    let spec = DeviceSpec {
        raw: data_dev.clone(),
        mount_point: mnt.clone(),
        fs_type: Some("ext4".into()),
        mount_options: String::new(),
        instance: backends::instance_for(&mnt),
    };
    let cow = if long { 56 * MIB } else { 32 * MIB };
    let opts = SnapshotOptions { cow_bytes: Some(cow), ..SnapshotOptions::default() };
    let stack = SnapshotStack::new(opts.clone());
    let backend = Arc::new(SnapshotBackend::new(spec.clone(), opts.clone(), records.clone())?);
    let plan = stack.setup(&spec, true)?;
    backends::mount(&plan, &mnt)?;
    mark("cw-log", "populate")?;
    populate_app_data(&mnt, seed)?;
    guest::sh("sync")?;
    // The checkpoint as the daemon drives it, its store on the logged metadata partition:
    // the update client's startCheckpoint, then (the checkpointed boot) the latch, the boot
    // attempt and prepareCheckpoint.
    daemon(meta_mnt, &backend)?.start_checkpoint(STORE_RETRY)?;
    let cp = daemon(meta_mnt, &backend)?;
    ensure(cp.needs_checkpoint()?, "needsCheckpoint after startCheckpoint")?;
    let attempt = cp.mark_boot_attempt()?;
    ensure(
        attempt == MarkOutcome::Decremented { left: STORE_RETRY.unsigned_abs() },
        format!("markBootAttempt: {attempt:?}"),
    )?;
    cp.prepare_checkpoint()?;
    ensure(backend.status()?.state == BackendState::Armed, "prepareCheckpoint arms")?;
    mark("cw-log", "armed")?;
    // The reference: what the snapshot device shows (the checkpoint's image).
    let dm = DeviceMapper::open()?;
    let snap = object_name(Role::Snapshot, &spec.instance)?;
    guest::sh(&format!(
        "cp --sparse=always {} {}",
        dm.node_path(&snap.name).display(),
        out.join("reference.img").display()
    ))?;
    println!("snapshot armed after {:?}; workload", t.elapsed());
    workload(&mnt, "cw-log", seed ^ 1, long, None)?;
    let update_text = format!("update of seed {seed:#x} done\n");
    write_durably(&mnt.join(UPDATE_FILE), update_text.as_bytes())?;
    mark("cw-log", "workload-end")?;
    println!("workload done after {:?}; space {:?}", t.elapsed(), backend.space()?);
    mark("cw-log", "commit-begin")?;
    let committed = cp.commit_changes()?;
    ensure(
        matches!(&committed, CommitOutcome::Committed { committed, .. } if committed.len() == 1),
        format!("commitChanges: {committed:?}"),
    )?;
    guest::sh("sync")?;
    mark("cw-log", "commit-end")?;
    drop(cp);
    // A second checkpoint, rolled back by the kernel's snapshot-merge, logged too: a crash
    // during the kernel's merge leaves the record armed, and the next boot's offline merge
    // must finish the rollback.
    // Through the daemon too: its one boot attempt spends the budget, so the boot after is
    // the rollback boot (needsRollback), whose restoreCheckpoint runs the kernel's merge.
    let kopts = SnapshotOptions { rollback: RollbackMethod::KernelMerge, ..opts };
    let kbackend = Arc::new(SnapshotBackend::new(spec.clone(), kopts, records)?);
    daemon(meta_mnt, &kbackend)?.start_checkpoint(KERNEL_MERGE_RETRY)?;
    let cp = daemon(meta_mnt, &kbackend)?;
    ensure(cp.needs_checkpoint()?, "needsCheckpoint (kernel merge)")?;
    let attempt = cp.mark_boot_attempt()?;
    ensure(attempt == MarkOutcome::BudgetSpent, format!("markBootAttempt: {attempt:?}"))?;
    cp.prepare_checkpoint()?;
    ensure(kbackend.status()?.state == BackendState::Armed, "prepareCheckpoint arms (kernel)")?;
    drop(cp);
    mark("cw-log", "armed-2")?;
    guest::sh(&format!(
        "cp --sparse=always {} {}",
        dm.node_path(&snap.name).display(),
        out.join("reference-kernel-merge.img").display()
    ))?;
    fsx(&mnt, &mut Rng::new(seed ^ 2), if long { 200 } else { 40 })?;
    guest::sh(&format!("sync -f {}", mnt.display()))?;
    blockdev::mount::umount(&mnt, Default::default())?;
    ensure(stack.teardown_stack(&spec)? == Action::Changed, "stack torn down")?;
    // The rollback boot.
    let cp = daemon(meta_mnt, &kbackend)?;
    ensure(!cp.needs_checkpoint()? && cp.needs_rollback()?, "the rollback boot")?;
    mark("cw-log", "kernel-merge-begin")?;
    let raw_path = spec.raw.to_str().ok_or("raw path")?;
    let no_fallback = |d: &str, _: &RestoreRequest, _: &dyn Fn(u64, u64)| {
        Err(policy::BackendError::Unsupported {
            backend: "none".into(),
            reason: format!("the snapshot backend does not cover {d}"),
        })
    };
    let run = cp.restore_device(raw_path, &RestoreRequest::default(), &|_, _| {}, &no_fallback);
    let restored = run.result?;
    ensure(
        matches!(restored.outcome, RestoreOutcome::Restored { .. }),
        format!("kernel merge: {:?}", restored.outcome),
    )?;
    let record = RestoreRecord {
        outcome: restored.outcome,
        duration_ms: run.duration_ms,
        backend: run.backend,
    };
    cp.record_restore(raw_path, record)?;
    guest::sh("sync")?;
    mark("cw-log", "kernel-merge-end")?;
    // The rollback boot completes: the spent checkpoint is acknowledged.
    let ack = cp.commit_changes()?;
    ensure(ack == CommitOutcome::RollbackAcknowledged, format!("commitChanges: {ack:?}"))?;
    drop(cp);
    println!("kernel merge done after {:?}", t.elapsed());
    let _ = stack.teardown_stack(&spec)?;
    guest::sh(&format!("umount {}", meta_mnt.display()))?;
    guest::sh("dmsetup remove --noudevsync cw-data && dmsetup remove --noudevsync cw-meta")?;
    guest::sh("dmsetup remove --noudevsync cw-log")?;
    save_log(Path::new("/dev/shm/cw-log.img"), &out.join("log.bin"))?;
    let case = CaseSpec {
        kind: "snapshot".into(),
        log: "log.bin".into(),
        reference: Some("reference.img".into()),
        kernel_merge_reference: Some("reference-kernel-merge.img".into()),
        meta_bytes: META_BYTES,
        instance: spec.instance.clone(),
        device_bytes: META_BYTES + DATA_BYTES,
        windows: vec![
            ("armed".into(), "workload-end".into(), "rollback".into()),
            ("commit-begin".into(), "commit-end".into(), "commit".into()),
            ("kernel-merge-begin".into(), "kernel-merge-end".into(), "kernel-merge".into()),
        ],
        subsets: if long { 12 } else { 3 },
        seed,
        only: None,
        recovery_every: if long { 5 } else { 25 },
        max_states: 0,
        store: Some(StoreSpec {
            retry: STORE_RETRY,
            kernel_merge_retry: KERNEL_MERGE_RETRY,
            update_file: UPDATE_FILE.into(),
            update_text,
        }),
    };
    fs::write(out.join("case.json"), serde_json::to_string_pretty(&case)?)?;
    raw.detach()?;
    logd.detach()?;
    let _ = fs::remove_file("/dev/shm/cw-log.img");
    let _ = fs::remove_file("/dev/shm/cw-raw.img");
    println!("snapshot capture took {:?}", t.elapsed());
    Ok(())
}

fn capture_bow(out: &Path, seed: u64, long: bool) -> Result<(), Failed> {
    fs::create_dir_all(out)?;
    let t = Instant::now();
    let bow_bytes = bow_bytes(long);
    let (_raw_f, raw) = loop_file("cw-braw.img", bow_bytes)?;
    let (_log_f, logd) = loop_file("cw-blog.img", 512 * MIB)?;
    let dev = dm_create(
        "cw-blog",
        &format!(
            "0 {} log-writes {} {}",
            bow_bytes / 512,
            majmin(raw.path())?,
            majmin(logd.path())?
        ),
    )?;
    mkfs_ext4(&dev)?;
    let mnt = Path::new("/dev/shm/cw-bow-mnt");
    fs::create_dir_all(mnt)?;
    guest::sh(&format!("mount -t ext4 {} {}", dev.display(), mnt.display()))?;
    populate_app_data(mnt, seed)?;
    guest::sh("sync")?;
    // What dm-bow's TRIM state sees: fstrim's discards of the free space.
    mark("cw-blog", "bow-trim")?;
    guest::sh(&format!("fstrim {}", mnt.display()))?;
    // dm-log-writes logs completed writes and discards only at the next flush, while a mark
    // goes in at once: a journal commit (a flush) puts the discards before the mark.
    flush_through_journal(mnt)?;
    mark("cw-blog", "bow-checkpoint")?;
    workload(mnt, "cw-blog", seed ^ 1, long, None)?;
    mark("cw-blog", "bow-end")?;
    guest::sh(&format!("umount {}", mnt.display()))?;
    guest::sh("dmsetup remove --noudevsync cw-blog")?;
    save_log(Path::new("/dev/shm/cw-blog.img"), &out.join("log.bin"))?;
    let case = CaseSpec {
        kind: "bow".into(),
        log: "log.bin".into(),
        reference: None,
        kernel_merge_reference: None,
        meta_bytes: 0,
        instance: String::new(),
        device_bytes: bow_bytes,
        windows: vec![("bow-trim".into(), "bow-end".into(), "rollback".into())],
        subsets: if long { 6 } else { 1 },
        seed,
        only: None,
        recovery_every: if long { 5 } else { 20 },
        max_states: if long { 2000 } else { 200 },
        store: None,
    };
    fs::write(out.join("case.json"), serde_json::to_string_pretty(&case)?)?;
    raw.detach()?;
    logd.detach()?;
    let _ = fs::remove_file("/dev/shm/cw-blog.img");
    let _ = fs::remove_file("/dev/shm/cw-braw.img");
    println!("bow capture took {:?}", t.elapsed());
    Ok(())
}

/// The f2fs backend (`checkpoint=disable`): its recovery is the kernel's own mount, so the
/// crash states are checked here, one mount per state: the app data written and unmounted
/// (a checkpoint on disk), then a checkpointed mount (mark `armed`), the workload, the commit
/// (remount with checkpoint=enable). After a crash in the workload, a plain mount must show
/// exactly the files of checkpoint start; during the commit, exactly those or exactly the
/// new ones; `fsck.f2fs` clean either way. Each state is mounted on a copy of its image
/// (the mount writes).
fn f2fs_capture_and_check(seed: u64, long: bool) -> Result<(), Failed> {
    let t = Instant::now();
    let (_raw_f, raw) = loop_file("cw-fraw.img", F2FS_BYTES)?;
    let (_log_f, logd) = loop_file("cw-flog.img", 768 * MIB)?;
    let dev = dm_create(
        "cw-flog",
        &format!(
            "0 {} log-writes {} {}",
            F2FS_BYTES / 512,
            majmin(raw.path())?,
            majmin(logd.path())?
        ),
    )?;
    guest::sh(&format!("mkfs.f2fs -q -f {}", dev.display()))?;
    let mnt = PathBuf::from("/dev/shm/cw-f2fs-mnt");
    fs::create_dir_all(&mnt)?;
    let spec = DeviceSpec {
        raw: dev.clone(),
        mount_point: mnt.clone(),
        fs_type: Some("f2fs".into()),
        mount_options: String::new(),
        instance: backends::instance_for(&mnt),
    };
    let stack = F2fsStack::new(F2fsOptions::default());
    backends::mount(&stack.setup(&spec, false)?, &mnt)?;
    populate_app_data(&mnt, seed)?;
    let before = manifest(&mnt)?;
    blockdev::mount::umount(&mnt, Default::default())?;
    let used = backends::mount(&stack.setup(&spec, true)?, &mnt)?;
    ensure(used.contains("checkpoint=disable"), format!("checkpointed mount used {used:?}"))?;
    let backend = F2fsBackend::new(spec.clone(), F2fsOptions::default())?;
    mark("cw-flog", "armed")?;
    workload(&mnt, "cw-flog", seed ^ 1, long, Some(&dev))?;
    mark("cw-flog", "workload-end")?;
    let after = manifest(&mnt)?;
    mark("cw-flog", "commit-begin")?;
    ensure(backend.commit()? == Action::Changed, "f2fs commit")?;
    guest::sh("sync")?;
    mark("cw-flog", "commit-end")?;
    blockdev::mount::umount(&mnt, Default::default())?;
    guest::sh("dmsetup remove --noudevsync cw-flog")?;
    raw.detach()?;
    let log_path = Path::new("/dev/shm/cw-flog.img");
    let log = crash::OpLog::load(log_path)?;
    logd.detach()?;
    println!("f2fs capture took {:?}: {} log entries", t.elapsed(), log.ops.len());

    // The states: spread evenly over each window.
    let per_window = if long { [40, 15] } else { [8, 3] };
    let windows = [("armed", "workload-end", false), ("commit-begin", "commit-end", true)];
    let mut picked = Vec::new();
    for ((first, last, commit), want) in windows.iter().zip(per_window) {
        let all = crash::enumerate(&log, log.mark(first)?, log.mark(last)?, 4, seed);
        let step = all.len().div_ceil(want).max(1);
        picked.extend(all.into_iter().step_by(step).map(|s| (s, *commit)));
    }
    let region = crash::Region { offset: 0, len: F2FS_BYTES };
    let image = crash::UndoImage::create(Path::new("/dev/shm/cw-fstate.img"), F2FS_BYTES)?;
    // The mount writes: each state is mounted through a non-persistent dm-snapshot of the
    // image, so its writes go to a scratch COW device and the image stays the crash state.
    let state_file = fs::OpenOptions::new().read(true).write(true).open(&image.path)?;
    let state_lo = LoopDevice::attach(&state_file, &LoopOptions::default())?;
    let (_cow_f, cow_lo) = loop_file("cw-fcow.img", 64 * MIB)?;
    let snap_table = format!(
        "0 {} snapshot {} {} N 8",
        F2FS_BYTES / 512,
        majmin(state_lo.path())?,
        majmin(cow_lo.path())?
    );
    let check_mnt = Path::new("/dev/shm/cw-f2fs-check");
    fs::create_dir_all(check_mnt)?;
    let mut applied = 0usize;
    let mut failures = Vec::new();
    let mut checked = 0usize;
    for (st, commit) in &picked {
        let t_state = Instant::now();
        while applied <= st.point {
            crash::apply_op(&log, &log.ops[applied], &[(&region, &image)])?;
            applied += 1;
        }
        image.forget_undo();
        let mark_undo = image.mark();
        for &i in &st.extra {
            crash::apply_op(&log, &log.ops[i], &[(&region, &image)])?;
        }
        let what = format!("f2fs state at entry {} + {} later writes", st.point, st.extra.len());
        let node = dm_create("cw-fcheck", &snap_table)?;
        let result = (|| -> Result<(), Failed> {
            guest::sh(&format!("mount -t f2fs {} {}", node.display(), check_mnt.display()))?;
            let got = manifest(check_mnt);
            guest::sh(&format!("umount {}", check_mnt.display()))?;
            let got = got?;
            let old = compare_manifests(&before, &got);
            if *commit {
                if old.is_err() && compare_manifests(&after, &got).is_err() {
                    return Err(
                        "neither the old nor the new files after a crash in the commit".into()
                    );
                }
            } else {
                old.map_err(|e| format!("not the files of checkpoint start: {e:?}"))?;
            }
            Fs::F2fs.fsck(&node)?;
            Ok(())
        })();
        guest::sh("dmsetup remove --noudevsync cw-fcheck")?;
        image.undo_to(mark_undo)?;
        checked += 1;
        println!("{what}: checked in {:?}", t_state.elapsed());
        if let Err(e) = result {
            println!("FAILURE {what}: {e:?}");
            failures.push(what);
        }
    }
    state_lo.detach()?;
    cow_lo.detach()?;
    let _ = fs::remove_file("/dev/shm/cw-fcow.img");
    let _ = fs::remove_file(log_path);
    let _ = fs::remove_file(&image.path);
    println!("f2fs crash checks took {:?} in all", t.elapsed());
    ensure(
        failures.is_empty(),
        format!("{} f2fs crash states failed: {failures:?}", failures.len()),
    )?;
    println!("f2fs crash states checked in the guest: {checked}");
    Ok(())
}
