//! checkpointd under hostile local clients (issue 10): the daemon as a process on its real RPC
//! socket, unprivileged clients as other UIDs (`checkpointctl watch` and a connection holder,
//! forked with setuid by `Command::uid`). Runs as root (it switches UIDs), as CI does.
//!
//! `CHECKPOINTD_BIN` / `CHECKPOINTCTL_BIN` run the suite against other builds (how the closing
//! note of issue 10 shows that each test fails on the code before the fix).
//!
//! The tests share one lock: each measures the daemon's threads, fds or latency, which a
//! daemon of another test running beside it on a 2-core machine would disturb.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use checkpoint_aidl::android::system::checkpoint::ICheckpoint as codes;
use checkpoint_aidl::android::system::checkpoint::{
    CheckpointState::CheckpointState, ICheckpoint::ICheckpoint,
    ICheckpointListener::ICheckpointListener,
};
use nix::sys::signal::Signal;
use rsbinder::Strong;
use testbench::daemon::{
    as_uid, event_listener, percentile, ClientProcess as Proc, DaemonProcess as Daemon, Launch,
    PeakSampler, Setup, NOBODY, TEST_BACKEND,
};

/// The environment variable that makes a run of this binary the connection holder.
const HOLDER_ENV: &str = "HOSTILE_HOLD_SOCKET";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The harness's setup with the test-null backend (as root: clients switch UIDs); `extra`
/// goes at the top of the config, `socket` into its `[socket]` table.
fn setup_with_socket(extra: &str, socket: &str) -> Setup {
    testbench::daemon::require_root(
        "the hostile-client tests switch clients to other UIDs and need root",
    );
    Setup::with_tables(&format!("{TEST_BACKEND}{extra}"), socket, "")
}

fn setup(extra: &str) -> Setup {
    setup_with_socket(extra, "")
}

/// Starts the daemon with an open-file limit of `nofile` (as a unit without LimitNOFILE gets
/// from systemd) and waits until the socket answers.
fn boot(setup: &Setup, nofile: u32) -> Daemon {
    setup.boot_with(&Launch { nofile: Some(nofile), ..Launch::default() })
}

/// Runs `f` on a thread and waits at most `limit` for it: a call that hangs fails the test
/// instead of hanging it.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

/// An image file with a real dm-bow log, so that a restore reports progress.
fn image_with_log(path: &Path) {
    use bow::device::{BlockDevice, FileDevice};
    const BS: usize = 4096;
    let original: Vec<u8> = (0..256 * BS).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
    std::fs::write(path, &original).expect("write image");
    let dev = FileDevice::open(path).expect("open image");
    let bs = bow::units::BlockSize::new(4096).expect("block size");
    let free: Vec<u64> = (128..256).collect();
    let mut log = bow::restore::synth::LogWriter::start(&dev, bs, &free).expect("start log");
    for block in 0..32 {
        log.write(block, &[0xee; BS]).expect("write a block");
    }
    dev.flush().expect("flush");
}

/// Observation 1: a listener that stops reading must not hang restores or silence the others.
#[test]
fn a_stopped_listener_neither_hangs_a_restore_nor_silences_other_listeners() {
    let _serial = serial();
    let setup = setup("");
    let image = setup.path("userdata.img");
    image_with_log(&image);
    let daemon = boot(&setup, 4096);

    // Registered first, so that a daemon notifying listeners in order meets it first.
    let stuck = setup.watch_as(NOBODY).expect("the watcher registers");
    stuck.signal(Signal::SIGSTOP);
    let (client, service) = setup.callback_client();
    let (live, events) = event_listener();
    service.registerListener(&live).expect("register");

    // State changes until the stopped watcher is dropped: its socket buffer takes a few hundred
    // oneway calls (how many depends on the kernel), then its queue of 64 fills.
    const DROPPED: &str = "fell 64 events behind";
    let root = setup.client().expect("root client");
    let log = setup.path("checkpointd.log");
    // The live listener is awaited after every 10 changes, as a listener that keeps up is: it
    // must hear each one, while the stopped one falls behind.
    let (changes, events) = within(Duration::from_secs(120), "state changes", move || {
        let mut changes = 0;
        // At most 3000: the assertions below fail if it was never dropped.
        while changes < 3000
            && (changes < 300
                || !std::fs::read_to_string(&log).unwrap_or_default().contains(DROPPED))
        {
            for _ in 0..10 {
                root.startCheckpoint(2).expect("startCheckpoint");
            }
            changes += 10;
            for _ in 0..10 {
                let event = events.recv_timeout(Duration::from_secs(10));
                assert!(
                    event.as_deref().is_ok_and(|e| e.starts_with("state")),
                    "the live listener did not hear state change {changes}: {event:?}"
                );
            }
        }
        (changes, events)
    });
    // A restore while a stopped listener is registered (this one has not fallen behind yet).
    let stuck_again = setup.watch_as(NOBODY).expect("another watcher registers");
    stuck_again.signal(Signal::SIGSTOP);
    let image_arg = image.to_str().expect("utf-8").to_owned();
    let root = setup.client().expect("root client");
    let restored = within(Duration::from_secs(30), "restoreCheckpoint", move || {
        root.restoreCheckpoint(&image_arg).map_err(|e| e.to_string())
    });
    assert_eq!(restored, Ok(()), "restoreCheckpoint");
    // ... and its progress.
    let progress = events.recv_timeout(Duration::from_secs(10));
    assert!(
        progress.as_deref().is_ok_and(|e| e.starts_with("progress")),
        "the live listener heard no restore progress: {progress:?}"
    );
    let log = setup.log_text();
    let dropped = log.matches(DROPPED).count();
    assert_eq!(dropped, 1, "the first stopped listener is dropped and that is logged once:\n{log}");
    eprintln!("the stopped watcher was dropped within {changes} state changes");
    stuck.signal(Signal::SIGCONT);
    if let Some(session) = client.session() {
        session.close_session();
    }
    drop(daemon);
}

