//! The U-Boot environment as a boot control: the env image format U-Boot, `fw_printenv` /
//! `fw_setenv` (libubootenv and u-boot-tools) and `mkenvimage` share, and an A/B scheme on
//! U-Boot's boot-count feature (`bootcount`, `bootlimit`, `upgrade_available`, `altbootcmd`)
//! plus one slot variable. Layout and scheme: docs/boot-control.md.
//!
//! One copy of the environment is `size` bytes at `offset` of a file or block device:
//!
//! | bytes | single env | redundant env (each of two copies) |
//! |---|---|---|
//! | 0..4 | CRC32 (IEEE, zlib's) of the data area, in the target's byte order | same |
//! | 4 | data area starts | flags: a counter, the copy with the newer value is current |
//! | 4 or 5 .. size | `name=value\0` … `\0`, then padding | same |

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::env::{EnvFormatError, EnvVars};
use super::{default_suffix, BootControl, BootControlError};

/// Bytes of the CRC at the start of every copy.
pub const CRC_LEN: usize = 4;

/// The byte order of the stored CRC: the target CPU's (`mkenvimage -b` writes big endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CrcByteOrder {
    /// Little endian (ARM, RISC-V, x86 targets; what `fw_printenv` on such a host reads).
    #[default]
    Little,
    /// Big endian (PowerPC, some MIPS targets).
    Big,
}

impl CrcByteOrder {
    fn encode(self, crc: u32) -> [u8; 4] {
        match self {
            CrcByteOrder::Little => crc.to_le_bytes(),
            CrcByteOrder::Big => crc.to_be_bytes(),
        }
    }

    fn decode(self, bytes: [u8; 4]) -> u32 {
        match self {
            CrcByteOrder::Little => u32::from_le_bytes(bytes),
            CrcByteOrder::Big => u32::from_be_bytes(bytes),
        }
    }
}

fn header_len(redundant: bool) -> usize {
    CRC_LEN + usize::from(redundant)
}

/// One copy as an image of exactly `size` bytes: CRC, the flags byte when `flags` is given
/// (a redundant copy), then the variables in name order and zero padding.
pub fn encode_env(
    vars: &EnvVars,
    size: usize,
    flags: Option<u8>,
    order: CrcByteOrder,
) -> Result<Vec<u8>, EnvFormatError> {
    vars.check()?;
    let header = header_len(flags.is_some());
    // The smallest env holds the terminating empty entry.
    let capacity = size
        .checked_sub(header)
        .filter(|c| *c > 0)
        .ok_or(EnvFormatError::TooSmall { len: size, min: header + 1 })?;
    let needed = vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>() + 1;
    if needed > capacity {
        return Err(EnvFormatError::Full { needed, capacity });
    }
    let mut image = vec![0u8; size];
    let mut pos = header;
    for (name, value) in vars.iter() {
        for part in [name, b"=".as_slice(), value] {
            image[pos..pos + part.len()].copy_from_slice(part);
            pos += part.len();
        }
        pos += 1; // the NUL is already there
    }
    let crc = crc32fast::hash(&image[header..]);
    image[..CRC_LEN].copy_from_slice(&order.encode(crc));
    if let Some(flags) = flags {
        image[CRC_LEN] = flags;
    }
    Ok(image)
}

/// One decoded copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedEnv {
    /// The variables (a later duplicate replaces an earlier one, as in libubootenv).
    pub vars: EnvVars,
    /// The flags byte of a redundant copy.
    pub flags: Option<u8>,
}

