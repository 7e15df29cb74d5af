//! A fake `android.hardware.boot.IBootControl` service for tests: slot state in memory, with
//! fault injection.
//!
//! The fake answers like Android's default HAL: slot arguments out of range get the
//! service-specific error `INVALID_SLOT`, and an injected failure of a command gets
//! `COMMAND_FAILED` (or whatever [`Fault`] says). Slot semantics follow the file-based boot
//! control of crate `policy` (`BootRecord`): `markBootSuccessful` marks the current slot,
//! `setActiveBootSlot` makes a slot bootable and not yet successful.
//!
//! A [`FakeBootControl`] is a cheap handle: clones share one state, so a test keeps a clone to
//! inspect the state and to inject faults while the service is published. Publish it with
//! [`FakeBootControl::serve_kernel`] (service manager on kernel binder) or
//! [`FakeBootControl::serve_socket`] (binder RPC on a Unix socket). For a fake in its own process
//! on the virtual device, run a guest entry that serves it and parks (see `tests/vm_hal.rs`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rsbinder::entry::{ServerGuard, Uri};
use rsbinder::{BinderResult, ExceptionCode, Status, StatusCode, Strong};

use crate::aidl::android::hardware::boot::IBootControl::{
    BnBootControl, IBootControl, COMMAND_FAILED, INVALID_SLOT,
};
use crate::aidl::android::hardware::boot::MergeStatus::MergeStatus;

/// The methods of `IBootControl`, to name where a fault is injected and what was called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `getActiveBootSlot`
    GetActiveBootSlot,
    /// `getCurrentSlot`
    GetCurrentSlot,
    /// `getNumberSlots`
    GetNumberSlots,
    /// `getSnapshotMergeStatus`
    GetSnapshotMergeStatus,
    /// `getSuffix`
    GetSuffix,
    /// `isSlotBootable`
    IsSlotBootable,
    /// `isSlotMarkedSuccessful`
    IsSlotMarkedSuccessful,
    /// `markBootSuccessful`
    MarkBootSuccessful,
    /// `setActiveBootSlot`
    SetActiveBootSlot,
    /// `setSlotAsUnbootable`
    SetSlotAsUnbootable,
    /// `setSnapshotMergeStatus`
    SetSnapshotMergeStatus,
}

impl Method {
    /// Every method, in AIDL (transaction) order.
    pub const ALL: [Method; 11] = [
        Method::GetActiveBootSlot,
        Method::GetCurrentSlot,
        Method::GetNumberSlots,
        Method::GetSnapshotMergeStatus,
        Method::GetSuffix,
        Method::IsSlotBootable,
        Method::IsSlotMarkedSuccessful,
        Method::MarkBootSuccessful,
        Method::SetActiveBootSlot,
        Method::SetSlotAsUnbootable,
        Method::SetSnapshotMergeStatus,
    ];

    /// The AIDL method name.
    pub fn aidl_name(self) -> &'static str {
        match self {
            Method::GetActiveBootSlot => "getActiveBootSlot",
            Method::GetCurrentSlot => "getCurrentSlot",
            Method::GetNumberSlots => "getNumberSlots",
            Method::GetSnapshotMergeStatus => "getSnapshotMergeStatus",
            Method::GetSuffix => "getSuffix",
            Method::IsSlotBootable => "isSlotBootable",
            Method::IsSlotMarkedSuccessful => "isSlotMarkedSuccessful",
            Method::MarkBootSuccessful => "markBootSuccessful",
            Method::SetActiveBootSlot => "setActiveBootSlot",
            Method::SetSlotAsUnbootable => "setSlotAsUnbootable",
            Method::SetSnapshotMergeStatus => "setSnapshotMergeStatus",
        }
    }

    /// The method with this AIDL name.
    pub fn from_aidl_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.aidl_name() == name)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.aidl_name())
    }
}

/// How an injected fault fails a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A service-specific error with this code (`COMMAND_FAILED`, `INVALID_SLOT`, ...).
    ServiceSpecific(i32),
    /// A binder exception other than a service-specific one.
    Exception(ExceptionCode),
}

impl Fault {
    /// What a failing HAL command normally returns: `COMMAND_FAILED`.
    pub const COMMAND_FAILED: Fault = Fault::ServiceSpecific(COMMAND_FAILED);

