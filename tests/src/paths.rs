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

/// Which of the installed kernels a VM boots. `cargo xtask setup` installs both; each one's
/// release name is in its own file under `<cache>/kernel/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Debian 12's own kernel (6.1, `linux-image-amd64`): the default, and the one the
    /// out-of-tree dm-bow module is built for.
    #[default]
    Debian61,
    /// Debian 12's 6.12 kernel (`linux-image-6.12-amd64`): ublk with `UBLK_F_USER_RECOVERY`
    /// and the rest of a recent mainline block layer.
    Mainline612,
}

impl Kernel {
    /// Every kernel setup installs, the default first.
    pub const ALL: [Kernel; 2] = [Kernel::Debian61, Kernel::Mainline612];

    /// The file under `<cache>/kernel/` that holds this kernel's release name.
    pub fn version_file(self) -> &'static str {
        match self {
            Kernel::Debian61 => "VERSION",
            Kernel::Mainline612 => "VERSION-6.12",
        }
    }
}

/// The installed bench: a kernel and virtme-ng, as `cargo xtask setup` leaves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bench {
    /// Kernel release, e.g. `6.1.0-56-amd64` (from `<cache>/kernel/VERSION`).
    pub kernel_version: String,
    /// `<cache>/kernel/<version>/boot/vmlinuz-<version>`; its modules sit beside it.
    pub kernel_image: PathBuf,
    /// The same kernel uncompressed, `boot/vmlinux-<version>`, which QEMU boots through its
    /// PVH entry (crate::kernel_image: the decompressor is slow under TCG).
    pub pvh_image: PathBuf,
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
    /// Finds the default kernel and virtme-ng in [`cache_dir`].
    pub fn locate() -> Result<Self, NotInstalled> {
        Self::locate_kernel(Kernel::default())
    }

    /// Finds `kernel` and virtme-ng in [`cache_dir`].
    pub fn locate_kernel(kernel: Kernel) -> Result<Self, NotInstalled> {
        Self::locate_kernel_in(&cache_dir(), kernel)
    }

    /// Finds the default kernel and virtme-ng in `cache`.
    pub fn locate_in(cache: &Path) -> Result<Self, NotInstalled> {
        Self::locate_kernel_in(cache, Kernel::default())
    }

    /// Finds `kernel` and virtme-ng in `cache`.
    pub fn locate_kernel_in(cache: &Path, kernel: Kernel) -> Result<Self, NotInstalled> {
        let must = |p: PathBuf| if p.exists() { Ok(p) } else { Err(NotInstalled { missing: p }) };
        let version_file = must(cache.join("kernel").join(kernel.version_file()))?;
        let kernel_version = std::fs::read_to_string(&version_file)
            .map_err(|_| NotInstalled { missing: version_file.clone() })?
            .trim()
            .to_owned();
        if kernel_version.is_empty() || kernel_version.contains('/') {
            return Err(NotInstalled { missing: version_file });
        }
        let root = cache.join("kernel").join(&kernel_version);
        let kernel_image = must(root.join("boot").join(format!("vmlinuz-{kernel_version}")))?;
        let pvh_image = must(crate::kernel_image::pvh_image_path(&kernel_image))?;
        must(root.join("lib").join("modules").join(&kernel_version).join("modules.dep"))?;
        let venv_bin = cache.join("venv").join("bin");
        must(venv_bin.join("vng"))?;
        Ok(Self { kernel_version, kernel_image, pvh_image, venv_bin })
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
        assert!(err.to_string().contains("boot/vmlinux-6.1.0-9-amd64"), "{err}");

        std::fs::write(kdir.join("6.1.0-9-amd64/boot/vmlinux-6.1.0-9-amd64"), "").unwrap();
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
        assert!(bench.pvh_image.ends_with("boot/vmlinux-6.1.0-9-amd64"));
    }

    #[test]
    fn each_kernel_is_found_through_its_own_version_file() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel");
        for (file, version) in
            [("VERSION", "6.1.0-9-amd64"), ("VERSION-6.12", "6.12.1+deb12-amd64")]
        {
            let modules = kdir.join(version).join("lib/modules").join(version);
            std::fs::create_dir_all(&modules).unwrap();
            std::fs::write(modules.join("modules.dep"), "").unwrap();
            std::fs::create_dir_all(kdir.join(version).join("boot")).unwrap();
            for image in ["vmlinuz", "vmlinux"] {
                std::fs::write(kdir.join(version).join(format!("boot/{image}-{version}")), "")
                    .unwrap();
            }
            std::fs::write(kdir.join(file), format!("{version}\n")).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("venv/bin")).unwrap();
        std::fs::write(dir.path().join("venv/bin/vng"), "").unwrap();
        let default = Bench::locate_in(dir.path()).unwrap();
        assert_eq!(default.kernel_version, "6.1.0-9-amd64");
        let new = Bench::locate_kernel_in(dir.path(), Kernel::Mainline612).unwrap();
        assert_eq!(new.kernel_version, "6.12.1+deb12-amd64");
        assert!(new.kernel_image.ends_with("boot/vmlinuz-6.12.1+deb12-amd64"));

        std::fs::remove_file(kdir.join("VERSION-6.12")).unwrap();
        let err = Bench::locate_kernel_in(dir.path(), Kernel::Mainline612).unwrap_err();
        assert!(err.to_string().contains("kernel/VERSION-6.12"), "{err}");
        assert!(Bench::locate_in(dir.path()).is_ok());
    }

    #[test]
    fn cache_dir_is_under_the_workspace_root_by_default() {
        if std::env::var_os(CACHE_ENV).is_none() {
            assert_eq!(cache_dir(), workspace_root().join(".cache"));
        }
        assert!(workspace_root().join("Cargo.toml").is_file());
    }
}
