//! checkpointd as a process, driven over its binder RPC Unix socket by checkpointctl (exit
//! codes!) and by a Rust client. No kernel binder needed: these run on any Linux host.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint_aidl::android::system::checkpoint::ICheckpoint as codes;
use checkpoint_aidl::android::system::checkpoint::{
    CheckpointState::CheckpointState, HistoryEventKind::HistoryEventKind,
};
use rsbinder::ExceptionCode;
use testbench::daemon::{checkpointctl, event_listener, require_root, Setup, NOBODY, TEST_BACKEND};

#[test]
fn without_backend_it_answers_like_vold_without_checkpoint_support() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["supportsCheckpoint"]).0, 0);
    assert_eq!(setup.vdc(&["supportsBlockCheckpoint"]).0, 0);
    assert_eq!(setup.vdc(&["supportsFileCheckpoint"]).0, 0);
    let (code, err) = setup.vdc(&["startCheckpoint", "2"]);
    assert_eq!(code, 25, "{err}");
    assert!(err.contains("Checkpoints not supported"), "{err}");
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 0);
    assert_eq!(setup.vdc(&["needsRollback"]).0, 0);
    assert_eq!(setup.vdc(&["markBootAttempt"]).0, 0);
    assert_eq!(setup.vdc(&["commitChanges"]).0, 0);
    assert_eq!(setup.vdc(&["prepareCheckpoint"]).0, 0);
    assert_eq!(setup.vdc(&["resetCheckpoint"]).0, 0);

    // The Rust client sees the documented code.
    let service = setup.client().expect("client");
    let err = service.startCheckpoint(2).unwrap_err();
    assert_eq!(err.exception_code(), ExceptionCode::ServiceSpecific);
    assert_eq!(err.service_specific_error(), codes::ENOTSUP);
    let status = service.getStatus().expect("status");
    assert_eq!(status.state, CheckpointState::NONE);
    assert!(status.backends.is_empty());
    daemon.stop();
}

#[test]
fn three_boot_attempts_then_rollback_across_daemon_restarts() {
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["supportsCheckpoint"]).0, 1);
    assert_eq!(setup.vdc(&["supportsBlockCheckpoint"]).0, 1);
    assert_eq!(setup.vdc(&["startCheckpoint", "2"]), (0, String::new()));
    let status = setup.ctl_json(&["status", "--json"]);
    assert_eq!(status["state"], "pending");
    assert_eq!(status["budget"], 3);
    daemon.stop();

    // Each restart of the daemon is a boot: mark the attempt, ask whether to checkpoint.
    for boot in 1..=3 {
        let daemon = setup.boot();
        assert_eq!(setup.vdc(&["needsRollback"]).0, 0, "boot {boot}: no rollback yet");
        assert_eq!(setup.vdc(&["markBootAttempt"]).0, 0, "boot {boot}");
        let (needs, _) = setup.vdc(&["needsCheckpoint"]);
        let status = setup.ctl_json(&["status", "--json"]);
        if boot < 3 {
            assert_eq!(needs, 1, "boot {boot} runs under the checkpoint");
            assert_eq!(status["attempts_left"], 3 - boot, "boot {boot}: {status}");
        } else {
            // The third attempt spends the budget: this boot must roll back.
            assert_eq!(setup.vdc(&["needsRollback"]).0, 1, "boot {boot}: {status}");
        }
        daemon.stop();
    }

    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["needsRollback"]).0, 1, "still rolling back after the budget");
    let status = setup.ctl_json(&["status", "--json"]);
    assert_eq!(status["state"], "rollback-needed", "{status}");
    assert_eq!(status["needs_rollback"], true);

    // History over the Rust client: the start and three boot attempts, newest first.
    let service = setup.client().expect("client");
    let history = service.getHistory(0).expect("history");
    let boots = history.iter().filter(|e| e.kind == HistoryEventKind::BOOT_ATTEMPT).count();
    assert_eq!(boots, 3, "{history:?}");
    assert_eq!(history.last().map(|e| e.kind), Some(HistoryEventKind::CHECKPOINT_STARTED));
    let out = setup.ctl(&["history"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("boot-attempt"));
    daemon.stop();
}

#[test]
fn commit_ends_the_checkpoint() {
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["startCheckpoint", "1"]).0, 0);
    daemon.stop();
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["markBootAttempt"]).0, 0);
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 1);
    assert_eq!(setup.vdc(&["prepareCheckpoint"]).0, 0);
    assert_eq!(setup.ctl_json(&["status", "--json"])["state"], "checkpointing");
    assert_eq!(setup.vdc(&["commitChanges"]).0, 0);
    // The latch answers false after a commit; nothing is pending any more.
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 0);
    assert_eq!(setup.ctl_json(&["status", "--json"])["state"], "none");
    daemon.stop();
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 0);
    assert_eq!(setup.vdc(&["needsRollback"]).0, 0);
    daemon.stop();
}

