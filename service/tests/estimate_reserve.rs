//! AIDL version 2 against checkpointd as a process on its socket: estimateBackupSpace,
//! reserveSpace, releaseReservation, each bad input, learning across daemon restarts, the
//! checkpointctl commands, and a client built against the frozen version 1 working against
//! this version-2 daemon.
//!
//! The checkpointed "device" is a tmpfs mounted for the test (statvfs gives its free space, the
//! reservation file is really allocated on it), with the `test-null` backend (estimated as
//! `bow`: a block checkpoint). Mounting needs root, as CI runs these tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoint_aidl::android::system::checkpoint::ICheckpoint as codes;
use checkpoint_aidl::android::system::checkpoint::{
    EstimateBasis::EstimateBasis, EstimateRequest::EstimateRequest,
    HistoryEventKind::HistoryEventKind, ICheckpoint::ICheckpoint,
};
use checkpoint_estimate::{Record, Trace};
use rsbinder::{ExceptionCode, ParcelFileDescriptor, Status, Strong};
use testbench::daemon::TEST_BACKEND;

const MIB: i64 = 1 << 20;
/// The tmpfs "device": 64 MiB.
const DEVICE_MIB: i64 = 64;
/// `monitor.action_free_bytes` in these configs: the estimate's headroom.
const HEADROOM: i64 = MIB;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, mib: i64) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mount point");
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={mib}m,mode=0755").as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot mount a tmpfs on {}: {e}. These tests mount one as the checkpointed \
                 filesystem and need root (CI runs the tests as root).",
                path.display()
            )
        });
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The harness's setup with a tmpfs "device" in its folder.
struct Setup {
    /// Declared first: unmounted before the folder is removed.
    data: Tmpfs,
    daemon: testbench::daemon::Setup,
}

impl std::ops::Deref for Setup {
    type Target = testbench::daemon::Setup;
    fn deref(&self) -> &Self::Target {
        &self.daemon
    }
}

impl Setup {
    /// A config with one `[[device]]` on a fresh tmpfs, the test-null backend and `access`.
    fn new(access: &str) -> Setup {
        let daemon = testbench::daemon::Setup::new("");
        let data = Tmpfs::mount(daemon.path("data"), DEVICE_MIB);
        let top = format!(
            "[[device]]\ndevice = \"{raw}\"\nmount_point = \"{mount}\"\ncheckpoint = \"block\"\n\
             {TEST_BACKEND}{access}",
            raw = daemon.path("raw-device").display(),
            mount = data.path.display(),
        );
        let monitor = format!(
            "action_free_bytes = {HEADROOM}\nwarn_free_bytes = {warn}\n",
            warn = 2 * HEADROOM
        );
        daemon.write_config(&top, "", &monitor);
        Setup { data, daemon }
    }

    fn mount(&self) -> &Path {
        &self.data.path
    }

    fn reservation_file(&self) -> PathBuf {
        self.mount().join(".checkpointd/reserved")
    }

    /// A version-2 client whose session may pass descriptors (the trace).
    fn client(&self) -> Result<(Strong<dyn ICheckpoint>, rsbinder::Client), String> {
        let client =
            rsbinder::Client::open_with(checkpoint_aidl::socket_uri(&self.socket()), |o, _| {
                o.fd_mode = Some(rsbinder::rpc::FileDescriptorTransportMode::Unix);
            })
            .map_err(|e| format!("{e:?}"))?;
        let service = client
            .try_get::<dyn ICheckpoint>(checkpoint_aidl::SERVICE_NAME)
            .map_err(|e| format!("{e:?}"))?
            .ok_or("not served")?;
        Ok((service, client))
    }

    fn service(&self) -> Strong<dyn ICheckpoint> {
        let (service, client) = self.client().expect("client");
        // The session lives as long as the process; the daemon ends it at its stop.
        std::mem::forget(client);
        service
    }
}

/// A trace file of `device_size` bytes with `blocks` 4 KiB writes (every other block).
fn trace_file(device_size: u64, blocks: u64) -> std::fs::File {
    let records = (0..blocks).map(|i| Record::write(i * 16, 8));
    let trace = Trace::from_records(device_size, 4096, records).expect("valid trace");
    let mut file = tempfile::tempfile().expect("temp file");
    trace.write_to(&mut file).expect("write trace");
    file
}

fn request(trace: Option<std::fs::File>, declared: &[i64]) -> EstimateRequest {
    EstimateRequest {
        trace: trace.map(ParcelFileDescriptor::from),
        declaredBytes: declared.to_vec(),
        mountPoint: String::new(),
    }
}

