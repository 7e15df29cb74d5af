//! The RAUC, Mender and SWUpdate hooks (hooks/), run as each updater runs them — with its
//! environment and arguments — against checkpointd on a socket, through the real
//! checkpointctl. The updaters' own commands (`rauc`, `fw_setenv`) are stubs on PATH that
//! record their arguments.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint_client::{CheckpointState, HistoryEventKind};
use common::Setup;
use testbench::daemon::checkpointctl;

fn hooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).with_file_name("hooks")
}

/// The settings file the hooks read, stub updater commands, and the hooks run with them.
struct Hooks {
    dir: tempfile::TempDir,
}

/// What a hook did: exit code, stderr, the stub commands it ran.
#[derive(Debug)]
struct Run {
    code: i32,
    stderr: String,
    calls: Vec<String>,
}

impl Hooks {
    /// Settings pointing at `setup`'s socket, plus `extra` lines.
    fn new(setup: &Setup, extra: &str) -> Hooks {
        let dir = tempfile::tempdir().expect("temp dir");
        let defaults = format!(
            "CHECKPOINTCTL={}\nCHECKPOINTCTL_ARGS=\"--socket {}\"\n{extra}",
            checkpointctl().display(),
            setup.socket().display()
        );
        std::fs::write(dir.path().join("checkpointd.defaults"), defaults).expect("defaults");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("stub dir");
        for stub in ["rauc", "fw_setenv"] {
            let path = bin.join(stub);
            let script = format!(
                "#!/bin/sh\necho \"{stub} $*\" >> {}\n",
                dir.path().join("calls").display()
            );
            testbench::write_script(&path, &script).expect("stub");
        }
        Hooks { dir }
    }

    /// Runs `hooks/<script> args` with only `env` from the updater (and PATH).
    fn run(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
        let _ = std::fs::remove_file(self.dir.path().join("calls"));
        let path =
            format!("{}:/usr/local/bin:/usr/bin:/bin", self.dir.path().join("bin").display());
        let out = Command::new(hooks_dir().join(script))
            .args(args)
            .env_clear()
            .env("PATH", path)
            .env("CHECKPOINTD_HOOK", hooks_dir().join("checkpointd-hook"))
            .env("CHECKPOINTD_DEFAULTS", self.dir.path().join("checkpointd.defaults"))
            .envs(env.iter().copied())
            .output()
            .expect("run the hook");
        let calls = std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default();
        Run {
            code: out.status.code().expect("exit code"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            calls: calls.lines().map(str::to_owned).collect(),
        }
    }
}

/// What RAUC puts in a system handler's environment for an A→B install of slot rootfs.1.
const RAUC_ENV: &[(&str, &str)] = &[
    ("RAUC_SYSTEM_CONFIG", "/etc/rauc/system.conf"),
    ("RAUC_CURRENT_BOOTNAME", "A"),
    ("RAUC_UPDATE_SOURCE", "/run/rauc/bundle"),
    ("RAUC_MOUNT_PREFIX", "/run/rauc"),
    ("RAUC_BUNDLE_MOUNT_POINT", "/run/rauc/bundle"),
    ("RAUC_SLOTS", "1 2"),
    ("RAUC_TARGET_SLOTS", "2"),
    ("RAUC_SLOT_NAME_1", "rootfs.0"),
    ("RAUC_SLOT_CLASS_1", "rootfs"),
    ("RAUC_SLOT_DEVICE_1", "/dev/mmcblk0p2"),
    ("RAUC_SLOT_BOOTNAME_1", "A"),
    ("RAUC_SLOT_NAME_2", "rootfs.1"),
    ("RAUC_SLOT_CLASS_2", "rootfs"),
    ("RAUC_SLOT_DEVICE_2", "/dev/mmcblk0p3"),
    ("RAUC_SLOT_BOOTNAME_2", "B"),
];

fn state(setup: &Setup) -> CheckpointState {
    setup.client().status().expect("status").state
}

fn newest_event(setup: &Setup) -> HistoryEventKind {
    setup.client().history(1).expect("history")[0].kind
}

/// Install under the old system (one daemon run), reboot into the new one (the next run).
#[test]
fn rauc_post_install_starts_the_checkpoint_and_mark_good_commits_before_marking() {
    let setup = Setup::new();
    let hooks = Hooks::new(&setup, "");
    let daemon = setup.boot();
    let run = hooks.run("rauc/post-install", &[], RAUC_ENV);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("RAUC installed rootfs.1, booted A"), "{run:?}");
    assert!(run.calls.is_empty(), "post-install must not touch RAUC's state: {run:?}");
    let status = setup.client().status().expect("status");
    assert_eq!(status.state, CheckpointState::PENDING);
    assert_eq!(status.budget, 3, "CHECKPOINTD_RETRY defaults to 2: three boot attempts");
    daemon.stop();

