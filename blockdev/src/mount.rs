//! mount / umount / remount (over `nix::mount`), with the kernel's logged reason on failure.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::ErrorKind;
use crate::kmsg::KmsgCursor;

/// A mount operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target}: {errno}{}", .kernel_message.as_deref().map(|m| format!(" (kernel: {m})")).unwrap_or_default())]
pub struct MountError {
    /// "mount", "remount" or "umount".
    pub op: &'static str,
    /// The mount point.
    pub target: PathBuf,
    /// The errno.
    pub errno: Errno,
    /// Kernel log lines logged during the call (the filesystem's reason), if readable.
    pub kernel_message: Option<String>,
}

impl MountError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::from_errno(self.errno)
    }
}

/// Generic mount flags plus the filesystem's own option string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `MS_RDONLY`.
    pub read_only: bool,
    /// `MS_NOSUID`.
    pub nosuid: bool,
    /// `MS_NODEV`.
    pub nodev: bool,
    /// `MS_NOEXEC`.
    pub noexec: bool,
    /// `MS_NOATIME`.
    pub noatime: bool,
    /// Filesystem options, comma separated (e.g. `"discard,checkpoint=disable"`).
    pub data: String,
}

impl MountOptions {
    fn flags(&self) -> MsFlags {
        let mut f = MsFlags::empty();
        f.set(MsFlags::MS_RDONLY, self.read_only);
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f.set(MsFlags::MS_NOEXEC, self.noexec);
        f.set(MsFlags::MS_NOATIME, self.noatime);
        f
    }
}

/// How to unmount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnmountMode {
    /// Fail with `EBUSY` if in use.
    #[default]
    Normal,
    /// `MNT_DETACH`: detach now, clean up when no longer busy.
    Detach,
}

fn fail<'a>(
    op: &'static str,
    target: &'a Path,
    cursor: KmsgCursor,
) -> impl FnOnce(Errno) -> MountError + 'a {
    move |errno| MountError {
        op,
        target: target.to_owned(),
        errno,
        kernel_message: cursor.messages_since(""),
    }
}

/// Mounts `source` (a block device) on `target` as `fstype`.
pub fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    opts: &MountOptions,
) -> Result<(), MountError> {
    let cursor = KmsgCursor::at_end();
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    nix::mount::mount(Some(source), target, Some(fstype), opts.flags(), data)
        .map_err(fail("mount", target, cursor))
}

/// Changes the flags and options of the mount at `target` (`MS_REMOUNT`).
pub fn remount(target: &Path, opts: &MountOptions) -> Result<(), MountError> {
    let cursor = KmsgCursor::at_end();
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    nix::mount::mount(None::<&Path>, target, None::<&str>, opts.flags() | MsFlags::MS_REMOUNT, data)
        .map_err(fail("remount", target, cursor))
}

/// Unmounts `target`.
pub fn umount(target: &Path, mode: UnmountMode) -> Result<(), MountError> {
    let cursor = KmsgCursor::at_end();
    let flags = match mode {
        UnmountMode::Normal => MntFlags::empty(),
        UnmountMode::Detach => MntFlags::MNT_DETACH,
    };
    nix::mount::umount2(target, flags).map_err(fail("umount", target, cursor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_map_to_flags() {
        let o = MountOptions { read_only: true, nodev: true, ..MountOptions::default() };
        assert_eq!(o.flags(), MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
    }

    #[test]
    fn unmounting_a_non_mount_point_is_a_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let e = umount(d.path(), UnmountMode::Normal).unwrap_err();
        // EINVAL (not a mount point) as root, EPERM otherwise.
        assert!(matches!(e.kind(), ErrorKind::Invalid | ErrorKind::Permission), "{e}");
    }
}
