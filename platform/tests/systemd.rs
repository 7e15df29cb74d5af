//! The systemd units in init/ checked with `systemd-analyze verify`, the tool integrators run,
//! and their presets with `systemctl --root preset` (../shared/reference/integration-tools.md).
//!
//! `systemd-analyze verify` resolves a unit's `ExecStart=` paths and dependencies on the
//! machine that runs it, so every check runs against a staged root (`--root=DIR`): the
//! installed systemd's own units (the targets ours pull in: sysinit.target, local-fs.target,
//! boot-complete.target, ...), our units in /usr/lib/systemd/system, and an executable at
//! every path our units run. Those executables are stand-ins (`verify` checks only that the
//! path is an executable file), and only for programs this project builds or installs
//! (checkpointd, checkpointctl; rsb_hub and rsb_device from rsbinder-tools): a unit that
//! names anything else fails here.
//!
//! A check fails on a non-zero exit and on any line on stderr: an unknown directive and an
//! ordering cycle systemd breaks by dropping a job are only messages, with exit status 0.
//! Each kind of failure is shown on a deliberately broken copy.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use platform_checks::{run, tool, workspace_root};

/// Where Debian's `systemd` package keeps its units (usrmerge: /lib is /usr/lib).
const HOST_UNITS: &str = "/usr/lib/systemd/system";
/// Where a distribution package installs unit files and presets.
const UNIT_DIR: &str = "usr/lib/systemd/system";
const PRESET_DIR: &str = "usr/lib/systemd/system-preset";

/// Programs the units may run: built by this workspace (`[[bin]]` of service/ and cli/) or
/// installed with rsb_hub (rsbinder-tools).
const KNOWN_PROGRAMS: &[&str] = &["checkpointd", "checkpointctl", "rsb_hub", "rsb_device"];

/// Every unit file we ship: init/*.service and init/rsb_hub/*.service.
fn our_units() -> Vec<PathBuf> {
    let init = workspace_root().join("init");
    let mut units = Vec::new();
    for dir in [init.clone(), init.join("rsb_hub")] {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "service" || e == "target") {
                units.push(path);
            }
        }
    }
    units.sort();
    units
}

fn name_of(path: &Path) -> String {
    path.file_name().expect("file name").to_string_lossy().into_owned()
}

/// The absolute program paths of a unit's `Exec*=` lines (after systemd's `-@:+!` prefixes).
fn exec_programs(unit_text: &str) -> Vec<String> {
    unit_text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Exec"))
        .filter_map(|l| l.split_once('='))
        .filter_map(|(_, command)| {
            command.trim_start_matches(['-', '@', ':', '+', '!']).split_whitespace().next()
        })
        .map(str::to_owned)
        .collect()
}

/// A temporary root, removed on drop.
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl Root {
    fn path(&self) -> &Path {
        &self.0
    }

    fn unit(&self, name: &str) -> PathBuf {
        self.0.join(UNIT_DIR).join(name)
    }

    /// Applies `edit` to the staged copy of unit `name`.
    fn edit(&self, name: &str, edit: impl FnOnce(&str) -> String) {
        let path = self.unit(name);
        let text = fs::read_to_string(&path).expect("staged unit");
        let changed = edit(&text);
        assert_ne!(changed, text, "the edit of {name} changed nothing");
        fs::write(&path, changed).expect("write the broken copy");
    }
}

/// A root holding the installed systemd's units, ours, and a stand-in executable for every
/// program ours run.
fn stage(label: &str) -> Root {
    tool("systemd-analyze");
    let root = Root(
        std::env::temp_dir().join(format!("checkpointd-systemd-{label}-{}", std::process::id())),
    );
    let _ = fs::remove_dir_all(root.path());
    let units = root.path().join(UNIT_DIR);
    assert!(
        Path::new(HOST_UNITS).join("sysinit.target").is_file(),
        "{HOST_UNITS} has no sysinit.target: install systemd (`cargo xtask setup`)"
    );
    copy_tree(Path::new(HOST_UNITS), &units);
    fs::create_dir_all(root.path().join("etc/systemd/system")).expect("etc");
    for unit in our_units() {
        let text = fs::read_to_string(&unit).expect("read unit");
        for program in exec_programs(&text) {
            let file = Path::new(&program).file_name().expect("program name").to_string_lossy();
            assert!(
                program.starts_with('/') && KNOWN_PROGRAMS.contains(&file.as_ref()),
                "{} runs {program}, which is not one of the programs this project installs \
                 ({KNOWN_PROGRAMS:?}, as absolute paths)",
                unit.display()
            );
            let staged = root.path().join(program.trim_start_matches('/'));
            fs::create_dir_all(staged.parent().expect("folder")).expect("bin folder");
            fs::write(&staged, "#!/bin/sh\nexit 0\n").expect("stand-in");
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::copy(&unit, units.join(name_of(&unit))).expect("stage unit");
    }
    root
}

/// Copies files and symbolic links (aliases such as runlevel3.target) of `from` into `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create folder");
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            let link = fs::read_link(&source).expect("read link");
            std::os::unix::fs::symlink(link, &target).expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&source, &target);
        } else {
            fs::copy(&source, &target).expect("copy unit");
        }
    }
}

