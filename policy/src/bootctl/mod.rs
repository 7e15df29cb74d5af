//! Boot control: the A/B slot state the policy reads and changes.
//!
//! [`BootControl`] mirrors the parts of `android.hardware.boot.IBootControl` vold uses.
//! Implementations here: [`NoBootControl`] (a device without a boot HAL: vold's behaviour when
//! the HAL is absent), [`FileBootControl`] (a documented bootloader-style record file for the
//! virtual device), and the two real bootloaders of embedded Linux: [`UBootEnvBootControl`]
//! (U-Boot's environment and its boot-count feature, `uboot`) and [`GrubEnvBootControl`]
//! (GRUB's `grubenv`, `grubenv`). The Android AIDL client lives in crate `bootctl-hal` (it
//! needs binder) and reports its failures as [`BootControlError::Hal`].

mod env;
mod grubenv;
mod uboot;

pub use env::{kernel_cmdline_value, EnvFormatError, EnvVars, PROC_CMDLINE};
pub use grubenv::{
    decode_grubenv, encode_grubenv, GrubAbScheme, GrubAbState, GrubEnvBootControl, GrubSlotState,
    GRUBENV_SIGNATURE, GRUBENV_SIZE,
};
pub use uboot::{
    decode_env, encode_env, newer_copy, CrcByteOrder, DecodedEnv, EnvLocation, LoadedEnv,
    UBootAbScheme, UBootAbState, UBootEnvBootControl, UBootEnvLayout, FW_ENV_LOCK_FILE,
};

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::ErrorKind;

/// An error from a boot control implementation.
#[derive(Debug, thiserror::Error)]
pub enum BootControlError {
    /// There is no boot control HAL on this device.
    #[error("no boot control HAL")]
    NotPresent,
    /// A slot number out of range.
    #[error("slot {slot} does not exist (this device has {count} slots)")]
    InvalidSlot {
        /// The requested slot.
        slot: u32,
        /// How many slots exist.
        count: u32,
    },
    /// Reading or writing the record failed.
    #[error("cannot {operation} boot control record {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The record file does not follow the documented format.
    #[error("boot control record {path} is corrupt at line {line}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The record has no slot a bootloader could boot.
    #[error("boot control record {path} has no bootable slot")]
    NoBootableSlot {
        /// The file.
        path: PathBuf,
    },
    /// The record already exists (from [`FileBootControl::create`]).
    #[error("boot control record {path} already exists")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A bootloader environment (U-Boot env copy, grubenv block) cannot be read or written.
    #[error("boot environment {path} (offset {offset}): {source}")]
    Env {
        /// The file or device.
        path: PathBuf,
        /// Byte offset of the copy.
        offset: u64,
        /// What is wrong.
        #[source]
        source: EnvFormatError,
    },
    /// A variable of the A/B scheme holds a value the scheme does not define.
    #[error("boot environment {path}: {name}={value:?}, expected {expected}")]
    BadVariable {
        /// The environment's file or device.
        path: PathBuf,
        /// The variable.
        name: String,
        /// Its value ("" when unset).
        value: String,
        /// What the scheme allows.
        expected: String,
    },
    /// The kernel command line does not say which slot this boot runs from.
    #[error(
        "kernel command line {cmdline} has no {param}= (the boot script must pass the slot it \
         booted; docs/boot-control.md)"
    )]
    BootedSlotUnknown {
        /// The command line file (/proc/cmdline).
        cmdline: PathBuf,
        /// The parameter looked for.
        param: String,
    },
    /// The slot this boot runs from is not one the scheme names.
    #[error("booted slot {value:?} is none of {expected:?}")]
    BootedSlotInvalid {
        /// The value from the kernel command line.
        value: String,
        /// The scheme's slot values or names.
        expected: Vec<String>,
    },
    /// An A/B scheme setting is unusable.
    #[error("invalid {what}: {value}")]
    BadScheme {
        /// Which setting.
        setting: SchemeSetting,
        /// The setting and what it must be, in words.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// The boot control HAL (a binder service) failed: a transport error or an error the HAL
    /// returned. The source is the HAL client's own typed error (crate `bootctl-hal`).
    #[error("boot control HAL: {0}")]
    Hal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl BootControlError {
    /// Classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BootControlError::NotPresent
            | BootControlError::NoBootableSlot { .. }
            | BootControlError::AlreadyExists { .. }
            | BootControlError::BootedSlotUnknown { .. }
            | BootControlError::BootedSlotInvalid { .. }
            | BootControlError::Hal(_) => ErrorKind::BootControl,
            BootControlError::InvalidSlot { .. } | BootControlError::BadScheme { .. } => {
                ErrorKind::InvalidArgument
            }
            BootControlError::Io { .. } => ErrorKind::Io,
            BootControlError::Env { source: EnvFormatError::Full { .. }, .. } => ErrorKind::NoSpace,
            BootControlError::Corrupt { .. }
            | BootControlError::Env { .. }
            | BootControlError::BadVariable { .. } => ErrorKind::Corrupt,
        }
    }
}

