//! GRUB's environment block as a boot control: the `grubenv` file GRUB's `load_env` /
//! `save_env` and `grub-editenv` read and write, and an A/B scheme over it (`ORDER`,
//! `<slot>_GOOD`, `<slot>_LEFT`) that the grub.cfg snippet in docs/boot-control.md acts on.
//!
//! The block: the line `# GRUB Environment Block`, then `name=value` lines (a `\` or newline
//! in a value is escaped with `\`), then `#` up to the block's size (1024 bytes as
//! `grub-editenv create` makes it). GRUB rewrites the block in place because it cannot
//! allocate blocks; from Linux we replace the file atomically instead (temporary file, fsync,
//! rename): GRUB finds the file by path at every boot, and a power cut leaves the old or the
//! new block, never a torn one.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::env::{replace_file_durably, EnvFormatError, EnvVars};
use super::{default_suffix, BootControl, BootControlError, MAX_SLOTS};

/// The first line of every block.
pub const GRUBENV_SIGNATURE: &str = "# GRUB Environment Block\n";
/// The block size `grub-editenv create` makes and GRUB expects.
pub const GRUBENV_SIZE: usize = 1024;

/// Decodes a block: signature, `name=value` lines (escapes undone), `#` comment lines.
pub fn decode_grubenv(block: &[u8]) -> Result<EnvVars, EnvFormatError> {
    let body = block
        .strip_prefix(GRUBENV_SIGNATURE.as_bytes())
        .ok_or(EnvFormatError::NoSignature { expected: GRUBENV_SIGNATURE })?;
    let mut vars = EnvVars::new();
    let mut rest = body;
    let mut line = 1;
    while let Some(&first) = rest.first() {
        line += 1;
        if first == b'#' || first == b'\n' {
            // A comment (the padding is one) runs to the end of its line.
            let end = rest.iter().position(|b| *b == b'\n').map_or(rest.len(), |p| p + 1);
            rest = &rest[end..];
            continue;
        }
        let eq = rest
            .iter()
            .take_while(|b| **b != b'\n')
            .position(|b| *b == b'=')
            .ok_or(EnvFormatError::NoEquals { line })?;
        let name = &rest[..eq];
        let mut value = Vec::new();
        let mut i = eq + 1;
        while i < rest.len() && rest[i] != b'\n' {
            if rest[i] == b'\\' && i + 1 < rest.len() {
                if rest[i + 1] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            value.push(rest[i]);
            i += 1;
        }
        vars.set_bytes(name, &value);
        rest = rest.get(i + 1..).unwrap_or_default();
    }
    Ok(vars)
}

/// Encodes a block of `size` bytes (normally [`GRUBENV_SIZE`]).
pub fn encode_grubenv(vars: &EnvVars, size: usize) -> Result<Vec<u8>, EnvFormatError> {
    vars.check()?;
    let mut block = GRUBENV_SIGNATURE.as_bytes().to_vec();
    for (name, value) in vars.iter() {
        if name.first() == Some(&b'#') {
            return Err(EnvFormatError::BadName { name: super::env::lossy(name) });
        }
        block.extend_from_slice(name);
        block.push(b'=');
        for &b in value {
            if b == b'\\' || b == b'\n' {
                block.push(b'\\');
            }
            block.push(b);
        }
        block.push(b'\n');
    }
    if block.len() > size {
        return Err(EnvFormatError::Full {
            needed: block.len(),
            capacity: size - GRUBENV_SIGNATURE.len().min(size),
        });
    }
    block.resize(size, b'#');
    Ok(block)
}

/// How the A/B state maps onto grubenv variables (docs/boot-control.md, "GRUB environment").
/// Slot `i` is named `slot_names[i]`; for each name `S`:
/// - `ORDER`: the slot names, most preferred first (GRUB boots the first bootable one);
/// - `S_GOOD`: `1` when the slot is marked successful;
/// - `S_LEFT`: boots left while it is not (GRUB spends one per boot).
///
/// A slot is bootable when `S_GOOD=1` or `S_LEFT` > 0. A variable that is not set has the
/// value the grub.cfg snippet sets before `load_env`: `ORDER` the names in slot order, the
/// first slot good, every `_LEFT` 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrubAbScheme {
    /// Slot names (default `A`, `B`).
    pub slot_names: Vec<String>,
    /// `S_LEFT` given to a slot made active.
    pub tries: u32,
}

/// The variable holding the boot order.
pub const VAR_ORDER: &str = "ORDER";

impl Default for GrubAbScheme {
    fn default() -> Self {
        GrubAbScheme { slot_names: vec!["A".to_string(), "B".to_string()], tries: 3 }
    }
}

