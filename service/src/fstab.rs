//! The checkpoint entries of an Android fstab (vold-checkpoint.md §6.1).
//!
//! An fstab line is `<src> <mount point> <type> <mount flags> <fs_mgr flags>`, separated by
//! white space; `#` starts a comment. Only the fs_mgr flag `checkpoint=block` or
//! `checkpoint=fs` matters here; every other flag is ignored, as fs_mgr ignores flags it does
//! not know.

use std::path::{Path, PathBuf};

use crate::config::{CheckpointMethod, DeviceConfig};

/// An fstab parse error; `Display` names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum FstabError {
    /// The file could not be read.
    #[error("cannot read fstab {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("fstab {path} line {line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Reads `path` and returns its checkpointed entries.
pub fn read_checkpoint_entries(path: &Path) -> Result<Vec<DeviceConfig>, FstabError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| FstabError::Read { path: path.to_owned(), source })?;
    parse_checkpoint_entries(&text).map_err(|(line, message)| FstabError::Malformed {
        path: path.to_owned(),
        line,
        message,
    })
}

/// Parses fstab text; the error is (1-based line, message).
pub fn parse_checkpoint_entries(text: &str) -> Result<Vec<DeviceConfig>, (usize, String)> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 {
            return Err((line_no, format!("expected 5 fields, found {}", fields.len())));
        }
        let mut method = None;
        for flag in fields[4].split(',') {
            let Some(value) = flag.strip_prefix("checkpoint=") else { continue };
            method = Some(match value {
                "block" => CheckpointMethod::Block,
                "fs" => CheckpointMethod::Fs,
                other => {
                    return Err((line_no, format!("unknown checkpoint method `{other}`")));
                }
            });
        }
        if let Some(checkpoint) = method {
            out.push(DeviceConfig {
                device: PathBuf::from(fields[0]),
                mount_point: PathBuf::from(fields[1]),
                checkpoint,
                fs_type: (fields[2] != "auto").then(|| fields[2].to_owned()),
                mount_options: if fields[3] == "defaults" {
                    String::new()
                } else {
                    fields[3].to_owned()
                },
                backend: None,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_fs_entries_and_ignores_the_rest() {
        let text = "\
# comment line
/dev/block/by-name/metadata /metadata ext4 noatime,nosuid wait,formattable,first_stage_mount
/dev/block/by-name/userdata /data ext4 noatime,nosuid latemount,wait,checkpoint=block,fileencryption=aes-256-xts # trailing
/dev/block/by-name/cache /cache f2fs noatime wait,checkpoint=fs

/dev/block/by-name/misc /misc emmc defaults defaults
";
        let entries = parse_checkpoint_entries(text).expect("valid");
        assert_eq!(
            entries,
            vec![
                DeviceConfig {
                    device: "/dev/block/by-name/userdata".into(),
                    mount_point: "/data".into(),
                    checkpoint: CheckpointMethod::Block,
                    fs_type: Some("ext4".into()),
                    mount_options: "noatime,nosuid".into(),
                    backend: None,
                },
                DeviceConfig {
                    device: "/dev/block/by-name/cache".into(),
                    mount_point: "/cache".into(),
                    checkpoint: CheckpointMethod::Fs,
                    fs_type: Some("f2fs".into()),
                    mount_options: "noatime".into(),
                    backend: None,
                },
            ]
        );
    }

    #[test]
    fn short_line_names_its_number() {
        let err = parse_checkpoint_entries("\n/dev/x /data ext4\n").unwrap_err();
        assert_eq!(err.0, 2);
    }

    #[test]
    fn unknown_method_is_refused() {
        let err = parse_checkpoint_entries("/dev/x /data ext4 rw checkpoint=magic\n").unwrap_err();
        assert!(err.1.contains("magic"));
    }
}