/// A setting of a bootloader environment's A/B scheme ([`BootControlError::BadScheme`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemeSetting {
    /// The variable naming the slot to boot (U-Boot).
    SlotVariable,
    /// The environment's names of the slots.
    SlotNames,
    /// Boots a slot made active gets.
    Tries,
}

/// The slot operations the checkpoint policy needs (a subset of `IBootControl`).
pub trait BootControl: Send + Sync + fmt::Debug {
    /// False only for a device without boot control; the policy then behaves as vold without a
    /// boot HAL (no implicit A/B checkpoint, commit does not mark a slot, `-1` has no slot).
    fn is_present(&self) -> bool {
        true
    }
    /// Number of slots.
    fn slot_count(&self) -> Result<u32, BootControlError>;
    /// The slot this boot runs from.
    fn current_slot(&self) -> Result<u32, BootControlError>;
    /// The suffix of a slot (`"_a"`, `"_b"`).
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError>;
    /// Whether a slot is marked as booted successfully.
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError>;
    /// Mark the current slot as booted successfully.
    fn mark_boot_successful(&self) -> Result<(), BootControlError>;
    /// Make a slot the one the bootloader boots next.
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError>;
}

/// A device without a boot control HAL: every call fails with [`BootControlError::NotPresent`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBootControl;

impl BootControl for NoBootControl {
    fn is_present(&self) -> bool {
        false
    }
    fn slot_count(&self) -> Result<u32, BootControlError> {
        Err(BootControlError::NotPresent)
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        Err(BootControlError::NotPresent)
    }
    fn slot_suffix(&self, _slot: u32) -> Result<String, BootControlError> {
        Err(BootControlError::NotPresent)
    }
    fn is_slot_marked_successful(&self, _slot: u32) -> Result<bool, BootControlError> {
        Err(BootControlError::NotPresent)
    }
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        Err(BootControlError::NotPresent)
    }
    fn set_active_boot_slot(&self, _slot: u32) -> Result<(), BootControlError> {
        Err(BootControlError::NotPresent)
    }
}

/// Highest slot priority (as in AVB's A/B metadata).
pub const MAX_PRIORITY: u8 = 15;
/// Boot tries given to a slot made active (as in AVB's A/B metadata).
pub const MAX_TRIES: u8 = 7;
/// Most slots a record may hold (suffixes `_a` … `_z`).
pub const MAX_SLOTS: u32 = 26;

/// One slot of a [`BootRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    /// Slot suffix, e.g. `"_a"`.
    pub suffix: String,
    /// 0 = unbootable, [`MAX_PRIORITY`] = preferred.
    pub priority: u8,
    /// Boots left before the bootloader gives up on an unsuccessful slot.
    pub tries_left: u8,
    /// Marked as booted successfully.
    pub successful: bool,
}