/// Observation 2: 2,000 sessions and 100 stopped listeners held by an unprivileged UID with
/// the daemon's open-file limit at 1024 leave root's calls as fast as on an idle daemon
/// (p99 within 5x), never timing out; threads and fds stay bounded and return to baseline.
#[test]
fn unprivileged_sessions_and_stopped_listeners_do_not_lock_out_root() {
    let _serial = serial();
    let setup = setup("");
    let daemon = boot(&setup, 1024);
    const SAMPLES: usize = 400;
    // Warm up (first connection, store pages), then half the idle samples; the other half
    // after the load, so that the machine's own noise weighs on both sides alike.
    let _ = root_call_latencies(&setup, 20);
    let mut idle = root_call_latencies(&setup, SAMPLES / 2);
    let baseline = daemon.usage();

    let started = Instant::now();
    let sampler = PeakSampler::start(daemon.pid());
    let mut watchers = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        match setup.watch_as(NOBODY) {
            Ok(watcher) => {
                watcher.signal(Signal::SIGSTOP);
                watchers.push(watcher);
            }
            Err(_) => refused += 1,
        }
    }
    let peak_watchers = sampler.stop();
    eprintln!("{} watchers started in {:?}", watchers.len() + refused, started.elapsed());
    let holder = hold_connections(&setup, NOBODY, 2000);
    eprintln!("holder ready after {:?}", started.elapsed());
    // Sampled all through the load (the holder keeps re-opening what the daemon closes).
    let sampler = PeakSampler::start(daemon.pid());
    let loaded = root_call_latencies(&setup, SAMPLES);
    let peak = sampler.stop();
    let peak = (peak.0.max(peak_watchers.0), peak.1.max(peak_watchers.1));
    let registered = watchers.len();

    drop(holder);
    drop(watchers);
    let after = daemon.back_to(baseline, 2, Duration::from_secs(15));
    idle.extend(root_call_latencies(&setup, SAMPLES / 2));

    let (idle_p50, idle_p99) = (percentile(&idle, 50), percentile(&idle, 99));
    let (loaded_p50, loaded_p99) = (percentile(&loaded, 50), percentile(&loaded, 99));
    eprintln!(
        "root markBootAttempt (new session + call): idle p50 {idle_p50:?} p99 {idle_p99:?}; \
         loaded p50 {loaded_p50:?} p99 {loaded_p99:?}; {registered} watchers registered, \
         {refused} refused; daemon threads/fds {baseline:?} idle, {peak:?} loaded, {after:?} \
         after"
    );
    assert!(
        loaded_p99 <= idle_p99 * 5,
        "root's p99 under load {loaded_p99:?} is more than 5x the idle p99 {idle_p99:?}"
    );
    // Nobody's share is 32 connections (socket.max_sessions_per_uid): one fd and up to two
    // threads each (rsbinder's worker and reaper), plus root's session of the moment.
    assert!(peak.0 <= baseline.0 + 2 * 32 + 8, "threads {peak:?} vs baseline {baseline:?}");
    assert!(peak.1 <= baseline.1 + 32 + 8, "fds {peak:?} vs baseline {baseline:?}");
    assert!(
        after.0 <= baseline.0 + 2 && after.1 <= baseline.1 + 2,
        "threads/fds {after:?} did not return to the baseline {baseline:?}"
    );
}

