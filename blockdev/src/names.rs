//! Kernel object names: every device-mapper device checkpointd makes gets its name and uuid
//! here, so a later run (after a crash) can find and remove what an earlier run left behind.
//!
//! * uuid: `CHECKPOINTD-<format version>-<role>-<instance>` — the prefix is what
//!   [`cleanup_stale`] looks for; the version lets a newer daemon recognise (and still clean
//!   up) devices named by an older scheme.
//! * name: `cpd-<instance>-<role>` — short, readable in `dmsetup ls`, unique per instance.

use std::collections::BTreeSet;
use std::fmt;

use crate::dm::{DevRef, DeviceMapper, DmError, DmName, DmUuid, ListedDevice, TableSlot};
use crate::units::DevId;

/// Prefix of every uuid we create.
pub const UUID_PREFIX: &str = "CHECKPOINTD-";
/// Version of the naming scheme.
pub const NAME_FORMAT_VERSION: u32 = 1;

/// What a device is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The dm-bow device /data is mounted through.
    Bow,
    /// A linear device the filesystem is mounted through (the claim holder).
    Base,
    /// snapshot-origin over the raw device.
    Origin,
    /// The persistent snapshot.
    Snapshot,
    /// The linear device over a COW file's extents.
    Cow,
    /// Test and measurement devices (log-writes, flakey, ...).
    Test,
}

impl Role {
    const ALL: [Role; 6] =
        [Role::Bow, Role::Base, Role::Origin, Role::Snapshot, Role::Cow, Role::Test];

    /// The role's token in names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bow => "bow",
            Self::Base => "base",
            Self::Origin => "origin",
            Self::Snapshot => "snap",
            Self::Cow => "cow",
            Self::Test => "test",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name and uuid of one of our devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    /// Device name.
    pub name: DmName,
    /// Device uuid.
    pub uuid: DmUuid,
}

/// Names the device playing `role` for `instance` (e.g. the mount's short label, `data`).
/// The instance is 1..=32 characters of `[a-z0-9_]`.
pub fn object_name(role: Role, instance: &str) -> Result<ObjectName, DmError> {
    let ok = !instance.is_empty()
        && instance.len() <= 32
        && instance.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(DmError::InvalidArgument {
            what: "instance",
            value: instance.to_owned(),
            reason: "must be 1 to 32 characters of [a-z0-9_]",
        });
    }
    Ok(ObjectName {
        name: DmName::new(format!("cpd-{instance}-{role}"))?,
        uuid: DmUuid::new(format!("{UUID_PREFIX}{NAME_FORMAT_VERSION}-{role}-{instance}"))?,
    })
}

/// A uuid of ours, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUuid {
    /// Scheme version.
    pub version: u32,
    /// Role, if this version's role token is known.
    pub role: Option<Role>,
    /// Instance.
    pub instance: String,
}

/// Parses a uuid made by [`object_name`] (any version); `None` if it is not ours.
pub fn parse_uuid(uuid: &str) -> Option<ParsedUuid> {
    let rest = uuid.strip_prefix(UUID_PREFIX)?;
    let (version, rest) = rest.split_once('-')?;
    let version = version.parse().ok()?;
    let (role, instance) = rest.split_once('-').unwrap_or((rest, ""));
    Some(ParsedUuid { version, role: Role::parse(role), instance: instance.to_owned() })
}

/// What [`cleanup_stale`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Devices removed, in removal order.
    pub removed: Vec<String>,
    /// Devices that could not be removed, with the error.
    pub failed: Vec<(String, DmError)>,
}

/// Orders our devices so that each is removed before any of ours it sits on: a device is
/// removable once no remaining device depends on it. Returns indices into `devices`; devices
/// caught in a dependency cycle (impossible for dm, but the input is outside data) come last.
fn removal_order(devices: &[(DevId, Vec<DevId>)]) -> Vec<usize> {
    let mut remaining: BTreeSet<usize> = (0..devices.len()).collect();
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let used: BTreeSet<DevId> =
            remaining.iter().flat_map(|&i| devices[i].1.iter().copied()).collect();
        let free: Vec<usize> =
            remaining.iter().copied().filter(|&i| !used.contains(&devices[i].0)).collect();
        if free.is_empty() {
            order.extend(remaining.iter().copied());
            break;
        }
        for i in free {
            remaining.remove(&i);
            order.push(i);
        }
    }
    order
}

