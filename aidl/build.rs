//! Compiles the `android.system.checkpoint` AIDL sources with rsbinder-aidl.
//!
//! The interfaces are stamped with the newest frozen version under
//! `aidl_api/android.system.checkpoint/<N>/` and that version's `.hash`, as Soong's
//! `aidl_interface` does for a frozen interface. `tests/api_freeze.rs` fails when the sources
//! differ from that frozen dump, so the stamp can't describe a different API.
//!
//! With the `frozen-v1-client` feature (tests only), it also compiles the frozen version-1 dump
//! `aidl_api/android.system.checkpoint/1/` as it was frozen, stamped version 1 and its hash, to
//! `checkpoint_aidl_v1.rs`: the code a client built against version 1 has, for the test that
//! such a client keeps working against the newer service (Soong's genrule does not build it).

use std::fs;
use std::path::{Path, PathBuf};

const PACKAGE_DIR: &str = "android/system/checkpoint";
const API_DIR: &str = "aidl_api/android.system.checkpoint";
/// The files that declare interfaces: they carry the version and hash meta methods.
const INTERFACES: &[&str] = &["ICheckpoint.aidl", "ICheckpointListener.aidl"];

/// The newest frozen version and its hash; `None` before the first freeze (the interfaces are
/// then built unversioned, and `tests/api_freeze.rs` fails until version 1 is frozen).
fn newest_frozen_version(api_dir: &Path) -> Result<Option<(i32, String)>, String> {
    let Ok(entries) = fs::read_dir(api_dir) else { return Ok(None) };
    let Some(newest) =
        entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok()).max()
    else {
        return Ok(None);
    };
    let hash_path = api_dir.join(newest.to_string()).join(".hash");
    let hash = fs::read_to_string(&hash_path)
        .map_err(|e| format!("cannot read {}: {e}", hash_path.display()))?;
    let hash = hash.lines().last().unwrap_or("").trim().to_owned();
    if hash.is_empty() {
        return Err(format!("{} is empty", hash_path.display()));
    }
    Ok(Some((newest, hash)))
}

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let package = root.join(PACKAGE_DIR);
    let api_dir = root.join(API_DIR);
    println!("cargo:rerun-if-changed={}", package.display());
    println!("cargo:rerun-if-changed={}", api_dir.display());

    let frozen = newest_frozen_version(&api_dir).unwrap_or_else(|e| {
        eprintln!("checkpoint-aidl: {e}");
        std::process::exit(1);
    });

    let stamp = |name: &str| {
        if INTERFACES.contains(&name) {
            frozen.clone()
        } else {
            None
        }
    };
    generate(&root, &package, "checkpoint_aidl.rs", &stamp);

    if std::env::var_os("CARGO_FEATURE_FROZEN_V1_CLIENT").is_some() {
        let v1_root = api_dir.join("1");
        let v1_hash = fs::read_to_string(v1_root.join(".hash")).unwrap_or_else(|e| {
            eprintln!("checkpoint-aidl: cannot read the version-1 .hash: {e}");
            std::process::exit(1);
        });
        let v1 = Some((1, v1_hash.lines().last().unwrap_or("").trim().to_owned()));
        let stamp = |name: &str| if INTERFACES.contains(&name) { v1.clone() } else { None };
        generate(&v1_root, &v1_root.join(PACKAGE_DIR), "checkpoint_aidl_v1.rs", &stamp);
    }
}

/// Compiles every .aidl file in `package` (imports resolved under `include`) to `output` in
/// OUT_DIR; `stamp` gives the version and hash a file's interfaces carry.
fn generate(
    include: &Path,
    package: &Path,
    output: &str,
    stamp: &dyn Fn(&str) -> Option<(i32, String)>,
) {
    let mut files: Vec<PathBuf> = fs::read_dir(package)
        .expect("the AIDL package directory exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "aidl"))
        .collect();
    files.sort();

    let mut builder = rsbinder_aidl::Builder::new().include_dir(include).output(output);
    for file in &files {
        builder = builder.source(file);
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some((version, hash)) = stamp(name) {
            builder = builder.version(version).hash(hash);
        }
    }
    if let Err(err) = builder.generate() {
        eprintln!("checkpoint-aidl: AIDL compilation of {output} failed: {err:?}");
        std::process::exit(1);
    }
}