    let daemon = setup.boot();
    setup.boot_hooks();
    assert_eq!(state(&setup), CheckpointState::CHECKPOINTING);
    let run = hooks.run("rauc/mark-good", &[], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.calls, ["rauc status mark-good"]);
    assert_eq!(state(&setup), CheckpointState::NONE);
    assert_eq!(newest_event(&setup), HistoryEventKind::COMMITTED);
    daemon.stop();
}

#[test]
fn rauc_post_install_without_the_daemon_fails_and_keeps_the_booted_slot_active() {
    let setup = Setup::new();
    let hooks = Hooks::new(&setup, "");
    // No daemon: the socket does not exist.
    let run = hooks.run("rauc/post-install", &[], RAUC_ENV);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot be reached"), "{run:?}");
    assert_eq!(run.calls, ["rauc status mark-active booted"]);
    // mark-good refuses to mark the slot when the commit fails.
    let run = hooks.run("rauc/mark-good", &[], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.calls.is_empty(), "{run:?}");
}

#[test]
fn mender_state_scripts_start_at_install_and_commit_before_mender_commits() {
    let setup = Setup::new();
    // The setting is honoured: retry 1 = two boot attempts.
    let hooks = Hooks::new(&setup, "CHECKPOINTD_RETRY=1\n");
    let daemon = setup.boot();
    // Mender passes its state scripts no arguments and no variables of its own.
    let run = hooks.run("mender/ArtifactInstall_Leave_50_checkpointd", &[], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let status = setup.client().status().expect("status");
    assert_eq!(status.state, CheckpointState::PENDING);
    assert_eq!(status.budget, 2);
    daemon.stop();

    let daemon = setup.boot();
    setup.boot_hooks();
    let run = hooks.run("mender/ArtifactCommit_Enter_50_checkpointd", &[], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(state(&setup), CheckpointState::NONE);
    assert_eq!(newest_event(&setup), HistoryEventKind::COMMITTED);
    daemon.stop();

    // A commit that cannot happen exits 1: Mender then rolls back.
    let run = hooks.run("mender/ArtifactCommit_Enter_50_checkpointd", &[], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("commitChanges failed"), "{run:?}");
}

#[test]
fn swupdate_script_starts_at_postinst_and_confirm_commits_then_confirms() {
    let setup = Setup::new();
    let hooks = Hooks::new(&setup, "");
    let daemon = setup.boot();
    for phase in ["preinst", "postfailure"] {
        let run = hooks.run("swupdate/checkpointd.sh", &[phase], &[]);
        assert_eq!(run.code, 0, "{phase}: {run:?}");
        assert_eq!(state(&setup), CheckpointState::NONE, "{phase} must not start anything");
    }
    let run = hooks.run("swupdate/checkpointd.sh", &["install"], &[]);
    assert_eq!(run.code, 1, "an unknown phase is an error: {run:?}");
    let run = hooks.run("swupdate/checkpointd.sh", &["postinst"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(state(&setup), CheckpointState::PENDING);
    daemon.stop();

    let daemon = setup.boot();
    setup.boot_hooks();
    let run = hooks.run("swupdate/confirm", &["fw_setenv", "ustate", "0"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.calls, ["fw_setenv ustate 0"]);
    assert_eq!(state(&setup), CheckpointState::NONE);
    assert_eq!(newest_event(&setup), HistoryEventKind::COMMITTED);
    daemon.stop();
}

#[test]
fn a_device_without_checkpoints_updates_unprotected_unless_protection_is_required() {
    let setup = Setup::with_backend(false);
    let daemon = setup.boot();
    let hooks = Hooks::new(&setup, "");
    let run = hooks.run("mender/ArtifactInstall_Leave_50_checkpointd", &[], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("no data rollback"), "{run:?}");

    let strict = Hooks::new(&setup, "CHECKPOINTD_REQUIRE=1\n");
    let run = strict.run("rauc/post-install", &[], RAUC_ENV);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("CHECKPOINTD_REQUIRE=1"), "{run:?}");
    assert_eq!(run.calls, ["rauc status mark-active booted"]);
    assert_eq!(state(&setup), CheckpointState::NONE);
    daemon.stop();
}

#[test]
fn the_core_hook_refuses_an_unknown_step() {
    let setup = Setup::new();
    let hooks = Hooks::new(&setup, "");
    let run = hooks.run("checkpointd-hook", &["begin"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("usage"), "{run:?}");
}