    fn status(self, method: Method) -> Status {
        let message = format!("injected fault in {method}");
        match self {
            Fault::ServiceSpecific(code) => Status::new_service_specific_error(code, Some(message)),
            Fault::Exception(exception) => Status::from(exception),
        }
    }
}

/// One slot of the fake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeSlot {
    /// The suffix (`"_a"`, ...).
    pub suffix: String,
    /// Whether the bootloader may boot it.
    pub bootable: bool,
    /// Whether it is marked as booted successfully.
    pub successful: bool,
}

/// The whole state of the fake HAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeState {
    /// The slots; slot `i` is `slots[i]`.
    pub slots: Vec<FakeSlot>,
    /// The slot this "boot" runs from.
    pub current: u32,
    /// The slot the bootloader boots next.
    pub active: u32,
    /// The Virtual A/B merge status.
    pub merge_status: MergeStatus,
}

impl FakeState {
    /// `slot_count` slots (suffixes `_a`, `_b`, ...; at most 26), all bootable and successful,
    /// booted from and active on `current`: a device at rest after a committed update.
    ///
    /// # Panics
    /// When `slot_count` is 0 or more than 26, or `current` is not a slot.
    pub fn new(slot_count: u32, current: u32) -> FakeState {
        assert!((1..=26).contains(&slot_count), "a fake has 1 to 26 slots, not {slot_count}");
        assert!(current < slot_count, "current slot {current} is not one of {slot_count}");
        let slots = (b'a'..)
            .take(usize::try_from(slot_count).expect("at most 26"))
            .map(|letter| FakeSlot {
                suffix: format!("_{}", char::from(letter)),
                bootable: true,
                successful: true,
            })
            .collect();
        FakeState { slots, current, active: current, merge_status: MergeStatus::NONE }
    }

    /// The first boot of a freshly updated slot: `current` is active, bootable and not yet
    /// successful (what makes vold checkpoint every boot until commit); other slots stay
    /// successful.
    pub fn after_update(slot_count: u32, current: u32) -> FakeState {
        let mut state = FakeState::new(slot_count, current);
        state.slots[slot_index(current)].successful = false;
        state
    }

    fn slot(&self, slot: i32) -> Result<usize, Status> {
        usize::try_from(slot)
            .ok()
            .filter(|&i| i < self.slots.len())
            .ok_or_else(|| invalid_slot(slot))
    }
}

fn slot_index(slot: u32) -> usize {
    usize::try_from(slot).expect("slot numbers fit in usize")
}

fn invalid_slot(slot: i32) -> Status {
    Status::new_service_specific_error(INVALID_SLOT, Some(format!("Invalid slot {slot}")))
}

#[derive(Debug)]
struct Inner {
    state: FakeState,
    faults: HashMap<Method, Fault>,
    calls: Vec<Method>,
}

/// The fake HAL (a handle; clones share the state).
#[derive(Clone)]
pub struct FakeBootControl {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for FakeBootControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeBootControl").field("inner", &*self.lock()).finish()
    }
}

impl FakeBootControl {
    /// A fake with this state and no faults.
    pub fn new(state: FakeState) -> FakeBootControl {
        let inner = Inner { state, faults: HashMap::new(), calls: Vec::new() };
        FakeBootControl { inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the current state.
    pub fn state(&self) -> FakeState {
        self.lock().state.clone()
    }

    /// Changes the state (e.g. to simulate a reboot into another slot).
    pub fn update<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.lock().state)
    }

    /// Makes every later call of `method` fail with `fault` (until [`clear_fault`]).
    ///
    /// [`clear_fault`]: FakeBootControl::clear_fault
    pub fn inject(&self, method: Method, fault: Fault) {
        self.lock().faults.insert(method, fault);
    }