/// Decodes one copy: the CRC must match, the variable list must end inside the data area. An
/// entry without `=` is skipped, as libubootenv does.
pub fn decode_env(
    image: &[u8],
    redundant: bool,
    order: CrcByteOrder,
) -> Result<DecodedEnv, EnvFormatError> {
    let header = header_len(redundant);
    if image.len() <= header {
        return Err(EnvFormatError::TooSmall { len: image.len(), min: header + 1 });
    }
    let mut crc_bytes = [0u8; CRC_LEN];
    crc_bytes.copy_from_slice(&image[..CRC_LEN]);
    let stored = order.decode(crc_bytes);
    let data = &image[header..];
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(EnvFormatError::BadCrc { stored, computed });
    }
    let mut vars = EnvVars::new();
    let mut rest = data;
    loop {
        let end = rest.iter().position(|b| *b == 0).ok_or(EnvFormatError::Unterminated)?;
        if end == 0 {
            break;
        }
        let entry = &rest[..end];
        if let Some(eq) = entry.iter().position(|b| *b == b'=') {
            vars.set_bytes(&entry[..eq], &entry[eq + 1..]);
        }
        rest = &rest[end + 1..];
    }
    Ok(DecodedEnv { vars, flags: redundant.then_some(image[CRC_LEN]) })
}

/// The current copy of a redundant pair whose copies are both valid, as U-Boot's
/// `env_import_redund` and libubootenv choose it: the larger flags counter, except that 0
/// follows 255 (the counter wrapped); copy 0 on a tie.
pub fn newer_copy(flags0: u8, flags1: u8) -> usize {
    match (flags0, flags1) {
        (0xff, 0) => 1,
        (0, 0xff) => 0,
        (a, b) if b > a => 1,
        _ => 0,
    }
}

/// Where one copy lives: a file or block device and a byte offset (a line of fw_env.config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvLocation {
    /// File or block device.
    pub path: PathBuf,
    /// Byte offset of the copy.
    pub offset: u64,
}

/// Where the environment lives and how big a copy is: fw_env.config's one or two lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UBootEnvLayout {
    /// The first (or only) copy.
    pub primary: EnvLocation,
    /// The second copy of a redundant environment.
    pub redundant: Option<EnvLocation>,
    /// Bytes per copy (U-Boot's `CONFIG_ENV_SIZE`; fw_env.config's third column).
    pub size: usize,
    /// Byte order of the CRC.
    pub crc_byte_order: CrcByteOrder,
}

/// The environment as read: the variables of the current copy and where they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedEnv {
    /// The variables of the current copy.
    pub vars: EnvVars,
    /// The current copy (0, or 1 for the second copy of a redundant pair).
    pub copy: usize,
    /// Its flags counter (redundant env only).
    pub flags: Option<u8>,
    /// Why the other copy of a redundant pair was refused, if it was.
    pub other_copy_error: Option<EnvFormatError>,
}

impl UBootEnvLayout {
    fn location(&self, copy: usize) -> &EnvLocation {
        match (&self.redundant, copy) {
            (Some(second), 1) => second,
            _ => &self.primary,
        }
    }

