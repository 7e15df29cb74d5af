//! Device-stack helpers shared by the backends: the raw device, the linear `Base` device /data
//! is mounted through, lookups by name, and removal of our devices that refuses to touch one in
//! use.

use std::path::PathBuf;

use blockdev::dm::target::LinearParams;
use blockdev::dm::{DevRef, DeviceInfo, DeviceMapper, DmError, Table, TableSlot, Target};
use blockdev::names::{object_name, ObjectName, Role};
use blockdev::{DevId, ErrorKind, Sectors};
use nix::errno::Errno;
use policy::{Action, BackendError};

use crate::errors;
use crate::DeviceSpec;

/// Opens device-mapper's control node.
pub(crate) fn open_dm(backend: &str) -> Result<DeviceMapper, BackendError> {
    DeviceMapper::open().map_err(|e| errors::dm(backend, "open device-mapper", e))
}

/// The name and uuid of `role` for `spec`'s instance.
pub(crate) fn name(
    backend: &str,
    role: Role,
    spec: &DeviceSpec,
) -> Result<ObjectName, BackendError> {
    object_name(role, &spec.instance).map_err(|e| errors::dm(backend, "device name", e))
}

/// The raw device's number and size (whole sectors).
pub(crate) fn raw_device(spec: &DeviceSpec) -> Result<(DevId, Sectors), BackendError> {
    let dev = DevId::of_path(&spec.raw)
        .map_err(|e| errors::io(format!("stat {}", spec.raw.display()), e))?;
    let file = std::fs::File::open(&spec.raw)
        .map_err(|e| errors::io(format!("open {}", spec.raw.display()), e))?;
    let size = blockdev::blk::size(&file)
        .map_err(|e| errors::blk(format!("size of {}", spec.raw.display()), e))?;
    Ok((dev, size.to_sectors_floor()))
}

/// `DM_DEV_STATUS` of a device by name; `None` when there is no such device.
pub(crate) fn lookup(
    dm: &DeviceMapper,
    backend: &str,
    n: &ObjectName,
) -> Result<Option<DeviceInfo>, BackendError> {
    match dm.info(DevRef::Name(&n.name)) {
        Ok(info) => Ok(Some(info)),
        Err(e) if e.errno() == Some(Errno::ENXIO) || e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(errors::dm(backend, format!("status of {}", n.name), e)),
    }
}

/// The active table's single target of a device, parsed.
pub(crate) fn active_target(
    dm: &DeviceMapper,
    backend: &str,
    n: &ObjectName,
) -> Result<Option<Target>, BackendError> {
    let lines = dm
        .table(DevRef::Name(&n.name), TableSlot::Active)
        .map_err(|e| errors::dm(backend, format!("table of {}", n.name), e))?;
    match &lines[..] {
        [one] => Ok(Target::parse(&one.target_type, &one.text).ok()),
        _ => Ok(None),
    }
}

/// A one-target linear table over `dev`.
pub(crate) fn linear(size: Sectors, dev: DevId) -> Result<Table, BackendError> {
    Table::single(size, Target::Linear(LinearParams { device: dev, offset: Sectors::new(0) }))
        .map_err(|e| errors::dm("stack", "linear table", DmError::from(e)))
}

/// Makes sure the `Base` device (linear over the raw device, or already swapped to
/// snapshot-origin over it) exists with its node; returns the node and whether it was made now.
pub(crate) fn ensure_base(
    dm: &DeviceMapper,
    backend: &str,
    spec: &DeviceSpec,
) -> Result<(PathBuf, Action), BackendError> {
    let base = name(backend, Role::Base, spec)?;
    let (raw, size) = raw_device(spec)?;
    if let Some(info) = lookup(dm, backend, &base)? {
        let ok = match active_target(dm, backend, &base)? {
            Some(Target::Linear(p)) => p.device == raw && p.offset == Sectors::new(0),
            Some(Target::SnapshotOrigin(p)) => p.origin == raw,
            _ => false,
        };
        if !ok {
            return Err(BackendError::InvalidState {
                backend: backend.to_owned(),
                state: format!("{} has an unexpected table", base.name),
                operation: "set up the base device",
            });
        }
        let node = dm
            .make_node(&base.name, info.dev)
            .map_err(|e| errors::dm(backend, format!("node of {}", base.name), e))?;
        return Ok((node, Action::Identity));
    }
    dm.create_device(&base.name, Some(&base.uuid), &linear(size, raw)?)
        .map_err(|e| errors::dm(backend, format!("create {}", base.name), e))?;
    Ok((dm.node_path(&base.name), Action::Changed))
}

/// Removes our devices of `roles` (in that order: stack tops first) for `spec`'s instance. A
/// device that is open (mounted, or used by another device) is never forced: the result is
/// `InvalidState` naming it. A device left suspended by a crash is resumed first.
pub(crate) fn remove_roles(
    dm: &DeviceMapper,
    backend: &str,
    spec: &DeviceSpec,
    roles: &[Role],
) -> Result<Action, BackendError> {
    let mut action = Action::Identity;
    for &role in roles {
        let n = name(backend, role, spec)?;
        let Some(info) = lookup(dm, backend, &n)? else { continue };
        if info.open_count > 0 {
            return Err(BackendError::InvalidState {
                backend: backend.to_owned(),
                state: format!("{} is in use ({} openers)", n.name, info.open_count),
                operation: "remove its devices",
            });
        }
        if info.suspended && info.active_table {
            dm.resume(DevRef::Name(&n.name))
                .map_err(|e| errors::dm(backend, format!("resume {}", n.name), e))?;
        }
        dm.remove_device(&n.name)
            .map_err(|e| errors::dm(backend, format!("remove {}", n.name), e))?;
        log::info!("removed {} ({})", n.name, spec.raw.display());
        action = Action::Changed;
    }
    Ok(action)
}