#[test]
fn abort_runs_the_reboot_command_with_the_message() {
    let setup = Setup::new("");
    let marker = setup.dir.path().join("rebooted");
    let config = format!(
        "[reboot]\naction = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \
         \"echo {{reason}} > {}\"]\n",
        marker.display()
    );
    let setup = Setup { dir: setup.dir };
    let base = std::fs::read_to_string(setup.config()).expect("config");
    std::fs::write(setup.config(), format!("{base}{TEST_BACKEND}{config}")).expect("config");

    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["startCheckpoint", "2"]).0, 0);
    daemon.stop();
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["markBootAttempt"]).0, 0);
    // Message first, retry second (vdc's argument bug fixed).
    assert_eq!(setup.vdc(&["abortChanges", "abort-staged-install", "0"]).0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the reboot command did not run");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let written = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(written.trim(), "abort-staged-install");
    // Without retry the budget is spent: the next boot rolls back.
    assert_eq!(setup.vdc(&["needsRollback"]).0, 1);
    daemon.stop();
}

#[test]
fn bad_input_is_refused_with_clear_errors_and_no_state_change() {
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    let before = setup.ctl_json(&["status", "--json"]);

    let (code, err) = setup.vdc(&["startCheckpoint", "-2"]);
    assert_eq!(code, 25, "{err}");
    assert!(err.contains("Retry count must be more than -1"), "{err}");

    for (path, message) in [
        ("dev/vdb", "is relative"),
        ("/dev/../etc/passwd", "is shady"),
        ("/dev/block/..", "is shady"),
        ("", "Missing path"),
    ] {
        let (code, err) = setup.vdc(&["restoreCheckpoint", path]);
        assert_eq!(code, 25, "{path}: {err}");
        assert!(err.contains(message), "{path}: {err}");
    }
    let service = setup.client().expect("client");
    let err = service.restoreCheckpoint("/dev/x\n").unwrap_err();
    assert_eq!(err.exception_code(), ExceptionCode::IllegalArgument);
    assert_eq!(err.message(), Some("Path /dev/x\n is malformed"));
    let err = service.restoreCheckpointPart("/dev/x", -1).unwrap_err();
    assert_eq!(err.service_specific_error(), codes::EINVAL);

    // Unknown and ill-sized commands, bad integers: vdc's exit codes, nothing sent.
    for args in
        [&["isCheckpointing"][..], &["frobnicate"], &["startCheckpoint"], &["startCheckpoint", "x"]]
    {
        let (code, _) = setup.vdc(args);
        assert_eq!(code, 22, "{args:?}");
    }
    let (code, err) = setup.vdc(&["frobnicate"]);
    assert_eq!(code, 22);
    assert!(err.contains("Raw commands are no longer supported"), "{err}");
    assert_eq!(setup.vdc(&[]).0, 5);

    let after = setup.ctl_json(&["status", "--json"]);
    assert_eq!(before, after, "bad input changed the state");
    let history = service.getHistory(0).expect("history");
    assert!(history.iter().all(|e| e.kind != HistoryEventKind::CHECKPOINT_STARTED), "{history:?}");
    daemon.stop();
}

#[test]
fn callers_outside_the_allowed_uids_may_query_but_not_change_state() {
    // Root itself excluded from the change list: the check is on the peer credentials.
    let setup = Setup::new(&format!("{TEST_BACKEND}[access]\nchange_uids = [1000]\n"));
    let daemon = setup.boot();
    assert_eq!(setup.vdc(&["supportsCheckpoint"]).0, 1, "queries are allowed");
    assert_eq!(setup.vdc(&["needsRollback"]).0, 0);
    let (code, err) = setup.vdc(&["startCheckpoint", "2"]);
    assert_eq!(code, 25);
    assert!(err.contains("is not allowed to call startCheckpoint"), "{err}");
    let service = setup.client().expect("client");
    let err = service.markBootAttempt().unwrap_err();
    assert_eq!(err.exception_code(), ExceptionCode::Security);
    assert_eq!(setup.ctl_json(&["status", "--json"])["state"], "none");
    daemon.stop();
}

