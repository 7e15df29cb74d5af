//! The `f2fs` backend: f2fs `checkpoint=disable`.
//!
//! TO BE BUILT (issue 9 §4). The options below are the configuration contract.

use serde::Deserialize;

/// `[[backend]] type = "f2fs"`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct F2fsOptions {
    /// Highest `checkpoint=disable:<n>%` rung tried (vold's ladder goes 0, 10, … 100).
    pub max_unusable_percent: Option<u8>,
}
