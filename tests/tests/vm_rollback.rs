//! End-to-end: an update, failed boots ended by power cuts, the rollback, and a second update
//! that commits, on the virtual device with real data on /data and the real backends.
//!
//! Each trial is a chain of boots of one device (metadata disk + data disk that survive every
//! boot); each boot is one VM run whose guest half is a step of [`guest_step`]. What each step
//! checks is printed, so a failed chain shows where it broke. Per chain:
//! 1. `install`: /data gets realistic app data; its manifest (every file's SHA-256) is kept on
//!    the metadata disk; the update client calls `startCheckpoint(2)` and switches the slot.
//! 2. `failed-boot`, three times: the boot flow (restore or merge of the previous boot's
//!    changes, the device stack, mount), the init hooks, the new system's workload, and a power
//!    cut at a random point of it (a timer thread cuts while the workload runs). From the
//!    second failed boot on, /data must equal the manifest right after the mount: each failed
//!    boot is rolled back at the next boot. One failed boot is instead cut in the middle of its
//!    restore (`restoreCheckpointPart`, vold's test hook), and the next boot must finish it.
//! 3. `rollback`: /data equals the manifest, needsRollback, the rollback action switches to the
//!    old slot; after unmount fsck is clean.
//! 4. `old-slot`: no checkpoint; the leftovers of the checkpoint are gone; a second update.
//! 5. `second-update`: new data written, committed (optionally cut by a power cut during
//!    the commit: then /data must be exactly the old or exactly the new data).
//! 6. `after-commit`: the new data is kept; no COW file, no DM or loop device left; fsck clean.
//!
//! The chains run with snapshot (ext4), f2fs `checkpoint=disable`, and userspace-bow (ext4 and
//! f2fs, each with the commit cut by a power cut), on the backend's kernel. Snapshot on f2fs
//! (not what `auto` picks on f2fs) had a chain here too until 2026-12-06; it was dropped to keep
//! `cargo xtask test` under 30 minutes: its boot flow is the ext4 chain's, and the f2fs side
//! (the pinned COW file, a rollback after a power cut) is `vm_backends`'
//! `f2fs_snapshot_and_checkpoint_disable_with_power_cut`.

use testbench::device::{Fs, Profile};
use testbench::scenario::{abort_chain, chain, fill_chain, guest_step, Commit, Fill, Launcher};
use testbench::vm_trial;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("snapshot_on_ext4_rolls_back_power_cut_boots_and_commits", || {
                let profile = Profile::new("snapshot", Fs::Ext4);
                chain("snap-ext4", &profile, Commit::PowerCutDuring, &Launcher::SelfEntry, false)
            }),
            vm_trial("f2fs_checkpoint_disable_rolls_back_power_cut_boots_and_commits", || {
                let profile = Profile::new("f2fs", Fs::F2fs);
                chain("f2fs", &profile, Commit::Clean, &Launcher::SelfEntry, false)
            }),
            // The userspace engine behind ublk (6.12 kernel, `Profile::kernel_for`): the
            // guest needs `bow-ublk`, built with `--features bow-ublk/ublk`.
            vm_trial("userspace_bow_on_ext4_rolls_back_power_cut_boots_and_commits", || {
                let profile = Profile::new("userspace-bow", Fs::Ext4);
                chain("ubow-ext4", &profile, Commit::PowerCutDuring, &Launcher::SelfEntry, false)
            }),
            // The commit cut by a power cut on f2fs too; f2fs's clean commit (the table switch,
            // /data writable on the raw partition) is vm_full_userspace_bow's monitor commit.
            vm_trial("userspace_bow_on_f2fs_rolls_back_power_cut_boots_and_commits", || {
                let profile = Profile::new("userspace-bow", Fs::F2fs);
                chain("ubow-f2fs", &profile, Commit::PowerCutDuring, &Launcher::SelfEntry, false)
            }),
            vm_trial("snapshot_on_ext4_abort_with_and_without_retry_rolls_back", || {
                let profile = Profile::new("snapshot", Fs::Ext4);
                abort_chain("abort", &profile, &Launcher::SelfEntry)
            }),
            vm_trial("snapshot_full_data_monitor_commits_before_the_store_fills", || {
                fill_chain("fill-commit", "snapshot", Fs::Ext4, Fill::Commit, &Launcher::SelfEntry)
            }),
            vm_trial("snapshot_full_data_monitor_grows_the_store_and_rollback_still_works", || {
                fill_chain("fill-grow", "snapshot", Fs::Ext4, Fill::Grow, &Launcher::SelfEntry)
            }),
        ],
        &[("step", |_| guest_step())],
    )
}