fn assert_service_specific(result: Result<impl std::fmt::Debug, Status>, code: i32, text: &str) {
    let err = result.expect_err("refused");
    assert_eq!(err.exception_code(), ExceptionCode::ServiceSpecific, "{err:?}");
    assert_eq!(err.service_specific_error(), code, "{err:?}");
    let message = err.message().unwrap_or_default().to_owned();
    assert!(message.contains(text), "{message:?} does not contain {text:?}");
}

#[test]
fn estimates_answer_from_trace_declared_sizes_or_the_default() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    let service = setup.service();
    assert_eq!(service.getInterfaceVersion().expect("version"), 2);

    let device_size = u64::try_from(DEVICE_MIB * MIB).expect("size");
    let default = service.estimateBackupSpace(&request(None, &[])).expect("default estimate");
    assert_eq!(default.basis, EstimateBasis::DEFAULT);
    assert_eq!(default.backend, "bow", "test-null of kind block is estimated as bow");
    assert_eq!(default.mountPoint, setup.mount().display().to_string());
    assert_eq!(default.headroomBytes, HEADROOM);
    assert!(default.freeBytes > 60 * MIB && default.freeBytes <= DEVICE_MIB * MIB, "{default:?}");
    assert_eq!(
        default.neededBytes,
        default.predictedBytes + default.marginBytes + default.headroomBytes
    );
    assert_eq!(default.predictedBytes, default.dataBytes + default.overheadBytes);

    // Declared sizes: 8 MiB rewritten, +10% filesystem writes, one backup per block.
    let declared = service.estimateBackupSpace(&request(None, &[8 * MIB])).expect("declared");
    assert_eq!(declared.basis, EstimateBasis::DECLARED);
    assert!(declared.dataBytes >= 8 * MIB + 8 * MIB / 10, "{declared:?}");

    // A trace of 1,000 scattered 4 KiB writes: 1,000 backups without a free map.
    let trace = service
        .estimateBackupSpace(&request(Some(trace_file(device_size, 1000)), &[]))
        .expect("trace estimate");
    assert_eq!(trace.basis, EstimateBasis::TRACE);
    assert_eq!(trace.dataBytes, 1000 * 4096, "{trace:?}");
    assert_eq!(trace.shortfallBytes, 0, "fits in 64 MiB: {trace:?}");

    // Too big for the device: the shortfall says how much to free.
    let big = service.estimateBackupSpace(&request(None, &[60 * MIB])).expect("big");
    assert!(big.shortfallBytes > 0, "{big:?}");
    assert_eq!(big.shortfallBytes, big.neededBytes - big.freeBytes);

    // checkpointctl estimate, with --trace and --declared (suffixes), text and JSON.
    let path = setup.path("update.cptrace");
    let mut file = trace_file(device_size, 10);
    std::io::Seek::rewind(&mut file).expect("rewind");
    std::io::copy(&mut file, &mut std::fs::File::create(&path).expect("create")).expect("copy");
    let json = setup.ctl_json(&["estimate", "--trace", path.to_str().expect("UTF-8"), "--json"]);
    assert_eq!(json["basis"], "trace");
    assert_eq!(json["breakdown"]["data_bytes"], 10 * 4096);
    assert_eq!(json["breakdown"]["headroom_bytes"], HEADROOM);
    let json = setup.ctl_json(&["estimate", "--declared", "1M", "3M", "--json"]);
    assert_eq!(json["basis"], "declared");
    let text = setup.ctl_ok(&["estimate"]);
    assert!(text.contains("basis:            default"), "{text}");
    assert!(text.contains("shortfall:"), "{text}");
    daemon.stop();
}

