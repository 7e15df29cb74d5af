//! The HAL client against the fake HAL over KERNEL binder in the virtual device: rsb_hub as the
//! service manager, the fake in its own process (this binary's `fake_hal` guest entry, serving
//! a healthy instance and a faulty one), the client in the test process. One boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bootctl_hal::fake::{FakeBootControl, FakeState, Fault, Method};
use bootctl_hal::{BootHal, HalBootControl, HalError, COMMAND_FAILED, HASH, INSTANCE};
use policy::{BootControl, BootControlError, Checkpointer, PolicyOptions};
use testbench::guest::{self, HubPolicy};
use testbench::vm::Vm;
use testbench::{vm_trial, Failed};

/// The faulty instance: `isSlotMarkedSuccessful` and `markBootSuccessful` fail with
/// `COMMAND_FAILED`.
const FAULTY: &str = "android.hardware.boot.IBootControl/faulty";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("hal_client_against_fake_hal_on_kernel_binder", host_kernel_binder)],
        &[("kernel_binder", guest_kernel_binder), ("fake_hal", guest_fake_hal)],
    )
}

fn host_kernel_binder() -> Result<(), Failed> {
    let run = Vm::new("bootctl_hal_kernel_binder")
        .modules(&["binder_linux devices=binder,hwbinder"])
        .timeout(Duration::from_secs(240))
        .run_self("kernel_binder", &[])?;
    run.expect_success()?;
    println!(
        "{}",
        run.output.lines().filter(|l| l.starts_with("measured")).collect::<Vec<_>>().join("\n")
    );
    for want in ["remote proxy", "faults typed", "policy commit marked the slot", "dead HAL typed"]
    {
        if !run.output.contains(want) {
            return Err(format!("guest output lacks {want:?}:\n{}", run.output).into());
        }
    }
    Ok(())
}

// ---- guest side ----

/// Processes this entry started; killed (by their own pid) when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_file(name: &str) -> Result<fs::File, Failed> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(guest::shared_dir().join(name))?)
}

fn log_text(name: &str) -> String {
    fs::read_to_string(guest::shared_dir().join(name)).unwrap_or_default()
}

