//! The `snapshot` backend: dm-snapshot on any mainline kernel.
//!
//! TO BE BUILT (issue 9 §3). The options below are the configuration contract.

use serde::Deserialize;

/// How a snapshot checkpoint is rolled back.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackMethod {
    /// Parse the persistent COW store and copy every chunk back before mount (`snapcow`).
    #[default]
    UserspaceMerge,
    /// The kernel's snapshot-merge target (handover), verified complete before the COW file
    /// is released.
    KernelMerge,
}

/// `[[backend]] type = "snapshot"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotOptions {
    /// The COW file, relative to the mount point.
    pub cow_file: String,
    /// Fixed size of the COW store in bytes; `None`: `cow_free_percent` of the free space at
    /// prepare time.
    pub cow_bytes: Option<u64>,
    /// Share of the filesystem's free space the COW store takes when `cow_bytes` is unset.
    pub cow_free_percent: u8,
    /// Chunk size in KiB (a power of two, 4 to 512).
    pub chunk_kib: u32,
    /// How a rollback merges the COW store back.
    pub rollback: RollbackMethod,
    /// When the store is this full (percent), grow it by `grow_percent` of its size while the
    /// filesystem has room; else the health monitor's low-space action applies.
    pub grow_at_percent: u8,
    /// Growth step, percent of the current store size (0 = never grow).
    pub grow_percent: u8,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            cow_file: ".checkpointd/cow".into(),
            cow_bytes: None,
            cow_free_percent: 25,
            chunk_kib: 4,
            rollback: RollbackMethod::UserspaceMerge,
            grow_at_percent: 75,
            grow_percent: 50,
        }
    }
}
