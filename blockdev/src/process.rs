//! The calling process's standing in the I/O path.
//!
//! A process that serves a block device (the ublk server) must not wait, while it serves, on
//! the I/O of the device it serves: memory reclaim inside it that writes back that device's
//! dirty pages, or dirty-page throttling that waits for them to be written, would wait for
//! itself. `PR_SET_IO_FLUSHER` (Linux 5.6) marks it: its allocations do no I/O
//! (`PF_MEMALLOC_NOIO`) and it is throttled only on the dirty pages of the device it writes to
//! (`PF_LOCAL_THROTTLE`). The mark is per thread, inherited by threads and processes created
//! after it, so it is set before the server starts any.

use std::io;

/// `<linux/prctl.h>` (the `libc` crate does not carry it).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// `PF_MEMALLOC_NOIO` in the flags field of `/proc/<pid>/task/<tid>/stat`.
pub const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
/// `PF_LOCAL_THROTTLE` in the same field.
pub const PF_LOCAL_THROTTLE: u64 = 0x0010_0000;

/// Marks the calling thread, and every thread or process it creates from now on, as serving
/// I/O. Needs `CAP_SYS_RESOURCE`; `EINVAL` on kernels before 5.6.
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: PR_SET_IO_FLUSHER takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel flags (`PF_*`) of a thread, from its `stat` line (`/proc/<pid>/task/<tid>/stat`):
/// the ninth field, counted after the command name, which may hold spaces and parentheses.
pub fn stat_flags(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields 3 on: state, ppid, pgrp, session, tty_nr, tpgid, flags.
    after_name.split_whitespace().nth(6)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel flags of the calling thread (`PR_GET_IO_FLUSHER` would need
    /// `CAP_SYS_RESOURCE` too; the `stat` line needs nothing).
    fn thread_flags() -> io::Result<u64> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
        stat_flags(&stat).ok_or_else(|| io::Error::other(format!("unreadable stat {stat:?}")))
    }

    #[test]
    fn stat_flags_are_the_ninth_field_whatever_the_name() {
        let line = "4242 (bow-ublk) S 1 4242 4242 0 -1 1077936448 155 0 0 0";
        assert_eq!(stat_flags(line), Some(1_077_936_448));
        let odd = "7 (a) (b c) R 1 7 7 0 -1 4194560 0 0";
        assert_eq!(stat_flags(odd), Some(4_194_560));
        assert_eq!(stat_flags("7 (a) R 1"), None);
        assert_eq!(stat_flags("no name"), None);
    }

    /// In a thread of its own: the mark stays with that thread and the threads it creates.
    /// Where the test may not set it (no `CAP_SYS_RESOURCE`, as on most build machines), the
    /// refusal leaves the thread unmarked; `vm_ublk` checks the server's threads as root.
    #[test]
    fn the_mark_shows_in_the_thread_flags_and_passes_to_new_threads() {
        const MARK: u64 = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE;
        std::thread::spawn(|| {
            assert_eq!(thread_flags().unwrap() & MARK, 0);
            match set_io_flusher() {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    assert_eq!(thread_flags().unwrap() & MARK, 0);
                    return;
                }
                Err(e) => panic!("PR_SET_IO_FLUSHER: {e}"),
            }
            assert_eq!(thread_flags().unwrap() & MARK, MARK);
            let child = std::thread::spawn(thread_flags).join().unwrap().unwrap();
            assert_eq!(child & MARK, MARK, "a thread created after the mark has it");
        })
        .join()
        .unwrap();
        assert_eq!(thread_flags().unwrap() & MARK, 0, "another thread is not marked");
    }
}