    /// Removes the fault of `method`.
    pub fn clear_fault(&self, method: Method) {
        self.lock().faults.remove(&method);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// The calls received so far, in order (failed ones included).
    pub fn calls(&self) -> Vec<Method> {
        self.lock().calls.clone()
    }

    /// The binder object to publish or hand to a client.
    pub fn binder(&self) -> Strong<dyn IBootControl> {
        BnBootControl::new_binder(self.clone())
    }

    /// Publishes the fake as `instance` with the service manager on kernel binder (the binder
    /// thread pool is started; the registration lasts as long as the process).
    pub fn serve_kernel(&self, instance: &str) -> Result<ServerGuard, StatusCode> {
        rsbinder::serve(Uri::kernel())?.add(instance, self.binder().as_binder())?.spawn()
    }

    /// Serves the fake as the root object [`crate::INSTANCE`] of a binder RPC server on the
    /// Unix socket `path`, with the wire profile of [`crate::socket_uri`]. Dropping the guard
    /// stops the server.
    pub fn serve_socket(&self, path: &Path) -> Result<ServerGuard, StatusCode> {
        rsbinder::serve(crate::socket_uri(path))?
            .add(crate::INSTANCE, self.binder().as_binder())?
            .spawn()
    }

    /// Runs one call: records it, fails it if a fault is injected, else applies `f`.
    fn call<T>(
        &self,
        method: Method,
        f: impl FnOnce(&mut FakeState) -> Result<T, Status>,
    ) -> BinderResult<T> {
        let mut inner = self.lock();
        inner.calls.push(method);
        if let Some(fault) = inner.faults.get(&method) {
            return Err(fault.status(method));
        }
        f(&mut inner.state)
    }
}

/// Why [`serve_kernel_until_killed`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Registering an instance with the service manager failed.
    #[error("cannot register {instance} on kernel binder: {status:?}")]
    Register {
        /// The instance.
        instance: String,
        /// rsbinder's status.
        status: StatusCode,
    },
    /// The ready file could not be written.
    #[error("cannot write the ready file {path}: {source}")]
    Ready {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Registers each `(instance, fake)` on kernel binder, writes `ready` once all are registered,
/// and serves until the process is killed: the body of a VM guest entry that runs the fake HAL
/// in a process of its own (start the service manager first).
pub fn serve_kernel_until_killed(
    services: &[(&str, &FakeBootControl)],
    ready: &Path,
) -> Result<std::convert::Infallible, ServeError> {
    let mut guards = Vec::new();
    for (instance, fake) in services {
        let guard = fake
            .serve_kernel(instance)
            .map_err(|status| ServeError::Register { instance: (*instance).to_owned(), status })?;
        guards.push(guard);
    }
    std::fs::write(ready, b"ready\n")
        .map_err(|source| ServeError::Ready { path: ready.to_owned(), source })?;
    log::info!("fake boot control HAL serving {} instance(s)", services.len());
    loop {
        std::thread::park();
    }
}

fn slot_number(index: usize) -> i32 {
    i32::try_from(index).expect("at most 26 slots")
}

impl rsbinder::Interface for FakeBootControl {}

#[allow(non_snake_case, reason = "method names are the AIDL's")]
impl IBootControl for FakeBootControl {
    fn getActiveBootSlot(&self) -> BinderResult<i32> {
        self.call(Method::GetActiveBootSlot, |s| Ok(slot_number(slot_index(s.active))))
    }

    fn getCurrentSlot(&self) -> BinderResult<i32> {
        self.call(Method::GetCurrentSlot, |s| Ok(slot_number(slot_index(s.current))))
    }

    fn getNumberSlots(&self) -> BinderResult<i32> {
        self.call(Method::GetNumberSlots, |s| Ok(slot_number(s.slots.len())))
    }

    fn getSnapshotMergeStatus(&self) -> BinderResult<MergeStatus> {
        self.call(Method::GetSnapshotMergeStatus, |s| Ok(s.merge_status))
    }

    fn getSuffix(&self, slot: i32) -> BinderResult<String> {
        self.call(Method::GetSuffix, |s| Ok(s.slots[s.slot(slot)?].suffix.clone()))
    }

    fn isSlotBootable(&self, slot: i32) -> BinderResult<bool> {
        self.call(Method::IsSlotBootable, |s| Ok(s.slots[s.slot(slot)?].bootable))
    }

    fn isSlotMarkedSuccessful(&self, slot: i32) -> BinderResult<bool> {
        self.call(Method::IsSlotMarkedSuccessful, |s| Ok(s.slots[s.slot(slot)?].successful))
    }

    fn markBootSuccessful(&self) -> BinderResult<()> {
        self.call(Method::MarkBootSuccessful, |s| {
            let current = slot_index(s.current);
            s.slots[current].successful = true;
            s.slots[current].bootable = true;
            Ok(())
        })
    }

    fn setActiveBootSlot(&self, slot: i32) -> BinderResult<()> {
        self.call(Method::SetActiveBootSlot, |s| {
            let index = s.slot(slot)?;
            s.slots[index].bootable = true;
            s.slots[index].successful = false;
            s.active = u32::try_from(index).expect("at most 26 slots");
            Ok(())
        })
    }

    fn setSlotAsUnbootable(&self, slot: i32) -> BinderResult<()> {
        self.call(Method::SetSlotAsUnbootable, |s| {
            let index = s.slot(slot)?;
            s.slots[index].bootable = false;
            s.slots[index].successful = false;
            Ok(())
        })
    }

    fn setSnapshotMergeStatus(&self, status: MergeStatus) -> BinderResult<()> {
        self.call(Method::SetSnapshotMergeStatus, |s| {
            s.merge_status = status;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_state_names_slots_and_starts_at_rest() {
        let state = FakeState::new(3, 1);
        let suffixes: Vec<&str> = state.slots.iter().map(|s| s.suffix.as_str()).collect();
        assert_eq!(suffixes, ["_a", "_b", "_c"]);
        assert!(state.slots.iter().all(|s| s.bootable && s.successful));
        assert_eq!((state.current, state.active), (1, 1));
        assert_eq!(state.merge_status, MergeStatus::NONE);
        let updated = FakeState::after_update(2, 1);
        assert!(updated.slots[0].successful && !updated.slots[1].successful);
    }

    #[test]
    fn local_calls_follow_the_boot_record_semantics() {
        let fake = FakeBootControl::new(FakeState::after_update(2, 1));
        assert!(!fake.isSlotMarkedSuccessful(1).unwrap());
        fake.markBootSuccessful().unwrap();
        assert!(fake.isSlotMarkedSuccessful(1).unwrap());
        fake.setActiveBootSlot(0).unwrap();
        assert_eq!(fake.getActiveBootSlot().unwrap(), 0);
        assert_eq!(fake.getCurrentSlot().unwrap(), 1, "switching slots needs a reboot");
        assert!(!fake.isSlotMarkedSuccessful(0).unwrap());
        fake.setSlotAsUnbootable(1).unwrap();
        assert!(!fake.isSlotBootable(1).unwrap());
        for slot in [-1, 2, i32::MAX] {
            let status = fake.getSuffix(slot).unwrap_err();
            assert_eq!(status.service_specific_error(), INVALID_SLOT);
        }
    }

    #[test]
    fn faults_fail_only_their_method_until_cleared() {
        let fake = FakeBootControl::new(FakeState::after_update(2, 1));
        fake.inject(Method::MarkBootSuccessful, Fault::COMMAND_FAILED);
        fake.inject(Method::GetCurrentSlot, Fault::Exception(ExceptionCode::IllegalState));
        let status = fake.markBootSuccessful().unwrap_err();
        assert_eq!(status.service_specific_error(), COMMAND_FAILED);
        assert!(!fake.state().slots[1].successful);
        let status = fake.getCurrentSlot().unwrap_err();
        assert_eq!(status.exception_code(), ExceptionCode::IllegalState);
        assert_eq!(fake.getNumberSlots().unwrap(), 2);
        fake.clear_fault(Method::MarkBootSuccessful);
        fake.markBootSuccessful().unwrap();
        assert!(fake.getCurrentSlot().is_err());
        fake.clear_faults();
        assert_eq!(fake.getCurrentSlot().unwrap(), 1);
        assert_eq!(fake.calls().len(), 6);
        assert_eq!(fake.calls()[0], Method::MarkBootSuccessful);
    }

    #[test]
    fn method_names_round_trip() {
        for method in Method::ALL {
            assert_eq!(Method::from_aidl_name(method.aidl_name()), Some(method));
        }
        assert_eq!(Method::from_aidl_name("reboot"), None);
    }
}