impl SlotRecord {
    /// Whether a bootloader may boot this slot.
    pub fn is_bootable(&self) -> bool {
        self.priority > 0 && (self.successful || self.tries_left > 0)
    }
}

/// The whole boot control record: which slot is running and each slot's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRecord {
    /// The slot the current boot runs from (written by [`FileBootControl::bootloader_select`]).
    pub current: u32,
    /// All slots, index = slot number.
    pub slots: Vec<SlotRecord>,
}

const RECORD_HEADER: &str = "# checkpointd boot control record, format: docs/state-machine.md";
const RECORD_VERSION: u32 = 1;

fn slot_count_u32(slots: &[SlotRecord]) -> u32 {
    // A record never holds more than MAX_SLOTS slots (checked by parse and create).
    u32::try_from(slots.len()).unwrap_or(u32::MAX)
}

fn slot_index(slot: u32) -> usize {
    usize::try_from(slot).unwrap_or(usize::MAX)
}

impl BootRecord {
    /// A fresh record: slot 0 active and successful, the other slots unbootable.
    pub fn new(slot_count: u32) -> Option<BootRecord> {
        if slot_count == 0 || slot_count > MAX_SLOTS {
            return None;
        }
        let slots = (0..slot_count)
            .map(|i| SlotRecord {
                suffix: default_suffix(i),
                priority: if i == 0 { MAX_PRIORITY } else { 0 },
                tries_left: 0,
                successful: i == 0,
            })
            .collect();
        Some(BootRecord { current: 0, slots })
    }