fn check(ok: bool, what: &str) -> Result<(), Failed> {
    if ok {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// The `HalError` inside a `BootControlError::Hal`.
fn hal_error(error: &BootControlError) -> Result<&HalError, Failed> {
    match error {
        BootControlError::Hal(source) => {
            source.downcast_ref::<HalError>().ok_or_else(|| "Hal without a HalError".into())
        }
        other => Err(format!("expected BootControlError::Hal, got {other:?}").into()),
    }
}

fn guest_kernel_binder(_: &[String]) -> Result<(), Failed> {
    let mut children = Children(Vec::new());
    children.0.push(guest::start_rsb_hub(HubPolicy::AllowAll, log_file("rsb_hub.log")?)?);

    // Looking up an instance nobody serves ends after the bounded wait.
    let start = Instant::now();
    match BootHal::connect(INSTANCE, Duration::from_millis(300)) {
        Err(HalError::NotRegistered { waited, .. }) => {
            check(waited >= Duration::from_millis(300), "waited less than the timeout")?;
            println!("measured: a missing HAL is reported after {:?}", start.elapsed());
        }
        other => return Err(format!("expected NotRegistered, got {other:?}").into()),
    }

    let ready = guest::shared_dir().join("fake_hal.ready");
    children.0.push(spawn_fake(&ready)?);

    // The client waits for the registration itself (the fake may not be up yet).
    let start = Instant::now();
    let boot = HalBootControl::connect(CONNECT_TIMEOUT)
        .map_err(|e| format!("{e}\nfake_hal.log:\n{}", log_text("fake_hal.log")))?;
    println!("measured: HAL found after {:?}", start.elapsed());
    check(boot.hal().binder().as_binder().is_remote(), "the HAL is not a remote proxy")?;
    println!("remote proxy from {}", boot.hal().origin());
    // The client may find the default instance before the fake has registered its second one
    // and written the file (one guest CPU makes that common): wait for it before the faulty
    // instance is used below.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while !ready.exists() {
        check(Instant::now() < deadline, "the fake never registered both instances")?;
        std::thread::sleep(Duration::from_millis(20));
    }

    // Slots, suffixes, successful bits: the fake starts as the first boot of updated slot _b.
    check(boot.slot_count()? == 2, "slot count")?;
    check(boot.current_slot()? == 1, "current slot")?;
    check(boot.slot_suffix(0)? == "_a" && boot.slot_suffix(1)? == "_b", "suffixes")?;
    check(boot.is_slot_marked_successful(0)?, "slot _a successful")?;
    check(!boot.is_slot_marked_successful(1)?, "slot _b not yet successful")?;
    check(boot.hal().interface_version()? == 1, "interface version 1")?;
    check(boot.hal().interface_hash()? == HASH, "interface hash")?;
    match boot.slot_suffix(5) {
        Err(BootControlError::InvalidSlot { slot: 5, count: 2 }) => {}
        other => return Err(format!("expected InvalidSlot, got {other:?}").into()),
    }

    // Round trips.
    let calls = 500u32;
    let start = Instant::now();
    for _ in 0..calls {
        boot.is_slot_marked_successful(1)?;
    }
    println!(
        "measured: isSlotMarkedSuccessful mean {:?} over {calls} calls",
        start.elapsed() / calls
    );

    // The policy on the HAL: implicit A/B checkpoint, commit marks the slot.
    let store_dir = Path::new("/dev/shm/bootctl-store");
    let cp = Checkpointer::new(
        policy::Store::open(store_dir)?,
        Box::new(boot),
        Vec::new(),
        PolicyOptions::default(),
    )?;
    check(cp.needs_checkpoint()?, "an unsuccessful slot must be checkpointed")?;
    cp.commit_changes()?;
    let boot = HalBootControl::connect(CONNECT_TIMEOUT)?;
    check(boot.is_slot_marked_successful(1)?, "commit must mark slot _b successful")?;
    println!("policy commit marked the slot");

    // setActiveBootSlot.
    check(boot.hal().active_boot_slot()? == 1, "active slot before")?;
    boot.set_active_boot_slot(0)?;
    check(boot.hal().active_boot_slot()? == 0, "active slot after")?;
    check(!boot.is_slot_marked_successful(0)?, "a newly active slot is not successful")?;
    boot.set_active_boot_slot(1)?;

    // Fault injection: typed errors, nothing changed, and vold's rule in the policy.
    let faulty = HalBootControl::new(BootHal::connect(FAULTY, CONNECT_TIMEOUT)?);
    let error = faulty.is_slot_marked_successful(1).unwrap_err();
    check(
        hal_error(&error)?.service_specific_code() == Some(COMMAND_FAILED),
        "isSlotMarkedSuccessful fault code",
    )?;
    let error = faulty.mark_boot_successful().unwrap_err();
    match hal_error(&error)? {
        HalError::ServiceSpecific {
            method: "markBootSuccessful", code: COMMAND_FAILED, ..
        } => {}
        other => return Err(format!("unexpected markBootSuccessful error {other:?}").into()),
    }
    check(faulty.hal().slot_bootable(1)?, "the faulty instance still answers other calls")?;
    let cp = Checkpointer::new(
        policy::Store::open(&store_dir.join("faulty"))?,
        Box::new(faulty),
        Vec::new(),
        PolicyOptions::default(),
    )?;
    check(!cp.needs_checkpoint()?, "vold: an isSlotMarkedSuccessful error counts as successful")?;
    println!("faults typed: {error}");

    // A HAL that dies: the next call is a transport error, not a HAL answer.
    let no_reconnect = HalBootControl::new(BootHal::connect(INSTANCE, CONNECT_TIMEOUT)?);
    let fake = children.0.last_mut().expect("the fake process");
    fake.kill()?;
    fake.wait()?;
    match no_reconnect.current_slot() {
        Err(error) => {
            let hal = hal_error(&error)?;
            check(matches!(hal, HalError::Transport { .. }), "a dead HAL is a transport error")?;
            println!("dead HAL typed: {error}");
        }
        Ok(slot) => return Err(format!("a dead HAL answered slot {slot}").into()),
    }

    // The HAL restarts: a client from `connect` looks it up again and retries the call.
    let ready = guest::shared_dir().join("fake_hal.ready.2");
    children.0.push(spawn_fake(&ready)?);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while !ready.exists() {
        check(Instant::now() < deadline, "the restarted fake never got ready")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    check(!boot.is_slot_marked_successful(1)?, "the new HAL process has fresh state")?;
    check(boot.hal().binder().as_binder().is_remote(), "still a remote proxy")?;
    println!("reconnected after HAL restart");
    Ok(())
}

/// Starts this binary's `fake_hal` entry as a process of its own.
fn spawn_fake(ready: &Path) -> Result<Child, Failed> {
    Ok(Command::new(std::env::current_exe()?)
        .args(["--guest", "fake_hal"])
        .arg(ready)
        .stdin(Stdio::null())
        .stdout(log_file("fake_hal.log")?)
        .stderr(log_file("fake_hal.log")?)
        .spawn()?)
}

/// The fake HAL process: the default instance (first boot of updated slot _b) and a faulty one;
/// writes `args[0]` once both are registered, then serves until killed.
fn guest_fake_hal(args: &[String]) -> Result<(), Failed> {
    let ready = PathBuf::from(args.first().ok_or("fake_hal needs the ready-file path")?);
    let healthy = FakeBootControl::new(FakeState::after_update(2, 1));
    let faulty = FakeBootControl::new(FakeState::after_update(2, 1));
    faulty.inject(Method::IsSlotMarkedSuccessful, Fault::COMMAND_FAILED);
    faulty.inject(Method::MarkBootSuccessful, Fault::COMMAND_FAILED);
    bootctl_hal::fake::serve_kernel_until_killed(
        &[(INSTANCE, &healthy), (FAULTY, &faulty)],
        &ready,
    )?;
    Ok(())
}
