//! What the bootloader-environment boot controls share: the variable set (bytes, sorted by name),
//! the format errors, the kernel command line that names the booted slot, and the durable
//! replacement of a small file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::BootControlError;

/// Why an environment image or block could not be read or written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvFormatError {
    /// The image is smaller than its header.
    #[error("{len} bytes is too small for an environment (at least {min})")]
    TooSmall {
        /// The image's length.
        len: usize,
        /// The smallest usable length.
        min: usize,
    },
    /// The stored CRC32 is not the CRC32 of the data area.
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// The CRC in the header (read in the configured byte order).
        stored: u32,
        /// The CRC of the data area.
        computed: u32,
    },
    /// The variable list has no terminating empty entry inside the data area.
    #[error("the variable list is not terminated inside the data area")]
    Unterminated,
    /// Neither copy of a redundant environment is valid.
    #[error("neither copy is valid (copy 0: {first}; copy 1: {second})")]
    NoValidCopy {
        /// Why copy 0 was refused.
        first: Box<EnvFormatError>,
        /// Why copy 1 was refused.
        second: Box<EnvFormatError>,
    },
    /// The variables do not fit.
    #[error("the variables need {needed} bytes, the data area holds {capacity}")]
    Full {
        /// Bytes the encoded variables need.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
    /// A variable name the format cannot hold.
    #[error("variable name {name:?} is not allowed (empty, or holds '=', NUL or a newline)")]
    BadName {
        /// The name (lossy UTF-8).
        name: String,
    },
    /// A value the format cannot hold (a NUL byte).
    #[error("the value of {name} holds a NUL byte")]
    BadValue {
        /// The variable.
        name: String,
    },
    /// A grubenv block without the `# GRUB Environment Block` first line.
    #[error("the block does not start with {expected:?}")]
    NoSignature {
        /// The first line GRUB requires.
        expected: &'static str,
    },
    /// A grubenv line that is neither a comment nor `name=value`.
    #[error("line {line} is neither a comment nor name=value")]
    NoEquals {
        /// 1-based line number in the block.
        line: usize,
    },
}

/// Environment variables as a bootloader stores them: bytes, sorted by name (U-Boot's
/// `saveenv` and libubootenv write them in `strcmp` order, which is byte order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvVars(BTreeMap<Vec<u8>, Vec<u8>>);

impl EnvVars {
    /// No variables.
    pub fn new() -> EnvVars {
        EnvVars::default()
    }

    /// The value of `name`, if it is set (and valid UTF-8; the scheme's variables are ASCII).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name.as_bytes()).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The raw value of `name`.
    pub fn get_bytes(&self, name: &[u8]) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// Set `name` to `value`.
    pub fn set(&mut self, name: &str, value: &str) {
        self.0.insert(name.as_bytes().to_vec(), value.as_bytes().to_vec());
    }

    /// Set from raw bytes (the decoders).
    pub fn set_bytes(&mut self, name: &[u8], value: &[u8]) {
        self.0.insert(name.to_vec(), value.to_vec());
    }

    /// Remove `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.remove(name.as_bytes());
    }

    /// All variables in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no variable is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks every name and value against what both bootloaders accept in a name: not empty,
    /// no `=`, NUL or newline; values without NUL.
    pub(crate) fn check(&self) -> Result<(), EnvFormatError> {
        for (name, value) in self.iter() {
            if name.is_empty() || name.iter().any(|b| matches!(b, b'=' | 0 | b'\n')) {
                return Err(EnvFormatError::BadName { name: lossy(name) });
            }
            if value.contains(&0) {
                return Err(EnvFormatError::BadValue { name: lossy(name) });
            }
        }
        Ok(())
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for EnvVars {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> EnvVars {
        let mut vars = EnvVars::new();
        for (k, v) in iter {
            vars.set(k.as_ref(), v.as_ref());
        }
        vars
    }
}

pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The kernel command line this boot ran with.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// The value of `param=` on a kernel command line read from `path` (normally
/// [`PROC_CMDLINE`]): how a bootloader-environment boot control learns the slot this boot runs
/// from. The boot script puts it there (docs/boot-control.md); the environment itself only
/// says which slot boots *next*. The last occurrence wins, as for the kernel's own parameters.
pub fn kernel_cmdline_value(path: &Path, param: &str) -> Result<String, BootControlError> {
    let text = fs::read_to_string(path).map_err(|source| BootControlError::Io {
        operation: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let prefix = format!("{param}=");
    text.split_whitespace()
        .rev()
        .find_map(|word| word.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or_else(|| BootControlError::BootedSlotUnknown {
            cmdline: path.to_path_buf(),
            param: param.to_string(),
        })
}

/// Replace `path` with `bytes` so that a crash leaves the old or the new content, never a mix:
/// a temporary file beside it (same permission bits), fsync, rename over, fsync of the folder.
pub(crate) fn replace_file_durably(path: &Path, bytes: &[u8]) -> Result<(), BootControlError> {
    let io_err = |operation: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| BootControlError::Io { operation, path, source }
    };
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0o644,
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename over", path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory of", &dir))?;
    Ok(())
}
