//! The `bow` backend: Android's dm-bow target.
//!
//! TO BE BUILT (issue 9 §2). The options below are the configuration contract.

use std::path::PathBuf;

use serde::Deserialize;

/// `[[backend]] type = "bow"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BowOptions {
    /// Add `1 block_size:4096` to the table line (Android with dm-default-key options v2).
    pub block_size_4096: bool,
    /// The sysfs root (`/sys`); tests point it at a directory the engine model serves.
    pub sysfs_root: PathBuf,
}

impl Default for BowOptions {
    fn default() -> Self {
        BowOptions { block_size_4096: false, sysfs_root: PathBuf::from("/sys") }
    }
}