    fn read_copy(&self, copy: usize) -> Result<Vec<u8>, BootControlError> {
        let loc = self.location(copy);
        let io_err = |operation| {
            let path = loc.path.clone();
            move |source| BootControlError::Io { operation, path, source }
        };
        let file = File::open(&loc.path).map_err(io_err("open"))?;
        let mut image = vec![0u8; self.size];
        file.read_exact_at(&mut image, loc.offset)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    // Say which bytes were missing: a wrong offset or size is the usual cause.
                    io::Error::new(
                        e.kind(),
                        format!(
                            "the file ends before byte {:#x} (offset {:#x} + size {:#x})",
                            loc.offset.saturating_add(self.size as u64),
                            loc.offset,
                            self.size
                        ),
                    )
                } else {
                    e
                }
            })
            .map_err(io_err("read"))?;
        Ok(image)
    }

    fn env_error(&self, copy: usize, source: EnvFormatError) -> BootControlError {
        let loc = self.location(copy);
        BootControlError::Env { path: loc.path.clone(), offset: loc.offset, source }
    }

    /// Reads the environment as U-Boot does at power-on: a single copy must be valid; of a
    /// redundant pair the valid copy, or the newer one ([`newer_copy`]) when both are.
    pub fn load(&self) -> Result<LoadedEnv, BootControlError> {
        let redundant = self.redundant.is_some();
        let decode = |copy| -> Result<Result<DecodedEnv, EnvFormatError>, BootControlError> {
            Ok(decode_env(&self.read_copy(copy)?, redundant, self.crc_byte_order))
        };
        if !redundant {
            let env = decode(0)?.map_err(|e| self.env_error(0, e))?;
            return Ok(LoadedEnv { vars: env.vars, copy: 0, flags: None, other_copy_error: None });
        }
        let (first, second) = (decode(0)?, decode(1)?);
        let (copy, env, other_copy_error) = match (first, second) {
            (Ok(a), Ok(b)) => {
                let newer = newer_copy(a.flags.unwrap_or(0), b.flags.unwrap_or(0));
                (newer, if newer == 0 { a } else { b }, None)
            }
            (Ok(a), Err(e)) => (0, a, Some(e)),
            (Err(e), Ok(b)) => (1, b, Some(e)),
            (Err(first), Err(second)) => {
                return Err(self.env_error(
                    0,
                    EnvFormatError::NoValidCopy { first: first.into(), second: second.into() },
                ))
            }
        };
        Ok(LoadedEnv { vars: env.vars, copy, flags: env.flags, other_copy_error })
    }

    /// Writes `vars` as `saveenv` and `fw_setenv` do: a single env in place; a redundant env
    /// into the copy that is *not* current, with the next flags value, so the current copy
    /// stays intact until the new one is complete. fsync before returning. Returns the copy
    /// written.
    pub fn store(&self, loaded: &LoadedEnv, vars: &EnvVars) -> Result<usize, BootControlError> {
        let (copy, flags) = match self.redundant {
            None => (0, None),
            Some(_) => (1 - loaded.copy, Some(loaded.flags.unwrap_or(0).wrapping_add(1))),
        };
        let image = encode_env(vars, self.size, flags, self.crc_byte_order)
            .map_err(|e| self.env_error(copy, e))?;
        let loc = self.location(copy);
        let io_err = |operation| {
            let path = loc.path.clone();
            move |source| BootControlError::Io { operation, path, source }
        };
        let file = OpenOptions::new().write(true).open(&loc.path).map_err(io_err("open"))?;
        file.write_all_at(&image, loc.offset).map_err(io_err("write"))?;
        file.sync_all().map_err(io_err("fsync"))?;
        Ok(copy)
    }
}

/// The lock file `fw_printenv` / `fw_setenv` (both implementations) take around their access.
pub const FW_ENV_LOCK_FILE: &str = "/var/lock/fw_printenv.lock";

/// Holds the tools' exclusive `flock` on the lock file while alive.
fn lock_tools_out(
    lock_file: Option<&Path>,
) -> Result<Option<nix::fcntl::Flock<File>>, BootControlError> {
    let Some(path) = lock_file else { return Ok(None) };
    let io_err = |operation| {
        let path = path.to_path_buf();
        move |source| BootControlError::Io { operation, path, source }
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open lock file"))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("lock")(io::Error::from(errno)))?;
    Ok(Some(lock))
}

/// How the A/B state maps onto U-Boot variables (docs/boot-control.md, "U-Boot environment").
/// Two slots; slot 0 and 1 are named by [`Self::slot_values`] in [`Self::slot_var`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UBootAbScheme {
    /// The variable naming the slot U-Boot boots (default `boot_slot`; Mender's is
    /// `mender_boot_part`).
    pub slot_var: String,
    /// Its value for slot 0 and slot 1 (default `a`, `b`; Mender's are partition numbers).
    pub slot_values: [String; 2],
    /// `bootlimit` written when a slot is made active: the boots it gets before U-Boot runs
    /// `altbootcmd`.
    pub boot_limit: u32,
}

