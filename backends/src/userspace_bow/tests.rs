//! The userspace-bow steps on the host: the server and the linear device are fakes that keep
//! the engine's state machine (TRIM → CHECKPOINT → COMMITTED, refusing anything else) and log
//! every call, so the order of each step and its rerun after a crash at every point are
//! checked; the process handling runs real scripts standing in for `bow-ublk`.

use std::sync::Mutex;

use super::*;

type Events = Arc<Mutex<Vec<String>>>;

fn events(e: &Events) -> Vec<String> {
    e.lock().unwrap().clone()
}

#[derive(Debug)]
struct FakeServer {
    events: Events,
    state: Mutex<(BowState, bool)>, // (engine state, a server answers)
    free: u64,
    used: u64,
    /// `trace` fails (a server that cannot give it).
    trace_fails: Mutex<bool>,
}

impl FakeServer {
    fn new(events: &Events, state: BowState, alive: bool) -> Arc<FakeServer> {
        Arc::new(FakeServer {
            events: events.clone(),
            state: Mutex::new((state, alive)),
            free: 40 << 20,
            used: 3 << 20,
            trace_fails: Mutex::new(false),
        })
    }
    fn state(&self) -> (BowState, bool) {
        *self.state.lock().unwrap()
    }
}

impl EngineServer for FakeServer {
    fn send(&self, command: ControlCommand) -> Result<String, BackendError> {
        let mut s = self.state.lock().unwrap();
        if !s.1 {
            return Err(BackendError::NotSetUp { backend: "fake (no server)".into() });
        }
        let refuse = |what: &str| BackendError::InvalidState {
            backend: "fake".into(),
            state: what.into(),
            operation: "drive the engine",
        };
        match command {
            ControlCommand::Status => {}
            ControlCommand::Checkpoint if s.0 == BowState::Trim => s.0 = BowState::Checkpoint,
            ControlCommand::Commit if s.0 == BowState::Checkpoint => s.0 = BowState::Committed,
            ControlCommand::Stop => unreachable!("stop goes through EngineServer::stop"),
            other => return Err(refuse(&format!("{other} in state {:?}", s.0))),
        }
        if command != ControlCommand::Status {
            self.events.lock().unwrap().push(command.to_string());
        }
        Ok(format!(
            "state={} free={} used={} held=0 backups=1 rebackups=0 batches=1 flushes=2",
            s.0.value(),
            self.free,
            self.used
        ))
    }

    fn stop(&self) -> Result<Action, BackendError> {
        let mut s = self.state.lock().unwrap();
        if !s.1 {
            return Ok(Action::Identity);
        }
        s.1 = false;
        self.events.lock().unwrap().push("stop".into());
        Ok(Action::Changed)
    }

    fn trace(&self) -> Result<Vec<u8>, BackendError> {
        let s = self.state.lock().unwrap();
        if !s.1 || *self.trace_fails.lock().unwrap() {
            return Err(BackendError::NotSetUp { backend: "fake (no trace)".into() });
        }
        self.events.lock().unwrap().push("trace".into());
        Ok(format!("trace in state {}", s.0.value()).into_bytes())
    }
}

#[derive(Debug)]
struct FakeLinear {
    events: Events,
    lower: Mutex<Lower>,
}

impl FakeLinear {
    fn new(events: &Events, lower: Lower) -> Arc<FakeLinear> {
        Arc::new(FakeLinear { events: events.clone(), lower: Mutex::new(lower) })
    }
}

impl LinearDevice for FakeLinear {
    fn lower(&self) -> Result<Lower, BackendError> {
        Ok(*self.lower.lock().unwrap())
    }
    fn switch_to_raw(&self) -> Result<(), BackendError> {
        let mut l = self.lower.lock().unwrap();
        assert_eq!(*l, Lower::Ublk, "switch_to_raw only from the ublk table");
        *l = Lower::Raw;
        self.events.lock().unwrap().push("switch".into());
        Ok(())
    }
}

#[derive(Debug)]
struct FakeFs {
    events: Events,
}