#[test]
fn an_unprivileged_uid_is_refused_state_changes() {
    require_root("this test switches the client to another UID");
    // The setup's folder lets the other UID reach the socket.
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    let as_nobody = |args: &[&str]| {
        let (code, _, stderr) = setup.ctl_as(NOBODY, args);
        (code, stderr)
    };
    assert_eq!(as_nobody(&["checkpoint", "supportsCheckpoint"]).0, 1);
    assert_eq!(as_nobody(&["checkpoint", "needsRollback"]).0, 0);
    assert_eq!(as_nobody(&["status"]).0, 0);
    for method in [
        &["startCheckpoint", "2"][..],
        &["markBootAttempt"],
        &["commitChanges"],
        &["needsCheckpoint"],
    ] {
        let mut args = vec!["checkpoint"];
        args.extend_from_slice(method);
        let (code, err) = as_nobody(&args);
        assert_eq!(code, 25, "{method:?}: {err}");
        assert!(err.contains("UID 65534 is not allowed"), "{method:?}: {err}");
    }
    assert_eq!(setup.ctl_json(&["status", "--json"])["state"], "none");
    // Root (allowed by default) still can.
    assert_eq!(setup.vdc(&["startCheckpoint", "2"]).0, 0);
    daemon.stop();
}

#[test]
fn garbage_config_is_refused_naming_the_key() {
    let setup = Setup::new("");
    std::fs::write(setup.config(), "metadata_dir = \"/tmp/x\"\n[policy]\ndefault_rety = 3\n")
        .expect("config");
    let err = setup.start_fails();
    assert!(err.contains("default_rety"), "{err}");
    std::fs::write(setup.config(), "[policy]\ndefault_retry = -7\n[binder]\nenabled = false\n")
        .expect("config");
    let err = setup.start_fails();
    assert!(err.contains("`policy.default_retry`"), "{err}");
    std::fs::write(setup.config(), "this is not toml").expect("config");
    let err = setup.start_fails();
    assert!(err.contains("invalid config file"), "{err}");
}

#[test]
fn corrupt_store_is_refused_and_left_untouched() {
    let setup = Setup::new(TEST_BACKEND);
    std::fs::create_dir_all(setup.metadata()).expect("mkdir");
    let db = setup.metadata().join(policy::Store::FILE_NAME);
    let garbage =
        b"this is not an SQLite database, it is garbage left by a broken write".repeat(100);
    std::fs::write(&db, &garbage).expect("write garbage");
    let err = setup.start_fails();
    assert!(err.contains("corrupt"), "{err}");
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&db).expect("db"), garbage, "the store was modified");
}

#[test]
fn store_from_a_future_schema_is_refused() {
    let setup = Setup::new(TEST_BACKEND);
    // A first run creates a valid store; then a "newer checkpointd" bumps its schema.
    setup.boot().stop();
    let db = setup.metadata().join(policy::Store::FILE_NAME);
    {
        let conn = rusqlite::Connection::open(&db).expect("open store");
        conn.pragma_update(None, "user_version", policy::SCHEMA_VERSION + 1).expect("bump");
    }
    let err = setup.start_fails();
    assert!(err.contains("newer than"), "{err}");
    assert!(err.contains(&format!("schema version {}", policy::SCHEMA_VERSION + 1)), "{err}");
}

#[test]
fn listeners_hear_state_changes_over_the_socket() {
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    let (client, service) = setup.callback_client();
    let (listener, rx) = event_listener();
    service.registerListener(&listener).expect("register");
    service.startCheckpoint(2).expect("start");
    let event = rx.recv_timeout(Duration::from_secs(10)).expect("an event within 10 s");
    assert_eq!(event, format!("state {}", CheckpointState::PENDING.0));
    if let Some(session) = client.session() {
        session.close_session();
    }
    daemon.stop();
}

/// Blocks 0..USED of the test image hold data; the rest was free at checkpoint start (dm-bow
/// keeps its backups there, so after a restore only the used blocks must be bit-exact).
const USED_BYTES: usize = 128 * 4096;

/// An image file with a real dm-bow log (bow's log writer). Returns the original contents.
fn image_with_log(path: &Path) -> Vec<u8> {
    use bow::device::{BlockDevice, FileDevice};
    const BS: usize = 4096;
    let original: Vec<u8> =
        (0..256 * BS).map(|i| u8::try_from((i / BS * 7 + i % 251) % 256).unwrap_or(0)).collect();
    std::fs::write(path, &original).expect("write image");
    let dev = FileDevice::open(path).expect("open image");
    let bs = bow::units::BlockSize::new(4096).expect("block size");
    let free: Vec<u64> = (128..256).collect();
    let mut log = bow::restore::synth::LogWriter::start(&dev, bs, &free).expect("start log");
    log.write(0, &[0xee; BS]).expect("write block 0");
    log.write(3, &[0x33; 2 * BS]).expect("write blocks 3-4");
    log.write(10, &[0x10; BS]).expect("write block 10");
    dev.flush().expect("flush");
    assert_ne!(std::fs::read(path).expect("image"), original, "the writes changed the image");
    original
}