/// `upgrade_available`: 1 while the active slot is on trial (U-Boot counts its boots).
pub const VAR_UPGRADE_AVAILABLE: &str = "upgrade_available";
/// `bootcount`: boots of the slot on trial so far (U-Boot's `CONFIG_BOOTCOUNT_ENV`).
pub const VAR_BOOTCOUNT: &str = "bootcount";
/// `bootlimit`: U-Boot runs `altbootcmd` once `bootcount` exceeds it.
pub const VAR_BOOTLIMIT: &str = "bootlimit";
/// `altbootcmd`: the integrator's fallback script (switches the slot variable back).
pub const VAR_ALTBOOTCMD: &str = "altbootcmd";

impl Default for UBootAbScheme {
    fn default() -> Self {
        UBootAbScheme {
            slot_var: "boot_slot".to_string(),
            slot_values: ["a".to_string(), "b".to_string()],
            boot_limit: 3,
        }
    }
}

impl UBootAbScheme {
    /// Checks the names and values a U-Boot environment can hold and the scheme needs.
    pub fn check(&self) -> Result<(), BootControlError> {
        let bad_word = |s: &str| {
            s.is_empty() || s.bytes().any(|b| b.is_ascii_whitespace() || b == b'=' || b == 0)
        };
        if bad_word(&self.slot_var)
            || [VAR_UPGRADE_AVAILABLE, VAR_BOOTCOUNT, VAR_BOOTLIMIT, VAR_ALTBOOTCMD]
                .contains(&self.slot_var.as_str())
        {
            return Err(BootControlError::BadScheme {
                setting: super::SchemeSetting::SlotVariable,
                what: "slot variable (a name, not one of the boot-count variables)",
                value: self.slot_var.clone(),
            });
        }
        if self.slot_values.iter().any(|v| bad_word(v))
            || self.slot_values[0] == self.slot_values[1]
        {
            return Err(BootControlError::BadScheme {
                setting: super::SchemeSetting::SlotNames,
                what: "slot values (two different words)",
                value: format!("{:?}", self.slot_values),
            });
        }
        if self.boot_limit == 0 {
            return Err(BootControlError::BadScheme {
                setting: super::SchemeSetting::Tries,
                what: "boot limit (1 or more; 0 turns U-Boot's boot counting off)",
                value: self.boot_limit.to_string(),
            });
        }
        Ok(())
    }

    /// The slot a slot-variable value names.
    pub fn slot_of(&self, value: &str) -> Option<u32> {
        (0u32..).zip(&self.slot_values).find(|(_, v)| v.as_str() == value).map(|(i, _)| i)
    }

    fn value_of(&self, slot: u32) -> &str {
        &self.slot_values[usize::from(slot != 0)]
    }

    /// The A/B state the variables hold.
    pub fn state(&self, vars: &EnvVars, path: &Path) -> Result<UBootAbState, BootControlError> {
        let bad = |name: &str, value: &str, expected: String| BootControlError::BadVariable {
            path: path.to_path_buf(),
            name: name.to_string(),
            value: value.to_string(),
            expected,
        };
        let value = vars.get(&self.slot_var).ok_or_else(|| {
            bad(
                &self.slot_var,
                "",
                format!("set to {} or {}", self.slot_values[0], self.slot_values[1]),
            )
        })?;
        let active = self.slot_of(value).ok_or_else(|| {
            bad(
                &self.slot_var,
                value,
                format!("{} or {}", self.slot_values[0], self.slot_values[1]),
            )
        })?;
        // U-Boot reads these with env_get_ulong(name, 10, 0): absent is 0.
        let number = |name: &str| -> Result<u32, BootControlError> {
            match vars.get(name) {
                None => Ok(0),
                Some(v) => v.parse().map_err(|_| bad(name, v, "a decimal number".to_string())),
            }
        };
        Ok(UBootAbState {
            active,
            upgrade_available: number(VAR_UPGRADE_AVAILABLE)? != 0,
            bootcount: number(VAR_BOOTCOUNT)?,
            bootlimit: number(VAR_BOOTLIMIT)?,
        })
    }