impl MountedFs for FakeFs {
    fn fitrim_from(&self, start: u64) -> Result<u64, BackendError> {
        self.events.lock().unwrap().push(format!("fitrim {start}"));
        Ok(1 << 20)
    }
    fn freeze(&self) -> Result<(), BackendError> {
        unreachable!("userspace-bow never freezes")
    }
    fn thaw(&self) -> Result<(), BackendError> {
        unreachable!("userspace-bow never thaws")
    }
    fn free_bytes(&self) -> Result<u64, BackendError> {
        Ok(100 << 20)
    }
}

struct Setup {
    _meta: tempfile::TempDir,
    events: Events,
    server: Arc<FakeServer>,
    base: Arc<FakeLinear>,
    backend: UserspaceBowBackend,
}

fn spec(mount: &Path) -> DeviceSpec {
    DeviceSpec {
        raw: PathBuf::from("/dev/fake-raw"),
        mount_point: mount.to_owned(),
        fs_type: Some("ext4".into()),
        mount_options: String::new(),
        instance: "data".into(),
    }
}

fn setup(state: BowState, alive: bool, lower: Lower) -> Setup {
    let meta = tempfile::tempdir().unwrap();
    let records = Records::open(meta.path()).unwrap();
    let events: Events = Arc::default();
    let server = FakeServer::new(&events, state, alive);
    let base = FakeLinear::new(&events, lower);
    let fs = Arc::new(FakeFs { events: events.clone() });
    let backend = UserspaceBowBackend::new(
        spec(meta.path()),
        UserspaceBowOptions::default(),
        RestoreOptions::default(),
        records,
    )
    .unwrap()
    .with_parts(server.clone(), base.clone(), fs);
    Setup { _meta: meta, events, server, base, backend }
}

#[test]
fn prepare_trims_from_the_second_block_then_checkpoints_once() {
    let s = setup(BowState::Trim, true, Lower::Ublk);
    assert_eq!(s.backend.status().unwrap().state, BackendState::Idle);
    assert_eq!(s.backend.space().unwrap(), BackupSpace::default());
    assert_eq!(s.backend.prepare().unwrap(), Action::Changed);
    assert_eq!(events(&s.events), ["fitrim 4096", "checkpoint"]);
    // A second prepare (a unit rerun) changes nothing.
    assert_eq!(s.backend.prepare().unwrap(), Action::Identity);
    assert_eq!(events(&s.events).len(), 2);
    // The engine's exact numbers, as they are.
    let st = s.backend.status().unwrap();
    assert_eq!(st.state, BackendState::Armed);
    assert_eq!((st.free_bytes, st.backup_used_bytes), (Some(40 << 20), Some(3 << 20)));
    let space = s.backend.space().unwrap();
    assert_eq!((space.free_bytes, space.used_bytes), (Some(40 << 20), Some(3 << 20)));
}

#[test]
fn prepare_is_refused_off_the_engine_and_after_commit() {
    for lower in [Lower::Raw, Lower::Missing, Lower::Other] {
        let s = setup(BowState::Trim, true, lower);
        let e = s.backend.prepare().unwrap_err();
        assert!(matches!(e, BackendError::NotSetUp { .. }), "{lower:?}: {e}");
        assert!(events(&s.events).is_empty(), "{lower:?}: nothing done");
    }
    let s = setup(BowState::Committed, true, Lower::Ublk);
    assert!(matches!(s.backend.prepare().unwrap_err(), BackendError::InvalidState { .. }));
    assert!(events(&s.events).is_empty());
}

#[test]
fn commit_is_engine_commit_then_table_switch_then_stop() {
    let s = setup(BowState::Checkpoint, true, Lower::Ublk);
    assert_eq!(s.backend.commit().unwrap(), Action::Changed);
    assert_eq!(events(&s.events), ["commit", "trace", "switch", "stop"]);
    assert_eq!(s.server.state(), (BowState::Committed, false));
    // The trace, fetched once the engine committed, kept on the metadata partition.
    let kept = TraceStore::new(s.backend.records.clone(), &s.backend.spec).path();
    assert_eq!(std::fs::read(&kept).unwrap(), b"trace in state 2");
    assert_eq!(*s.base.lower.lock().unwrap(), Lower::Raw);
    // A second commit finds it all done.
    assert_eq!(s.backend.commit().unwrap(), Action::Identity);
    assert_eq!(events(&s.events).len(), 4);
    let st = s.backend.status().unwrap();
    assert_eq!((st.state, st.free_bytes), (BackendState::Idle, None));
    assert_eq!(s.backend.space().unwrap(), BackupSpace::default());
}

