//! `auto` backend selection: dm-bow where the kernel has it, else dm-snapshot.
//!
//! TO BE BUILT (issue 9 §2).

use serde::Deserialize;

use crate::bow::BowOptions;
use crate::snapshot::SnapshotOptions;

/// `[[backend]] type = "auto"`: the options of each candidate.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoOptions {
    /// Used when dm-bow is chosen.
    pub bow: BowOptions,
    /// Used when dm-snapshot is chosen.
    pub snapshot: SnapshotOptions,
}
