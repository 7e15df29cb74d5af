//! A full /data while `userspace-bow` checkpoints (issue 16's "full device": the monitor acts
//! before the filesystem sees ENOSPC), on ext4 and on f2fs, on the 6.12 kernel
//! (`Profile::kernel_for`). The guest needs `bow-ublk`, built with `--features bow-ublk/ublk`
//! (`cargo xtask test` builds it).
//!
//! Each chain ([`fill_chain`]) is three boots of one device with a small /data (ext4 128 MiB,
//! f2fs 256 MiB: f2fs leaves the engine less of it):
//! 1. `fill-install`: app data and 32 MiB more of in-use data; the update asks for the
//!    checkpoint.
//! 2. `fill-commit`: the checkpoint armed (the engine's backup space is /data's free space);
//!    1 MiB steps with fsync, first rewrites in place of the in-use data (each block backed up)
//!    and a new file (free blocks taken), until the monitor, below its action threshold,
//!    commits (the table switch: /data on the raw partition, no ublk device left), then 4 MiB
//!    more. Every write and fsync succeeded, no error in dmesg, the backup space never ran out,
//!    the monitor's history has its warning and its commit, every written byte reads back;
//!    then a power cut. Without the monitor's commit the engine runs out and a write fails
//!    with ENOSPC (checked once by hand with the action threshold set to 1 byte: the ext4
//!    chain failed at MiB 58, dmesg "critical space allocation error, dev ublkb…").
//! 3. `after-fill-commit`: nothing rolled back (/data equals the manifest taken after the
//!    fill), no checkpoint, fsck clean.
//!
//! A separate binary from `vm_rollback` so that `cargo xtask test`'s VM phase runs it beside
//! that one.

use testbench::device::Fs;
use testbench::scenario::{fill_chain, guest_step, Fill, Launcher};
use testbench::vm_trial;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial(
                "userspace_bow_on_ext4_full_data_monitor_commits_before_the_engine_fills",
                || {
                    fill_chain(
                        "ubow-fill-ext4",
                        "userspace-bow",
                        Fs::Ext4,
                        Fill::Commit,
                        &Launcher::SelfEntry,
                    )
                },
            ),
            vm_trial(
                "userspace_bow_on_f2fs_full_data_monitor_commits_before_the_engine_fills",
                || {
                    fill_chain(
                        "ubow-fill-f2fs",
                        "userspace-bow",
                        Fs::F2fs,
                        Fill::Commit,
                        &Launcher::SelfEntry,
                    )
                },
            ),
        ],
        &[("step", |_| guest_step())],
    )
}