/// One slot's state under a [`GrubAbScheme`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrubSlotState {
    /// `S_GOOD`.
    pub good: bool,
    /// `S_LEFT`.
    pub left: u32,
}

impl GrubSlotState {
    /// Whether GRUB may boot the slot.
    pub fn is_bootable(&self) -> bool {
        self.good || self.left > 0
    }
}

/// The A/B state of a grubenv block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrubAbState {
    /// Slots in `ORDER`, most preferred first.
    pub order: Vec<u32>,
    /// Per slot.
    pub slots: Vec<GrubSlotState>,
}

impl GrubAbState {
    /// The slot GRUB boots next: the first bootable one in `ORDER`.
    pub fn next_boot_slot(&self) -> Option<u32> {
        self.order.iter().copied().find(|s| self.slots[slot_index(*s)].is_bootable())
    }
}

fn slot_index(slot: u32) -> usize {
    usize::try_from(slot).unwrap_or(usize::MAX)
}

impl GrubAbScheme {
    /// Checks the slot names (2 to [`MAX_SLOTS`] distinct words of letters, digits and `_`,
    /// so that `S_GOOD` is a GRUB variable name) and the tries (1 to 9: the snippet's
    /// countdown).
    pub fn check(&self) -> Result<(), BootControlError> {
        let count_ok = (2..=slot_index(MAX_SLOTS)).contains(&self.slot_names.len());
        let names_ok = self.slot_names.iter().enumerate().all(|(i, n)| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !self.slot_names[..i].contains(n)
        });
        if !count_ok || !names_ok {
            return Err(BootControlError::BadScheme {
                setting: super::SchemeSetting::SlotNames,
                what: "slot names (2 to 26 different words of letters, digits and _)",
                value: format!("{:?}", self.slot_names),
            });
        }
        if !(1..=9).contains(&self.tries) {
            return Err(BootControlError::BadScheme {
                setting: super::SchemeSetting::Tries,
                what: "tries (1 to 9)",
                value: self.tries.to_string(),
            });
        }
        Ok(())
    }

    fn var(&self, slot: u32, what: &str) -> String {
        format!("{}_{what}", self.slot_names[slot_index(slot)])
    }

    /// The slot named `name`.
    pub fn slot_of(&self, name: &str) -> Option<u32> {
        (0u32..).zip(&self.slot_names).find(|(_, n)| n.as_str() == name).map(|(i, _)| i)
    }

    fn slot_count(&self) -> u32 {
        u32::try_from(self.slot_names.len()).unwrap_or(MAX_SLOTS)
    }

    /// The A/B state the variables hold.
    pub fn state(&self, vars: &EnvVars, path: &Path) -> Result<GrubAbState, BootControlError> {
        let bad = |name: &str, value: &str, expected: &str| BootControlError::BadVariable {
            path: path.to_path_buf(),
            name: name.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let order = match vars.get(VAR_ORDER) {
            None => (0..self.slot_count()).collect(),
            Some(text) => {
                let mut order = Vec::new();
                for word in text.split_whitespace() {
                    let slot = self
                        .slot_of(word)
                        .filter(|s| !order.contains(s))
                        .ok_or_else(|| bad(VAR_ORDER, text, "slot names, each once"))?;
                    order.push(slot);
                }
                order
            }
        };
        let mut slots = Vec::new();
        for slot in 0..self.slot_count() {
            let good_var = self.var(slot, "GOOD");
            let good = match vars.get(&good_var) {
                None => slot == 0,
                Some("1") => true,
                Some("0") => false,
                Some(v) => return Err(bad(&good_var, v, "0 or 1")),
            };
            let left_var = self.var(slot, "LEFT");
            let left = match vars.get(&left_var) {
                None => 0,
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n| *n <= 9)
                    .ok_or_else(|| bad(&left_var, v, "a number 0 to 9"))?,
            };
            slots.push(GrubSlotState { good, left });
        }
        Ok(GrubAbState { order, slots })
    }

    /// What the documented grub.cfg does at power-on, applied to `vars`: boot the first
    /// bootable slot of `ORDER`, spending one of its tries if it is not good; with no bootable
    /// slot, the first slot of `ORDER` (nothing better is left). The model the tests and
    /// docs/boot-control.md describe; on a device GRUB does this.
    pub fn power_on(&self, vars: &mut EnvVars, path: &Path) -> Result<u32, BootControlError> {
        let state = self.state(vars, path)?;
        let Some(slot) = state.next_boot_slot() else {
            return Ok(state.order.first().copied().unwrap_or(0));
        };
        let s = state.slots[slot_index(slot)];
        if !s.good {
            vars.set(&self.var(slot, "LEFT"), &(s.left - 1).to_string());
        }
        Ok(slot)
    }
}

