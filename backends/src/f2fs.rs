//! The `f2fs` backend: f2fs `checkpoint=disable` (vold `checkpoint=fs`).
//!
//! * setup (boot flow, before mount): the raw device, mounted with `checkpoint=disable` when
//!   this boot checkpoints ([`crate::mount`] climbs vold's ladder);
//! * restore: nothing to do: f2fs itself discards everything written since the last
//!   checkpoint at the next mount if the filesystem was not remounted `checkpoint=enable`;
//! * prepare: nothing to do (the checkpoint is active from mount) but hand over a backup-space
//!   reservation still held: released. The boot flow should release it before the
//!   `checkpoint=disable` mount ([`release_reservation_before_mount`]): a file deleted while
//!   checkpoints are disabled keeps its blocks unusable until commit (rollback may need them);
//!   prepare's release is the fallback that keeps nothing behind;
//! * commit: remount with `checkpoint=enable`, idempotent (it reads `/proc/self/mountinfo` to
//!   see whether `checkpoint=disable` is still in force);
//! * space: the filesystem's free space (statvfs): with checkpoints disabled f2fs keeps every
//!   overwritten block until commit, so its free space is the backup space.

use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreOutcome, RestoreReport, RestoreRequest,
};
use serde::Deserialize;

use crate::ladder::split_options;
use crate::mountinfo::{find_mount, read_mountinfo, MountEntry};
use crate::reservation::Reservations;
use crate::{errors, BootStack, DeviceSpec, MountPlan};

const NAME: &str = "f2fs";

/// `[[backend]] type = "f2fs"`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct F2fsOptions {
    /// Highest `checkpoint=disable:<n>%` rung tried (vold's ladder goes 0, 10, … 100).
    pub max_unusable_percent: Option<u8>,
}

impl F2fsOptions {
    /// Checks the options; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        match self.max_unusable_percent {
            Some(p) if p > 100 => Err(format!("max_unusable_percent = {p}: at most 100")),
            _ => Ok(()),
        }
    }

    fn ladder_max(&self) -> u8 {
        self.max_unusable_percent.unwrap_or(100)
    }
}

fn check_fs_type(spec: &DeviceSpec) -> Result<(), BackendError> {
    match spec.fs_type.as_deref() {
        None | Some("f2fs") => Ok(()),
        Some(other) => Err(BackendError::Unsupported {
            backend: NAME.into(),
            reason: format!("{} is {other}, not f2fs", spec.mount_point.display()),
        }),
    }
}

/// The boot flow's half: what to mount, with `checkpoint=disable` when checkpointing.
#[derive(Clone, Debug, Default)]
pub struct F2fsStack {
    opts: F2fsOptions,
    /// Where a backup-space reservation of the device is recorded (`None`: not looked for).
    reservations: Option<Reservations>,
}

impl F2fsStack {
    /// A stack with these options.
    pub fn new(opts: F2fsOptions) -> F2fsStack {
        F2fsStack { opts, reservations: None }
    }

    /// A checkpointing setup first releases the device's reservation recorded in
    /// `reservations` ([`release_reservation_before_mount`]): after the `checkpoint=disable`
    /// mount its blocks would stay unusable until the commit.
    pub fn with_reservations(mut self, reservations: Reservations) -> F2fsStack {
        self.reservations = Some(reservations);
        self
    }
}

