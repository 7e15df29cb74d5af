//! The HAL client against the fake HAL over binder RPC on a Unix socket: real parcels through a
//! real socket, no kernel binder needed.

use std::path::PathBuf;
use std::time::Duration;

use bootctl_hal::fake::{FakeBootControl, FakeState, Fault, Method};
use bootctl_hal::{
    BootHal, HalBootControl, HalError, MergeStatus, COMMAND_FAILED, HASH, INSTANCE, INVALID_SLOT,
    VERSION,
};
use policy::{BootControl, BootControlError, Checkpointer, ErrorKind, PolicyError, PolicyOptions};
use rsbinder::entry::ServerGuard;
use rsbinder::ExceptionCode;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fake served on a socket in its own temporary folder, and a client connected to it.
struct Rig {
    fake: FakeBootControl,
    client: HalBootControl,
    socket: PathBuf,
    server: Option<ServerGuard>,
    _dir: tempfile::TempDir,
}

fn rig(state: FakeState) -> Rig {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("bootctl.sock");
    let fake = FakeBootControl::new(state);
    let server = fake.serve_socket(&socket).expect("serve the fake on a socket");
    let client = HalBootControl::new(BootHal::connect_socket(&socket, TIMEOUT).expect("connect"));
    Rig { fake, client, socket, server: Some(server), _dir: dir }
}

/// The `HalError` inside a `BootControlError::Hal`.
fn hal_error(error: &BootControlError) -> &HalError {
    match error {
        BootControlError::Hal(source) => {
            source.downcast_ref::<HalError>().expect("BootControlError::Hal carries a HalError")
        }
        other => panic!("expected BootControlError::Hal, got {other:?}"),
    }
}

#[test]
fn reads_slots_suffixes_and_successful_bits_over_the_socket() {
    let rig = rig(FakeState::after_update(2, 1));
    let boot = &rig.client;
    assert!(boot.is_present());
    assert_eq!(boot.slot_count().unwrap(), 2);
    assert_eq!(boot.current_slot().unwrap(), 1);
    assert_eq!(boot.slot_suffix(0).unwrap(), "_a");
    assert_eq!(boot.slot_suffix(1).unwrap(), "_b");
    assert!(boot.is_slot_marked_successful(0).unwrap());
    assert!(!boot.is_slot_marked_successful(1).unwrap());
    assert_eq!(
        rig.fake.calls(),
        [
            Method::GetNumberSlots,
            Method::GetCurrentSlot,
            Method::GetSuffix,
            Method::GetSuffix,
            Method::IsSlotMarkedSuccessful,
            Method::IsSlotMarkedSuccessful,
        ]
    );
}

#[test]
fn mark_boot_successful_flips_the_current_slots_bit() {
    let rig = rig(FakeState::after_update(2, 1));
    assert!(!rig.client.is_slot_marked_successful(1).unwrap());
    rig.client.mark_boot_successful().unwrap();
    assert!(rig.client.is_slot_marked_successful(1).unwrap());
    assert!(rig.fake.state().slots[1].successful);
    assert!(rig.fake.state().slots[0].successful, "the other slot is untouched");
}

#[test]
fn set_active_boot_slot_changes_the_next_boot_slot() {
    let rig = rig(FakeState::new(2, 0));
    assert_eq!(rig.client.hal().active_boot_slot().unwrap(), 0);
    rig.client.set_active_boot_slot(1).unwrap();
    assert_eq!(rig.client.hal().active_boot_slot().unwrap(), 1);
    assert!(rig.client.hal().slot_bootable(1).unwrap());
    assert!(!rig.client.is_slot_marked_successful(1).unwrap(), "a new active slot is unproven");
    assert_eq!(rig.client.current_slot().unwrap(), 0, "the running slot does not change");
    assert_eq!(rig.fake.state().active, 1);
}

