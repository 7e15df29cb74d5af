//! Where the bench lives: the cache folder (kernel, virtme-ng, tools) and the target dir.

use std::fmt;
use std::path::{Path, PathBuf};

/// Overrides the cache folder (default: `<workspace root>/.cache`).
pub const CACHE_ENV: &str = "CHECKPOINTD_CACHE";

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The cache folder holding the kernel, the virtme-ng venv and the tools.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".cache"),
    }
}

/// The cargo profile dir of the running executable (`target/debug`), where workspace binaries are.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test and bench executables live in `<profile>/deps`, binaries in `<profile>`.
    if dir.file_name().is_some_and(|n| n == "deps" || n == "examples") {
        dir.pop();
    }
    dir
}

/// The cargo target dir of the running executable.
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().map(Path::to_path_buf).unwrap_or(profile)
}

/// The installed bench: a kernel and virtme-ng, as `cargo xtask setup` leaves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bench {
    /// Kernel release, e.g. `6.1.0-56-amd64` (from `<cache>/kernel/VERSION`).
    pub kernel_version: String,
    /// `<cache>/kernel/<version>/boot/vmlinuz-<version>`; its modules sit beside it.
    pub kernel_image: PathBuf,
    /// The venv's bin dir (holds `vng` and `virtme-run`, which vng calls through PATH).
    pub venv_bin: PathBuf,
}

/// The bench is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotInstalled {
    missing: PathBuf,
}

impl fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the virtual device is not installed ({} is missing): run `cargo xtask setup`",
            self.missing.display()
        )
    }
}

impl std::error::Error for NotInstalled {}

impl Bench {
    /// Finds the kernel and virtme-ng in [`cache_dir`].
    pub fn locate() -> Result<Self, NotInstalled> {
        Self::locate_in(&cache_dir())
    }

    /// Finds the kernel and virtme-ng in `cache`.
    pub fn locate_in(cache: &Path) -> Result<Self, NotInstalled> {
        let must = |p: PathBuf| if p.exists() { Ok(p) } else { Err(NotInstalled { missing: p }) };
        let version_file = must(cache.join("kernel").join("VERSION"))?;
        let kernel_version = std::fs::read_to_string(&version_file)
            .map_err(|_| NotInstalled { missing: version_file.clone() })?
            .trim()
            .to_owned();
        if kernel_version.is_empty() || kernel_version.contains('/') {
            return Err(NotInstalled { missing: version_file });
        }
        let root = cache.join("kernel").join(&kernel_version);
        let kernel_image = must(root.join("boot").join(format!("vmlinuz-{kernel_version}")))?;
        must(root.join("lib").join("modules").join(&kernel_version).join("modules.dep"))?;
        let venv_bin = cache.join("venv").join("bin");
        must(venv_bin.join("vng"))?;
        Ok(Self { kernel_version, kernel_image, venv_bin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_reports_the_first_missing_piece() {
        let dir = tempfile::tempdir().unwrap();
        let err = Bench::locate_in(dir.path()).unwrap_err();
        assert!(err.to_string().contains("kernel/VERSION"), "{err}");
        assert!(err.to_string().contains("cargo xtask setup"), "{err}");

        let kdir = dir.path().join("kernel");
        std::fs::create_dir_all(kdir.join("6.1.0-9-amd64/boot")).unwrap();
        std::fs::write(kdir.join("VERSION"), "6.1.0-9-amd64\n").unwrap();
        std::fs::write(kdir.join("6.1.0-9-amd64/boot/vmlinuz-6.1.0-9-amd64"), "").unwrap();
        let err = Bench::locate_in(dir.path()).unwrap_err();
        assert!(err.to_string().contains("modules.dep"), "{err}");

        std::fs::create_dir_all(kdir.join("6.1.0-9-amd64/lib/modules/6.1.0-9-amd64")).unwrap();
        std::fs::write(kdir.join("6.1.0-9-amd64/lib/modules/6.1.0-9-amd64/modules.dep"), "")
            .unwrap();
        let err = Bench::locate_in(dir.path()).unwrap_err();
        assert!(err.to_string().contains("venv/bin/vng"), "{err}");

        std::fs::create_dir_all(dir.path().join("venv/bin")).unwrap();
        std::fs::write(dir.path().join("venv/bin/vng"), "").unwrap();
        let bench = Bench::locate_in(dir.path()).unwrap();
        assert_eq!(bench.kernel_version, "6.1.0-9-amd64");
        assert!(bench.kernel_image.ends_with("boot/vmlinuz-6.1.0-9-amd64"));
    }

    #[test]
    fn cache_dir_is_under_the_workspace_root_by_default() {
        if std::env::var_os(CACHE_ENV).is_none() {
            assert_eq!(cache_dir(), workspace_root().join(".cache"));
        }
        assert!(workspace_root().join("Cargo.toml").is_file());
    }
}
