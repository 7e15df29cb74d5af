//! The daemon's start order, as a process: it registers its service (and tells systemd
//! `READY=1`) before the boot control HAL exists, answers the methods that need no HAL at once,
//! and makes the ones that do wait for it, bounded. The fake HAL (`bootctl_hal::fake`) appears
//! on its RPC socket only after a delay, as Android's `early_hal` class starts after
//! checkpointd. No kernel binder needed.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bootctl_hal::fake::{FakeBootControl, FakeState};
use checkpoint_aidl::android::system::checkpoint::ICheckpoint as codes;
use checkpoint_aidl::android::system::checkpoint::{
    HistoryEventKind::HistoryEventKind, ICheckpoint::ICheckpoint,
};
use rsbinder::Strong;
use testbench::daemon::{DaemonProcess, Launch, TEST_BACKEND};

/// How long a HAL-dependent call waits for the HAL (`boot_control.wait_secs`).
const HAL_WAIT: Duration = Duration::from_secs(2);

/// The harness's setup, its daemon expecting the boot HAL on a socket of its own.
struct Setup(testbench::daemon::Setup);

impl std::ops::Deref for Setup {
    type Target = testbench::daemon::Setup;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Setup {
    /// A socket-only daemon with the test-null backend and the boot HAL expected on a socket
    /// that does not exist yet; `extra` is added.
    fn new(extra: &str) -> Setup {
        let setup = testbench::daemon::Setup::new("");
        let top = format!(
            "{extra}\n{TEST_BACKEND}\
             [boot_control]\ntype = \"hal\"\nwait_secs = {}\n\
             hal_uri = \"unix://{}?profile=android13plus#{}\"\n",
            HAL_WAIT.as_secs(),
            setup.path("bootctl.sock").display(),
            bootctl_hal::INSTANCE,
        );
        setup.write_config(&top, "", "");
        Setup(setup)
    }

    fn hal_socket(&self) -> PathBuf {
        self.path("bootctl.sock")
    }

    /// Starts the daemon with a notify socket of ours and waits for its `READY=1`; returns it
    /// and how long readiness took.
    fn start(&self) -> (Daemon, Duration) {
        let notify_path = self.path("notify");
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        notify.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let started = Instant::now();
        let launch =
            Launch { env: vec![("NOTIFY_SOCKET".to_owned(), notify_path)], ..Launch::default() };
        let process = self.spawn(&launch);
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no sd_notify datagram in 20 s ({e}); log:\n{}", self.log_text())
        });
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
        (Daemon { process, notify }, started.elapsed())
    }

    fn client(&self) -> Strong<dyn ICheckpoint> {
        self.0
            .client()
            .unwrap_or_else(|e| panic!("connect after READY=1: {e:?}; log:\n{}", self.log_text()))
    }

    fn serve_hal(&self, fake: &FakeBootControl) -> rsbinder::entry::ServerGuard {
        fake.serve_socket(&self.hal_socket()).expect("serve the fake HAL")
    }
}

struct Daemon {
    process: DaemonProcess,
    /// Its `$NOTIFY_SOCKET`.
    notify: UnixDatagram,
}