#[test]
fn the_rest_of_the_hal_round_trips() {
    let rig = rig(FakeState::new(3, 2));
    let hal = rig.client.hal();
    assert_eq!(hal.interface_version().unwrap(), VERSION);
    assert_eq!(hal.interface_version().unwrap(), 1);
    assert_eq!(hal.interface_hash().unwrap(), HASH);
    assert_eq!(hal.number_slots().unwrap(), 3);
    assert_eq!(hal.suffix(2).unwrap(), "_c");
    hal.set_unbootable(0).unwrap();
    assert!(!hal.slot_bootable(0).unwrap());
    assert!(!hal.slot_marked_successful(0).unwrap());
    assert_eq!(hal.snapshot_merge_status().unwrap(), MergeStatus::NONE);
    hal.set_snapshot_merge_status(MergeStatus::SNAPSHOTTED).unwrap();
    assert_eq!(hal.snapshot_merge_status().unwrap(), MergeStatus::SNAPSHOTTED);
    assert_eq!(rig.fake.state().merge_status, MergeStatus::SNAPSHOTTED);
    assert!(hal.origin().starts_with("unix://"), "{}", hal.origin());
}

#[test]
fn injected_faults_surface_as_typed_errors_and_change_nothing() {
    let rig = rig(FakeState::after_update(2, 1));
    rig.fake.inject(Method::IsSlotMarkedSuccessful, Fault::COMMAND_FAILED);
    rig.fake.inject(Method::MarkBootSuccessful, Fault::COMMAND_FAILED);

    let error = rig.client.is_slot_marked_successful(1).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BootControl);
    match hal_error(&error) {
        HalError::ServiceSpecific { method, code, message } => {
            assert_eq!(*method, "isSlotMarkedSuccessful");
            assert_eq!(*code, COMMAND_FAILED);
            assert!(message.contains("injected"), "{message}");
        }
        other => panic!("expected a service-specific error, got {other:?}"),
    }
    assert!(error.to_string().contains("COMMAND_FAILED"), "{error}");

    let error = rig.client.mark_boot_successful().unwrap_err();
    assert_eq!(hal_error(&error).service_specific_code(), Some(COMMAND_FAILED));
    assert!(!rig.fake.state().slots[1].successful, "a failed mark leaves the bit clear");

    rig.fake.clear_faults();
    rig.client.mark_boot_successful().unwrap();
    assert!(rig.client.is_slot_marked_successful(1).unwrap());
}

