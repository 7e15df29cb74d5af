//! Which mounts a fresh server must drop from its private mount namespace.
//!
//! `unshare(CLONE_NEWNS)` copies every mount, including a file system that sits on a ublk
//! device (a server started to recover a device whose file system is mounted). The copy holds
//! that file system, and so the device, open for as long as the server lives: after the user
//! unmounts it, stopping the device would wait for the server, which waits for the stop. The
//! server detaches every such mount in its own namespace first.
//!
//! "On a ublk device" includes a device stacked over one: the userspace-bow backend mounts
//! /data through a dm-linear device whose table points at `/dev/ublkbN`, so the mount's source
//! is `/dev/mapper/…`, and only sysfs (`/sys/dev/block/M:m/slaves/`) says what is under it.
//! Missing that made a recovered server hold the linear device open until it stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blockdev::mountinfo::parse_mountinfo;

/// Devices stacked deeper than this are not followed (a loop in sysfs cannot happen, but a
/// bound costs nothing).
const MAX_DEPTH: usize = 16;

/// The mount points of `/proc/self/mountinfo` whose file system sits on a ublk block device,
/// directly or through devices stacked over one (as `sys_block` — `/sys/class/block` — shows
/// their slaves), deepest (last mounted) first.
pub fn ublk_mount_points(mountinfo: &str, sys_block: &Path) -> Vec<PathBuf> {
    let names = device_names(sys_block);
    let mut points: Vec<PathBuf> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| {
            m.source.starts_with("/dev/ublkb")
                || names
                    .get(&m.dev.to_string())
                    .is_some_and(|name| stacks_over_ublk(sys_block, name, 0))
        })
        .map(|m| m.mount_point)
        .collect();
    points.reverse();
    points
}

/// `major:minor` → the kernel's name (`dm-3`) of every block device in `sys_block`, read once
/// (a mount on no block device, tmpfs or 9p, finds none).
fn device_names(sys_block: &Path) -> HashMap<String, String> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("dev")).ok()?;
            Some((text.trim().to_owned(), entry.file_name().to_string_lossy().into_owned()))
        })
        .collect()
}

/// Whether block device `name` is a ublk device or sits on one.
fn stacks_over_ublk(sys_block: &Path, name: &str, depth: usize) -> bool {
    if name.starts_with("ublkb") {
        return true;
    }
    if depth >= MAX_DEPTH {
        return false;
    }
    let Ok(slaves) = std::fs::read_dir(sys_block.join(name).join("slaves")) else {
        return false;
    };
    slaves
        .flatten()
        .any(|slave| stacks_over_ublk(sys_block, &slave.file_name().to_string_lossy(), depth + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/class/block`: `(name, major:minor, slaves)`.
    fn sys(devices: &[(&str, &str, &[&str])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, dev, slaves) in devices {
            let d = dir.path().join(name);
            std::fs::create_dir_all(d.join("slaves")).unwrap();
            std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
            for s in *slaves {
                std::fs::create_dir_all(d.join("slaves").join(s)).unwrap();
            }
        }
        dir
    }

    #[test]
    fn finds_ublk_mounts_deepest_first_and_unescapes_their_paths() {
        let info = "\
22 1 0:21 / / ro,relatime shared:1 - 9p /dev/root ro
30 22 259:0 / /dev/shm/mnt-ublk rw,relatime shared:12 - ext4 /dev/ublkb0 rw
31 22 8:1 / /data rw - ext4 /dev/vda rw
32 30 259:1 / /dev/shm/mnt-ublk/my\\040dir rw - ext4 /dev/ublkb1 rw
";
        let sys = sys(&[("vda", "8:1", &[])]);
        assert_eq!(
            ublk_mount_points(info, sys.path()),
            [PathBuf::from("/dev/shm/mnt-ublk/my dir"), PathBuf::from("/dev/shm/mnt-ublk")]
        );
        assert!(ublk_mount_points("garbage line\n", sys.path()).is_empty());
    }

    #[test]
    fn finds_a_mount_through_devices_stacked_over_ublk() {
        // /data on dm-linear (dm-2) over /dev/ublkb0; /other on dm-1 over a plain disk;
        // /deep on dm-4 over dm-3 over ublkb1.
        let sys = sys(&[
            ("ublkb0", "259:0", &[]),
            ("ublkb1", "259:1", &[]),
            ("vdb", "254:16", &[]),
            ("dm-1", "253:1", &["vdb"]),
            ("dm-2", "253:2", &["ublkb0"]),
            ("dm-3", "253:3", &["ublkb1"]),
            ("dm-4", "253:4", &["dm-3"]),
        ]);
        let info = "\
22 1 0:21 / / ro,relatime shared:1 - 9p /dev/root ro
40 22 253:2 / /data rw - ext4 /dev/mapper/cpd-data-base rw
41 22 253:1 / /other rw - ext4 /dev/mapper/other rw
42 22 253:4 / /deep rw - f2fs /dev/mapper/deep rw
43 22 0:30 / /run rw - tmpfs tmpfs rw
";
        assert_eq!(
            ublk_mount_points(info, sys.path()),
            [PathBuf::from("/deep"), PathBuf::from("/data")]
        );
    }
}