/// Observation 3: 400 watchers killed with -9 free their threads and fds at once, with no
/// state change.
#[test]
fn killed_watchers_free_their_threads_and_fds() {
    let _serial = serial();
    let setup = setup("");
    let daemon = boot(&setup, 4096);
    let baseline = daemon.usage();
    let mut watchers = Vec::new();
    // 400 watchers, 50 from each of 8 UIDs: each UID gets its share (16 watchers, 32
    // connections) until the unreserved 224 connections are taken; the rest is refused.
    for uid in (0..8).map(|i| NOBODY - i) {
        for _ in 0..50 {
            if let Ok(watcher) = setup.watch_as(uid) {
                watchers.push(watcher);
            }
        }
    }
    let peak = daemon.usage();
    let registered = watchers.len();
    for watcher in &watchers {
        watcher.signal(Signal::SIGKILL);
    }
    let after = daemon.back_to(baseline, 2, Duration::from_secs(10));
    eprintln!(
        "{registered} watchers: daemon threads/fds {baseline:?} before, {peak:?} with them, \
         {after:?} after kill -9"
    );
    assert!(
        after.0 <= baseline.0 + 2 && after.1 <= baseline.1 + 2,
        "{registered} killed watchers left threads/fds {after:?} (baseline {baseline:?})"
    );
    // 224 unreserved connections, two per watcher.
    assert!((100..=112).contains(&registered), "{registered} watchers registered");
    // Each watcher's session: one fd per connection, a worker and a reaper thread.
    assert!(peak.0 <= baseline.0 + 2 * 112 + 16, "threads {peak:?} vs baseline {baseline:?}");
    assert!(peak.1 <= baseline.1 + 224 + 16, "fds {peak:?} vs baseline {baseline:?}");
    drop(watchers);
}

/// The same listener registered 2,000 times counts once: one event per state change.
#[test]
fn a_listener_registered_twice_counts_once() {
    let _serial = serial();
    let setup = setup("");
    let daemon = boot(&setup, 4096);
    let (client, service) = setup.callback_client();
    let (one, events) = event_listener();
    within(Duration::from_secs(60), "2,000 registrations", {
        let service = service.clone();
        let one = one.clone();
        move || {
            for _ in 0..2000 {
                service.registerListener(&one).expect("register");
            }
        }
    });
    setup.client().expect("root").startCheckpoint(2).expect("start");
    let first = events.recv_timeout(Duration::from_secs(10)).expect("the event");
    assert_eq!(first, format!("state {}", CheckpointState::PENDING.0));
    std::thread::sleep(Duration::from_millis(500));
    let more = events.try_iter().count();
    assert_eq!(more, 0, "one state change reached the listener {} times", more + 1);
    if let Some(session) = client.session() {
        session.close_session();
    }
    drop(daemon);
}

/// Registers `n` listeners of its own on `service`, each asserted to succeed.
fn register_many(
    service: &Strong<dyn ICheckpoint>,
    n: usize,
) -> Vec<(Strong<dyn ICheckpointListener>, mpsc::Receiver<String>)> {
    (0..n)
        .map(|i| {
            let (binder, rx) = event_listener();
            service.registerListener(&binder).unwrap_or_else(|e| panic!("listener {i}: {e}"));
            (binder, rx)
        })
        .collect()
}

/// A UID may register 16 listeners (default `listeners.max_per_uid`); the 17th gets EBUSY and
/// the 16 keep working.
#[test]
fn listeners_are_capped_per_uid() {
    let _serial = serial();
    let setup = setup("");
    let daemon = boot(&setup, 4096);
    let (client, service) = setup.callback_client();
    let registered = register_many(&service, 16);
    let (extra, _rx) = event_listener();
    let err = service.registerListener(&extra).expect_err("root's 17th listener");
    assert_eq!(err.service_specific_error(), codes::EBUSY, "{err}");
    setup.client().expect("root").startCheckpoint(2).expect("start");
    for (i, (_, rx)) in registered.iter().enumerate() {
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok(), "listener {i} got no event");
    }
    if let Some(session) = client.session() {
        session.close_session();
    }
    drop(daemon);
}

/// Listeners are capped overall (`listeners.max`), whatever the UID.
#[test]
fn listeners_are_capped_overall() {
    let _serial = serial();
    let setup = setup("[listeners]\nmax = 18\n");
    let daemon = boot(&setup, 4096);
    let (client, service) = setup.callback_client();
    let _registered = register_many(&service, 16);
    // Two more from another UID fit under max = 18; the third does not.
    let first = setup.watch_as(NOBODY).expect("nobody's first watcher");
    let second = setup.watch_as(NOBODY).expect("nobody's second watcher");
    let third = setup.watch_as(NOBODY).expect_err("the 19th listener overall");
    assert!(third.contains("too many listeners"), "{third}");
    drop((first, second));
    if let Some(session) = client.session() {
        session.close_session();
    }
    drop(daemon);
}