    /// The slot a bootloader boots next: the bootable slot with the highest priority (lowest
    /// number on ties).
    pub fn next_boot_slot(&self) -> Option<u32> {
        let mut best: Option<(u32, u8)> = None;
        for (i, s) in (0u32..).zip(&self.slots) {
            if s.is_bootable() && best.is_none_or(|(_, p)| s.priority > p) {
                best = Some((i, s.priority));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Apply a bootloader's power-on decision: pick [`Self::next_boot_slot`], spend one try if
    /// that slot is not successful, make it current. `None` if nothing is bootable.
    pub fn select_for_boot(&mut self) -> Option<u32> {
        let slot = self.next_boot_slot()?;
        let s = &mut self.slots[slot_index(slot)];
        if !s.successful {
            s.tries_left = s.tries_left.saturating_sub(1);
        }
        self.current = slot;
        Some(slot)
    }

    /// `IBootControl.markBootSuccessful` on the current slot.
    pub fn mark_successful(&mut self) {
        if let Some(s) = self.slots.get_mut(slot_index(self.current)) {
            s.successful = true;
            s.tries_left = 0;
        }
    }

    /// `IBootControl.setActiveBootSlot`: the slot gets top priority and fresh tries and is not
    /// successful; any other slot at top priority drops one step below.
    pub fn set_active(&mut self, slot: u32) -> bool {
        if slot_index(slot) >= self.slots.len() {
            return false;
        }
        for (i, s) in (0u32..).zip(self.slots.iter_mut()) {
            if i == slot {
                s.priority = MAX_PRIORITY;
                s.tries_left = MAX_TRIES;
                s.successful = false;
            } else if s.priority >= MAX_PRIORITY {
                s.priority = MAX_PRIORITY - 1;
            }
        }
        true
    }

    /// Serialize in the documented text format.
    pub fn to_text(&self) -> String {
        let mut out =
            format!("{RECORD_HEADER}\nversion={RECORD_VERSION}\ncurrent={}\n", self.current);
        for (i, s) in self.slots.iter().enumerate() {
            out.push_str(&format!(
                "slot={i} suffix={} priority={} tries={} successful={}\n",
                s.suffix,
                s.priority,
                s.tries_left,
                u8::from(s.successful)
            ));
        }
        out
    }

    /// Parse the documented text format strictly.
    pub fn parse(text: &str, path: &Path) -> Result<BootRecord, BootControlError> {
        let corrupt = |line: usize, reason: String| BootControlError::Corrupt {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut version = None;
        let mut current = None;
        let mut slots: Vec<SlotRecord> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let Some((key, value)) = fields.next().and_then(|f| f.split_once('=')) else {
                return Err(corrupt(line_no, format!("expected key=value, found {line:?}")));
            };
            match key {
                "version" if version.is_none() => {
                    let v: u32 = value.parse().map_err(|_| {
                        corrupt(line_no, format!("version {value:?} is not a number"))
                    })?;
                    if v != RECORD_VERSION {
                        return Err(corrupt(
                            line_no,
                            format!("version {v} is not supported (expected {RECORD_VERSION})"),
                        ));
                    }
                    version = Some(v);
                }
                "current" if version.is_some() && current.is_none() => {
                    current = Some(value.parse::<u32>().map_err(|_| {
                        corrupt(line_no, format!("current slot {value:?} is not a number"))
                    })?);
                }
                "slot" if current.is_some() => {
                    let n: usize = value
                        .parse()
                        .map_err(|_| corrupt(line_no, format!("slot {value:?} is not a number")))?;
                    if n != slots.len() {
                        return Err(corrupt(
                            line_no,
                            format!("slot {n} out of order (expected {})", slots.len()),
                        ));
                    }
                    slots.push(parse_slot_fields(fields, line_no, &corrupt)?);
                }
                _ => return Err(corrupt(line_no, format!("unexpected key {key:?}"))),
            }
            if line.split_whitespace().count() > 1 && key != "slot" {
                return Err(corrupt(line_no, "trailing fields".to_string()));
            }
        }
        let Some(current) = current else {
            return Err(corrupt(0, "missing version or current line".to_string()));
        };
        if slots.is_empty() || slots.len() > slot_index(MAX_SLOTS) {
            return Err(corrupt(0, format!("{} slots (expected 1 to {MAX_SLOTS})", slots.len())));
        }
        if slot_index(current) >= slots.len() {
            return Err(corrupt(0, format!("current slot {current} does not exist")));
        }
        Ok(BootRecord { current, slots })
    }
}

fn parse_slot_fields<'a>(
    fields: impl Iterator<Item = &'a str>,
    line_no: usize,
    corrupt: &dyn Fn(usize, String) -> BootControlError,
) -> Result<SlotRecord, BootControlError> {
    let mut suffix = None;
    let mut priority = None;
    let mut tries = None;
    let mut successful = None;
    for field in fields {
        let Some((k, v)) = field.split_once('=') else {
            return Err(corrupt(line_no, format!("expected key=value, found {field:?}")));
        };
        let num = |max: u8| -> Result<u8, BootControlError> {
            v.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| corrupt(line_no, format!("{k}={v:?} is not a number 0..={max}")))
        };
        match k {
            "suffix" if suffix.is_none() => {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(corrupt(line_no, format!("bad suffix {v:?}")));
                }
                suffix = Some(v.to_string());
            }
            "priority" if priority.is_none() => priority = Some(num(MAX_PRIORITY)?),
            "tries" if tries.is_none() => tries = Some(num(MAX_TRIES)?),
            "successful" if successful.is_none() => successful = Some(num(1)? == 1),
            _ => return Err(corrupt(line_no, format!("unexpected or repeated field {k:?}"))),
        }
    }
    match (suffix, priority, tries, successful) {
        (Some(suffix), Some(priority), Some(tries_left), Some(successful)) => {
            Ok(SlotRecord { suffix, priority, tries_left, successful })
        }
        _ => Err(corrupt(line_no, "slot line lacks suffix, priority, tries or successful".into())),
    }
}

fn default_suffix(slot: u32) -> String {
    let letter = u8::try_from(slot).ok().and_then(|s| b'a'.checked_add(s)).unwrap_or(b'?');
    format!("_{}", char::from(letter))
}

