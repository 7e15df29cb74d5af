//! The `android.system.checkpoint` stable AIDL interface, compiled for rsbinder.
//!
//! The sources are in `aidl/android/system/checkpoint/`; the frozen API dumps in
//! `aidl/aidl_api/android.system.checkpoint/` (see `tests/api_freeze.rs` for the freeze rules).
//! Everything generated is re-exported under its AIDL package path, e.g.
//! `checkpoint_aidl::android::system::checkpoint::ICheckpoint`.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

rsbinder::include_aidl!("checkpoint_aidl");

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
