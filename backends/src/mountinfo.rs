//! Reading `/proc/self/mountinfo` for the backends: the f2fs backend tells whether
//! `checkpoint=disable` is still in force (so its commit is idempotent), and the stacks refuse
//! removing a device that is mounted. The format is parsed by [`blockdev::mountinfo`].

use std::path::Path;

pub use blockdev::mountinfo::{parse_mountinfo, MountEntry};

/// The filesystem mounted on `mount_point` (the last, i.e. topmost, entry), if any.
pub(crate) fn find_mount(entries: &[MountEntry], mount_point: &Path) -> Option<MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == mount_point).cloned()
}

/// Reads `/proc/self/mountinfo`.
pub(crate) fn read_mountinfo() -> Result<Vec<MountEntry>, policy::BackendError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| crate::errors::io("read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /data mounted twice: with checkpoint=disable, then a plain mount on top of it.
    const STACKED: &str = "\
36 22 254:0 / /data rw,noatime - f2fs /dev/dm-0 rw,checkpoint=disable:10%
38 22 254:0 / /data rw,relatime - f2fs /dev/dm-0 rw,lazytime
";

    #[test]
    fn the_topmost_mount_wins() {
        let all = parse_mountinfo(STACKED);
        let top = find_mount(&all, Path::new("/data")).unwrap();
        assert!(!top.checkpoint_disabled(), "the later /data entry is on top");
        assert!(find_mount(&all, Path::new("/nope")).is_none());
    }
}
