//! Block checkpoints under /data: the backends that put a checkpoint under a filesystem, and
//! the device stack the boot flow mounts.
//!
//! * [`bow`]: Android's dm-bow target (state through sysfs, the log restored by the `bow`
//!   crate);
//! * [`snapshot`]: mainline dm-snapshot with a persistent COW store in a FIEMAP-mapped file on
//!   the filesystem itself; rollback by the kernel's snapshot-merge or by the offline merge of
//!   the `snapcow` crate;
//! * [`f2fs`]: f2fs `checkpoint=disable`, committed by remounting `checkpoint=enable`;
//! * [`userspace_bow`]: the userspace backup-on-write engine served over ublk by `bow-ublk`,
//!   /data mounted through a dm-linear device that commit switches onto the raw partition;
//! * [`select`]: `auto` selection (dm-bow where the kernel has it, else userspace-bow where it
//!   has ublk, else dm-snapshot);
//! * [`records`]: what a backend must remember across boots (a COW file's extents), kept in
//!   the metadata directory, outside the rolled-back filesystem;
//! * [`reservation`]: backup space reserved before the update's reboot (a preallocated file),
//!   handed over by each backend's `prepare` (the snapshot's COW store, released for bow and
//!   f2fs).
//!
//! Two halves of one contract (docs/backends.md):
//! * [`policy::Backend`]: what the daemon drives on a mounted device (restore before mount,
//!   prepare, commit, abort, teardown, space, status);
//! * [`BootStack`]: what the boot flow (`checkpointctl boot mount`, fs_mgr's role) runs before
//!   mount: build the device stack for this boot and say what to mount.
//!
//! Every step is idempotent and answers a [`policy::Action`]. Kernel object names come from
//! [`blockdev::names`], so a step rerun after a crash finds what an earlier run made.

use std::path::{Path, PathBuf};

pub use policy::{Action, BackendError};

pub mod bow;
mod errors;
pub mod f2fs;
mod ladder;
mod mountinfo;
pub mod records;
pub mod reservation;
pub mod select;
pub mod snapshot;
mod stack;
pub mod userspace_bow;

pub use ladder::{mount, mount_with, MountAttempt};
pub use mountinfo::{parse_mountinfo, MountEntry};

/// One checkpointed filesystem, as the configuration describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The raw block device (the partition; a restore or merge writes here).
    pub raw: PathBuf,
    /// Where the filesystem is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`, `f2fs`); `None` lets the kernel probe.
    pub fs_type: Option<String>,
    /// Extra mount options (comma-separated, as fstab's fifth field).
    pub mount_options: String,
    /// The instance token in kernel object names ([`blockdev::names::object_name`]): 1 to 32
    /// characters of `[a-z0-9_]`, derived from the mount point by [`instance_for`].
    pub instance: String,
}

impl DeviceSpec {
    /// Whether `device` (as `restoreCheckpoint` names it) is this spec's raw device: the same
    /// path, or a link to the same node (fs_mgr passes `/dev/block/by-name/...` links).
    pub fn covers(&self, device: &str) -> bool {
        let device = Path::new(device);
        if device == self.raw {
            return true;
        }
        match (std::fs::canonicalize(device), std::fs::canonicalize(&self.raw)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// The names' instance token for a mount point: `/data` → `data`, `/mnt/user data` →
/// `mnt_user_data`; `root` for `/`. Truncated to 32 characters.
pub fn instance_for(mount_point: &Path) -> String {
    let mut out: String = mount_point
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if out.is_empty() {
        out.push_str("root");
    }
    out.truncate(32);
    out
}

/// What the boot flow mounts after [`BootStack::setup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountPlan {
    /// The block device to mount (a device-mapper node, or the raw device).
    pub device: PathBuf,
    /// Filesystem type, if known.
    pub fs_type: Option<String>,
    /// Mount options, the configured ones plus the backend's (f2fs `checkpoint=disable`).
    pub options: String,
    /// Whether this boot's writes are checkpointed (or will be, once `prepare` arms it).
    pub checkpointed: bool,
    /// Whether the stack was built now or found in place.
    pub action: Action,
    /// f2fs `checkpoint=disable`: when set, [`mount`] adds the option itself, climbing vold's
    /// ladder (`checkpoint=disable:<n>%` from 0 up to this percentage in steps of 10, then the
    /// plain option, then none). `None`: mount with `options` as they are.
    pub checkpoint_disable_max_percent: Option<u8>,
    /// Something the boot flow should say about this plan (`auto`'s userspace-bow fell back to
    /// snapshot, and why).
    pub note: Option<String>,
}

/// The boot flow's half of a backend: runs before the filesystem is mounted.
pub trait BootStack: std::fmt::Debug {
    /// Builds this boot's device stack for `device` and says what to mount. `checkpointing` is
    /// the daemon's `needsCheckpoint` answer. Idempotent: a stack already in place (a daemon
    /// or boot script run twice) is found and reused.
    fn setup(&self, device: &DeviceSpec, checkpointing: bool) -> Result<MountPlan, BackendError>;
    /// Removes this backend's kernel objects for `device` (after unmount, or left behind by a
    /// crash). Objects in use are reported, never forced.
    fn teardown_stack(&self, device: &DeviceSpec) -> Result<Action, BackendError>;
}