    /// What U-Boot does at power-on with `CONFIG_BOOTCOUNT_LIMIT`, `CONFIG_BOOTCOUNT_ENV` and
    /// the documented `altbootcmd`, applied to `vars`; returns the slot it boots. The model
    /// the tests and docs/boot-control.md describe; on a device U-Boot itself does this.
    pub fn power_on(&self, vars: &mut EnvVars, path: &Path) -> Result<u32, BootControlError> {
        let state = self.state(vars, path)?;
        if !state.upgrade_available {
            return Ok(state.active);
        }
        let count = state.bootcount.saturating_add(1);
        vars.set(VAR_BOOTCOUNT, &count.to_string());
        if state.bootlimit > 0 && count > state.bootlimit {
            // altbootcmd: back to the other slot, trial over.
            let fallback = 1 - state.active;
            vars.set(&self.slot_var, self.value_of(fallback));
            vars.set(VAR_UPGRADE_AVAILABLE, "0");
            vars.set(VAR_BOOTCOUNT, "0");
            return Ok(fallback);
        }
        Ok(state.active)
    }
}

/// The A/B state of a U-Boot environment under a [`UBootAbScheme`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UBootAbState {
    /// The slot the slot variable names: the one U-Boot boots while `bootcount` ≤ `bootlimit`.
    pub active: u32,
    /// The active slot is on trial (not yet marked successful).
    pub upgrade_available: bool,
    /// Boots of the slot on trial so far.
    pub bootcount: u32,
    /// Boots allowed before `altbootcmd` (0: unset, U-Boot never falls back).
    pub bootlimit: u32,
}

impl UBootAbState {
    /// Whether `slot` is marked successful: the active slot when no trial runs; the other slot
    /// while the active one is on trial (it is the known-good fallback `altbootcmd` boots).
    /// Otherwise nothing records the other slot as good, and it is not.
    pub fn is_successful(&self, slot: u32) -> bool {
        if slot == self.active {
            !self.upgrade_available
        } else {
            self.upgrade_available
        }
    }

    /// Boots left before the fallback (0 when no trial runs).
    pub fn tries_left(&self) -> u32 {
        if self.upgrade_available {
            self.bootlimit.saturating_sub(self.bootcount)
        } else {
            0
        }
    }
}

/// A boot control on the U-Boot environment (two slots). The slot this boot runs from comes
/// from the kernel command line (the boot script passes the slot variable there), because
/// the environment only says which slot boots next.
#[derive(Debug)]
pub struct UBootEnvBootControl {
    layout: UBootEnvLayout,
    lock_file: Option<PathBuf>,
    scheme: UBootAbScheme,
    booted: u32,
    // Serializes read-modify-write cycles within this process (the flock covers other ones).
    lock: Mutex<()>,
}

impl UBootEnvBootControl {
    /// Opens the environment at `layout` under `scheme`; `booted_value` is the slot variable's
    /// value this boot was started with (from [`super::kernel_cmdline_value`]). `lock_file`:
    /// the lock the fw_* tools take ([`FW_ENV_LOCK_FILE`]), held around every access. The
    /// environment is read once to fail early.
    pub fn open(
        layout: UBootEnvLayout,
        lock_file: Option<PathBuf>,
        scheme: UBootAbScheme,
        booted_value: &str,
    ) -> Result<UBootEnvBootControl, BootControlError> {
        scheme.check()?;
        let booted =
            scheme.slot_of(booted_value).ok_or_else(|| BootControlError::BootedSlotInvalid {
                value: booted_value.to_string(),
                expected: scheme.slot_values.to_vec(),
            })?;
        let bc = UBootEnvBootControl { layout, lock_file, scheme, booted, lock: Mutex::new(()) };
        let loaded = bc.load_locked()?;
        let state = bc.scheme.state(&loaded.vars, bc.path())?;
        if state.bootlimit == 0 && state.upgrade_available {
            log::warn!("U-Boot env: a slot is on trial but bootlimit is not set: no fallback");
        }
        if loaded.vars.get(VAR_ALTBOOTCMD).is_none() {
            log::warn!(
                "U-Boot env {} has no altbootcmd: U-Boot cannot fall back to the other slot",
                bc.path().display()
            );
        }
        Ok(bc)
    }