/// A connection that never sends its handshake is closed at the handshake deadline, so it
/// cannot hold a session slot.
#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    use std::io::Read;
    let _serial = serial();
    let setup = setup("");
    let daemon = boot(&setup, 4096);
    let mut silent = std::os::unix::net::UnixStream::connect(setup.socket()).expect("connect");
    silent.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0)) && waited < Duration::from_secs(8),
        "the silent connection was not closed by the 5 s handshake deadline: {read:?} after \
         {waited:?}"
    );
    drop(daemon);
}

/// A session that finishes its handshake but never calls is closed at the first-call
/// deadline (`socket.first_call_timeout_ms`), so it cannot hold a session slot; one that calls
/// in time is served.
#[test]
fn a_session_that_never_calls_is_closed_at_the_first_call_deadline() {
    let _serial = serial();
    let setup = setup_with_socket("", "first_call_timeout_ms = 1000");
    let daemon = boot(&setup, 4096);
    let uri = checkpoint_aidl::socket_uri(&setup.socket());
    let idle = rsbinder::Client::open(uri.clone()).expect("handshake");
    let busy = rsbinder::Client::open(uri).expect("handshake");
    let _service: Strong<dyn ICheckpoint> =
        busy.try_get(checkpoint_aidl::SERVICE_NAME).expect("lookup").expect("registered");
    std::thread::sleep(Duration::from_millis(2500));
    let late = idle.try_get::<dyn ICheckpoint>(checkpoint_aidl::SERVICE_NAME);
    assert!(late.is_err(), "the idle session was still served after 2.5 s");
    let service: Strong<dyn ICheckpoint> =
        busy.try_get(checkpoint_aidl::SERVICE_NAME).expect("lookup").expect("registered");
    service.getStatus().expect("the session that called is still served");
    assert!(setup.log_text().contains("no call within 1000 ms"), "{}", setup.log_text());
    drop(daemon);
}

// ---- load helpers ----

/// `n` samples of root's markBootAttempt as init makes it: a new session, then the call.
fn root_call_latencies(setup: &Setup, n: usize) -> Vec<Duration> {
    let socket = setup.socket();
    (0..n)
        .map(|i| {
            let socket = socket.clone();
            within(Duration::from_secs(10), &format!("root's markBootAttempt #{i}"), move || {
                let started = Instant::now();
                let uri = checkpoint_aidl::socket_uri(&socket)
                    .with_service(checkpoint_aidl::SERVICE_NAME);
                let service = rsbinder::connect::<dyn ICheckpoint>(uri).expect("root connects");
                service.markBootAttempt().expect("markBootAttempt");
                let took = started.elapsed();
                // Paced as boot-time callers are, so the samples span the load's rounds.
                std::thread::sleep(Duration::from_millis(5));
                took
            })
        })
        .collect()
}

/// This test binary run as `uid`, holding `n` connections to the socket (re-opening those the
/// daemon closes, 200 a second) until killed. Returns once they are open.
fn hold_connections(setup: &Setup, uid: u32, n: usize) -> Proc {
    // Through sh for `ulimit -n`: the holder needs more than 1024 fds.
    let mut holder = Command::new("/bin/sh");
    holder
        .arg("-c")
        .arg(format!("ulimit -n {} && exec \"$0\" \"$@\"", n + 64))
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", "connection_holder", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, setup.socket())
        .env("HOSTILE_HOLD_COUNT", n.to_string());
    let mut child = as_uid(&mut holder, uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the connection holder");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let holder = Proc(child);
    let ready = Arc::new(AtomicBool::new(false));
    for line in stdout.lines() {
        let line = line.expect("holder output");
        // libtest prints "test connection_holder ... " on the same line first.
        if let Some((_, count)) = line.split_once("holding ") {
            eprintln!("connection holder: {count} connections opened");
            ready.store(true, Ordering::SeqCst);
            break;
        }
    }
    assert!(ready.load(Ordering::SeqCst), "the connection holder did not start");
    holder
}

/// Not a test: the connection holder that `hold_connections` runs as another UID.
#[test]
#[ignore = "a helper process of the other tests, run by them"]
fn connection_holder() {
    let socket_path = std::env::var_os(HOLDER_ENV).expect("run by hold_connections");
    let count: usize = std::env::var("HOSTILE_HOLD_COUNT").expect("count").parse().expect("n");
    testbench::daemon::hold_connections(Path::new(&socket_path), count, Duration::from_secs(120));
}