#[test]
fn a_commit_cut_after_any_step_is_finished_by_a_rerun_without_repeating_a_step() {
    // (engine state, server alive, table) as a crash of the daemon after each step leaves them.
    let cases = [
        ((BowState::Committed, true, Lower::Ublk), &["trace", "switch", "stop"][..]),
        ((BowState::Committed, true, Lower::Raw), &["stop"][..]),
        ((BowState::Committed, false, Lower::Raw), &[][..]),
    ];
    for ((state, alive, lower), want) in cases {
        let s = setup(state, alive, lower);
        let action = s.backend.commit().unwrap();
        assert_eq!(events(&s.events), want, "after {state:?}/{alive}/{lower:?}");
        assert_eq!(action == Action::Changed, !want.is_empty());
        assert_eq!(*s.base.lower.lock().unwrap(), Lower::Raw);
        assert!(!s.server.state().1, "no server left");
    }
}

#[test]
fn a_trace_that_cannot_be_fetched_fails_nothing_and_keeps_the_last_one() {
    let s = setup(BowState::Checkpoint, true, Lower::Ublk);
    let kept = TraceStore::new(s.backend.records.clone(), &s.backend.spec).path();
    std::fs::write(&kept, b"the last checkpoint's").unwrap();
    *s.server.trace_fails.lock().unwrap() = true;
    assert_eq!(s.backend.commit().unwrap(), Action::Changed);
    assert_eq!(events(&s.events), ["commit", "switch", "stop"]);
    assert_eq!(std::fs::read(&kept).unwrap(), b"the last checkpoint's");
}

#[test]
fn abort_keeps_the_failed_attempts_trace_and_the_log() {
    let s = setup(BowState::Checkpoint, true, Lower::Ublk);
    assert_eq!(s.backend.abort().unwrap(), Action::Identity, "no reservation was held");
    assert_eq!(events(&s.events), ["trace"]);
    assert_eq!(s.server.state(), (BowState::Checkpoint, true), "the engine keeps its log");
    let kept = TraceStore::new(s.backend.records.clone(), &s.backend.spec).path();
    assert_eq!(std::fs::read(&kept).unwrap(), b"trace in state 1");
}

#[test]
fn abort_with_a_dead_server_still_releases_and_succeeds() {
    // The trace is advisory: no server to ask is no reason for the abort to fail.
    let s = setup(BowState::Checkpoint, false, Lower::Ublk);
    assert_eq!(s.backend.abort().unwrap(), Action::Identity);
    assert!(events(&s.events).is_empty());
}

#[test]
fn commit_in_trim_switches_and_stops_without_an_engine_commit() {
    let s = setup(BowState::Trim, true, Lower::Ublk);
    assert_eq!(s.backend.commit().unwrap(), Action::Changed);
    assert_eq!(events(&s.events), ["switch", "stop"]);
}

#[test]
fn commit_refuses_a_raw_table_under_an_engine_still_in_checkpoint() {
    // The filesystem would have written past the engine; stopping it would leave a log that
    // rolls those writes back. Nothing is done.
    let s = setup(BowState::Checkpoint, true, Lower::Raw);
    assert!(matches!(s.backend.commit().unwrap_err(), BackendError::InvalidState { .. }));
    assert!(events(&s.events).is_empty());
    assert!(s.server.state().1, "the server still runs");
    for lower in [Lower::Missing, Lower::Other] {
        let s = setup(BowState::Checkpoint, true, lower);
        assert!(s.backend.commit().is_err(), "{lower:?}");
        assert!(events(&s.events).is_empty(), "{lower:?}");
    }
}

#[test]
fn a_dead_server_is_an_error_not_a_silent_zero() {
    let s = setup(BowState::Checkpoint, false, Lower::Ublk);
    assert!(s.backend.space().is_err());
    assert!(s.backend.status().is_err());
    assert!(s.backend.prepare().is_err());
}