    fn path(&self) -> &Path {
        &self.layout.primary.path
    }

    fn load(&self) -> Result<LoadedEnv, BootControlError> {
        let loaded = self.layout.load()?;
        if let Some(e) = &loaded.other_copy_error {
            log::warn!(
                "U-Boot env: copy {} refused ({e}); using copy {}",
                1 - loaded.copy,
                loaded.copy
            );
        }
        Ok(loaded)
    }

    /// The layout.
    pub fn layout(&self) -> &UBootEnvLayout {
        &self.layout
    }

    /// The scheme.
    pub fn scheme(&self) -> &UBootAbScheme {
        &self.scheme
    }

    /// The environment now (under both locks).
    pub fn load_locked(&self) -> Result<LoadedEnv, BootControlError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _tools = lock_tools_out(self.lock_file.as_deref())?;
        self.load()
    }

    /// The A/B state now in the environment.
    pub fn state(&self) -> Result<UBootAbState, BootControlError> {
        self.scheme.state(&self.load_locked()?.vars, self.path())
    }

    fn update(
        &self,
        change: impl FnOnce(&mut EnvVars, UBootAbState) -> bool,
    ) -> Result<(), BootControlError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _tools = lock_tools_out(self.lock_file.as_deref())?;
        let loaded = self.load()?;
        let state = self.scheme.state(&loaded.vars, self.path())?;
        let mut vars = loaded.vars.clone();
        // Nothing to change, nothing written (flash wear, and one less chance to tear).
        if change(&mut vars, state) && vars != loaded.vars {
            self.layout.store(&loaded, &vars)?;
        }
        Ok(())
    }

    fn check_slot(slot: u32) -> Result<(), BootControlError> {
        if slot < 2 {
            Ok(())
        } else {
            Err(BootControlError::InvalidSlot { slot, count: 2 })
        }
    }
}

