//! `checkpointctl boot …`: the boot flow's steps that fs_mgr and init perform on Android
//! (docs/boot-flow.md), for init scripts, rc files and systemd units. Each step is idempotent
//! and logs what it did on stderr.
//!
//! `boot mount`, for every device of the daemon's configuration (same file, same
//! device/backend pairing and `auto` choice as the daemon, `checkpointd::plan`):
//! 1. already mounted at its mount point → nothing (a rerun is harmless);
//! 2. block checkpoint: `restoreCheckpoint <raw>` through the daemon (a dm-bow log restore or
//!    a snapshot merge); "No magic" (nothing to restore) is not an error, as for fs_mgr;
//! 3. `needsCheckpoint`, asked once and cached for every device (fs_mgr's cache);
//! 4. the backend's `BootStack::setup(spec, checkpointing)` builds the device stack;
//! 5. `backends::mount` mounts the plan (with f2fs's `checkpoint=disable` ladder).
//!
//! A failure stops the run with a distinct exit status (below); the failing device's stack is
//! removed again, so nothing of it stays half set up (devices mounted earlier stay mounted and
//! a rerun skips them).

use std::path::{Path, PathBuf};

use backends::MountPlan;
use checkpoint_aidl::android::system::checkpoint::ICheckpoint as icheckpoint;
use checkpointd::backend::boot_stack;
use checkpointd::config::{CheckpointMethod, DEFAULT_CONFIG_PATH};
use checkpointd::plan::DevicePlan;
use clap::Subcommand;
use icheckpoint::ICheckpoint;

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the configuration could not be read, or pairs devices and backends wrongly.
pub const EXIT_CONFIG: u8 = 1;
/// Exit status: the daemon could not be reached, or a call other than the restore failed.
pub const EXIT_DAEMON: u8 = 2;
/// Exit status: a restore failed; the device was not mounted.
pub const EXIT_RESTORE: u8 = 3;
/// Exit status: building the device stack or mounting failed; the stack was removed again.
pub const EXIT_MOUNT: u8 = 4;

