//! The update-client library and the example updater against checkpointd on its socket: the
//! flows of docs/update-client.md, each daemon run one "boot".

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use checkpoint_client::{
    BootState, CheckpointClient, CheckpointState, CommitWait, Connect, Error, ErrorKind, Event,
    HistoryEventKind, StartOutcome,
};
use common::Setup;

#[test]
fn start_then_commit_across_a_reboot() {
    let setup = Setup::new();
    let daemon = setup.boot();
    let client = setup.client();
    assert!(client.supports_checkpoint().expect("supports"));
    assert_eq!(client.boot_state().expect("state"), BootState::NoCheckpoint);
    assert_eq!(
        client.start_checkpoint(2).expect("start"),
        StartOutcome::Started { boot_attempts: 3 }
    );
    assert_eq!(client.boot_state().expect("state"), BootState::Pending);
    // The boot that asked never sees the commit: the wait ends at its timeout.
    let err = client.wait_for_commit(Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("state: pending"), "{err}");
    drop(client);
    daemon.stop();

    let daemon = setup.boot();
    setup.boot_hooks();
    let client = setup.client();
    assert_eq!(
        client.boot_state().expect("state"),
        BootState::Checkpointing { attempts_left: Some(2) }
    );
    assert!(!client.needs_rollback().expect("needsRollback"));
    client.commit().expect("commit");
    assert_eq!(client.boot_state().expect("state"), BootState::NoCheckpoint);
    assert_eq!(client.history(1).expect("history")[0].kind, HistoryEventKind::COMMITTED);
    assert_eq!(
        client.wait_for_commit(Duration::from_secs(1)).expect("nothing to wait for"),
        CommitWait::NoCheckpoint
    );
    drop(client);
    daemon.stop();
}