/// A boot control on GRUB's environment block. The slot this boot runs from comes from the
/// kernel command line (the grub.cfg snippet passes it).
#[derive(Debug)]
pub struct GrubEnvBootControl {
    path: PathBuf,
    scheme: GrubAbScheme,
    booted: u32,
    // Serializes read-modify-write cycles within this process.
    lock: Mutex<()>,
}

impl GrubEnvBootControl {
    /// Opens the block at `path` (it must exist: `grub-install` or `grub-editenv PATH create`
    /// makes it; a missing one is more likely a wrong path than a new device).
    /// `booted_name` is the slot name this boot was started with (from
    /// [`super::kernel_cmdline_value`]).
    pub fn open(
        path: &Path,
        scheme: GrubAbScheme,
        booted_name: &str,
    ) -> Result<GrubEnvBootControl, BootControlError> {
        scheme.check()?;
        let booted =
            scheme.slot_of(booted_name).ok_or_else(|| BootControlError::BootedSlotInvalid {
                value: booted_name.to_string(),
                expected: scheme.slot_names.clone(),
            })?;
        let bc =
            GrubEnvBootControl { path: path.to_path_buf(), scheme, booted, lock: Mutex::new(()) };
        bc.state()?;
        Ok(bc)
    }

    /// The block's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scheme.
    pub fn scheme(&self) -> &GrubAbScheme {
        &self.scheme
    }

    /// Reads and decodes the block; returns its variables and its size.
    pub fn load(&self) -> Result<(EnvVars, usize), BootControlError> {
        let block = fs::read(&self.path).map_err(|source| BootControlError::Io {
            operation: "read",
            path: self.path.clone(),
            source,
        })?;
        let vars = decode_grubenv(&block).map_err(|source| BootControlError::Env {
            path: self.path.clone(),
            offset: 0,
            source,
        })?;
        Ok((vars, block.len()))
    }

    /// The A/B state now in the block.
    pub fn state(&self) -> Result<GrubAbState, BootControlError> {
        self.scheme.state(&self.load()?.0, &self.path)
    }

    fn update(
        &self,
        change: impl FnOnce(&mut EnvVars, &GrubAbState),
    ) -> Result<(), BootControlError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (old, size) = self.load()?;
        let state = self.scheme.state(&old, &self.path)?;
        let mut vars = old.clone();
        change(&mut vars, &state);
        if vars == old {
            return Ok(());
        }
        // Keep the block's size: GRUB's save_env can only rewrite the blocks it has.
        let block = encode_grubenv(&vars, size.max(GRUBENV_SIZE)).map_err(|source| {
            BootControlError::Env { path: self.path.clone(), offset: 0, source }
        })?;
        replace_file_durably(&self.path, &block)
    }

    fn check_slot(&self, slot: u32) -> Result<(), BootControlError> {
        if slot < self.scheme.slot_count() {
            Ok(())
        } else {
            Err(BootControlError::InvalidSlot { slot, count: self.scheme.slot_count() })
        }
    }
}

