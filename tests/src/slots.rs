//! Guest slots shared by every test process on the machine.
//!
//! Under TCG each guest vCPU is a host thread, so guests beyond the host's cores stall each
//! other and stretch every timing window of the power-cut scenarios. `cargo xtask test` runs
//! the VM test binaries side by side (docs/testing.md), and each binary runs its trials on
//! several threads, so the limit must hold across processes: a guest boots only while its VM
//! holds one of N exclusive `flock`s under `<target>/testbench/slots/`. The kernel drops a lock
//! when its holder exits, however it exits, so a crashed test never leaks a slot.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::paths;

/// Guests that may run at once on this machine; default: the host's available parallelism.
pub const SLOTS_ENV: &str = "TESTBENCH_VM_SLOTS";

/// How often a waiting VM tries the slots again.
const POLL: Duration = Duration::from_millis(200);

/// One held slot; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct VmSlot {
    _lock: Flock<File>,
    /// Which slot (for messages).
    pub index: usize,
}

/// The number of slots: [`SLOTS_ENV`] when it is a positive integer, else the host's
/// available parallelism.
pub fn slot_count() -> usize {
    parse_slots(std::env::var(SLOTS_ENV).ok().as_deref()).unwrap_or_else(|| {
        std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1)
    })
}

fn parse_slots(value: Option<&str>) -> Option<usize> {
    value?.trim().parse::<usize>().ok().filter(|n| *n > 0)
}

fn slot_dir() -> PathBuf {
    paths::target_dir().join("testbench").join("slots")
}

/// Waits until a slot is free and takes it.
pub fn acquire() -> io::Result<VmSlot> {
    let dir = slot_dir();
    fs::create_dir_all(&dir)?;
    let count = slot_count();
    loop {
        for index in 0..count {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{index}.lock")))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(VmSlot { _lock: lock, index }),
                Err((_, Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => return Err(io::Error::from(e)),
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_counts_come_from_the_environment_when_they_make_sense() {
        assert_eq!(parse_slots(Some("3")), Some(3));
        assert_eq!(parse_slots(Some(" 1 ")), Some(1));
        assert_eq!(parse_slots(Some("0")), None);
        assert_eq!(parse_slots(Some("two")), None);
        assert_eq!(parse_slots(None), None);
    }

    #[test]
    fn a_held_slot_is_not_handed_out_twice() {
        // Two locks on the same file from one process: flock locks belong to the open file
        // description, so the second open must be refused while the first is held.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.lock");
        let open = || OpenOptions::new().create(true).truncate(false).write(true).open(&path);
        let held = Flock::lock(open().unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        let again = Flock::lock(open().unwrap(), FlockArg::LockExclusiveNonblock);
        assert!(matches!(again, Err((_, Errno::EWOULDBLOCK))));
        drop(held);
        assert!(Flock::lock(open().unwrap(), FlockArg::LockExclusiveNonblock).is_ok());
    }
}