#[test]
fn other_exceptions_are_typed_too() {
    let rig = rig(FakeState::new(2, 0));
    rig.fake.inject(Method::GetCurrentSlot, Fault::Exception(ExceptionCode::Security));
    let error = rig.client.current_slot().unwrap_err();
    assert!(
        matches!(
            hal_error(&error),
            HalError::Exception {
                method: "getCurrentSlot",
                exception: ExceptionCode::Security,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(hal_error(&error).is_hal_answer());
}

#[test]
fn invalid_slots_become_invalid_slot_errors() {
    let rig = rig(FakeState::new(2, 0));
    for slot in [2, 7, u32::MAX] {
        let error = rig.client.slot_suffix(slot).unwrap_err();
        assert!(matches!(error, BootControlError::InvalidSlot { slot: s, count: 2 } if s == slot));
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        let error = rig.client.set_active_boot_slot(slot).unwrap_err();
        assert!(matches!(error, BootControlError::InvalidSlot { count: 2, .. }), "{error:?}");
    }
    // The typed client keeps the HAL's own answer.
    let error = rig.client.hal().suffix(2).unwrap_err();
    assert_eq!(error.service_specific_code(), Some(INVALID_SLOT));
    assert!(matches!(rig.client.hal().suffix(u32::MAX), Err(HalError::SlotOutOfRange { .. })));
    assert_eq!(rig.fake.state().active, 0);
}

#[test]
fn a_missing_instance_or_socket_is_reported() {
    let rig = rig(FakeState::new(2, 0));
    let uri = bootctl_hal::socket_uri(&rig.socket)
        .with_service("android.hardware.boot.IBootControl/other");
    match BootHal::connect_uri(&uri, TIMEOUT) {
        Err(HalError::NotRegistered { instance, .. }) => assert!(instance.ends_with("/other")),
        other => panic!("expected NotRegistered, got {other:?}"),
    }
    let nowhere = rig._dir.path().join("nothing-here.sock");
    assert!(matches!(
        BootHal::connect_socket(&nowhere, TIMEOUT),
        Err(HalError::ServiceManager { .. })
    ));
    // The default instance name is what the socket serves.
    assert!(BootHal::connect_uri(
        &bootctl_hal::socket_uri(&rig.socket).with_service(INSTANCE),
        TIMEOUT
    )
    .is_ok());
}

#[test]
fn uri_strings_name_the_hal_for_a_config_file() {
    let rig = rig(FakeState::new(2, 1));
    let text = format!("unix://{}?profile=android13plus#{INSTANCE}", rig.socket.display());
    let uri: rsbinder::Uri = text.parse().expect("a unix URI string");
    assert_eq!(uri, bootctl_hal::socket_uri(&rig.socket).with_service(INSTANCE));
    let client = HalBootControl::connect_uri(&uri, TIMEOUT).unwrap();
    assert_eq!(client.current_slot().unwrap(), 1);

    let kernel: rsbinder::Uri = format!("binder://{INSTANCE}").parse().expect("a binder URI");
    assert!(kernel.endpoint().is_kernel());
    assert_eq!(kernel.service(), Some(INSTANCE));
}

#[test]
fn a_vanished_hal_is_a_transport_error() {
    let mut rig = rig(FakeState::new(2, 0));
    assert_eq!(rig.client.current_slot().unwrap(), 0);
    drop(rig.server.take());
    let error = rig.client.current_slot().unwrap_err();
    assert!(
        matches!(hal_error(&error), HalError::Transport { method: "getCurrentSlot", .. }),
        "{error:?}"
    );
    assert!(!hal_error(&error).is_hal_answer());
}

#[test]
fn a_hal_that_comes_back_is_looked_up_again() {
    let mut rig = rig(FakeState::after_update(2, 1));
    let uri = bootctl_hal::socket_uri(&rig.socket);
    let client = HalBootControl::connect_uri(&uri, TIMEOUT).unwrap();
    assert!(!client.is_slot_marked_successful(1).unwrap());

    // The HAL process "restarts": the old session dies, a new server takes the same socket.
    drop(rig.server.take());
    std::fs::remove_file(&rig.socket).ok();
    rig.server = Some(rig.fake.serve_socket(&rig.socket).expect("serve again"));
    client.mark_boot_successful().expect("the call is retried on the new HAL");
    assert!(rig.fake.state().slots[1].successful);
    assert!(client.is_slot_marked_successful(1).unwrap());

    // Gone for good: the lookup fails and the call reports the death it saw.
    drop(rig.server.take());
    std::fs::remove_file(&rig.socket).ok();
    let error = client.current_slot().unwrap_err();
    assert!(
        matches!(
            hal_error(&error),
            HalError::Transport { status: rsbinder::StatusCode::DeadObject, .. }
        ),
        "{error:?}"
    );
}

/// The policy on top of the HAL client: vold's implicit A/B checkpoint while the slot is not
/// successful, commit marks it, and the HAL-error rules.
fn checkpointer(client: HalBootControl, dir: &std::path::Path) -> Checkpointer {
    let store = policy::Store::open(dir).expect("open the store");
    Checkpointer::new(store, Box::new(client), Vec::new(), PolicyOptions::default())
        .expect("checkpointer")
}

#[test]
fn policy_checkpoints_an_unsuccessful_slot_and_commit_marks_it() {
    let rig = rig(FakeState::after_update(2, 1));
    let store_dir = tempfile::tempdir().unwrap();
    let Rig { fake, client, _dir, server, .. } = rig;
    let cp = checkpointer(client, store_dir.path());
    assert!(cp.needs_checkpoint().unwrap(), "slot _b is not successful: implicit checkpoint");
    assert!(!fake.state().slots[1].successful);
    cp.commit_changes().unwrap();
    assert!(fake.state().slots[1].successful, "commit marked the slot through the HAL");
    assert!(fake.calls().contains(&Method::MarkBootSuccessful));
    drop(server);
}

#[test]
fn policy_treats_an_is_successful_error_as_successful_and_fails_commit_on_a_mark_error() {
    let rig = rig(FakeState::after_update(2, 1));
    let store_dir = tempfile::tempdir().unwrap();
    let Rig { fake, client, socket, _dir, server } = rig;
    fake.inject(Method::IsSlotMarkedSuccessful, Fault::COMMAND_FAILED);
    let cp = checkpointer(client, store_dir.path());
    assert!(!cp.needs_checkpoint().unwrap(), "vold: an isSlotMarkedSuccessful error = successful");

    // A fresh boot (new store) of the same unproven slot: commit must mark it; make that fail.
    let store_dir = tempfile::tempdir().unwrap();
    fake.clear_faults();
    fake.inject(Method::MarkBootSuccessful, Fault::COMMAND_FAILED);
    let client = HalBootControl::new(BootHal::connect_socket(&socket, TIMEOUT).unwrap());
    let cp = checkpointer(client, store_dir.path());
    assert!(cp.needs_checkpoint().unwrap());
    match cp.commit_changes() {
        Err(error @ PolicyError::MarkBootSuccessful(_)) => {
            assert_eq!(error.errno(), policy::errno::EINVAL, "vold answers EINVAL");
        }
        other => panic!("expected a markBootSuccessful failure, got {other:?}"),
    }
    assert!(!fake.state().slots[1].successful);
    drop(server);
}

/// The wire, independent of the generated code: the transaction codes are AOSP's (the order of
/// the frozen V1 dump, from `FIRST_CALL_TRANSACTION` = 1; the meta methods at the top of the
/// user range), each carrying the arguments and result the AIDL declares.
#[test]
fn transaction_codes_and_parcels_match_the_frozen_v1_interface() {
    let mut state = FakeState::new(3, 2);
    state.active = 1;
    state.slots[0].bootable = false;
    state.merge_status = MergeStatus::CANCELLED;
    let rig = rig(state);
    // A hand-written stub, as rsbinder documents for RPC: build_request writes the interface
    // token, transact sends the raw code.
    let binder =
        rsbinder::connect_binder(bootctl_hal::socket_uri(&rig.socket).with_service(INSTANCE))
            .expect("the raw binder");
    let remote =
        (*binder).as_any().downcast_ref::<rsbinder::rpc::RpcProxy>().expect("an RPC proxy");
    let call = |code: u32, arg: Option<i32>| -> rsbinder::Parcel {
        let mut data = remote.build_request("android.hardware.boot.IBootControl").expect("request");
        if let Some(arg) = arg {
            data.write(&arg).expect("argument");
        }
        let mut reply = remote
            .transact(code, &data, 0)
            .expect("transaction")
            .expect("a two-way call has a reply");
        let status: rsbinder::Status = reply.read().expect("status");
        assert!(status.is_ok(), "code {code}: {status}");
        reply
    };
    let int = |code, arg| call(code, arg).read::<i32>().expect("int result");
    let boolean = |code, arg| call(code, arg).read::<bool>().expect("boolean result");

    assert_eq!(int(1, None), 1, "1 = getActiveBootSlot");
    assert_eq!(int(2, None), 2, "2 = getCurrentSlot");
    assert_eq!(int(3, None), 3, "3 = getNumberSlots");
    assert_eq!(int(4, None), 4, "4 = getSnapshotMergeStatus (CANCELLED = 4)");
    assert_eq!(call(5, Some(2)).read::<String>().unwrap(), "_c", "5 = getSuffix");
    assert!(!boolean(6, Some(0)), "6 = isSlotBootable");
    assert!(boolean(7, Some(1)), "7 = isSlotMarkedSuccessful");
    call(9, Some(0)); // 9 = setActiveBootSlot
    assert_eq!(rig.fake.state().active, 0);
    assert!(!boolean(7, Some(0)));
    call(8, None); // 8 = markBootSuccessful (current slot 2)
    call(10, Some(2)); // 10 = setSlotAsUnbootable
    assert!(!rig.fake.state().slots[2].bootable);
    call(11, Some(3)); // 11 = setSnapshotMergeStatus(MERGING)
    assert_eq!(rig.fake.state().merge_status, MergeStatus::MERGING);
    assert_eq!(int(16_777_215, None), 1, "getInterfaceVersion");
    assert_eq!(call(16_777_214, None).read::<String>().unwrap(), HASH, "getInterfaceHash");
    assert_eq!(
        rig.fake.calls(),
        [
            Method::GetActiveBootSlot,
            Method::GetCurrentSlot,
            Method::GetNumberSlots,
            Method::GetSnapshotMergeStatus,
            Method::GetSuffix,
            Method::IsSlotBootable,
            Method::IsSlotMarkedSuccessful,
            Method::SetActiveBootSlot,
            Method::IsSlotMarkedSuccessful,
            Method::MarkBootSuccessful,
            Method::SetSlotAsUnbootable,
            Method::SetSnapshotMergeStatus,
        ]
    );
}