impl BootControl for UBootEnvBootControl {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        Ok(2)
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        Ok(self.booted)
    }
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        Self::check_slot(slot)?;
        Ok(default_suffix(slot))
    }
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        Self::check_slot(slot)?;
        Ok(self.state()?.is_successful(slot))
    }
    /// Ends the trial of the running slot: `upgrade_available=0`, `bootcount=0`. When the
    /// running slot is not the active one (another slot was made active this boot, or U-Boot
    /// fell back and the active one is this slot already) nothing is written: the running
    /// slot is then the fallback, which is the good one.
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        let booted = self.booted;
        self.update(|vars, state| {
            if state.active != booted || !state.upgrade_available {
                return false;
            }
            vars.set(VAR_UPGRADE_AVAILABLE, "0");
            vars.set(VAR_BOOTCOUNT, "0");
            true
        })
    }
    /// Makes `slot` the one U-Boot boots, on trial: slot variable, `upgrade_available=1`,
    /// `bootcount=0`, `bootlimit` = the scheme's limit.
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        Self::check_slot(slot)?;
        let scheme = &self.scheme;
        self.update(|vars, _| {
            vars.set(&scheme.slot_var, scheme.value_of(slot));
            vars.set(VAR_UPGRADE_AVAILABLE, "1");
            vars.set(VAR_BOOTCOUNT, "0");
            vars.set(VAR_BOOTLIMIT, &scheme.boot_limit.to_string());
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(pairs: &[(&str, &str)]) -> EnvVars {
        pairs.iter().copied().collect()
    }

    // `printf 'a=1\nb=2\n' | mkenvimage -p 0 -s 32 [-r | -b]` (u-boot-tools 2023.01).
    const GOLDEN_SINGLE: [u8; 32] = [
        0x4c, 0x23, 0x45, 0xa1, b'a', b'=', b'1', 0, b'b', b'=', b'2', 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    const GOLDEN_REDUNDANT: [u8; 32] = [
        0x87, 0x42, 0xda, 0x9b, 1, b'a', b'=', b'1', 0, b'b', b'=', b'2', 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn images_match_mkenvimage_byte_for_byte() {
        let ab = vars(&[("b", "2"), ("a", "1")]);
        assert_eq!(encode_env(&ab, 32, None, CrcByteOrder::Little).unwrap(), GOLDEN_SINGLE);
        assert_eq!(encode_env(&ab, 32, Some(1), CrcByteOrder::Little).unwrap(), GOLDEN_REDUNDANT);
        let mut big = GOLDEN_SINGLE;
        big[..4].reverse();
        assert_eq!(encode_env(&ab, 32, None, CrcByteOrder::Big).unwrap(), big);
        let decoded = decode_env(&GOLDEN_REDUNDANT, true, CrcByteOrder::Little).unwrap();
        assert_eq!(decoded, DecodedEnv { vars: ab, flags: Some(1) });
    }

    #[test]
    fn damaged_images_are_refused() {
        let mut bad = GOLDEN_SINGLE;
        bad[9] ^= 1;
        assert!(matches!(
            decode_env(&bad, false, CrcByteOrder::Little),
            Err(EnvFormatError::BadCrc { stored: 0xa145_234c, .. })
        ));
        assert!(matches!(
            decode_env(&GOLDEN_SINGLE, false, CrcByteOrder::Big),
            Err(EnvFormatError::BadCrc { .. })
        ));
        // The flags byte is outside the CRC: reading a redundant copy as single fails.
        assert!(decode_env(&GOLDEN_REDUNDANT, false, CrcByteOrder::Little).is_err());
        assert!(matches!(
            decode_env(&[0; 4], false, CrcByteOrder::Little),
            Err(EnvFormatError::TooSmall { len: 4, min: 5 })
        ));
        // A data area with no empty entry: valid CRC, refused.
        let mut full = vec![0u8; 4];
        full.extend_from_slice(b"a=1\0b=22");
        let crc = crc32fast::hash(&full[4..]).to_le_bytes();
        full[..4].copy_from_slice(&crc);
        assert_eq!(
            decode_env(&full, false, CrcByteOrder::Little),
            Err(EnvFormatError::Unterminated)
        );
    }

    #[test]
    fn encoding_refuses_what_does_not_fit_or_cannot_be_stored() {
        let ab = vars(&[("a", "1"), ("b", "2")]);
        // "a=1\0b=2\0" and the final NUL: 9 bytes fit a 13-byte single env, not a 12-byte one.
        assert!(encode_env(&ab, 13, None, CrcByteOrder::Little).is_ok());
        assert_eq!(
            encode_env(&ab, 12, None, CrcByteOrder::Little),
            Err(EnvFormatError::Full { needed: 9, capacity: 8 })
        );
        assert!(matches!(
            encode_env(&vars(&[("a=b", "1")]), 64, None, CrcByteOrder::Little),
            Err(EnvFormatError::BadName { .. })
        ));
        let mut nul = EnvVars::new();
        nul.set_bytes(b"a", b"x\0y");
        assert!(matches!(
            encode_env(&nul, 64, None, CrcByteOrder::Little),
            Err(EnvFormatError::BadValue { .. })
        ));
    }

    #[test]
    fn the_newer_copy_is_the_larger_counter_with_wraparound() {
        assert_eq!(newer_copy(1, 2), 1);
        assert_eq!(newer_copy(2, 1), 0);
        assert_eq!(newer_copy(5, 5), 0);
        assert_eq!(newer_copy(255, 0), 1);
        assert_eq!(newer_copy(0, 255), 0);
        assert_eq!(newer_copy(254, 255), 1);
    }

    fn scheme() -> UBootAbScheme {
        UBootAbScheme::default()
    }

    #[test]
    fn state_reads_the_boot_count_variables_as_u_boot_does() {
        let p = Path::new("env");
        let s = scheme().state(&vars(&[("boot_slot", "b")]), p).unwrap();
        assert_eq!(
            s,
            UBootAbState { active: 1, upgrade_available: false, bootcount: 0, bootlimit: 0 }
        );
        assert!(s.is_successful(1) && !s.is_successful(0));
        let trial = vars(&[
            ("boot_slot", "a"),
            ("upgrade_available", "1"),
            ("bootcount", "2"),
            ("bootlimit", "3"),
        ]);
        let s = scheme().state(&trial, p).unwrap();
        assert!(!s.is_successful(0) && s.is_successful(1));
        assert_eq!(s.tries_left(), 1);
        for bad in [
            vec![],
            vec![("boot_slot", "c")],
            vec![("boot_slot", "a"), ("bootcount", "x")],
            vec![("boot_slot", "a"), ("upgrade_available", "-1")],
        ] {
            let err = scheme().state(&vars(&bad), p).unwrap_err();
            assert!(matches!(err, BootControlError::BadVariable { .. }), "{bad:?}: {err:?}");
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        }
    }

    #[test]
    fn power_on_counts_trial_boots_and_falls_back_after_the_limit() {
        let p = Path::new("env");
        let mut env = vars(&[
            ("boot_slot", "b"),
            ("upgrade_available", "1"),
            ("bootcount", "0"),
            ("bootlimit", "2"),
        ]);
        assert_eq!(scheme().power_on(&mut env, p).unwrap(), 1);
        assert_eq!(scheme().power_on(&mut env, p).unwrap(), 1);
        assert_eq!(env.get("bootcount"), Some("2"));
        assert_eq!(scheme().power_on(&mut env, p).unwrap(), 0);
        assert_eq!(
            env,
            vars(&[
                ("boot_slot", "a"),
                ("upgrade_available", "0"),
                ("bootcount", "0"),
                ("bootlimit", "2")
            ])
        );
        // No trial: nothing counted, nothing changed.
        let before = env.clone();
        assert_eq!(scheme().power_on(&mut env, p).unwrap(), 0);
        assert_eq!(env, before);
    }

    #[test]
    fn schemes_are_checked() {
        assert!(scheme().check().is_ok());
        let mender = UBootAbScheme {
            slot_var: "mender_boot_part".into(),
            slot_values: ["2".into(), "3".into()],
            boot_limit: 1,
        };
        assert!(mender.check().is_ok());
        assert_eq!(mender.slot_of("3"), Some(1));
        for bad in [
            UBootAbScheme { slot_var: "".into(), ..scheme() },
            UBootAbScheme { slot_var: "bootcount".into(), ..scheme() },
            UBootAbScheme { slot_var: "a b".into(), ..scheme() },
            UBootAbScheme { slot_values: ["a".into(), "a".into()], ..scheme() },
            UBootAbScheme { slot_values: ["a".into(), "".into()], ..scheme() },
            UBootAbScheme { boot_limit: 0, ..scheme() },
        ] {
            let err = bad.check().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad:?}");
        }
    }

    fn arb_vars() -> impl Strategy<Value = EnvVars> {
        proptest::collection::btree_map("[a-zA-Z_.][a-zA-Z0-9_.]{0,12}", "[ -~\n]{0,24}", 0..12)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn images_round_trip(vars in arb_vars(), flags in proptest::option::of(any::<u8>()), big in any::<bool>()) {
            let order = if big { CrcByteOrder::Big } else { CrcByteOrder::Little };
            let image = encode_env(&vars, 1024, flags, order).unwrap();
            prop_assert_eq!(image.len(), 1024);
            let decoded = decode_env(&image, flags.is_some(), order).unwrap();
            prop_assert_eq!(decoded, DecodedEnv { vars, flags });
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_only_with_a_matching_crc(
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
            redundant in any::<bool>(),
        ) {
            if let Ok(decoded) = decode_env(&bytes, redundant, CrcByteOrder::Little) {
                let header = 4 + usize::from(redundant);
                prop_assert_eq!(
                    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                    crc32fast::hash(&bytes[header..])
                );
                prop_assert_eq!(decoded.flags.is_some(), redundant);
            }
        }
    }
}
