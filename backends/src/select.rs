//! `auto` backend selection: dm-bow where the kernel has the target, else userspace-bow where
//! the kernel has ublk and the `bow-ublk` server is installed, else dm-snapshot.
//!
//! The decision is made from `DM_GET_TARGET_VERSION("bow")` (which loads the module if there
//! is one) and, without dm-bow, from `/dev/ublk-control` (or a dry-run `modprobe -n ublk_drv`)
//! and the server binary, in the daemon and in the boot flow alike, so both pick the same
//! backend. The reason is logged and surfaced through `selection_reason()` (getStatus). When
//! userspace-bow is chosen but its boot setup fails before the mount, the boot flow falls back
//! to snapshot and records it for the daemon (`userspace_bow::UserspaceBowStack::with_fallback`).

use std::path::Path;

use blockdev::dm::{DeviceMapper, Version};
use serde::Deserialize;

use crate::bow::BowOptions;
use crate::snapshot::SnapshotOptions;
use crate::userspace_bow::{self, UserspaceBowOptions};

/// `[[backend]] type = "auto"`: the options of each candidate.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoOptions {
    /// Used when dm-bow is chosen.
    pub bow: BowOptions,
    /// Used when userspace-bow is chosen.
    pub userspace_bow: UserspaceBowOptions,
    /// Used when dm-snapshot is chosen (and as userspace-bow's fallback).
    pub snapshot: SnapshotOptions,
}

impl AutoOptions {
    /// Checks every candidate's options; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        self.bow.validate().map_err(|e| format!("bow.{e}"))?;
        self.userspace_bow.validate().map_err(|e| format!("userspace_bow.{e}"))?;
        self.snapshot.validate().map_err(|e| format!("snapshot.{e}"))
    }
}

/// The backend `auto` chose, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chosen {
    /// dm-bow.
    Bow(BowOptions),
    /// The userspace engine over ublk, with snapshot's options for a boot whose setup fails.
    UserspaceBow(UserspaceBowOptions, SnapshotOptions),
    /// dm-snapshot.
    Snapshot(SnapshotOptions),
}

impl Chosen {
    /// `"bow"`, `"userspace-bow"` or `"snapshot"`.
    pub fn name(&self) -> &'static str {
        match self {
            Chosen::Bow(_) => "bow",
            Chosen::UserspaceBow(..) => "userspace-bow",
            Chosen::Snapshot(_) => "snapshot",
        }
    }
}

/// The pure decision: `bow_probe` is what `target_version("bow")` answered (`Err` carries why
/// the probe itself failed); `ublk_probe` whether userspace-bow can run (`Ok`: what was found,
/// `Err`: why not). The ublk probe is consulted only without dm-bow.
pub fn decide(
    opts: &AutoOptions,
    bow_probe: Result<Option<Version>, String>,
    ublk_probe: impl FnOnce() -> Result<String, String>,
) -> (Chosen, String) {
    let no_bow = match bow_probe {
        Ok(Some(v)) => {
            return (
                Chosen::Bow(opts.bow.clone()),
                format!("auto: the kernel has dm-bow {v}, using bow"),
            )
        }
        Ok(None) => "the kernel has no dm-bow target".to_owned(),
        Err(e) => format!("probing for dm-bow failed ({e})"),
    };
    match ublk_probe() {
        Ok(found) => (
            Chosen::UserspaceBow(opts.userspace_bow.clone(), opts.snapshot.clone()),
            format!("auto: {no_bow} but has ublk ({found}), using userspace-bow"),
        ),
        Err(why) => (
            Chosen::Snapshot(opts.snapshot.clone()),
            format!("auto: {no_bow} and userspace-bow cannot run ({why}), using snapshot"),
        ),
    }
}

/// Whether userspace-bow can run here: the server binary and ublk in the kernel.
pub fn probe_ublk(opts: &UserspaceBowOptions) -> Result<String, String> {
    let server = userspace_bow::find_server(opts.server.as_deref())?;
    let kernel = userspace_bow::ublk_available(
        Path::new(userspace_bow::UBLK_CONTROL),
        Path::new("modprobe"),
    )?;
    Ok(format!("{kernel}, server {}", server.display()))
}