impl BootStack for F2fsStack {
    fn setup(&self, device: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError> {
        check_fs_type(device)?;
        let mut plan = MountPlan {
            device: device.raw.clone(),
            fs_type: Some("f2fs".into()),
            options: device.mount_options.clone(),
            checkpointed: checkpointing,
            action: Action::Identity,
            checkpoint_disable_max_percent: checkpointing.then(|| self.opts.ladder_max()),
            note: None,
        };
        if let Some(reservations) = &self.reservations {
            plan.action = release_reservation_before_mount(&plan, device, reservations)?;
        }
        Ok(plan)
    }

    fn teardown_stack(&self, _device: &DeviceSpec) -> Result<Action, BackendError> {
        Ok(Action::Identity) // no kernel objects of ours
    }
}

/// The boot flow's f2fs hand-over, to run before [`crate::mount`]: when `plan` asks for
/// `checkpoint=disable` and `spec` has a reservation recorded, the filesystem is mounted
/// without the option, the reservation released (unlinked, synced, record cleared) and the
/// filesystem unmounted, so the checkpointed mount finds those blocks free. f2fs needs it
/// then: once checkpoints are disabled, the blocks of a deleted file stay unusable until the
/// checkpoint is re-enabled (the rollback may need them). `Identity` when there is nothing to
/// release (a reservation of another device is left alone).
pub fn release_reservation_before_mount(
    plan: &MountPlan,
    spec: &DeviceSpec,
    reservations: &Reservations,
) -> Result<Action, BackendError> {
    if plan.checkpoint_disable_max_percent.is_none() {
        return Ok(Action::Identity);
    }
    match reservations.record(spec)? {
        Some(r) if r.raw == spec.raw && r.mount_point == spec.mount_point => {}
        _ => return Ok(Action::Identity),
    }
    // The plan's own options, without the ladder's checkpoint=disable (added only by mount).
    let opts = split_options(&plan.options);
    blockdev::mount::mount(&plan.device, &spec.mount_point, "f2fs", &opts)
        .map_err(errors::mount)?;
    let released = reservations.release_for(spec, "f2fs before the checkpoint=disable mount");
    let unmounted =
        blockdev::mount::umount(&spec.mount_point, Default::default()).map_err(errors::mount);
    let released = released?;
    unmounted?;
    Ok(if released.is_some() { Action::Changed } else { Action::Identity })
}

/// The daemon's half for one f2fs filesystem.
#[derive(Debug)]
pub struct F2fsBackend {
    spec: DeviceSpec,
    opts: F2fsOptions,
    /// Backup-space reservations to hand over and clean up (`None`: the daemon gave none).
    reservations: Option<Reservations>,
}

impl F2fsBackend {
    /// The backend of `spec`.
    pub fn new(spec: DeviceSpec, opts: F2fsOptions) -> Result<F2fsBackend, BackendError> {
        opts.validate()
            .map_err(|reason| BackendError::Unsupported { backend: NAME.into(), reason })?;
        check_fs_type(&spec)?;
        Ok(F2fsBackend { spec, opts, reservations: None })
    }

    /// Hands over, releases at abort and repairs at teardown the device's backup-space
    /// reservation, recorded in `reservations` (the bow and snapshot backends use their
    /// records folder; f2fs has no record of its own).
    pub fn with_reservations(mut self, reservations: Reservations) -> F2fsBackend {
        self.reservations = Some(reservations);
        self
    }

    fn mounted(&self) -> Result<Option<MountEntry>, BackendError> {
        Ok(find_mount(&read_mountinfo()?, &self.spec.mount_point))
    }

    fn mounted_f2fs(&self, operation: &'static str) -> Result<MountEntry, BackendError> {
        match self.mounted()? {
            Some(m) if m.fs_type == "f2fs" => Ok(m),
            Some(m) => Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: format!("{} is {}", self.spec.mount_point.display(), m.fs_type),
                operation,
            }),
            None => Err(BackendError::NotSetUp {
                backend: format!("{NAME} ({} not mounted)", self.spec.mount_point.display()),
            }),
        }
    }

    /// The options this backend was built with.
    pub fn options(&self) -> &F2fsOptions {
        &self.opts
    }
}

/// Remount options that keep the mount's flags and turn checkpoints back on.
fn enable_options(m: &MountEntry) -> blockdev::mount::MountOptions {
    let flags: Vec<&str> = ["ro", "nosuid", "nodev", "noexec", "noatime"]
        .into_iter()
        .filter(|w| m.mount_options.iter().any(|o| o == w))
        .collect();
    let mut o = split_options(&flags.join(","));
    o.data = "checkpoint=enable".into();
    o
}