/// A file-based boot control for Linux and the virtual device: one small text record (format in
/// docs/state-machine.md) holding, per slot, priority, tries left and the successful bit, plus
/// the slot the current boot runs from. Every change is written durably: temporary file, fsync,
/// rename over the record, fsync of the directory.
#[derive(Debug)]
pub struct FileBootControl {
    path: PathBuf,
    // Serializes read-modify-write cycles within this process.
    lock: Mutex<()>,
}

impl FileBootControl {
    /// The record's conventional file name inside a metadata directory.
    pub const DEFAULT_FILE_NAME: &'static str = "bootctl";

    /// Use an existing record; it is parsed once to fail early on a bad file.
    pub fn open(path: &Path) -> Result<FileBootControl, BootControlError> {
        let bc = FileBootControl { path: path.to_path_buf(), lock: Mutex::new(()) };
        bc.record()?;
        Ok(bc)
    }

    /// Create a new record with [`BootRecord::new`]; fails if the file exists.
    pub fn create(path: &Path, slot_count: u32) -> Result<FileBootControl, BootControlError> {
        if path.exists() {
            return Err(BootControlError::AlreadyExists { path: path.to_path_buf() });
        }
        let record = BootRecord::new(slot_count)
            .ok_or(BootControlError::InvalidSlot { slot: slot_count, count: MAX_SLOTS })?;
        let bc = FileBootControl { path: path.to_path_buf(), lock: Mutex::new(()) };
        bc.write(&record)?;
        Ok(bc)
    }

    /// [`Self::open`] if the file exists, else [`Self::create`].
    pub fn open_or_create(
        path: &Path,
        slot_count: u32,
    ) -> Result<FileBootControl, BootControlError> {
        if path.exists() {
            Self::open(path)
        } else {
            Self::create(path, slot_count)
        }
    }

    /// The record's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and parse the record.
    pub fn record(&self) -> Result<BootRecord, BootControlError> {
        let text = fs::read_to_string(&self.path).map_err(|source| BootControlError::Io {
            operation: "read",
            path: self.path.clone(),
            source,
        })?;
        BootRecord::parse(&text, &self.path)
    }

    /// What a bootloader does at power-on ([`BootRecord::select_for_boot`]), written durably.
    /// Call once per boot before the policy runs (the virtual device's init does).
    pub fn bootloader_select(&self) -> Result<u32, BootControlError> {
        self.update(|r| {
            r.select_for_boot()
                .ok_or_else(|| BootControlError::NoBootableSlot { path: self.path.clone() })
        })
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut BootRecord) -> Result<T, BootControlError>,
    ) -> Result<T, BootControlError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = self.record()?;
        let out = change(&mut record)?;
        self.write(&record)?;
        Ok(out)
    }

    fn write(&self, record: &BootRecord) -> Result<(), BootControlError> {
        env::replace_file_durably(&self.path, record.to_text().as_bytes())
    }

    fn check_slot(record: &BootRecord, slot: u32) -> Result<usize, BootControlError> {
        let i = slot_index(slot);
        if i < record.slots.len() {
            Ok(i)
        } else {
            Err(BootControlError::InvalidSlot { slot, count: slot_count_u32(&record.slots) })
        }
    }
}

impl BootControl for FileBootControl {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        Ok(slot_count_u32(&self.record()?.slots))
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        Ok(self.record()?.current)
    }
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        let record = self.record()?;
        let i = Self::check_slot(&record, slot)?;
        Ok(record.slots[i].suffix.clone())
    }
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        let record = self.record()?;
        let i = Self::check_slot(&record, slot)?;
        Ok(record.slots[i].successful)
    }
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        self.update(|r| {
            r.mark_successful();
            Ok(())
        })
    }
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        self.update(|r| {
            Self::check_slot(r, slot)?;
            r.set_active(slot);
            Ok(())
        })
    }
}