/// Chooses among bow, userspace-bow and snapshot from the running kernel, logging why.
pub fn choose(opts: &AutoOptions) -> (Chosen, String) {
    let probe =
        DeviceMapper::open().and_then(|dm| dm.target_version("bow")).map_err(|e| e.to_string());
    let (chosen, reason) = decide(opts, probe, || probe_ublk(&opts.userspace_bow));
    log::info!("{reason}");
    (chosen, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_ublk() -> Result<String, String> {
        Err("no /dev/ublk-control and ublk_drv cannot be loaded".into())
    }

    fn ublk() -> Result<String, String> {
        Ok("/dev/ublk-control present, server /usr/bin/bow-ublk".into())
    }

    #[test]
    fn bow_first_then_userspace_bow_then_snapshot_each_with_a_reason() {
        let opts = AutoOptions::default();
        let v = Version { major: 1, minor: 2, patch: 0 };
        // dm-bow wins whatever ublk offers, and ublk is not even probed.
        let (c, why) =
            decide(&opts, Ok(Some(v)), || panic!("ublk probed although dm-bow is there"));
        assert_eq!(c, Chosen::Bow(BowOptions::default()));
        assert!(why.contains("dm-bow 1.2.0"), "{why}");
        // No dm-bow, ublk: userspace-bow, with snapshot's options kept for the fallback.
        let (c, why) = decide(&opts, Ok(None), ublk);
        assert_eq!(
            c,
            Chosen::UserspaceBow(UserspaceBowOptions::default(), SnapshotOptions::default())
        );
        assert_eq!(c.name(), "userspace-bow");
        assert!(why.contains("no dm-bow") && why.contains("ublk-control present"), "{why}");
        // No dm-bow, no ublk (or no server): snapshot, saying why not userspace-bow.
        let (c, why) = decide(&opts, Ok(None), no_ublk);
        assert_eq!(c.name(), "snapshot");
        assert!(why.contains("no dm-bow") && why.contains("cannot be loaded"), "{why}");
        let (c, why) =
            decide(&opts, Ok(None), || Err("no bow-ublk binary (looked in PATH)".into()));
        assert_eq!(c.name(), "snapshot");
        assert!(why.contains("no bow-ublk binary"), "{why}");
        // The dm-bow probe failing is not dm-bow: ublk is next.
        let (c, why) = decide(&opts, Err("cannot open /dev/mapper/control".into()), ublk);
        assert_eq!(c.name(), "userspace-bow");
        assert!(why.contains("/dev/mapper/control"), "{why}");
        let (c, why) = decide(&opts, Err("cannot open /dev/mapper/control".into()), no_ublk);
        assert_eq!(c.name(), "snapshot");
        assert!(why.contains("/dev/mapper/control"), "{why}");
    }

    #[test]
    fn the_chosen_options_are_the_configured_ones() {
        let mut opts = AutoOptions::default();
        opts.snapshot.chunk_kib = 16;
        opts.bow.block_size_4096 = true;
        opts.userspace_bow.start_timeout_ms = 2500;
        match decide(&opts, Ok(None), no_ublk).0 {
            Chosen::Snapshot(s) => assert_eq!(s.chunk_kib, 16),
            other => panic!("{other:?}"),
        }
        match decide(&opts, Ok(Some(Version { major: 1, minor: 1, patch: 1 })), ublk).0 {
            Chosen::Bow(b) => assert!(b.block_size_4096),
            other => panic!("{other:?}"),
        }
        match decide(&opts, Ok(None), ublk).0 {
            Chosen::UserspaceBow(u, s) => {
                assert_eq!(u.start_timeout_ms, 2500);
                assert_eq!(s.chunk_kib, 16);
            }
            other => panic!("{other:?}"),
        }
        opts.snapshot.chunk_kib = 3;
        assert!(opts.validate().unwrap_err().starts_with("snapshot.chunk_kib"));
        opts.snapshot.chunk_kib = 16;
        opts.userspace_bow.start_timeout_ms = 0;
        assert!(opts.validate().unwrap_err().starts_with("userspace_bow.start_timeout_ms"));
    }

    #[test]
    fn the_ublk_probe_needs_the_server_and_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let missing = UserspaceBowOptions {
            server: Some(dir.path().join("bow-ublk")),
            ..UserspaceBowOptions::default()
        };
        assert!(probe_ublk(&missing).unwrap_err().contains("does not exist"));
        let control = dir.path().join("ublk-control");
        let false_modprobe = Path::new("/bin/false");
        assert!(userspace_bow::ublk_available(&control, false_modprobe)
            .unwrap_err()
            .contains("cannot be loaded"));
        assert!(userspace_bow::ublk_available(&control, Path::new("/bin/true"))
            .unwrap()
            .contains("loadable"));
        std::fs::write(&control, "").unwrap();
        assert!(userspace_bow::ublk_available(&control, false_modprobe)
            .unwrap()
            .contains("present"));
    }
}