impl Backend for F2fsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::File
    }

    fn name(&self) -> &str {
        NAME
    }

    fn covers(&self, device: &str) -> bool {
        self.spec.covers(device)
    }

    fn restore(
        &self,
        device: &str,
        _request: &RestoreRequest,
        _progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        log::info!(
            "restore of {device}: nothing to do for f2fs: the next mount discards what was \
             written since the last checkpoint if it was never re-enabled"
        );
        Ok(RestoreReport { outcome: RestoreOutcome::NothingToRestore, result: Ok(()) })
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        let m = self.mounted_f2fs("prepare")?;
        if m.checkpoint_disabled() {
            let Some(r) = &self.reservations else { return Ok(Action::Identity) };
            let Some(bytes) = r.release_for(&self.spec, "f2fs prepare")? else {
                return Ok(Action::Identity);
            };
            log::warn!(
                "f2fs prepare of {}: the reservation ({bytes} bytes) was still held at the \
                 checkpoint=disable mount; released now, its blocks are usable only after \
                 commit (release it before that mount: release_reservation_before_mount)",
                self.spec.mount_point.display()
            );
            Ok(Action::Changed)
        } else {
            Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: format!(
                    "{} is mounted without checkpoint=disable",
                    self.spec.mount_point.display()
                ),
                operation: "prepare",
            })
        }
    }

    fn commit(&self) -> Result<Action, BackendError> {
        let m = self.mounted_f2fs("commit")?;
        if !m.checkpoint_disabled() {
            return Ok(Action::Identity);
        }
        blockdev::mount::remount(&self.spec.mount_point, &enable_options(&m))
            .map_err(errors::mount)?;
        let after = self.mounted_f2fs("commit")?;
        if after.checkpoint_disabled() {
            return Err(BackendError::InvalidState {
                backend: NAME.into(),
                state: "checkpoint=disable still set after remount".into(),
                operation: "commit",
            });
        }
        log::info!("{}: f2fs checkpoint=enable", self.spec.mount_point.display());
        Ok(Action::Changed)
    }

    fn abort(&self) -> Result<Action, BackendError> {
        // The update is abandoned: a reservation not yet handed over goes.
        let Some(r) = &self.reservations else { return Ok(Action::Identity) };
        let released = r.release_for(&self.spec, "f2fs abort")?;
        Ok(if released.is_some() { Action::Changed } else { Action::Identity })
    }

    fn teardown(&self) -> Result<Action, BackendError> {
        match &self.reservations {
            Some(r) => r.repair_for(&self.spec, "f2fs teardown"),
            None => Ok(Action::Identity),
        }
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        let s = blockdev::fs::statvfs(&self.spec.mount_point)
            .map_err(|e| errors::fs(format!("statvfs {}", self.spec.mount_point.display()), e))?;
        Ok(BackupSpace {
            free_bytes: Some(s.available.get()),
            used_bytes: None,
            total_bytes: Some(s.total.get()),
            grow_below_free_bytes: None,
        })
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        let state = match self.mounted()? {
            Some(m) if m.checkpoint_disabled() => BackendState::Armed,
            Some(_) => BackendState::Committed,
            None => BackendState::Unknown,
        };
        let space =
            if state == BackendState::Unknown { BackupSpace::default() } else { self.space()? };
        Ok(BackendStatus {
            state,
            backup_used_bytes: space.used_bytes,
            free_bytes: space.free_bytes,
            devices: vec![self.spec.mount_point.display().to_string()],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::mountinfo::parse_mountinfo;

    fn spec(fs: Option<&str>) -> DeviceSpec {
        DeviceSpec {
            raw: "/dev/vdb".into(),
            mount_point: "/data".into(),
            fs_type: fs.map(Into::into),
            mount_options: "noatime,discard".into(),
            instance: "data".into(),
        }
    }

    #[test]
    fn setup_asks_for_the_ladder_only_when_checkpointing() {
        let stack = F2fsStack::new(F2fsOptions { max_unusable_percent: Some(30) });
        let p = stack.setup(&spec(Some("f2fs")), true).unwrap();
        assert_eq!(p.checkpoint_disable_max_percent, Some(30));
        assert_eq!(p.device, Path::new("/dev/vdb"));
        let p = stack.setup(&spec(None), false).unwrap();
        assert_eq!(p.checkpoint_disable_max_percent, None);
        assert!(stack.setup(&spec(Some("ext4")), true).is_err());
    }

    #[test]
    fn options_are_validated() {
        assert!(F2fsOptions { max_unusable_percent: Some(101) }.validate().is_err());
        assert!(F2fsOptions::default().validate().is_ok());
        assert!(F2fsBackend::new(spec(Some("ext4")), F2fsOptions::default()).is_err());
    }

    #[test]
    fn remount_keeps_the_mount_flags() {
        let line =
            "36 22 254:0 / /data rw,nosuid,nodev,noatime - f2fs /dev/vdb rw,checkpoint=disable:0%";
        let m = parse_mountinfo(line).remove(0);
        let o = enable_options(&m);
        assert!(o.nosuid && o.nodev && o.noatime && !o.read_only && !o.noexec);
        assert_eq!(o.data, "checkpoint=enable");
    }
}
