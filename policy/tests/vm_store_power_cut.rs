//! The store on a real (virtual) disk survives a power cut in the middle of a burst of
//! `markBootAttempt` calls: it opens cleanly (integrity check), every acknowledged call is
//! durable, and the checkpoint row and the history agree (one transaction per call). The boot
//! control record written in the same burst still parses.
//!
//! Needs the virtual device (`cargo xtask test`, or `TESTBENCH_VM=1 cargo test -p policy --test
//! vm_store_power_cut`); without it the trial is reported as ignored by the harness.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use policy::{
    BootControl, Budget, Checkpointer, FileBootControl, HistoryKind, MarkOutcome, NoBootControl,
    PolicyOptions, Store,
};
use testbench::vm::Vm;
use testbench::{guest, paths, vm_trial, Failed};

/// Budget requested before the burst (retry = BUDGET - 1).
const BUDGET: u32 = 1_000_000;
const MOUNT: &str = "/dev/shm/meta";
/// How long the burst runs before the power is cut.
const BURST: Duration = Duration::from_millis(2500);

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("power_cut_during_mark_burst_keeps_the_store_intact", host_power_cut)],
        &[("mark_burst_then_cut", guest_mark_burst_then_cut), ("check_store", guest_check_store)],
    )
}

fn scratch_dir() -> Result<PathBuf, Failed> {
    let dir = paths::target_dir().join("testbench").join("scratch");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The value after `key=` on the last line starting with `prefix`.
fn last_value(output: &str, prefix: &str, key: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix(key)))
        .find_map(|v| v.parse().ok())
}

fn host_power_cut() -> Result<(), Failed> {
    let dir = tempfile::Builder::new().prefix("policy-cut").tempdir_in(scratch_dir()?)?;
    let image = dir.path().join("meta.img");
    File::create(&image)?.set_len(64 << 20)?;
    let vm = Vm::new("policy_store_power_cut").disk(&image).timeout(Duration::from_secs(400));

    let run = vm.run_self("mark_burst_then_cut", &[])?;
    run.expect_power_cut()?;
    let acked = run.output.lines().filter(|l| l.starts_with("acked ")).count();
    let Some(last_left) = last_value(&run.output, "acked ", "left=") else {
        return Err(format!("no markBootAttempt was acknowledged:\n{}", run.output).into());
    };
    if acked < 3 {
        return Err(format!("the burst was too short ({acked} calls):\n{}", run.output).into());
    }
    print!(
        "{}",
        run.output.lines().filter(|l| !l.starts_with("acked ")).collect::<Vec<_>>().join("\n")
    );
    println!("\n{acked} markBootAttempt calls acknowledged before the cut, last left={last_left}");

    let check = vm.run_self("check_store", &[])?;
    check.expect_success()?;
    let get = |key: &str| {
        last_value(&check.output, "store ", key)
            .ok_or_else(|| format!("check printed no {key}:\n{}", check.output))
    };
    let (left, used, history) = (get("left=")?, get("used=")?, get("history=")?);
    println!("after the cut: left={left} used={used} history={history}");
    if left > last_left {
        return Err(
            format!("an acknowledged call was lost: left={left} > acked {last_left}").into()
        );
    }
    if left + used != u64::from(BUDGET) || history != used {
        return Err(format!(
            "row and history disagree: left={left} used={used} history={history} budget={BUDGET}"
        )
        .into());
    }
    Ok(())
}

fn open_policy(meta: &Path) -> Result<Checkpointer, Failed> {
    let store = Store::open(&meta.join("checkpointd"))?;
    Ok(Checkpointer::new(store, Box::new(NoBootControl), Vec::new(), PolicyOptions::default())?)
}

fn guest_mark_burst_then_cut(_: &[String]) -> Result<(), Failed> {
    let disk = guest::disk(0);
    guest::sh(&format!("mkfs.ext4 -q -F {} && mkdir -p {MOUNT}", disk.display()))?;
    guest::sh(&format!("mount -t ext4 {} {MOUNT}", disk.display()))?;
    let meta = Path::new(MOUNT);
    let bootctl = FileBootControl::create(&meta.join("bootctl"), 2)?;
    // A backend is needed to start a checkpoint; this test is about the store, so open the
    // store once with a stand-in that only supports checkpoints, then mark without it.
    {
        let store = Store::open(&meta.join("checkpointd"))?;
        let cp = Checkpointer::new(
            store,
            Box::new(NoBootControl),
            vec![Box::new(stand_in::Nothing)],
            PolicyOptions::default(),
        )?;
        cp.start_checkpoint(i32::try_from(BUDGET - 1)?)?;
    }
    let cp = open_policy(meta)?;
    let calls = Arc::new(AtomicU32::new(0));
    // The power is cut from another thread, at whatever point the burst has reached (most
    // likely inside a transaction or an fsync). Nothing is closed or synced.
    let counter = Arc::clone(&calls);
    std::thread::spawn(move || {
        std::thread::sleep(BURST);
        let n = counter.load(Ordering::SeqCst);
        let per_call = BURST / n.max(1);
        println!("timing calls={n} per_call_us={}", per_call.as_micros());
        guest::power_cut()
    });
    println!("burst started");
    let mut slot = 0;
    loop {
        match cp.mark_boot_attempt()? {
            MarkOutcome::Decremented { left } => println!("acked left={left}"),
            other => return Err(format!("unexpected {other:?}").into()),
        }
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n % 8 == 0 {
            slot = 1 - slot;
            bootctl.set_active_boot_slot(slot)?;
        }
    }
}

fn guest_check_store(_: &[String]) -> Result<(), Failed> {
    let disk = guest::disk(0);
    guest::sh(&format!("mkdir -p {MOUNT} && mount -t ext4 {} {MOUNT}", disk.display()))?;
    let meta = Path::new(MOUNT);
    let record = FileBootControl::open(&meta.join("bootctl"))?.record()?;
    println!("bootctl ok: {} slots, current {}", record.slots.len(), record.current);
    let cp = open_policy(meta)?;
    let status = cp.status()?;
    let Some(Budget::Attempts(left)) = status.budget else {
        return Err(format!("unexpected budget {:?}", status.budget).into());
    };
    let history =
        cp.history(usize::MAX)?.into_iter().filter(|e| e.kind == HistoryKind::BootAttempt).count();
    println!("store left={left} used={} history={history}", status.attempts_used);
    Ok(())
}

mod stand_in {
    use policy::{
        Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    };

    /// A backend that does nothing: lets the test request a checkpoint.
    #[derive(Debug)]
    pub struct Nothing;

    impl Backend for Nothing {
        fn kind(&self) -> BackendKind {
            BackendKind::File
        }
        fn name(&self) -> &str {
            "nothing"
        }
        fn prepare(&self) -> Result<Action, BackendError> {
            Ok(Action::Changed)
        }
        fn commit(&self) -> Result<Action, BackendError> {
            Ok(Action::Changed)
        }
        fn space(&self) -> Result<BackupSpace, BackendError> {
            Ok(BackupSpace::default())
        }
        fn status(&self) -> Result<BackendStatus, BackendError> {
            Ok(BackendStatus {
                state: BackendState::Idle,
                backup_used_bytes: None,
                free_bytes: None,
                devices: Vec::new(),
            })
        }
    }
}
