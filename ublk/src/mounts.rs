//! Which mounts a fresh server must drop from its private mount namespace.
//!
//! `unshare(CLONE_NEWNS)` copies every mount, including a file system that sits on a ublk
//! device (a server started to recover a device whose file system is mounted). The copy holds
//! that file system, and so the device, open for as long as the server lives: after the user
//! unmounts it, stopping the device would wait for the server, which waits for the stop. The
//! server detaches every such mount in its own namespace first.

use std::path::PathBuf;

use blockdev::mountinfo::parse_mountinfo;

/// The mount points of `/proc/self/mountinfo` whose source is a ublk block device, deepest
/// (last mounted) first.
pub fn ublk_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.source.starts_with("/dev/ublkb"))
        .map(|m| m.mount_point)
        .collect();
    points.reverse();
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_deepest_first_and_unescapes_their_paths() {
        let info = "\
22 1 0:21 / / ro,relatime shared:1 - 9p /dev/root ro
30 22 259:0 / /dev/shm/mnt-ublk rw,relatime shared:12 - ext4 /dev/ublkb0 rw
31 22 8:1 / /data rw - ext4 /dev/vda rw
32 30 259:1 / /dev/shm/mnt-ublk/my\\040dir rw - ext4 /dev/ublkb1 rw
";
        assert_eq!(
            ublk_mount_points(info),
            [PathBuf::from("/dev/shm/mnt-ublk/my dir"), PathBuf::from("/dev/shm/mnt-ublk")]
        );
        assert!(ublk_mount_points("garbage line\n").is_empty());
    }
}