#[test]
fn status_lines_parse_or_are_corrupt() {
    let st = EngineStatus::parse(
        "state=1 free=4096 used=8192 held=8192 backups=2 rebackups=0 batches=1 flushes=2",
    )
    .unwrap();
    assert_eq!(st, EngineStatus { state: BowState::Checkpoint, free: 4096, used: 8192 });
    for bad in ["passthrough", "state=7 free=1 used=1", "state=1 free=x used=1", "state=0 used=1"] {
        assert!(matches!(EngineStatus::parse(bad), Err(BackendError::Corrupt { .. })), "{bad}");
    }
}

#[test]
fn options_validate_and_the_default_id_is_fixed_per_instance() {
    let ok = UserspaceBowOptions::default();
    assert_eq!(ok.validate(), Ok(()));
    let bad = |o: UserspaceBowOptions, key: &str| {
        let e = o.validate().unwrap_err();
        assert!(e.starts_with(key), "{e}");
    };
    bad(UserspaceBowOptions { server: Some("bow-ublk".into()), ..ok.clone() }, "server");
    bad(UserspaceBowOptions { start_timeout_ms: 0, ..ok.clone() }, "start_timeout_ms");
    bad(UserspaceBowOptions { ublk_id: Some(1 << 20), ..ok.clone() }, "ublk_id");
    bad(UserspaceBowOptions { run_dir: "run".into(), ..ok.clone() }, "run_dir");
    let a = default_ublk_id("data");
    assert_eq!(a, default_ublk_id("data"));
    assert_ne!(a, default_ublk_id("cache"));
    assert!((4096..8192).contains(&a), "{a}");
    let spec = spec(Path::new("/data"));
    assert_eq!(ok.id_for(&spec), a);
    assert_eq!(UserspaceBowOptions { ublk_id: Some(3), ..ok }.id_for(&spec), 3);
}

#[test]
fn the_server_binary_is_the_configured_one_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bow-ublk");
    assert!(find_server(Some(&bin)).unwrap_err().contains("does not exist"));
    std::fs::write(&bin, "").unwrap();
    assert_eq!(find_server(Some(&bin)).unwrap(), bin);
}

/// A script standing in for `bow-ublk serve`: `body` runs after it records its pid and session
/// id. The server to start is `/bin/sh` ([`SH`]) with these arguments, not the script itself:
/// Linux refuses to execute a file open for writing anywhere (ETXTBSY), and another test's
/// fork can briefly hold a copy of this thread's write descriptor (seen failing at random).
fn script(dir: &Path, body: &str) -> Vec<String> {
    let path = dir.join("fake-bow-ublk");
    let ids = dir.join("ids");
    std::fs::write(
        &path,
        format!("echo \"$$ $(cut -d' ' -f6 /proc/$$/stat)\" > {}\n{body}\n", ids.display()),
    )
    .unwrap();
    vec![path.to_string_lossy().into_owned(), "serve".into()]
}

/// What runs a [`script`].
const SH: &str = "/bin/sh";

/// (pid, session id) the script recorded.
fn ids(dir: &Path) -> (i32, i32) {
    let text = std::fs::read_to_string(dir.join("ids")).unwrap();
    let mut it = text.split_whitespace().map(|n| n.parse::<i32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone: `start_server` reaps what it kills.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
}

#[test]
fn a_server_that_serves_keeps_running_in_a_session_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let args = script(dir.path(), "echo 'bow-ublk: serving /dev/ublkb7 (4096 bytes)'\nsleep 30");
    let log = dir.path().join("log");
    let line = start_server(Path::new(SH), &args, &log, Duration::from_secs(10)).unwrap();
    assert!(line.contains("serving /dev/ublkb7"), "{line}");
    let (pid, sid) = ids(dir.path());
    assert_eq!(pid, sid, "the server leads its own session");
    assert!(alive(pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
}

#[test]
fn a_server_that_never_serves_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let args = script(dir.path(), "echo 'starting' >&2\nsleep 30");
    let log = dir.path().join("log");
    let started = Instant::now();
    let e = start_server(Path::new(SH), &args, &log, Duration::from_millis(700)).unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(10), "{took:?}");
    let msg = e.to_string();
    assert!(matches!(e, BackendError::Unsupported { .. }), "{msg}");
    assert!(
        msg.contains("did not report serving within 700 ms") && msg.contains("starting"),
        "{msg}"
    );
    let (pid, _) = ids(dir.path());
    assert!(!alive(pid), "the server was killed");
}