impl BootControl for GrubEnvBootControl {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        Ok(self.scheme.slot_count())
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        Ok(self.booted)
    }
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        self.check_slot(slot)?;
        Ok(default_suffix(slot))
    }
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        self.check_slot(slot)?;
        Ok(self.state()?.slots[slot_index(slot)].good)
    }
    /// `S_GOOD=1`, `S_LEFT=0` for the running slot.
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        let slot = self.booted;
        let scheme = &self.scheme;
        self.update(|vars, _| {
            vars.set(&scheme.var(slot, "GOOD"), "1");
            vars.set(&scheme.var(slot, "LEFT"), "0");
        })
    }
    /// `slot` first in `ORDER` (the others keep their order), `S_GOOD=0`, `S_LEFT` = tries.
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        self.check_slot(slot)?;
        let scheme = &self.scheme;
        self.update(|vars, state| {
            let order: Vec<&str> = std::iter::once(slot)
                .chain(state.order.iter().copied().filter(|s| *s != slot))
                .map(|s| scheme.slot_names[slot_index(s)].as_str())
                .collect();
            vars.set(VAR_ORDER, &order.join(" "));
            vars.set(&scheme.var(slot, "GOOD"), "0");
            vars.set(&scheme.var(slot, "LEFT"), &scheme.tries.to_string());
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

    #[test]
    fn blocks_have_the_signature_escapes_and_padding() {
        let block = encode_grubenv(&vars(&[("b", "x\\y"), ("a", "l1\nl2")]), GRUBENV_SIZE).unwrap();
        assert_eq!(block.len(), GRUBENV_SIZE);
        let text = b"# GRUB Environment Block\na=l1\\\nl2\nb=x\\\\y\n";
        assert_eq!(&block[..text.len()], text);
        assert!(block[text.len()..].iter().all(|b| *b == b'#'));
        assert_eq!(decode_grubenv(&block).unwrap(), vars(&[("a", "l1\nl2"), ("b", "x\\y")]));
    }

    #[test]
    fn grub_editenv_create_output_decodes_empty_and_bad_blocks_are_refused() {
        // What `grub-editenv FILE create` writes (GRUB 2.06).
        let mut created = b"# GRUB Environment Block\n# WARNING: Do not edit this file by tools other than grub-editenv!!!\n".to_vec();
        created.resize(GRUBENV_SIZE, b'#');
        assert!(decode_grubenv(&created).unwrap().is_empty());
        assert!(matches!(
            decode_grubenv(b"# GRUB Environment\n"),
            Err(EnvFormatError::NoSignature { .. })
        ));
        assert_eq!(
            decode_grubenv(b"# GRUB Environment Block\na=1\nnoequals\n"),
            Err(EnvFormatError::NoEquals { line: 3 })
        );
        let too_much = vars(&[("k", &"v".repeat(GRUBENV_SIZE))]);
        assert!(matches!(
            encode_grubenv(&too_much, GRUBENV_SIZE),
            Err(EnvFormatError::Full { .. })
        ));
        assert!(matches!(
            encode_grubenv(&vars(&[("#x", "1")]), GRUBENV_SIZE),
            Err(EnvFormatError::BadName { .. })
        ));
    }

    #[test]
    fn unset_variables_take_the_snippet_defaults() {
        let s = GrubAbScheme::default().state(&EnvVars::new(), Path::new("g")).unwrap();
        assert_eq!(s.order, vec![0, 1]);
        assert_eq!(s.slots[0], GrubSlotState { good: true, left: 0 });
        assert_eq!(s.slots[1], GrubSlotState { good: false, left: 0 });
        assert_eq!(s.next_boot_slot(), Some(0));
    }

    #[test]
    fn values_outside_the_scheme_are_refused() {
        for bad in [
            vec![("ORDER", "A C")],
            vec![("ORDER", "A A")],
            vec![("A_GOOD", "true")],
            vec![("B_LEFT", "10")],
            vec![("B_LEFT", "-1")],
        ] {
            let err = GrubAbScheme::default().state(&vars(&bad), Path::new("g")).unwrap_err();
            assert!(matches!(err, BootControlError::BadVariable { .. }), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn power_on_spends_tries_then_moves_down_the_order() {
        let scheme = GrubAbScheme::default();
        let p = Path::new("g");
        let mut env = vars(&[("ORDER", "B A"), ("B_GOOD", "0"), ("B_LEFT", "2"), ("A_GOOD", "1")]);
        assert_eq!(scheme.power_on(&mut env, p).unwrap(), 1);
        assert_eq!(scheme.power_on(&mut env, p).unwrap(), 1);
        assert_eq!(env.get("B_LEFT"), Some("0"));
        assert_eq!(scheme.power_on(&mut env, p).unwrap(), 0);
        // Nothing bootable: the first of ORDER, nothing changed.
        let mut none = vars(&[("ORDER", "B A"), ("A_GOOD", "0"), ("B_GOOD", "0")]);
        let before = none.clone();
        assert_eq!(scheme.power_on(&mut none, p).unwrap(), 1);
        assert_eq!(none, before);
    }

    #[test]
    fn schemes_are_checked() {
        let ok = GrubAbScheme { slot_names: vec!["A".into(), "B".into(), "C".into()], tries: 9 };
        assert!(ok.check().is_ok());
        for bad in [
            GrubAbScheme { slot_names: vec!["A".into()], tries: 3 },
            GrubAbScheme { slot_names: vec!["A".into(), "A".into()], tries: 3 },
            GrubAbScheme { slot_names: vec!["A".into(), "B-1".into()], tries: 3 },
            GrubAbScheme { tries: 0, ..GrubAbScheme::default() },
            GrubAbScheme { tries: 10, ..GrubAbScheme::default() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn blocks_round_trip(
            map in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,10}", "[ -~\n]{0,20}", 0..12)
        ) {
            let vars: EnvVars = map.into_iter().collect();
            let block = encode_grubenv(&vars, GRUBENV_SIZE).unwrap();
            prop_assert_eq!(block.len(), GRUBENV_SIZE);
            prop_assert_eq!(decode_grubenv(&block).unwrap(), vars);
        }

        #[test]
        fn arbitrary_blocks_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut block = GRUBENV_SIGNATURE.as_bytes().to_vec();
            block.extend_from_slice(&tail);
            let _ = decode_grubenv(&block);
        }
    }
}
