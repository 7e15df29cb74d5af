//! `auto` backend selection: dm-bow where the kernel has the target, else dm-snapshot.
//!
//! The decision is made from `DM_GET_TARGET_VERSION("bow")` (which loads the module if there
//! is one), in the daemon and in the boot flow alike, so both pick the same backend. The
//! reason is logged and surfaced through `selection_reason()` (getStatus).

use blockdev::dm::{DeviceMapper, Version};
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

impl AutoOptions {
    /// Checks both candidates' options; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        self.bow.validate().map_err(|e| format!("bow.{e}"))?;
        self.snapshot.validate().map_err(|e| format!("snapshot.{e}"))
    }
}

/// The backend `auto` chose, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chosen {
    /// dm-bow.
    Bow(BowOptions),
    /// dm-snapshot.
    Snapshot(SnapshotOptions),
}

impl Chosen {
    /// `"bow"` or `"snapshot"`.
    pub fn name(&self) -> &'static str {
        match self {
            Chosen::Bow(_) => "bow",
            Chosen::Snapshot(_) => "snapshot",
        }
    }
}

/// The pure decision: `probe` is what `target_version("bow")` answered (`Err` carries why the
/// probe itself failed).
pub fn decide(opts: &AutoOptions, probe: Result<Option<Version>, String>) -> (Chosen, String) {
    match probe {
        Ok(Some(v)) => {
            (Chosen::Bow(opts.bow.clone()), format!("auto: the kernel has dm-bow {v}, using bow"))
        }
        Ok(None) => (
            Chosen::Snapshot(opts.snapshot.clone()),
            "auto: the kernel has no dm-bow target, using snapshot".to_owned(),
        ),
        Err(e) => (
            Chosen::Snapshot(opts.snapshot.clone()),
            format!("auto: probing for dm-bow failed ({e}), using snapshot"),
        ),
    }
}

/// Chooses between bow and snapshot from the running kernel, logging why.
pub fn choose(opts: &AutoOptions) -> (Chosen, String) {
    let probe =
        DeviceMapper::open().and_then(|dm| dm.target_version("bow")).map_err(|e| e.to_string());
    let (chosen, reason) = decide(opts, probe);
    log::info!("{reason}");
    (chosen, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bow_when_present_snapshot_otherwise_with_a_reason() {
        let opts = AutoOptions::default();
        let v = Version { major: 1, minor: 2, patch: 0 };
        let (c, why) = decide(&opts, Ok(Some(v)));
        assert_eq!(c, Chosen::Bow(BowOptions::default()));
        assert!(why.contains("dm-bow 1.2.0"), "{why}");
        let (c, why) = decide(&opts, Ok(None));
        assert_eq!(c.name(), "snapshot");
        assert!(why.contains("no dm-bow"), "{why}");
        let (c, why) = decide(&opts, Err("cannot open /dev/mapper/control".into()));
        assert_eq!(c.name(), "snapshot");
        assert!(why.contains("/dev/mapper/control"), "{why}");
    }

    #[test]
    fn the_chosen_options_are_the_configured_ones() {
        let mut opts = AutoOptions::default();
        opts.snapshot.chunk_kib = 16;
        opts.bow.block_size_4096 = true;
        match decide(&opts, Ok(None)).0 {
            Chosen::Snapshot(s) => assert_eq!(s.chunk_kib, 16),
            other => panic!("{other:?}"),
        }
        match decide(&opts, Ok(Some(Version { major: 1, minor: 1, patch: 1 }))).0 {
            Chosen::Bow(b) => assert!(b.block_size_4096),
            other => panic!("{other:?}"),
        }
        opts.snapshot.chunk_kib = 3;
        assert!(opts.validate().unwrap_err().starts_with("snapshot.chunk_kib"));
    }
}