impl Daemon {
    /// The next datagram on the notify socket, if one comes within a second.
    fn next_notification(&self) -> Option<String> {
        self.notify.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        let mut buf = [0u8; 256];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Runs `call` and returns its result and how long it took.
fn timed<T>(call: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = call();
    (value, start.elapsed())
}

#[test]
fn serves_before_the_boot_hal_and_waits_for_it_only_where_the_answer_needs_it() {
    let setup = Setup::new("");
    let (daemon, ready_after) = setup.start();
    assert!(ready_after < Duration::from_secs(10), "READY=1 took {ready_after:?}");
    // READY=1 came after registration: the very first connection succeeds.
    let service = setup.client();

    // No HAL yet. What needs none answers at once.
    let quick = Duration::from_millis(500);
    let (supports, took) = timed(|| service.supportsCheckpoint());
    assert!(supports.expect("supportsCheckpoint"), "test-null backend");
    assert!(took < quick, "supportsCheckpoint took {took:?}");
    let (status, took) = timed(|| service.getStatus());
    let status = status.expect("getStatus before the HAL");
    assert!(took < quick, "getStatus took {took:?}");
    assert_eq!(status.currentSlotSuffix, "", "no slot is known before the HAL");
    assert!(!service.isCheckpointing().expect("isCheckpointing"));
    // vold's markBootAttempt needs no HAL, and init runs it before the HAL starts.
    let (mark, took) = timed(|| service.markBootAttempt());
    mark.expect("markBootAttempt before the HAL");
    assert!(took < quick, "markBootAttempt took {took:?}");

    // needsCheckpoint latches its first answer, which depends on the slot: it waits for the
    // HAL, then fails with EAGAIN rather than latching a guess.
    let (err, took) = timed(|| service.needsCheckpoint().unwrap_err());
    assert_eq!(err.service_specific_error(), codes::EAGAIN, "{err}");
    assert!(err.message().unwrap_or_default().contains("boot control HAL"), "{err}");
    assert!(took >= HAL_WAIT, "it waited {took:?}, not boot_control.wait_secs");
    assert!(took < HAL_WAIT + Duration::from_secs(3), "bounded: {took:?}");

    // A call waiting when the HAL appears gets the HAL's answer: this freshly updated slot _b
    // is not marked successful, so the boot is checkpointed (vold's implicit A/B checkpoint),
    // which proves nothing was latched by the failed call above.
    let fake = FakeBootControl::new(FakeState::after_update(2, 1));
    let waiting = {
        let service = service.clone();
        std::thread::spawn(move || timed(|| service.needsCheckpoint()))
    };
    std::thread::sleep(Duration::from_millis(500));
    let _hal = setup.serve_hal(&fake);
    let (needs, took) = waiting.join().expect("needsCheckpoint thread");
    assert!(needs.expect("needsCheckpoint once the HAL is there"), "implicit A/B checkpoint");
    assert!(took >= Duration::from_millis(400), "it answered before the HAL existed: {took:?}");

    let status = service.getStatus().expect("getStatus");
    assert_eq!(status.currentSlotSuffix, "_b", "{status:?}");
    assert!(!fake.state().slots[1].successful);
    service.commitChanges().expect("commitChanges");
    assert!(fake.state().slots[1].successful, "the commit marked the slot through the HAL");
    // The commit signal on Linux: a status line to systemd.
    assert_eq!(daemon.next_notification().as_deref(), Some("STATUS=checkpoint committed"));
    assert!(setup.log_text().contains("boot control HAL"), "{}", setup.log_text());
}

#[test]
fn a_rollback_slot_switch_waits_for_the_hal_then_switches() {
    let setup = Setup::new("[policy]\nrollback_action = \"switch-to-previous-slot\"\n");
    let (daemon, _) = setup.start();
    let service = setup.client();

    // With switch-to-previous-slot, markBootAttempt may have to switch slots: it needs the HAL
    // and fails with EAGAIN, counting nothing, while there is none.
    let err = service.markBootAttempt().unwrap_err();
    assert_eq!(err.service_specific_error(), codes::EAGAIN, "{err}");
    let attempts = |service: &Strong<dyn ICheckpoint>| {
        service
            .getHistory(0)
            .expect("history")
            .iter()
            .filter(|e| e.kind == HistoryEventKind::BOOT_ATTEMPT)
            .count()
    };
    assert_eq!(attempts(&service), 0, "a refused markBootAttempt counts no attempt");

    // The HAL appears: slot _a (0) requests a checkpoint with no retry, its one attempt is
    // used, and the device then runs from slot _b (1) with the budget spent: the next
    // markBootAttempt makes slot _a active again.
    let fake = FakeBootControl::new(FakeState::new(2, 0));
    let _hal = setup.serve_hal(&fake);
    service.startCheckpoint(0).expect("startCheckpoint(0)");
    service.markBootAttempt().expect("markBootAttempt: budget spent");
    fake.update(|state| {
        state.current = 1;
        state.active = 1;
    });
    service.markBootAttempt().expect("markBootAttempt: the rollback switch");
    assert_eq!(fake.state().active, 0, "the requesting slot is active again");
    let history = service.getHistory(0).expect("history");
    assert!(
        history.iter().any(|e| e.kind == HistoryEventKind::ROLLBACK_SLOT_SWITCH),
        "{history:?}"
    );
    assert_eq!(attempts(&service), 2);

    // A commit on a boot that is not checkpointing commits nothing and gives no signal.
    service.commitChanges().expect("commitChanges: nothing to commit");
    assert_eq!(daemon.next_notification(), None);
}

/// The HAL's lookup must not keep the daemon from stopping, and a stop says `STOPPING=1`.
#[test]
fn stops_cleanly_while_still_looking_for_the_hal() {
    let setup = Setup::new("");
    let (mut daemon, _) = setup.start();
    daemon.process.signal(nix::sys::signal::Signal::SIGTERM);
    let mut buf = [0u8; 64];
    let n = daemon.notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = daemon
        .process
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("checkpointd did not stop; log:\n{}", setup.log_text()));
    assert!(status.success(), "{status}; log:\n{}", setup.log_text());
}