#[test]
fn bad_estimate_input_is_refused_with_a_clear_message() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    let service = setup.service();
    let device_size = u64::try_from(DEVICE_MIB * MIB).expect("size");

    // A trace that does not parse.
    let mut garbage = tempfile::tempfile().expect("temp");
    garbage.write_all(b"not a trace at all, not even close").expect("write");
    assert_service_specific(
        service.estimateBackupSpace(&request(Some(garbage), &[])),
        codes::EINVAL,
        "magic",
    );
    // A trace captured on a device of another size.
    assert_service_specific(
        service.estimateBackupSpace(&request(Some(trace_file(device_size * 2, 4)), &[])),
        codes::EINVAL,
        "device",
    );
    // A negative declared size.
    assert_service_specific(
        service.estimateBackupSpace(&request(None, &[MIB, -5])),
        codes::EINVAL,
        "Declared size -5 is negative",
    );
    // An absurd one (more than the device).
    assert_service_specific(
        service.estimateBackupSpace(&request(None, &[i64::MAX])),
        codes::EINVAL,
        "declared",
    );
    // A pipe: never read (it could block a binder thread).
    let (read, _write) = nix::unistd::pipe().expect("pipe");
    let pipe =
        EstimateRequest { trace: Some(ParcelFileDescriptor::new(read)), ..request(None, &[]) };
    assert_service_specific(service.estimateBackupSpace(&pipe), codes::EINVAL, "regular file");
    // An unknown mount point.
    let elsewhere = EstimateRequest { mountPoint: "/elsewhere".into(), ..request(None, &[]) };
    assert_service_specific(
        service.estimateBackupSpace(&elsewhere),
        codes::EINVAL,
        "No checkpointed device is mounted at /elsewhere",
    );
    // A refused estimate is not kept.
    let status = service.getStatus().expect("status");
    assert_eq!(status.lastEstimateNeededBytes, -1, "{status:?}");

    // The CLI: a missing trace file is named; the daemon's refusal is shown.
    let out = setup.ctl(&["estimate", "--trace", "/nonexistent/trace"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open the trace"));
    let out = setup.ctl(&["estimate", "--declared", "-1"]);
    assert_eq!(out.status.code(), Some(2), "a clap usage error");
    daemon.stop();
}

#[test]
fn a_reservation_is_held_refused_twice_and_released() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    let service = setup.service();

    let before = service.estimateBackupSpace(&request(None, &[])).expect("estimate");
    let info = service.reserveSpace(8 * MIB).expect("reserve 8 MiB");
    assert_eq!(info.bytes, 8 * MIB);
    assert_eq!(Path::new(&info.path), setup.reservation_file());
    assert_eq!(info.mountPoint, setup.mount().display().to_string());
    let meta = std::fs::metadata(setup.reservation_file()).expect("the file exists");
    assert_eq!(i64::try_from(meta.len()).expect("len"), 8 * MIB);
    let free_after = blockdev::fs::statvfs(setup.mount()).expect("statvfs").available.get();
    assert!(free_after <= u64::try_from((DEVICE_MIB - 8) * MIB).expect("fits"), "allocated");
    let status = service.getStatus().expect("status");
    assert_eq!(status.reservation.as_ref().map(|r| r.bytes), Some(8 * MIB));
    // The estimate counts the held reservation as free: the backend takes it over.
    let after = service.estimateBackupSpace(&request(None, &[])).expect("estimate");
    assert_eq!(after.freeBytes, before.freeBytes, "{before:?} {after:?}");

    // A second reservation while one is held: EBUSY, the first one untouched.
    assert_service_specific(service.reserveSpace(MIB), codes::EBUSY, "release it first");
    assert_eq!(std::fs::metadata(setup.reservation_file()).expect("kept").len(), meta.len());

    // The CLI sees it, then releases it.
    let status = setup.ctl_json(&["status", "--json"]);
    assert_eq!(status["reservation"]["bytes"], 8 * MIB, "{status}");
    assert_eq!(status["backends_in_use"][0]["type"], "test-null");
    assert_eq!(status["backends_in_use"][0]["reason"], "configured");
    let text = setup.ctl_ok(&["status"]);
    assert!(text.contains("reservation:      8388608 bytes at"), "{text}");
    assert!(text.contains("backend in use:"), "{text}");
    assert_eq!(setup.ctl_ok(&["release"]).trim(), "reservation released");
    assert!(!setup.reservation_file().exists());
    assert!(service.getStatus().expect("status").reservation.is_none());
    // Releasing again: nothing to do.
    service.releaseReservation().expect("idempotent");

    // checkpointctl reserve takes suffixes.
    let json = setup.ctl_json(&["reserve", "2M", "--json"]);
    assert_eq!(json["bytes"], 2 * MIB);
    service.releaseReservation().expect("release");
    daemon.stop();
}

