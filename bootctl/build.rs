//! Compiles `android.hardware.boot` (version 1) from `../aidl/android/hardware/boot/` with
//! rsbinder-aidl.
//!
//! The interface is stamped with version 1 and the hash Android's frozen V1 dump carries, so a
//! client that asks `getInterfaceVersion`/`getInterfaceHash` (as Android's framework may) gets
//! the same answers from the fake as from a real V1 HAL.

use std::path::PathBuf;

/// The frozen version of `android.hardware.boot` this crate speaks.
const VERSION: i32 = 1;
/// The hash of the frozen version-1 API (AOSP `aidl_api/android.hardware.boot/1/.hash`).
const HASH: &str = "2400346954240a5de495a1debc81429dd012d7b7";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.join("..").join("aidl");
    let package = root.join("android").join("hardware").join("boot");
    println!("cargo:rerun-if-changed={}", package.display());

    let builder = rsbinder_aidl::Builder::new()
        .include_dir(&root)
        .output("boot_aidl.rs")
        .source(package.join("MergeStatus.aidl"))
        .source(package.join("IBootControl.aidl"))
        .version(VERSION)
        .hash(HASH);
    if let Err(err) = builder.generate() {
        eprintln!("bootctl-hal: AIDL compilation failed: {err:?}");
        std::process::exit(1);
    }
}