/// Removes every device-mapper device whose uuid starts with [`UUID_PREFIX`] (and its named
/// node), top of each stack first, after resuming any that a crash left suspended. Devices still in use (e.g. a mounted filesystem) fail with
/// `EBUSY` and are reported, not forced.
pub fn cleanup_stale(dm: &DeviceMapper) -> Result<CleanupReport, DmError> {
    let ours: Vec<ListedDevice> = dm
        .list_devices()?
        .into_iter()
        .filter(|d| d.uuid.as_deref().is_some_and(|u| u.starts_with(UUID_PREFIX)))
        .collect();
    let mut graph = Vec::new();
    for d in &ours {
        let deps = dm.deps(DevRef::Dev(d.dev), TableSlot::Active).unwrap_or_default();
        graph.push((d.dev, deps));
    }
    // A crash during a table swap can leave a device suspended. Removing a device flushes its
    // I/O, which would wait forever on a suspended device below it: resume ours first.
    for d in &ours {
        if let Ok(info) = dm.info(DevRef::Dev(d.dev)) {
            if info.suspended && info.active_table {
                if let Err(e) = dm.resume(DevRef::Dev(d.dev)) {
                    log::warn!("resuming stale dm device {}: {e}", d.name);
                }
            }
        }
    }
    let mut report = CleanupReport::default();
    for i in removal_order(&graph) {
        let d = &ours[i];
        if let Ok(name) = DmName::new(d.name.clone()) {
            if let Err(e) = dm.remove_node(&name) {
                log::warn!("stale dm node for {}: {e}", d.name);
            }
        }
        match dm.remove(DevRef::Dev(d.dev)) {
            Ok(()) => {
                log::warn!(
                    "removed stale dm device {} ({})",
                    d.name,
                    d.uuid.as_deref().unwrap_or("")
                );
                report.removed.push(d.name.clone());
            }
            Err(e) => report.failed.push((d.name.clone(), e)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids_are_versioned_and_parse_back() {
        let n = object_name(Role::Snapshot, "data").unwrap();
        assert_eq!(n.name.as_str(), "cpd-data-snap");
        assert_eq!(n.uuid.as_str(), "CHECKPOINTD-1-snap-data");
        let p = parse_uuid(n.uuid.as_str()).unwrap();
        assert_eq!(
            p,
            ParsedUuid { version: 1, role: Some(Role::Snapshot), instance: "data".into() }
        );
        assert!(parse_uuid("LVM-abc").is_none());
        // A future scheme's unknown role still parses as ours (so cleanup finds it).
        let future = parse_uuid("CHECKPOINTD-2-newrole-x").unwrap();
        assert_eq!((future.version, future.role), (2, None));
        assert!(object_name(Role::Bow, "Data").is_err());
        assert!(object_name(Role::Bow, "").is_err());
    }

    #[test]
    fn removal_order_puts_stack_tops_first() {
        let raw = DevId::new(7, 0).unwrap();
        let cow = DevId::new(254, 0).unwrap();
        let origin = DevId::new(254, 1).unwrap();
        let snap = DevId::new(254, 2).unwrap();
        let base = DevId::new(254, 3).unwrap();
        // snap uses raw and cow; origin uses raw; base uses origin; cow uses raw.
        let graph = vec![
            (cow, vec![raw]),
            (origin, vec![raw]),
            (snap, vec![raw, cow]),
            (base, vec![origin]),
        ];
        let order = removal_order(&graph);
        let pos = |i| order.iter().position(|&x| x == i).unwrap();
        assert!(pos(2) < pos(0), "snapshot before its cow device");
        assert!(pos(3) < pos(1), "base before the origin it sits on");
        assert_eq!(order.len(), 4);
    }
}