#[test]
fn restore_checkpoint_restores_an_image_and_records_it() {
    let setup = Setup::new(TEST_BACKEND);
    let image = setup.dir.path().join("userdata.img");
    let original = image_with_log(&image);
    let daemon = setup.boot();
    let image_arg = image.to_str().expect("utf-8 path");

    // A partial restore stops at its limit with vold's EAGAIN, and can be resumed.
    let service = setup.client().expect("client");
    let err = service.restoreCheckpointPart(image_arg, 1).unwrap_err();
    assert_eq!(err.service_specific_error(), codes::EAGAIN, "{err}");
    assert_eq!(err.message(), Some("Hit the test limit"));

    assert_eq!(setup.vdc(&["restoreCheckpoint", image_arg]), (0, String::new()));
    let restored = std::fs::read(&image).expect("image");
    let first_difference = (0..USED_BYTES).find(|&i| restored[i] != original[i]);
    assert_eq!(first_difference, None, "the used blocks are not restored bit-exact");

    // Nothing left to restore: vold's "No magic".
    let (code, err) = setup.vdc(&["restoreCheckpoint", image_arg]);
    assert_eq!(code, 25);
    assert!(err.contains("No magic"), "{err}");

    let status = setup.ctl_json(&["status", "--json"]);
    assert_eq!(status["last_restore"]["kind"], "restore", "{status}");
    assert_eq!(status["last_restore"]["device"], image_arg, "{status}");
    let history = service.getHistory(0).expect("history");
    let outcomes: Vec<&str> = history
        .iter()
        .filter(|e| e.kind == HistoryEventKind::RESTORED)
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(outcomes.len(), 3, "{history:?}");
    assert!(outcomes.contains(&"restored"), "{outcomes:?}");
    daemon.stop();
}

#[test]
fn boot_control_hal_marks_the_slot_on_commit() {
    use bootctl_hal::fake::{FakeBootControl, FakeState};
    let setup = Setup::new("");
    // The first boot of freshly updated slot _b: not yet marked successful.
    let hal = FakeBootControl::new(FakeState::after_update(2, 1));
    let hal_socket = setup.dir.path().join("bootctl.sock");
    let _hal_server = hal.serve_socket(&hal_socket).expect("serve the fake HAL");
    let base = std::fs::read_to_string(setup.config()).expect("config");
    std::fs::write(
        setup.config(),
        format!(
            "{base}{TEST_BACKEND}[boot_control]\ntype = \"hal\"\nwait_secs = 5\n\
             hal_uri = \"unix://{}?profile=android13plus#{}\"\n",
            hal_socket.display(),
            bootctl_hal::INSTANCE
        ),
    )
    .expect("config");
    let daemon = setup.boot();
    // vold's implicit A/B checkpoint: an unmarked slot is checkpointed without startCheckpoint.
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 1);
    let status = setup.ctl_json(&["status", "--json"]);
    assert_eq!(status["current_slot_suffix"], "_b", "{status}");
    assert_eq!(status["state"], "checkpointing", "{status}");
    assert!(!hal.state().slots[1].successful);
    assert_eq!(setup.vdc(&["commitChanges"]).0, 0);
    assert!(hal.state().slots[1].successful, "commit marks the slot successful first");
    assert_eq!(setup.vdc(&["needsCheckpoint"]).0, 0);
    daemon.stop();
}

#[test]
fn checkpointctl_watch_prints_listener_events() {
    use std::io::BufRead;
    let setup = Setup::new(TEST_BACKEND);
    let daemon = setup.boot();
    let mut watch = Command::new(checkpointctl())
        .arg("--socket")
        .arg(setup.socket())
        .args(["watch", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run checkpointctl watch");
    // "watching ..." is printed once the listener is registered.
    let mut stderr = std::io::BufReader::new(watch.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read stderr");
    assert!(line.starts_with("watching"), "{line}");
    assert_eq!(setup.vdc(&["startCheckpoint", "2"]).0, 0);
    // A watchdog, so a lost event fails the test instead of hanging it.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(watch.id()).expect("pid"));
    let exited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog_exited = std::sync::Arc::clone(&exited);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        if !watchdog_exited.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let out = watch.wait_with_output().expect("watch exits after one event");
    exited.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "state pending");
    daemon.stop();
}
