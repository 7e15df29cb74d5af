//! `/proc/self/mountinfo`'s format (proc(5)): which filesystem is mounted where, with which
//! options. Pure text parsing, shared by the backends (is `checkpoint=disable` still in force,
//! is a device mounted) and the ublk server (which mounts to drop from its namespace).

use std::path::PathBuf;

use crate::DevId;

/// One line of `/proc/self/mountinfo` (proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem's device.
    pub dev: DevId,
    /// The mount point.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub mount_options: Vec<String>,
    /// Filesystem type (`ext4`, `f2fs`).
    pub fs_type: String,
    /// The mount source (`/dev/dm-0`).
    pub source: String,
    /// Per-superblock options (`rw,checkpoint=disable:0%,...`).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether the superblock options contain `checkpoint=disable` (with or without `:<n>%`
    /// or a block count).
    pub fn checkpoint_disabled(&self) -> bool {
        self.super_options
            .iter()
            .any(|o| o == "checkpoint=disable" || o.starts_with("checkpoint=disable:"))
    }

    /// Whether a per-mount or superblock option is exactly `word`.
    pub fn has_option(&self, word: &str) -> bool {
        self.mount_options.iter().chain(&self.super_options).any(|o| o == word)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let oct = std::str::from_utf8(oct).unwrap_or("");
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn split_options(s: &str) -> Vec<String> {
    s.split(',').filter(|o| !o.is_empty()).map(unescape).collect()
}

/// Parses mountinfo text; lines that do not have the documented shape are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    // id parent major:minor root mount_point mount_options [optional...] - fstype source super
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    Some(MountEntry {
        dev: fields[2].parse().ok()?,
        mount_point: PathBuf::from(unescape(fields[4])),
        mount_options: split_options(fields[5]),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: split_options(fields[sep + 3]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 22 254:0 / /data rw,nosuid,nodev,noatime shared:20 - f2fs /dev/dm-0 rw,lazytime,background_gc=on,checkpoint=disable:10%,active_logs=6
37 22 7:1 / /mnt/with\\040space rw,relatime - ext4 /dev/loop1 rw,errors=remount-ro
38 22 254:0 / /data rw,relatime - f2fs /dev/dm-0 rw,lazytime,background_gc=on,active_logs=6
garbage line
";

    #[test]
    fn parses_fields_escapes_and_options() {
        let all = parse_mountinfo(SAMPLE);
        assert_eq!(all.len(), 4, "the garbage line is skipped");
        let data = &all[1];
        assert_eq!(data.dev, "254:0".parse().unwrap());
        assert_eq!(data.fs_type, "f2fs");
        assert_eq!(data.source, "/dev/dm-0");
        assert!(data.checkpoint_disabled());
        assert!(data.has_option("noatime") && data.has_option("nosuid"));
        assert_eq!(all[2].mount_point, PathBuf::from("/mnt/with space"));
        assert!(!all[2].checkpoint_disabled());
    }

    #[test]
    fn plain_checkpoint_disable_counts() {
        let line = "40 22 8:1 / /d rw - f2fs /dev/sda1 rw,checkpoint=disable";
        let e = parse_line(line).unwrap();
        assert!(e.checkpoint_disabled());
        let line = "40 22 8:1 / /d rw - f2fs /dev/sda1 rw,checkpoint=enable";
        assert!(!parse_line(line).unwrap().checkpoint_disabled());
    }
}