/// `checkpointctl boot …`.
#[derive(Clone, Debug, Subcommand)]
pub enum BootCommand {
    /// fs_mgr's role: restore, needsCheckpoint, build the device stack and mount every
    /// configured device. Exit 0 all mounted, 1 config, 2 daemon, 3 restore, 4 stack/mount.
    Mount {
        /// The daemon's configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The "boot declared good" hook: commitChanges (a no-op on a boot that is not
    /// checkpointing). Exit 0, or 2 when the daemon cannot be reached or the commit fails.
    Commit,
    /// Per device: its backend, whether it is mounted, and the daemon's state.
    Status {
        /// The daemon's configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Remove the device stacks of unmounted devices (shutdown, or leftovers of a crash).
    /// Devices still mounted are reported and left alone. Exit 0, 1 config, 4 a stack failed.
    Teardown {
        /// The daemon's configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

/// A failure of a boot step, with its exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct BootError {
    /// The exit status.
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl BootError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        BootError { code, message: message.into() }
    }
}

/// What a restore call answered.
#[derive(Debug, PartialEq, Eq)]
pub enum RestoreAnswer {
    /// Restored, rolled forward or finished: the device is ready.
    Done,
    /// "No magic": nothing to restore.
    NothingToRestore,
}

/// The daemon as the boot flow calls it (the CLI's transport, or a fake in tests).
pub trait Daemon {
    /// `restoreCheckpoint(device)`; `Err` is the failure message.
    fn restore(&self, device: &str) -> Result<RestoreAnswer, String>;
    /// `needsCheckpoint()`.
    fn needs_checkpoint(&self) -> Result<bool, String>;
}

impl Daemon for &dyn ICheckpoint {
    fn restore(&self, device: &str) -> Result<RestoreAnswer, String> {
        match self.restoreCheckpoint(device) {
            Ok(()) => Ok(RestoreAnswer::Done),
            Err(status)
                if status.exception_code() == rsbinder::ExceptionCode::ServiceSpecific
                    && status.service_specific_error() == icheckpoint::EINVAL
                    && status.message() == Some("No magic") =>
            {
                Ok(RestoreAnswer::NothingToRestore)
            }
            Err(status) => Err(status.to_string()),
        }
    }

    fn needs_checkpoint(&self) -> Result<bool, String> {
        self.needsCheckpoint().map_err(|s| s.to_string())
    }
}

/// The machine side of the boot flow (the kernel, or a fake in tests).
pub trait Machine {
    /// Whether something is mounted at `mount_point`.
    fn is_mounted(&self, mount_point: &Path) -> Result<bool, String>;
    /// The backend's stack setup.
    fn setup(&self, plan: &DevicePlan, checkpointing: bool) -> Result<Option<MountPlan>, String>;
    /// Mounts `plan` at `mount_point`; answers the options used.
    fn mount(&self, plan: &MountPlan, mount_point: &Path) -> Result<String, String>;
    /// The backend's stack teardown.
    fn teardown(&self, plan: &DevicePlan) -> Result<(), String>;
}

/// What `boot mount` did to one device.
#[derive(Debug, PartialEq, Eq)]
pub enum Mounted {
    /// It was mounted already; nothing done.
    Already,
    /// Mounted now.
    Now {
        /// Whether this boot's writes are checkpointed.
        checkpointed: bool,
        /// The device mounted.
        device: PathBuf,
        /// The options used.
        options: String,
    },
}

/// `boot mount` over every planned device; the log lines go to `log`.
pub fn mount_all(
    plans: &[DevicePlan],
    daemon: &dyn Daemon,
    machine: &dyn Machine,
    log: &mut dyn FnMut(String),
) -> Result<Vec<Mounted>, BootError> {
    let mut needs: Option<bool> = None;
    let mut out = Vec::new();
    for p in plans {
        let mp = &p.spec.mount_point;
        let raw = p.spec.raw.display().to_string();
        let mounted = machine
            .is_mounted(mp)
            .map_err(|e| BootError::new(EXIT_MOUNT, format!("{}: {e}", mp.display())))?;
        if mounted {
            log(format!("{}: already mounted, nothing to do", mp.display()));
            out.push(Mounted::Already);
            continue;
        }
        if p.device.checkpoint == CheckpointMethod::Block {
            match daemon.restore(&raw) {
                Ok(RestoreAnswer::Done) => log(format!("{raw}: restoreCheckpoint: ok")),
                Ok(RestoreAnswer::NothingToRestore) => {
                    log(format!("{raw}: restoreCheckpoint: nothing to restore (No magic)"))
                }
                Err(e) => {
                    return Err(BootError::new(
                        EXIT_RESTORE,
                        format!("{raw}: restoreCheckpoint failed, not mounting it: {e}"),
                    ))
                }
            }
        }
        let checkpointing = match needs {
            Some(n) => n,
            None => {
                let n = daemon.needs_checkpoint().map_err(|e| {
                    BootError::new(EXIT_DAEMON, format!("needsCheckpoint failed: {e}"))
                })?;
                log(format!("needsCheckpoint: {n}"));
                *needs.insert(n)
            }
        };
        let plan = match machine.setup(p, checkpointing) {
            Ok(Some(plan)) => plan,
            Ok(None) => MountPlan {
                device: p.spec.raw.clone(),
                fs_type: p.spec.fs_type.clone(),
                options: p.spec.mount_options.clone(),
                checkpointed: false,
                action: policy::Action::Identity,
                checkpoint_disable_max_percent: None,
                note: None,
            },
            Err(e) => {
                let what = format!("backend {} could not build the device stack: {e}", p.name);
                return Err(remove_stack(machine, p, what));
            }
        };
        if let Some(note) = &plan.note {
            log(format!("{}: {note}", mp.display()));
        }
        log(format!(
            "{}: backend {} ({}{}): mount {} ({:?} stack{})",
            mp.display(),
            p.name,
            p.backend.type_name(),
            if p.reason.is_empty() { String::new() } else { format!(", {}", p.reason) },
            plan.device.display(),
            plan.action,
            if plan.checkpointed { ", checkpointed" } else { "" },
        ));
        match machine.mount(&plan, mp) {
            Ok(options) => {
                log(format!(
                    "{}: mounted {} with `{options}`",
                    mp.display(),
                    plan.device.display()
                ));
                out.push(Mounted::Now {
                    checkpointed: plan.checkpointed,
                    device: plan.device.clone(),
                    options,
                });
            }
            Err(e) => {
                let what = format!("mounting {} failed: {e}", plan.device.display());
                return Err(remove_stack(machine, p, what));
            }
        }
    }
    Ok(out)
}

/// After a failed setup or mount: removes the device's stack again, and says so in the error.
fn remove_stack(machine: &dyn Machine, p: &DevicePlan, what: String) -> BootError {
    let undo = match machine.teardown(p) {
        Ok(()) => "its device stack was removed".to_owned(),
        Err(u) => format!("removing its device stack failed too: {u}"),
    };
    BootError::new(EXIT_MOUNT, format!("{}: {what}; {undo}", p.spec.mount_point.display()))
}

/// `boot teardown`: every unmounted device's stack.
pub fn teardown_all(
    plans: &[DevicePlan],
    machine: &dyn Machine,
    log: &mut dyn FnMut(String),
) -> Result<(), BootError> {
    let mut failed = Vec::new();
    for p in plans {
        let mp = &p.spec.mount_point;
        match machine.is_mounted(mp) {
            Ok(true) => {
                log(format!("{}: still mounted, its stack is left in place", mp.display()));
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                failed.push(format!("{}: {e}", mp.display()));
                continue;
            }
        }
        match machine.teardown(p) {
            Ok(()) => log(format!("{}: device stack of {} removed", mp.display(), p.name)),
            Err(e) => failed.push(format!("{}: {e}", mp.display())),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BootError::new(EXIT_MOUNT, format!("teardown failed: {}", failed.join("; "))))
    }
}

/// The real machine: the backends crate's stacks and mount, `/proc/self/mountinfo`.
#[derive(Debug)]
pub struct Kernel {
    /// The metadata dir's backend records (a reservation to hand over before an f2fs mount);
    /// `None` when they could not be opened: the mount goes on without the hand-over.
    records: Option<backends::records::Records>,
}

impl Kernel {
    /// The machine, with the backend records of `metadata_dir` if it can be opened.
    pub fn new(metadata_dir: &Path, log: &mut dyn FnMut(String)) -> Kernel {
        let records = match backends::records::Records::open(metadata_dir) {
            Ok(r) => Some(r),
            Err(e) => {
                log(format!(
                    "backend records in {} unavailable ({e}): no reservation hand-over",
                    metadata_dir.display()
                ));
                None
            }
        };
        Kernel { records }
    }
}

impl Machine for Kernel {
    fn is_mounted(&self, mount_point: &Path) -> Result<bool, String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
        Ok(backends::parse_mountinfo(&text).iter().any(|m| m.mount_point == mount_point))
    }

    fn setup(&self, plan: &DevicePlan, checkpointing: bool) -> Result<Option<MountPlan>, String> {
        match boot_stack(&plan.backend, self.records.as_ref()) {
            Some(stack) => {
                stack.setup(&plan.spec, checkpointing).map(Some).map_err(|e| e.to_string())
            }
            None => Ok(None),
        }
    }

    fn mount(&self, plan: &MountPlan, mount_point: &Path) -> Result<String, String> {
        backends::mount(plan, mount_point).map_err(|e| e.to_string())
    }

    fn teardown(&self, plan: &DevicePlan) -> Result<(), String> {
        match boot_stack(&plan.backend, self.records.as_ref()) {
            Some(stack) => stack.teardown_stack(&plan.spec).map(|_| ()).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// One line per device for `boot status`.
pub fn status_lines(plans: &[DevicePlan], machine: &dyn Machine) -> Vec<String> {
    plans
        .iter()
        .map(|p| {
            let mounted = match machine.is_mounted(&p.spec.mount_point) {
                Ok(true) => "mounted",
                Ok(false) => "not mounted",
                Err(_) => "mount state unknown",
            };
            format!(
                "{} on {}: backend {} ({}{}), {mounted}",
                p.spec.raw.display(),
                p.spec.mount_point.display(),
                p.name,
                p.backend.type_name(),
                if p.reason.is_empty() { String::new() } else { format!(", {}", p.reason) },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;
    use checkpointd::backend::Resolved;
    use checkpointd::config::TestNullOptions;

    /// The plan of `spec`'s resolved backend, for tests.
    fn test_plan(mount_point: &str, method: CheckpointMethod, backend: Resolved) -> DevicePlan {
        let device = checkpointd::config::DeviceConfig {
            device: PathBuf::from(format!("/dev/raw{}", mount_point.replace('/', "_"))),
            mount_point: PathBuf::from(mount_point),
            checkpoint: method,
            fs_type: Some("ext4".into()),
            mount_options: "noatime".into(),
            backend: None,
        };
        let spec = checkpointd::plan::device_spec(&device);
        DevicePlan {
            device,
            spec,
            name: backend.type_name().into(),
            backend,
            reason: String::new(),
        }
    }

    #[derive(Default)]
    struct FakeDaemon {
        restore_error: Option<String>,
        no_magic: bool,
        needs: bool,
        needs_error: bool,
        calls: RefCell<Vec<String>>,
    }

    impl Daemon for FakeDaemon {
        fn restore(&self, device: &str) -> Result<RestoreAnswer, String> {
            self.calls.borrow_mut().push(format!("restore {device}"));
            match &self.restore_error {
                Some(e) => Err(e.clone()),
                None if self.no_magic => Ok(RestoreAnswer::NothingToRestore),
                None => Ok(RestoreAnswer::Done),
            }
        }
        fn needs_checkpoint(&self) -> Result<bool, String> {
            self.calls.borrow_mut().push("needsCheckpoint".into());
            if self.needs_error {
                return Err("Status(-32, TransactionFailed)".into());
            }
            Ok(self.needs)
        }
    }

    #[derive(Default)]
    struct FakeMachine {
        mounted: RefCell<BTreeSet<PathBuf>>,
        fail_setup: bool,
        fail_mount: bool,
        calls: RefCell<Vec<String>>,
    }

    impl Machine for FakeMachine {
        fn is_mounted(&self, mount_point: &Path) -> Result<bool, String> {
            Ok(self.mounted.borrow().contains(mount_point))
        }
        fn setup(
            &self,
            plan: &DevicePlan,
            checkpointing: bool,
        ) -> Result<Option<MountPlan>, String> {
            self.calls.borrow_mut().push(format!("setup {} {checkpointing}", plan.name));
            if self.fail_setup {
                return Err("dm create: EBUSY".into());
            }
            if matches!(plan.backend, Resolved::TestNull(_)) {
                return Ok(None);
            }
            Ok(Some(MountPlan {
                device: PathBuf::from("/dev/mapper/cp-data"),
                fs_type: plan.spec.fs_type.clone(),
                options: plan.spec.mount_options.clone(),
                checkpointed: checkpointing,
                action: policy::Action::Changed,
                checkpoint_disable_max_percent: None,
                note: None,
            }))
        }
        fn mount(&self, plan: &MountPlan, mount_point: &Path) -> Result<String, String> {
            self.calls.borrow_mut().push(format!("mount {}", plan.device.display()));
            if self.fail_mount {
                return Err("EINVAL".into());
            }
            self.mounted.borrow_mut().insert(mount_point.to_owned());
            Ok(plan.options.clone())
        }
        fn teardown(&self, plan: &DevicePlan) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("teardown {}", plan.name));
            Ok(())
        }
    }

    fn snapshot(mp: &str) -> DevicePlan {
        test_plan(mp, CheckpointMethod::Block, Resolved::Snapshot(Default::default()))
    }

    fn run(
        plans: &[DevicePlan],
        d: &FakeDaemon,
        m: &FakeMachine,
    ) -> Result<Vec<Mounted>, BootError> {
        mount_all(plans, d, m, &mut |_| {})
    }

    #[test]
    fn restores_asks_once_builds_and_mounts_in_order() {
        let d = FakeDaemon { needs: true, ..Default::default() };
        let m = FakeMachine::default();
        let f2fs = test_plan("/cache", CheckpointMethod::Fs, Resolved::F2fs(Default::default()));
        let out = run(&[snapshot("/data"), f2fs], &d, &m).expect("mounts");
        assert_eq!(
            *d.calls.borrow(),
            ["restore /dev/raw_data", "needsCheckpoint"],
            "one restore (fs devices have none), needsCheckpoint cached"
        );
        assert_eq!(
            *m.calls.borrow(),
            [
                "setup snapshot true",
                "mount /dev/mapper/cp-data",
                "setup f2fs true",
                "mount /dev/mapper/cp-data"
            ]
        );
        assert!(matches!(out[0], Mounted::Now { checkpointed: true, .. }));
    }

    #[test]
    fn a_second_run_does_nothing() {
        let d = FakeDaemon::default();
        let m = FakeMachine::default();
        run(&[snapshot("/data")], &d, &m).unwrap();
        d.calls.borrow_mut().clear();
        m.calls.borrow_mut().clear();
        assert_eq!(run(&[snapshot("/data")], &d, &m).unwrap(), [Mounted::Already]);
        assert!(d.calls.borrow().is_empty(), "no restore of a mounted device");
        assert!(m.calls.borrow().is_empty());
    }

    #[test]
    fn no_magic_is_not_an_error() {
        let d = FakeDaemon { no_magic: true, ..Default::default() };
        let m = FakeMachine::default();
        let mut lines = Vec::new();
        mount_all(&[snapshot("/data")], &d, &m, &mut |l| lines.push(l)).unwrap();
        assert!(lines.iter().any(|l| l.contains("nothing to restore")), "{lines:?}");
    }

    #[test]
    fn a_failed_restore_mounts_nothing() {
        let d = FakeDaemon { restore_error: Some("EIO".into()), ..Default::default() };
        let m = FakeMachine::default();
        let err = run(&[snapshot("/data")], &d, &m).unwrap_err();
        assert_eq!(err.code, EXIT_RESTORE);
        assert!(err.message.contains("restoreCheckpoint failed") && err.message.contains("EIO"));
        assert!(m.calls.borrow().is_empty());
    }

    #[test]
    fn an_unreachable_daemon_mounts_nothing() {
        let d = FakeDaemon { needs_error: true, ..Default::default() };
        let m = FakeMachine::default();
        assert_eq!(run(&[snapshot("/data")], &d, &m).unwrap_err().code, EXIT_DAEMON);
        assert!(m.calls.borrow().is_empty());
    }

    #[test]
    fn a_failed_mount_removes_the_stack_again() {
        let d = FakeDaemon::default();
        let m = FakeMachine { fail_mount: true, ..Default::default() };
        let err = run(&[snapshot("/data")], &d, &m).unwrap_err();
        assert_eq!(err.code, EXIT_MOUNT);
        assert_eq!(
            *m.calls.borrow(),
            ["setup snapshot false", "mount /dev/mapper/cp-data", "teardown snapshot"]
        );
        let m = FakeMachine { fail_setup: true, ..Default::default() };
        assert_eq!(run(&[snapshot("/data")], &d, &m).unwrap_err().code, EXIT_MOUNT);
        assert_eq!(*m.calls.borrow(), ["setup snapshot false", "teardown snapshot"]);
    }

    #[test]
    fn test_null_mounts_the_raw_device() {
        let d = FakeDaemon::default();
        let m = FakeMachine::default();
        let p = test_plan(
            "/data",
            CheckpointMethod::Block,
            Resolved::TestNull(TestNullOptions::default()),
        );
        let out = run(&[p], &d, &m).unwrap();
        assert_eq!(
            out,
            [Mounted::Now {
                checkpointed: false,
                device: PathBuf::from("/dev/raw_data"),
                options: "noatime".into()
            }]
        );
    }

    #[test]
    fn teardown_leaves_mounted_devices_alone() {
        let m = FakeMachine::default();
        m.mounted.borrow_mut().insert(PathBuf::from("/data"));
        teardown_all(&[snapshot("/data"), snapshot("/cache")], &m, &mut |_| {}).unwrap();
        assert_eq!(*m.calls.borrow(), ["teardown snapshot"]);
    }
}