/// `systemd-analyze verify --root=ROOT UNIT...`: Ok, or the exit status and every message.
fn verify(root: &Root, units: &[&str]) -> Result<(), String> {
    let output = run(Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(units)
        // No pager, no colour, no attempt to reach a running manager's journal.
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let messages: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if output.status.success() && messages.is_empty() {
        Ok(())
    } else {
        Err(format!("systemd-analyze verify {units:?}: {}\n{}", output.status, messages.join("\n")))
    }
}

/// `systemctl --root=ROOT preset UNIT...`, then whether each is enabled.
fn preset_and_check(root: &Root, units: &[String]) -> Vec<(String, String)> {
    let status = run(Command::new(tool("systemctl"))
        .arg(format!("--root={}", root.path().display()))
        .arg("preset")
        .args(units));
    assert!(
        status.status.success(),
        "systemctl preset: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    units
        .iter()
        .map(|unit| {
            let out = run(Command::new(tool("systemctl"))
                .arg(format!("--root={}", root.path().display()))
                .args(["is-enabled", unit]));
            (unit.clone(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .collect()
}

fn unit_names() -> Vec<String> {
    our_units().iter().map(|u| name_of(u)).collect()
}

#[test]
fn the_shipped_units_are_the_ones_checked() {
    let names = unit_names();
    for expected in [
        "checkpointd.service",
        "checkpointd-mount.service",
        "checkpointd-prepare.service",
        "checkpointd-commit.service",
        "rsb_hub.service",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[test]
fn every_unit_verifies() {
    let root = stage("every");
    let mut failures = Vec::new();
    for name in unit_names() {
        if let Err(e) = verify(&root, &[&name]) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Enabled as the preset enables them, the units join the boot transaction (sysinit.target,
/// local-fs.target, multi-user.target) without an ordering cycle.
#[test]
fn the_preset_enables_every_unit_and_the_boot_transaction_verifies() {
    let root = stage("preset");
    let presets = root.path().join(PRESET_DIR);
    fs::create_dir_all(&presets).expect("preset folder");
    // As distributions that enable nothing by default ship it (systemd's own default is to
    // enable everything, which would prove nothing).
    fs::write(presets.join("99-default.preset"), "disable *\n").expect("default preset");
    let units = unit_names();
    let disabled = preset_and_check(&root, &units);
    assert!(
        disabled.iter().all(|(_, state)| state == "disabled"),
        "without our preset nothing is enabled: {disabled:?}"
    );

    fs::copy(
        workspace_root().join("init/90-checkpointd.preset"),
        presets.join("90-checkpointd.preset"),
    )
    .expect("stage our preset");
    let enabled = preset_and_check(&root, &units);
    assert!(enabled.iter().all(|(_, state)| state == "enabled"), "{enabled:?}");
    let wants = root.path().join("etc/systemd/system/multi-user.target.wants");
    // The link points into the staged root (absolute, as systemctl makes it).
    assert!(
        fs::symlink_metadata(wants.join("checkpointd-commit.service")).is_ok(),
        "the commit unit is enabled by multi-user.target"
    );

    verify(&root, &["multi-user.target", "local-fs.target", "sysinit.target"])
        .expect("the enabled boot transaction");
}

#[test]
fn an_unknown_key_fails_the_check() {
    let root = stage("unknown-key");
    verify(&root, &["checkpointd.service"]).expect("the intact unit");
    root.edit("checkpointd.service", |t| t.replace("[Service]\n", "[Service]\nFrobnicate=yes\n"));
    let err = verify(&root, &["checkpointd.service"]).unwrap_err();
    assert!(err.contains("Unknown key 'Frobnicate'"), "{err}");
}

#[test]
fn a_missing_program_fails_the_check() {
    let root = stage("missing-program");
    verify(&root, &["checkpointd-prepare.service"]).expect("the intact unit");
    fs::remove_file(root.path().join("usr/bin/checkpointctl")).expect("remove checkpointctl");
    let err = verify(&root, &["checkpointd-prepare.service"]).unwrap_err();
    assert!(err.contains("/usr/bin/checkpointctl"), "{err}");
    assert!(err.contains("is not executable"), "{err}");
}

#[test]
fn a_missing_dependency_fails_the_check() {
    let root = stage("bad-dependency");
    verify(&root, &["checkpointd-commit.service"]).expect("the intact unit");
    root.edit("checkpointd-commit.service", |t| {
        t.replace("Requires=boot-complete.target", "Requires=boot-completed.target")
    });
    let err = verify(&root, &["checkpointd-commit.service"]).unwrap_err();
    assert!(err.contains("boot-completed.target not found"), "{err}");
}

#[test]
fn an_ordering_cycle_fails_the_check() {
    let root = stage("cycle");
    // The commit ordered before the target that declares the boot good: a cycle.
    root.edit("checkpointd-commit.service", |t| {
        t.replace("[Service]\n", "Before=boot-complete.target\n\n[Service]\n")
    });
    let err = verify(&root, &["checkpointd-commit.service"]).unwrap_err();
    assert!(err.contains("ordering cycle"), "{err}");

    // A cycle that systemd breaks by dropping a job exits 0 and only says so on stderr.
    let root = stage("cycle-dropped");
    fs::create_dir_all(root.path().join("etc/systemd/system/sysinit.target.wants")).expect("wants");
    for unit in ["checkpointd.service", "checkpointd-prepare.service"] {
        std::os::unix::fs::symlink(
            format!("/{UNIT_DIR}/{unit}"),
            root.path().join("etc/systemd/system/sysinit.target.wants").join(unit),
        )
        .expect("enable");
    }
    root.edit("checkpointd-prepare.service", |t| {
        t.replace("Before=sysinit.target", "Before=sysinit.target checkpointd.service")
    });
    let err = verify(&root, &["sysinit.target"]).unwrap_err();
    assert!(err.contains("cycle"), "{err}");
}
