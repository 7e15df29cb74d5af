//! What each guest cost: one line per boot, appended by every test process to one file, so
//! that `cargo xtask test` can say which VM test binary spends the VM phase's guest time.
//!
//! The VM phase is bound by guest slots (crate::slots), not by any one binary's wall time: a
//! binary that waits for a slot costs nothing, so its wall time says little. The sum of its
//! guests' times is what it takes from the phase.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file, under the target folder; `cargo xtask test` empties it before its VM phase.
pub fn log_path() -> PathBuf {
    crate::paths::target_dir().join("testbench").join("guest-seconds.tsv")
}

/// Appends `binary<TAB>vm<TAB>seconds` for one boot. One `write` of a short line to a file
/// opened for appending: lines of parallel test processes do not interleave.
pub fn record(path: &Path, binary: &str, vm: &str, time: Duration) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let line = format!("{binary}\t{vm}\t{:.1}\n", time.as_secs_f64());
    OpenOptions::new().create(true).append(true).open(path)?.write_all(line.as_bytes())
}

/// Boots and guest seconds of one test binary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestTime {
    pub boots: usize,
    pub seconds: f64,
}

/// Sums the file's lines per binary. A line that does not parse is an error naming it.
pub fn by_binary(text: &str) -> Result<BTreeMap<String, GuestTime>, String> {
    let mut out = BTreeMap::<String, GuestTime>::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut fields = line.split('\t');
        let (Some(binary), Some(_vm), Some(seconds), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("guest time line {line:?}: want binary, vm, seconds"));
        };
        let seconds: f64 = seconds.parse().map_err(|e| format!("guest time line {line:?}: {e}"))?;
        let t = out.entry(binary.to_owned()).or_default();
        t.boots += 1;
        t.seconds += seconds;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_of_parallel_writers_are_summed_per_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/guest-seconds.tsv");
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..25 {
                        let binary = if t % 2 == 0 { "vm_a" } else { "vm_b" };
                        record(path, binary, &format!("boot-{t}-{i}"), Duration::from_millis(1500))
                            .unwrap();
                    }
                });
            }
        });
        let sums = by_binary(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(sums.len(), 2);
        for binary in ["vm_a", "vm_b"] {
            assert_eq!(sums[binary].boots, 50);
            assert!((sums[binary].seconds - 75.0).abs() < 1e-9, "{:?}", sums[binary]);
        }
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        assert!(by_binary("vm_a\tx\t1.5\nvm_a\t2.0\n").is_err());
        assert!(by_binary("vm_a\tx\tslow\n").is_err());
        assert_eq!(by_binary("").unwrap(), BTreeMap::new());
    }
}
