//! The client: [`BootHal`] (every `IBootControl` method, typed) and [`HalBootControl`] (the
//! [`policy::BootControl`] the checkpoint policy uses). All rsbinder bootstrap code of the client
//! is in [`BootHal::connect`] and [`BootHal::connect_uri`].

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use policy::{BootControl, BootControlError};
use rsbinder::entry::{Client, Uri};
use rsbinder::{BinderResult, StatusCode, Strong};

use crate::aidl::android::hardware::boot::IBootControl::{IBootControl, INVALID_SLOT};
use crate::aidl::android::hardware::boot::MergeStatus::MergeStatus;
use crate::error::HalError;

/// First pause between service-manager lookups while waiting for the HAL; doubled up to
/// [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(10);
/// Longest pause between lookups.
const MAX_POLL: Duration = Duration::from_millis(250);

/// A connected boot control HAL: the AIDL methods with typed errors and `u32` slots.
pub struct BootHal {
    hal: Strong<dyn IBootControl>,
    /// Where it came from (instance name or URI), for messages.
    origin: String,
}

impl fmt::Debug for BootHal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootHal").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl BootHal {
    /// Looks `instance` up with the service manager on kernel binder (the default driver, or
    /// the one this process already uses), waiting up to `timeout` for it to be registered
    /// (vold waits without bound; a daemon should not). Starts the binder thread pool if this
    /// process has not yet.
    ///
    /// Unlike vold's client this does not ask the service manager whether the instance is
    /// declared in a VINTF manifest first: `rsb_hub` on Linux has no manifest, so the bounded
    /// wait is the only test of presence.
    pub fn connect(instance: &str, timeout: Duration) -> Result<BootHal, HalError> {
        BootHal::connect_kernel(Uri::kernel(), instance, timeout)
    }

    fn connect_kernel(
        endpoint: Uri,
        instance: &str,
        timeout: Duration,
    ) -> Result<BootHal, HalError> {
        let sm_error =
            |status: StatusCode| HalError::ServiceManager { instance: instance.to_owned(), status };
        let client = Client::open(endpoint).map_err(sm_error)?;
        let start = Instant::now();
        let mut pause = FIRST_POLL;
        loop {
            match client.try_get::<dyn IBootControl>(instance) {
                Ok(Some(hal)) => return Ok(BootHal::from_binder(hal, instance)),
                Ok(None) => {}
                Err(StatusCode::BadType) => {
                    return Err(HalError::WrongInterface { instance: instance.to_owned() })
                }
                Err(status) => return Err(sm_error(status)),
            }
            let waited = start.elapsed();
            let Some(left) = timeout.checked_sub(waited).filter(|left| !left.is_zero()) else {
                return Err(HalError::NotRegistered { instance: instance.to_owned(), waited });
            };
            thread::sleep(pause.min(left));
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Connects through any rsbinder endpoint: `uri` names the endpoint and, optionally, the
    /// service (default [`crate::INSTANCE`]); e.g. `binder://android.hardware.boot.IBootControl/default`
    /// or `unix:///run/bootctl.sock#android.hardware.boot.IBootControl/default` (see
    /// `rsbinder::Uri`). Kernel endpoints wait as [`BootHal::connect`] (with the URI's driver);
    /// RPC endpoints (`unix://...`) do one lookup, with `timeout` bounding every connection
    /// step and every later reply.
    pub fn connect_uri(uri: &Uri, timeout: Duration) -> Result<BootHal, HalError> {
        let instance = uri.service().unwrap_or(crate::INSTANCE).to_owned();
        let endpoint = Uri::new(uri.endpoint().clone()).with_wire(uri.wire());
        if uri.endpoint().is_kernel() {
            return BootHal::connect_kernel(endpoint, &instance, timeout);
        }
        let client = Client::open_with(endpoint, |options, _| options.timeout = Some(timeout))
            .map_err(|status| HalError::ServiceManager { instance: instance.clone(), status })?;
        match client.get::<dyn IBootControl>(&instance) {
            Ok(hal) => Ok(BootHal::from_binder(hal, &format!("{uri}"))),
            Err(StatusCode::NameNotFound) => {
                Err(HalError::NotRegistered { instance, waited: Duration::ZERO })
            }
            Err(StatusCode::BadType) => Err(HalError::WrongInterface { instance }),
            Err(status) => Err(HalError::ServiceManager { instance, status }),
        }
    }

    /// Connects to a fake (or a bridge) served on the Unix socket `path` with
    /// [`crate::socket_uri`]'s wire profile.
    pub fn connect_socket(path: &Path, timeout: Duration) -> Result<BootHal, HalError> {
        BootHal::connect_uri(&crate::socket_uri(path), timeout)
    }

    /// Wraps a binder obtained elsewhere. `origin` names it in messages.
    pub fn from_binder(hal: Strong<dyn IBootControl>, origin: &str) -> BootHal {
        BootHal { hal, origin: origin.to_owned() }
    }

    /// The proxy (or local object).
    pub fn binder(&self) -> &Strong<dyn IBootControl> {
        &self.hal
    }

    /// Where the HAL was found (instance name or URI).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `getNumberSlots`.
    pub fn number_slots(&self) -> Result<u32, HalError> {
        unsigned("getNumberSlots", self.hal.getNumberSlots())
    }

    /// `getCurrentSlot`.
    pub fn current_slot(&self) -> Result<u32, HalError> {
        unsigned("getCurrentSlot", self.hal.getCurrentSlot())
    }

    /// `getActiveBootSlot`.
    pub fn active_boot_slot(&self) -> Result<u32, HalError> {
        unsigned("getActiveBootSlot", self.hal.getActiveBootSlot())
    }

    /// `getSuffix`.
    pub fn suffix(&self, slot: u32) -> Result<String, HalError> {
        checked("getSuffix", self.hal.getSuffix(aidl_slot(slot)?))
    }

    /// `isSlotBootable`.
    pub fn slot_bootable(&self, slot: u32) -> Result<bool, HalError> {
        checked("isSlotBootable", self.hal.isSlotBootable(aidl_slot(slot)?))
    }

    /// `isSlotMarkedSuccessful`.
    pub fn slot_marked_successful(&self, slot: u32) -> Result<bool, HalError> {
        checked("isSlotMarkedSuccessful", self.hal.isSlotMarkedSuccessful(aidl_slot(slot)?))
    }

    /// `markBootSuccessful` (the current slot).
    pub fn mark_successful(&self) -> Result<(), HalError> {
        checked("markBootSuccessful", self.hal.markBootSuccessful())
    }

    /// `setActiveBootSlot`.
    pub fn set_active(&self, slot: u32) -> Result<(), HalError> {
        checked("setActiveBootSlot", self.hal.setActiveBootSlot(aidl_slot(slot)?))
    }

    /// `setSlotAsUnbootable`.
    pub fn set_unbootable(&self, slot: u32) -> Result<(), HalError> {
        checked("setSlotAsUnbootable", self.hal.setSlotAsUnbootable(aidl_slot(slot)?))
    }

    /// `getSnapshotMergeStatus`.
    pub fn snapshot_merge_status(&self) -> Result<MergeStatus, HalError> {
        checked("getSnapshotMergeStatus", self.hal.getSnapshotMergeStatus())
    }

    /// `setSnapshotMergeStatus`.
    pub fn set_snapshot_merge_status(&self, status: MergeStatus) -> Result<(), HalError> {
        checked("setSnapshotMergeStatus", self.hal.setSnapshotMergeStatus(status))
    }

    /// The stable-AIDL version the HAL implements (`getInterfaceVersion`).
    pub fn interface_version(&self) -> Result<i32, HalError> {
        checked("getInterfaceVersion", self.hal.getInterfaceVersion())
    }

    /// The stable-AIDL hash of the HAL's interface (`getInterfaceHash`).
    pub fn interface_hash(&self) -> Result<String, HalError> {
        checked("getInterfaceHash", self.hal.getInterfaceHash())
    }
}

fn aidl_slot(slot: u32) -> Result<i32, HalError> {
    i32::try_from(slot).map_err(|_| HalError::SlotOutOfRange { slot })
}

fn checked<T>(method: &'static str, result: BinderResult<T>) -> Result<T, HalError> {
    result.map_err(|status| HalError::from_status(method, &status))
}

fn unsigned(method: &'static str, result: BinderResult<i32>) -> Result<u32, HalError> {
    let value = checked(method, result)?;
    u32::try_from(value).map_err(|_| HalError::BadReply { method, value })
}

/// [`policy::BootControl`] over the boot control HAL.
///
/// Errors are [`BootControlError::Hal`] with a [`HalError`] inside, except slot numbers the HAL
/// rejects as `INVALID_SLOT` (or that AIDL cannot carry), which become
/// [`BootControlError::InvalidSlot`]. vold's rule that an `isSlotMarkedSuccessful` error means
/// "successful" is the policy's to apply: this returns the error.
///
/// A HAL found by [`HalBootControl::connect`] or [`HalBootControl::connect_uri`] is looked up
/// again when a call finds it dead (`DeadObject`: the HAL process restarted), and the call is
/// retried once on the new one, as vold's client reconnects on binder death. Every call the
/// policy makes is idempotent, so the retry is safe.
#[derive(Debug)]
pub struct HalBootControl {
    hal: Mutex<Arc<BootHal>>,
    /// Where to look the HAL up again; `None` for a binder handed in.
    reconnect: Option<(Uri, Duration)>,
}

impl HalBootControl {
    /// How long [`HalBootControl::connect`] waits for the HAL to register when the caller has
    /// no better figure.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The default instance ([`crate::INSTANCE`]) on kernel binder, waiting up to `timeout` (also
    /// for a reconnect).
    pub fn connect(timeout: Duration) -> Result<HalBootControl, HalError> {
        HalBootControl::connect_uri(&Uri::kernel().with_service(crate::INSTANCE), timeout)
    }

    /// Any endpoint (see [`BootHal::connect_uri`]), waiting up to `timeout` (also for a
    /// reconnect).
    pub fn connect_uri(uri: &Uri, timeout: Duration) -> Result<HalBootControl, HalError> {
        let hal = BootHal::connect_uri(uri, timeout)?;
        log::info!("boot control HAL: using {}", hal.origin());
        Ok(HalBootControl {
            hal: Mutex::new(Arc::new(hal)),
            reconnect: Some((uri.clone(), timeout)),
        })
    }

    /// Over a HAL already connected (no reconnect).
    pub fn new(hal: BootHal) -> HalBootControl {
        HalBootControl { hal: Mutex::new(Arc::new(hal)), reconnect: None }
    }

    /// Over a binder obtained elsewhere (a test's local fake, a proxy from another lookup); no
    /// reconnect.
    pub fn from_binder(hal: Strong<dyn IBootControl>, origin: &str) -> HalBootControl {
        HalBootControl::new(BootHal::from_binder(hal, origin))
    }

    /// The typed HAL in use, for the methods the policy does not use.
    pub fn hal(&self) -> Arc<BootHal> {
        Arc::clone(&self.hal.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Runs `call` on the HAL; if the HAL is dead and can be looked up again, once more on the
    /// new one.
    fn with_hal<T>(&self, call: impl Fn(&BootHal) -> Result<T, HalError>) -> Result<T, HalError> {
        let hal = self.hal();
        let error = match call(&hal) {
            Err(error @ HalError::Transport { status: StatusCode::DeadObject, .. }) => error,
            other => return other,
        };
        let Some((uri, timeout)) = &self.reconnect else { return Err(error) };
        log::warn!("boot control HAL {} died ({error}); looking it up again", hal.origin());
        let fresh = match BootHal::connect_uri(uri, *timeout) {
            Ok(fresh) => Arc::new(fresh),
            Err(lookup) => {
                log::error!("boot control HAL: lookup after its death failed: {lookup}");
                return Err(error);
            }
        };
        *self.hal.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::clone(&fresh);
        call(&fresh)
    }

    /// A slot-taking call: `INVALID_SLOT` becomes [`BootControlError::InvalidSlot`] (with the
    /// count, if the HAL answers it).
    fn slot_call<T>(
        &self,
        slot: u32,
        call: impl Fn(&BootHal) -> Result<T, HalError>,
    ) -> Result<T, BootControlError> {
        let error = match self.with_hal(call) {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let invalid = matches!(error, HalError::SlotOutOfRange { .. })
            || error.service_specific_code() == Some(INVALID_SLOT);
        match (invalid, self.with_hal(BootHal::number_slots)) {
            (true, Ok(count)) => Err(BootControlError::InvalidSlot { slot, count }),
            _ => Err(error.into()),
        }
    }
}

impl BootControl for HalBootControl {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        Ok(self.with_hal(BootHal::number_slots)?)
    }

    fn current_slot(&self) -> Result<u32, BootControlError> {
        Ok(self.with_hal(BootHal::current_slot)?)
    }

    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        self.slot_call(slot, |hal| hal.suffix(slot))
    }

    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        self.slot_call(slot, |hal| hal.slot_marked_successful(slot))
    }

    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        Ok(self.with_hal(BootHal::mark_successful)?)
    }

    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        self.slot_call(slot, |hal| hal.set_active(slot))
    }
}
