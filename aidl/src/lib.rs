//! The `android.system.checkpoint` stable AIDL interface, compiled for rsbinder.
//!
//! The sources are in `aidl/android/system/checkpoint/`; the frozen API dumps in
//! `aidl/aidl_api/android.system.checkpoint/` (see `tests/api_freeze.rs` for the freeze rules).
//! Everything generated is re-exported under its AIDL package path, e.g.
//! `checkpoint_aidl::android::system::checkpoint::ICheckpoint`.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

rsbinder::include_aidl!("checkpoint_aidl");

/// The frozen version 1 of the interface, compiled from `aidl_api/android.system.checkpoint/1/`
/// and stamped version 1: what a client built against version 1 runs. For the compatibility
/// tests (feature `frozen-v1-client`), never for the daemon.
#[cfg(feature = "frozen-v1-client")]
pub mod frozen_v1 {
    rsbinder::include_aidl!("checkpoint_aidl_v1");
}

/// The service-manager name of the default instance (`<descriptor>/default`).
pub const SERVICE_NAME: &str = "android.system.checkpoint.ICheckpoint/default";

/// The binder RPC endpoint of checkpointd's Unix socket at `path`, with the wire profile both
/// ends use: AOSP's android-13+ versioned wire (needed for callbacks such as
/// ICheckpointListener), at the highest version rsbinder speaks.
pub fn socket_uri(path: &std::path::Path) -> rsbinder::Uri {
    use rsbinder::entry::{WireProfile, WireVersion};
    rsbinder::Uri::new(rsbinder::Endpoint::unix(path))
        .with_wire(WireProfile::Android13Plus(WireVersion::MAX))
}