/// The Virtual A/B rule: the merge waits for the commit, which another process makes. With
/// listener events and by polling alone.
#[test]
fn wait_for_commit_returns_when_another_client_commits() {
    let setup = Setup::new();
    for events in [true, false] {
        let daemon = setup.boot();
        setup.client().start_checkpoint(1).expect("start");
        daemon.stop();
        let daemon = setup.boot();
        setup.boot_hooks();
        let socket = setup.socket();
        let waiter = std::thread::spawn(move || {
            let mut how = Connect::socket(socket);
            how.events = events;
            let client = CheckpointClient::connect(&how).expect("connect");
            let started = Instant::now();
            let outcome = client.wait_for_commit(Duration::from_secs(30));
            (outcome, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(700));
        setup.client().commit().expect("commit");
        let (outcome, waited) = waiter.join().expect("waiter");
        assert_eq!(outcome.expect("committed"), CommitWait::Committed, "events {events}");
        assert!(waited >= Duration::from_millis(600), "returned before the commit: {waited:?}");
        assert!(waited < Duration::from_secs(10), "events {events}: {waited:?}");
        daemon.stop();
    }
}

#[test]
fn a_spent_budget_is_a_rollback_boot() {
    let setup = Setup::new();
    let daemon = setup.boot();
    setup.client().start_checkpoint(0).expect("start");
    daemon.stop();
    // One attempt: the first boot spends it.
    let daemon = setup.boot();
    assert_eq!(setup.ctl(&["checkpoint", "markBootAttempt"]), 0);
    let client = setup.client();
    assert_eq!(client.boot_state().expect("state"), BootState::RollbackNeeded);
    assert!(client.needs_rollback().expect("needsRollback"));
    let err = client.wait_for_commit(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, Error::RolledBack), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::RolledBack);
    drop(client);
    daemon.stop();
}

#[test]
fn listener_events_arrive_and_bad_input_is_refused_before_any_call() {
    let setup = Setup::new();
    let daemon = setup.boot();
    let plain = setup.client();
    assert!(matches!(plain.subscribe().unwrap_err(), Error::EventsNotEnabled));
    let err = plain.start_checkpoint(-2).unwrap_err();
    assert!(matches!(err, Error::InvalidRetry(-2)), "{err:?}");
    assert_eq!(plain.status().expect("status").state, CheckpointState::NONE, "nothing sent");

    let client =
        CheckpointClient::connect(&Connect::socket(setup.socket()).with_events()).expect("connect");
    let events = client.subscribe().expect("subscribe");
    assert_eq!(
        client.start_checkpoint(-1).expect("start"),
        StartOutcome::Started { boot_attempts: -1 }
    );
    assert_eq!(
        events.recv_timeout(Duration::from_secs(10)),
        Some(Event::StateChanged(CheckpointState::PENDING))
    );
    drop(client);
    daemon.stop();
}

#[test]
fn a_device_without_backend_is_not_supported_rather_than_an_error() {
    let setup = Setup::with_backend(false);
    let daemon = setup.boot();
    let client = setup.client();
    assert!(!client.supports_checkpoint().expect("supports"));
    assert_eq!(client.start_checkpoint(2).expect("start"), StartOutcome::NotSupported);
    drop(client);
    daemon.stop();
}

#[test]
fn a_refused_call_carries_the_daemons_status() {
    let setup = Setup::new();
    // Only UID 1000 may change state: root (this test) is refused.
    let config = std::fs::read_to_string(setup.config()).expect("config");
    std::fs::write(setup.config(), format!("{config}[access]\nchange_uids = [1000]\n"))
        .expect("config");
    let daemon = setup.boot();
    let err = setup.client().start_checkpoint(2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let status = err.status().expect("a binder status");
    assert_eq!(status.exception_code(), rsbinder::ExceptionCode::Security);
    assert!(err.to_string().contains("startCheckpoint failed"), "{err}");
    daemon.stop();
}

/// The example updater (client/examples/updater.rs): from this target dir when `cargo test`
/// built it, else built once into a target dir of its own.
fn updater() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let sibling = testbench::paths::profile_dir().join("examples").join("updater");
        if sibling.exists() {
            return sibling;
        }
        testbench::daemon::build_once(
            &["-p", "checkpoint-client", "--example", "updater"],
            Path::new("examples/updater"),
        )
    })
}

fn run_updater(setup: &Setup, args: &[&str]) -> (i32, String) {
    let out = Command::new(updater())
        .arg("--socket")
        .arg(setup.socket())
        .args(args)
        .output()
        .expect("run the updater");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().expect("exit code"), text)
}

#[test]
fn the_example_updater_runs_the_whole_flow() {
    let setup = Setup::new();
    let daemon = setup.boot();
    let (code, out) = run_updater(&setup, &["install", "--retry", "2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 boot attempts, state pending, backends test-null"), "{out}");
    daemon.stop();

    let daemon = setup.boot();
    setup.boot_hooks();
    let (code, out) = run_updater(&setup, &["boot"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 attempts left"), "{out}");
    let waiter = {
        let socket = setup.socket();
        std::thread::spawn(move || {
            let out = Command::new(updater())
                .arg("--socket")
                .arg(socket)
                .args(["wait-commit", "--timeout", "30"])
                .output()
                .expect("run the updater");
            (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (code, out) = run_updater(&setup, &["mark-good"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = waiter.join().expect("waiter");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("committed; the merge may start"), "{out}");
    daemon.stop();

    let unsupported = Setup::with_backend(false);
    let daemon = unsupported.boot();
    let (code, out) = run_updater(&unsupported, &["install"]);
    assert_eq!(code, 3, "refused without protection: {out}");
    let (code, out) = run_updater(&unsupported, &["install", "--allow-unprotected"]);
    assert_eq!(code, 0, "{out}");
    daemon.stop();

    let never_booted = Setup::new();
    let (code, out) = run_updater(&never_booted, &["boot"]);
    assert_eq!(code, 1, "no daemon: {out}");
    assert!(out.contains("does not exist"), "{out}");
}
