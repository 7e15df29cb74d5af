//! Shared helpers of the platform-artifact checks in `tests/`: each check runs the tool its
//! ecosystem uses (../shared/reference/integration-tools.md). A missing tool is a failure with
//! the fix in the message, never a skip: `cargo xtask setup` installs them all.

pub mod blueprint;
pub mod soong;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (this crate's parent folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("platform/ has a parent").to_path_buf()
}

/// The path of `tool` on PATH (or /usr/sbin, /sbin); panics with the setup command when absent.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed; run `cargo xtask setup` (it installs the Debian packages the platform checks use)")
        })
}

/// Runs `command`, panicking if it cannot be started.
pub fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}