#[test]
fn bad_reservations_reserve_nothing() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    let service = setup.service();
    let free = |s: &Setup| blockdev::fs::statvfs(s.mount()).expect("statvfs").available.get();
    let before = free(&setup);

    for (bytes, code, text) in [
        (-1, codes::EINVAL, "must be more than 0 bytes (got -1)"),
        (0, codes::EINVAL, "must be more than 0 bytes (got 0)"),
        (i64::MAX, codes::EINVAL, "more than the whole filesystem"),
        // More than is free, less than the whole device (a 32 MiB file takes half of it).
        (DEVICE_MIB * MIB - MIB, codes::ENOSPC, "available"),
    ] {
        if code == codes::ENOSPC {
            let filler = setup.mount().join("filler");
            std::fs::write(&filler, vec![1u8; 32 << 20]).expect("fill half the device");
        }
        assert_service_specific(service.reserveSpace(bytes), code, text);
        assert!(!setup.reservation_file().exists(), "{bytes}: nothing reserved");
        assert!(service.getStatus().expect("status").reservation.is_none());
    }
    std::fs::remove_file(setup.mount().join("filler")).expect("unfill");
    assert_eq!(free(&setup), before, "no space lost");

    // The CLI refuses what is not a size before asking.
    let out = setup.ctl(&["reserve", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
    // And shows the daemon's refusal.
    let out = setup.ctl(&["reserve", "1T"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reserveSpace failed") && err.contains("whole filesystem"), "{err}");
    daemon.stop();
}

#[test]
fn reservation_needs_the_change_permission_estimate_does_not() {
    // Root (the test's UID) may query, not change.
    let setup = Setup::new("[access]\nchange_uids = [4242]\n");
    let daemon = setup.boot();
    let service = setup.service();
    service.estimateBackupSpace(&request(None, &[])).expect("estimate is a query");
    for result in [service.reserveSpace(MIB).map(|_| ()), service.releaseReservation()] {
        let err = result.expect_err("refused");
        assert_eq!(err.exception_code(), ExceptionCode::Security, "{err:?}");
    }
    assert!(!setup.reservation_file().exists());
    daemon.stop();
}

#[test]
fn learning_keeps_the_estimate_before_start_against_the_actual_across_restarts() {
    let setup = Setup::new("");
    let daemon = setup.boot();
    let service = setup.service();
    let estimate = service.estimateBackupSpace(&request(None, &[4 * MIB])).expect("estimate");
    service.startCheckpoint(2).expect("start");
    // An estimate after the start belongs to the next update, not this checkpoint.
    service.estimateBackupSpace(&request(None, &[32 * MIB])).expect("later estimate");
    let status = service.getStatus().expect("status");
    assert_eq!(status.checkpointEstimatedBytes, estimate.neededBytes, "{status:?}");
    daemon.stop();

    // The next boot runs under the checkpoint and commits it.
    let daemon = setup.boot();
    let service = setup.service();
    assert!(service.needsCheckpoint().expect("needsCheckpoint"));
    service.markBootAttempt().expect("mark");
    service.commitChanges().expect("commit");
    let history = service.getHistory(0).expect("history");
    let commit = history.iter().find(|e| e.kind == HistoryEventKind::COMMITTED).expect("commit");
    assert_eq!(commit.estimatedBytes, estimate.neededBytes, "{commit:?}");
    assert_eq!(commit.backupBytes, 0, "test-null backs nothing up: {commit:?}");
    let status = service.getStatus().expect("status");
    assert_eq!((status.lastEstimatedBytes, status.lastActualBytes), (estimate.neededBytes, 0));
    assert_eq!(status.checkpointEstimatedBytes, -1, "nothing tracked after the commit");

    // That checkpoint is now history for the estimator.
    let learned = service.estimateBackupSpace(&request(None, &[])).expect("from history");
    assert_eq!(learned.basis, EstimateBasis::HISTORY, "{learned:?}");
    assert_eq!(learned.historySamples, 1);

    // checkpointctl shows the estimate against the actual.
    let text = setup.ctl_ok(&["history"]);
    assert!(text.contains(&format!("backup=0 estimated={}", estimate.neededBytes)), "{text}");
    let text = setup.ctl_ok(&["status"]);
    let expected =
        format!("last checkpoint:  estimated {} bytes, actual 0 bytes", estimate.neededBytes);
    assert!(text.contains(&expected), "{text}");
    let json = setup.ctl_json(&["status", "--json"]);
    assert_eq!(json["last_checkpoint"]["estimated_bytes"], estimate.neededBytes);
    daemon.stop();
}

/// A listener of the frozen version 1.
struct V1Events(std::sync::Mutex<std::sync::mpsc::Sender<i32>>);

impl rsbinder::Interface for V1Events {}

#[allow(non_snake_case, reason = "AIDL names")]
impl checkpoint_aidl::frozen_v1::android::system::checkpoint::ICheckpointListener::ICheckpointListener
    for V1Events
{
    fn onStateChanged(
        &self,
        state: checkpoint_aidl::frozen_v1::android::system::checkpoint::CheckpointState::CheckpointState,
    ) -> rsbinder::BinderResult<()> {
        let _ = self.0.lock().expect("lock").send(state.0);
        Ok(())
    }
    fn onRestoreProgress(&self, _: i64, _: i64) -> rsbinder::BinderResult<()> {
        Ok(())
    }
    fn onLowSpace(&self, _: i64) -> rsbinder::BinderResult<()> {
        Ok(())
    }
}

#[test]
fn a_client_built_against_version_1_keeps_working_against_version_2() {
    use checkpoint_aidl::frozen_v1::android::system::checkpoint as v1;
    use v1::ICheckpoint::ICheckpoint as V1Checkpoint;
    use v1::ICheckpointListener::BnCheckpointListener;

    assert_eq!(v1::ICheckpoint::VERSION, 1, "the client is built against version 1");
    let setup = Setup::new("");
    let daemon = setup.boot();
    // A plain version-1 session: no descriptor passing asked for.
    let client =
        rsbinder::Client::open_with(checkpoint_aidl::socket_uri(&setup.socket()), |o, _| {
            o.incoming_connections = Some(1);
        })
        .expect("v1 client session");
    let service: Strong<dyn V1Checkpoint> =
        client.try_get(checkpoint_aidl::SERVICE_NAME).expect("lookup").expect("served");

    // The service says it is version 2, with version 2's hash.
    assert_eq!(service.getInterfaceVersion().expect("version"), 2);
    let v2_hash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../aidl/aidl_api/android.system.checkpoint/2/.hash"),
    )
    .expect("v2 hash");
    assert_eq!(service.getInterfaceHash().expect("hash"), v2_hash.trim());

    // Every version-1 method.
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = BnCheckpointListener::new_binder(V1Events(std::sync::Mutex::new(tx)));
    service.registerListener(&listener).expect("registerListener");
    assert!(service.supportsCheckpoint().expect("supportsCheckpoint"));
    assert!(service.supportsBlockCheckpoint().expect("supportsBlockCheckpoint"));
    assert!(!service.supportsFileCheckpoint().expect("supportsFileCheckpoint"));
    assert!(!service.isCheckpointing().expect("isCheckpointing"));
    assert!(!service.needsRollback().expect("needsRollback"));
    service.startCheckpoint(1).expect("startCheckpoint");
    let state = rx.recv_timeout(Duration::from_secs(10)).expect("a v1 listener event");
    assert_eq!(state, v1::CheckpointState::CheckpointState::PENDING.0);
    // The version-2 status parcel, read by the version-1 reader (it skips the new fields).
    let status = service.getStatus().expect("getStatus");
    assert_eq!(status.state, v1::CheckpointState::CheckpointState::PENDING);
    assert_eq!(status.budget, 2);
    assert_eq!(status.backends, ["test-null"]);
    service.resetCheckpoint().expect("resetCheckpoint");
    assert!(service.needsCheckpoint().expect("needsCheckpoint"), "a pending checkpoint");
    service.markBootAttempt().expect("markBootAttempt");
    service.prepareCheckpoint().expect("prepareCheckpoint");
    let err = service.restoreCheckpoint("relative/path").expect_err("vold's path check");
    assert_eq!(err.exception_code(), ExceptionCode::IllegalArgument);
    let err = service.restoreCheckpointPart("/dev/nonexistent-device", 1).expect_err("no device");
    assert_eq!(err.exception_code(), ExceptionCode::ServiceSpecific, "{err:?}");
    service.commitChanges().expect("commitChanges");
    assert!(!service.isCheckpointing().expect("isCheckpointing"));
    service.abortChanges("not checkpointing: nothing to do", false).expect("abortChanges");
    // Version-2 history entries (with estimatedBytes) through the version-1 reader.
    let history = service.getHistory(0).expect("getHistory");
    let kinds: Vec<_> = history.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&v1::HistoryEventKind::HistoryEventKind::COMMITTED), "{kinds:?}");
    assert!(kinds.contains(&v1::HistoryEventKind::HistoryEventKind::CHECKPOINT_STARTED));
    let commit = history
        .iter()
        .find(|e| e.kind == v1::HistoryEventKind::HistoryEventKind::COMMITTED)
        .expect("commit");
    assert_eq!(commit.backupBytes, 0);
    // Still in step after every call: the parcels were read to their end.
    assert_eq!(service.getInterfaceVersion().expect("version"), 2);
    if let Some(session) = client.session() {
        session.close_session();
    }
    daemon.stop();
}
