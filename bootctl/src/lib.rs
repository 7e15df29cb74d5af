//! A client of Android's boot control HAL (`android.hardware.boot.IBootControl`, stable AIDL
//! version 1) as a [`policy::BootControl`], and a fake of the HAL for tests.
//!
//! - [`HalBootControl`]: what checkpointd hands to the policy on Android (or on Linux with a
//!   boot HAL registered with `rsb_hub`). [`BootHal`] is the typed client under it.
//! - [`fake::FakeBootControl`]: an in-memory HAL with fault injection, served on kernel binder
//!   or on a binder RPC socket.
//! - [`aidl`]: the generated interface (`aidl::android::hardware::boot::{IBootControl,
//!   MergeStatus}`), compiled from `aidl/android/hardware/boot/`.
//!
//! See docs/boot-control.md for how the daemon picks a boot control and which vold semantics
//! apply.

mod client;
mod error;
pub mod fake;

pub use client::{BootHal, HalBootControl};
pub use error::HalError;

/// The interface generated from `aidl/android/hardware/boot/*.aidl` by rsbinder-aidl.
pub mod aidl {
    #![allow(missing_debug_implementations, missing_docs, clippy::all, clippy::pedantic)]
    rsbinder::include_aidl!("boot_aidl");
}

pub use aidl::android::hardware::boot::IBootControl::{
    IBootControl, COMMAND_FAILED, HASH, INVALID_SLOT, VERSION,
};
pub use aidl::android::hardware::boot::MergeStatus::MergeStatus;

/// The service-manager name of the HAL's default instance (`<descriptor>/default`), the one vold
/// looks up.
pub const INSTANCE: &str = "android.hardware.boot.IBootControl/default";

/// The binder RPC endpoint of a boot HAL served on the Unix socket `path` (tests, bridges), with
/// the wire profile both ends use: AOSP's android-13+ versioned wire at the highest version
/// rsbinder speaks.
pub fn socket_uri(path: &std::path::Path) -> rsbinder::Uri {
    use rsbinder::entry::{WireProfile, WireVersion};
    rsbinder::Uri::new(rsbinder::Endpoint::unix(path))
        .with_wire(WireProfile::Android13Plus(WireVersion::MAX))
}