#[test]
fn a_server_that_exits_is_reported_with_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let args =
        script(dir.path(), "echo 'bow-ublk: ublk: adding the device: Permission' >&2\nexit 1");
    let log = dir.path().join("log");
    std::fs::write(&log, "an earlier run's line\n").unwrap();
    let e = start_server(Path::new(SH), &args, &log, Duration::from_secs(10)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("exited") && msg.contains("adding the device"), "{msg}");
    assert!(!msg.contains("earlier run"), "only this run's messages: {msg}");
    let missing = dir.path().join("no-such-binary");
    let e = start_server(&missing, &[], &log, Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("cannot start"), "{e}");
}

#[test]
fn no_ublk_control_and_a_failing_modprobe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ublk-control");
    let e = ensure_ublk_kernel(&control, Path::new("/bin/false")).unwrap_err();
    assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("ublk_drv") && e.to_string().contains("failed"), "{e}");
    let e = ensure_ublk_kernel(&control, &dir.path().join("no-modprobe")).unwrap_err();
    assert!(e.to_string().contains("could not run"), "{e}");
    std::fs::write(&control, "").unwrap();
    ensure_ublk_kernel(&control, Path::new("/bin/false")).unwrap();
}

#[test]
fn the_fallback_of_this_boot_is_what_the_daemon_drives_and_reports() {
    let meta = tempfile::tempdir().unwrap();
    let records = Records::open(meta.path()).unwrap();
    let spec = spec(meta.path());
    let log: Events = Arc::default();
    let make = || {
        let server = FakeServer::new(&log, BowState::Trim, true);
        let base = FakeLinear::new(&log, Lower::Ublk);
        UserspaceBowBackend::new(
            spec.clone(),
            UserspaceBowOptions::default(),
            RestoreOptions::default(),
            records.clone(),
        )
        .unwrap()
        .with_fallback(SnapshotOptions::default())
        .unwrap()
        .with_parts(server, base, Arc::new(FakeFs { events: log.clone() }))
    };
    // No record: userspace-bow itself (auto's reason is the plan's); prepare drives the engine.
    let b = make();
    assert_eq!(b.selection_reason(), "");
    assert_eq!(b.prepare().unwrap(), Action::Changed);
    assert_eq!(events(&log), ["fitrim 4096", "checkpoint"]);
    log.lock().unwrap().clear();
    // A record of another boot is stale.
    let stale = FallbackRecord { boot_id: "another boot".into(), reason: "old".into() };
    records.save(FALLBACK_KIND, &spec.instance, &stale).unwrap();
    assert_eq!(make().selection_reason(), "");
    // This boot fell back: the reason is shown, and every step is the snapshot backend's (its
    // prepare fails here, with no snapshot stack), never the engine's.
    let why = "auto: userspace-bow could not be set up (no ublk), using snapshot";
    let now = FallbackRecord { boot_id: boot_id(), reason: why.into() };
    records.save(FALLBACK_KIND, &spec.instance, &now).unwrap();
    let b = make();
    assert_eq!(b.selection_reason(), why);
    let _ = b.prepare();
    let _ = b.commit();
    let _ = b.space();
    assert!(events(&log).is_empty(), "the engine was driven: {:?}", events(&log));
}

#[test]
fn prepare_refuses_an_engine_that_knows_no_free_block_after_fitrim() {
    let meta = tempfile::tempdir().unwrap();
    let log: Events = Arc::default();
    let server = Arc::new(FakeServer {
        events: log.clone(),
        state: Mutex::new((BowState::Trim, true)),
        free: 0,
        used: 0,
        trace_fails: Mutex::new(false),
    });
    let backend = UserspaceBowBackend::new(
        spec(meta.path()),
        UserspaceBowOptions::default(),
        RestoreOptions::default(),
        Records::open(meta.path()).unwrap(),
    )
    .unwrap()
    .with_parts(
        server.clone(),
        FakeLinear::new(&log, Lower::Ublk),
        Arc::new(FakeFs { events: log.clone() }),
    );
    let e = backend.prepare().unwrap_err();
    assert!(matches!(e, BackendError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains("FITRIM trimmed 1048576 bytes"), "{e}");
    assert_eq!(events(&log), ["fitrim 4096"], "no checkpoint asked");
    assert_eq!(server.state().0, BowState::Trim);
}
