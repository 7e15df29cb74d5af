//! `cargo xtask setup`: Debian packages, the kernel, virtme-ng and tools, into the cache folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure as check, Context, Result};
use testbench::paths::{cache_dir, Kernel};

/// Debian packages the bench and the tests use.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86", // the virtual device (TCG)
    "busybox-static",  // virtme-ng builds its initramfs with busybox
    "kmod",            // depmod for the unpacked kernel, modprobe in the guest
    "dmsetup",         // device-mapper CLI used by tests and the demo
    "util-linux",      // blkdiscard, fallocate, ...
    "mount",           // losetup
    "e2fsprogs",       // mkfs.ext4
    "f2fs-tools",      // mkfs.f2fs
    "fio",             // benchmarks
    "python3-venv",    // the virtme-ng virtualenv
    "g++",             // cargo-fuzz builds libFuzzer
    "strace",          // the binder benchmark counts fsyncs with it
    "sqlite3",         // the estimate benchmark's workloads (package and app databases)
    "procps",          // ps: the VM watchdog's report of every guest thread (testbench)
    // Platform-artifact checkers (../shared/reference/integration-tools.md): the tools each
    // ecosystem itself uses, so a pass means to integrators what it means to us.
    "blueprint-tools",  // bpfmt: Soong's Blueprint parser, checks every Android.bp
    "checkpolicy",      // compiles sepolicy/ against the stub base policy
    "setools",          // sesearch/seinfo: assertions on the compiled policy
    "m4",               // expands the .te files and stub macros into policy.conf
    "libubootenv-tool", // fw_printenv/fw_setenv: U-Boot environment boot control
    "u-boot-tools",     // mkenvimage: redundant U-Boot environments
    "grub-common",      // grub-editenv: the grubenv boot control
    "grub-emu",         // GRUB in userspace: runs the documented grub.cfg A/B snippet
    "systemd",          // systemd-analyze verify for the shipped units
    // bindgen (the `libublk` crate, behind bow-ublk's `ublk` feature) loads libclang.so at
    // build time; Debian 12 ships it in libclang-dev (clang 14).
    "libclang-dev",
    // Unpack the kernels' vmlinux for QEMU's PVH boot (testbench::kernel_image): 6.1 is
    // xz-compressed, 6.12 zstd.
    "xz-utils",
    "zstd",
];
/// virtme-ng version installed into the venv (the one checked on these machines).
pub const VIRTME_NG: &str = "virtme-ng==1.42";
/// Tools installed with `cargo install --locked --root <cache>/tools`: (binary, crate spec).
pub const TOOLS: &[(&str, &str)] =
    &[("rsb_hub", "rsbinder-tools@0.12.0"), ("cargo-fuzz", "cargo-fuzz@0.13.2")];
/// Where a kernel of the virtual device comes from: the meta package whose dependency names its
/// current package, and the suffix to add to that name (the 6.12 kernel comes unsigned: the same
/// image and modules, without the Secure Boot signature QEMU does not need).
fn package_source(kernel: Kernel) -> (&'static str, &'static str) {
    match kernel {
        Kernel::Debian61 => ("linux-image-amd64", ""),
        Kernel::Mainline612 => ("linux-image-6.12-amd64", "-unsigned"),
    }
}

/// What is missing.
#[derive(Debug, Default)]
pub struct Missing {
    pub packages: Vec<&'static str>,
    pub venv: bool,
    /// Kernels not (fully) unpacked in the cache.
    pub kernels: Vec<Kernel>,
    /// Kernels unpacked without their PVH image (`boot/vmlinux-<release>`), as setups before
    /// 2026-12-07 left them: only the image is made.
    pub pvh_images: Vec<Kernel>,
    pub tools: Vec<(&'static str, &'static str)>,
    /// rustup components (`rustfmt`, `clippy`) whose cargo subcommand does not run.
    pub components: Vec<&'static str>,
}

impl Missing {
    pub fn nothing(&self) -> bool {
        self.packages.is_empty()
            && !self.venv
            && self.kernels.is_empty()
            && self.pvh_images.is_empty()
            && self.tools.is_empty()
            && self.components.is_empty()
    }
}

/// Checks what is missing, without changing anything.
pub fn missing() -> Result<Missing> {
    let cache = cache_dir();
    let installed = installed_packages(APT_PACKAGES)?;
    Ok(Missing {
        packages: APT_PACKAGES
            .iter()
            .copied()
            .filter(|p| !installed.iter().any(|i| i == p))
            .collect(),
        venv: !cache.join("venv/bin/vng").is_file(),
        kernels: Kernel::ALL.into_iter().filter(|k| kernel_missing(&cache, *k)).collect(),
        pvh_images: Kernel::ALL
            .into_iter()
            .filter(|k| !kernel_missing(&cache, *k) && pvh_image_missing(&cache, *k))
            .collect(),
        tools: TOOLS
            .iter()
            .copied()
            .filter(|(bin, _)| !cache.join("tools/bin").join(bin).is_file())
            .collect(),
        components: [("rustfmt", "fmt"), ("clippy", "clippy")]
            .into_iter()
            .filter(|(_, sub)| {
                !Command::new(crate::cargo())
                    .args([sub, "--version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|(component, _)| component)
            .collect(),
    })
}

fn kernel_missing(cache: &Path, kernel: Kernel) -> bool {
    let Ok(version) = fs::read_to_string(cache.join("kernel").join(kernel.version_file())) else {
        return true;
    };
    let version = version.trim();
    let root = cache.join("kernel").join(version);
    !(root.join(format!("boot/vmlinuz-{version}")).is_file()
        && root.join(format!("lib/modules/{version}/modules.dep")).is_file())
}

/// The bzImage of an unpacked kernel (`kernel_missing` is false).
fn vmlinuz(cache: &Path, kernel: Kernel) -> Option<PathBuf> {
    let version = fs::read_to_string(cache.join("kernel").join(kernel.version_file())).ok()?;
    let version = version.trim();
    Some(cache.join("kernel").join(version).join(format!("boot/vmlinuz-{version}")))
}

fn pvh_image_missing(cache: &Path, kernel: Kernel) -> bool {
    vmlinuz(cache, kernel).is_none_or(|z| !testbench::kernel_image::pvh_image_path(&z).is_file())
}

fn unpack_pvh_image(cache: &Path, kernel: Kernel) -> Result<()> {
    let vmlinuz = vmlinuz(cache, kernel).context("the kernel's VERSION file is unreadable")?;
    unpack_pvh(&vmlinuz)
}

fn unpack_pvh(vmlinuz: &Path) -> Result<()> {
    let image = testbench::kernel_image::unpack_pvh_image(vmlinuz)
        .with_context(|| format!("unpacking the PVH image of {}", vmlinuz.display()))?;
    println!("setup: {} unpacked for QEMU's PVH boot", image.display());
    Ok(())
}

/// Runs setup when something is missing.
pub fn ensure() -> Result<()> {
    if missing()?.nothing() {
        return Ok(());
    }
    println!("setup: something is missing, running `cargo xtask setup` first");
    run().map(|_| ())
}

/// Installs what is missing. Returns whether anything was done.
pub fn run() -> Result<bool> {
    let cache = cache_dir();
    let todo = missing()?;
    if todo.nothing() {
        println!("setup: everything is in place in {}; nothing to do", cache.display());
        return Ok(false);
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut apt_updated = false;
    if !todo.packages.is_empty() {
        println!("setup: installing Debian packages: {}", todo.packages.join(" "));
        apt(&["update"])?;
        apt_updated = true;
        let mut args = vec!["install", "-y"];
        args.extend(&todo.packages);
        apt(&args)?;
    }
    // The downloads (virtualenv, kernels) wait on the network, the tools on the CPU: run the
    // two at once (setup 126 s → 112 s from a fresh clone).
    let downloads = || -> Result<()> {
        if todo.venv {
            install_venv(&cache)?;
        }
        for kernel in &todo.kernels {
            install_kernel(&cache, *kernel, apt_updated)?;
        }
        for kernel in &todo.pvh_images {
            unpack_pvh_image(&cache, *kernel)?;
        }
        Ok(())
    };
    let builds = || -> Result<()> {
        if !todo.components.is_empty() {
            println!("setup: adding rustup components: {}", todo.components.join(" "));
            run_cmd(Command::new("rustup").args(["component", "add"]).args(&todo.components))?;
        }
        for (bin, spec) in &todo.tools {
            println!("setup: installing {bin} ({spec}) into {}", cache.join("tools").display());
            let root = cache.join("tools");
            run_cmd(
                Command::new(crate::cargo())
                    .args(["install", "--locked", "--root"])
                    .arg(&root)
                    .arg(spec),
            )?;
        }
        Ok(())
    };
    let (downloaded, built) = std::thread::scope(|scope| {
        let downloading = scope.spawn(downloads);
        let built = builds();
        let downloaded = downloading
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the download thread panicked")));
        (downloaded, built)
    });
    downloaded?;
    built?;
    check!(missing()?.nothing(), "setup finished but something is still missing");
    println!("setup: done ({})", cache.display());
    Ok(true)
}

fn install_venv(cache: &Path) -> Result<()> {
    let venv = cache.join("venv");
    println!("setup: creating the virtme-ng virtualenv at {}", venv.display());
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "--disable-pip-version-check",
        "--quiet",
        VIRTME_NG,
    ]))
}

fn install_kernel(cache: &Path, kernel: Kernel, apt_updated: bool) -> Result<()> {
    let (meta, suffix) = package_source(kernel);
    let package = match kernel_package(meta) {
        Ok(p) => p,
        Err(e) if !apt_updated => {
            println!("setup: {e:#}; refreshing the package lists");
            apt(&["update"])?;
            kernel_package(meta)?
        }
        Err(e) => return Err(e),
    };
    // The release name (`uname -r`, the modules folder) is the signed package's name.
    let version = package.strip_prefix("linux-image-").unwrap_or(&package).to_owned();
    let package = format!("{package}{suffix}");
    println!("setup: installing kernel {version} (package {package}) into the cache");
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    run_cmd(Command::new("apt-get").args(["download", &package]).current_dir(&debs))?;
    let prefix = format!("{package}_");
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && Path::new(n).extension().is_some_and(|e| e == "deb")
            })
        })
        .with_context(|| format!("apt-get download left no {prefix}*.deb in {}", debs.display()))?;
    let kernels = cache.join("kernel");
    let partial = kernels.join(format!("{version}.partial"));
    let dest = kernels.join(&version);
    for d in [&partial, &dest] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    fs::create_dir_all(&partial)?;
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &dest)?;
    run_cmd(Command::new(sbin("depmod")).arg("-b").arg(&dest).arg(&version))?;
    unpack_pvh(&dest.join(format!("boot/vmlinuz-{version}")))?;
    let version_file = kernels.join(kernel.version_file());
    let tmp = version_file.with_extension("tmp");
    fs::write(&tmp, format!("{version}\n"))?;
    fs::rename(&tmp, &version_file)?;
    fs::remove_file(&deb)?;
    println!("setup: kernel {version} unpacked in {}", dest.display());
    Ok(())
}

/// The kernel package that the meta package `meta` depends on today (one exact name).
fn kernel_package(meta: &str) -> Result<String> {
    let out =
        Command::new("apt-cache").args(["depends", meta]).output().context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_kernel_depends(&text)
        .with_context(|| format!("apt-cache depends {meta} names no kernel package"))
}

/// Finds `Depends: linux-image-<version>` in `apt-cache depends` output.
pub fn parse_kernel_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?.trim();
        let version = dep.strip_prefix("linux-image-")?;
        let plain = !version.is_empty()
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '+');
        plain.then(|| dep.to_owned())
    })
}

/// Which of `packages` dpkg reports as installed.
fn installed_packages(packages: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(packages)
        .output()
        .context("running dpkg-query (is this a Debian system?)")?;
    Ok(parse_dpkg_status(&String::from_utf8_lossy(&out.stdout)))
}

/// Names of installed packages from `dpkg-query -W -f='${Package} ${Status}\n'` output.
pub fn parse_dpkg_status(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .map(|p| p.trim().to_owned())
        .collect()
}

fn apt(args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run_cmd(&mut cmd)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `name` from /usr/sbin or /sbin when they are not on PATH (non-root shells).
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Prints and runs a command; fails on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    println!("+ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_comes_from_the_meta_package_dependency() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_kernel_depends(text).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        let virtual_only = "linux-image-amd64\n  Depends: <linux-image-6.1.0-9-amd64-unsigned>\n";
        assert_eq!(parse_kernel_depends(virtual_only), None);
        assert_eq!(parse_kernel_depends(""), None);
    }

    #[test]
    fn the_612_kernel_comes_from_its_own_meta_package() {
        // `apt-cache depends linux-image-6.12-amd64` on Debian 12 (bookworm-security).
        let text = "linux-image-6.12-amd64\n  Depends: linux-image-6.12.118+deb12-amd64\n";
        assert_eq!(parse_kernel_depends(text).as_deref(), Some("linux-image-6.12.118+deb12-amd64"));
        assert_eq!(package_source(Kernel::Mainline612), ("linux-image-6.12-amd64", "-unsigned"));
        assert_eq!(package_source(Kernel::Debian61), ("linux-image-amd64", ""));
        // The two kernels record their release names in different files, the default in the
        // file older caches already have.
        assert_eq!(Kernel::default().version_file(), "VERSION");
        assert_ne!(Kernel::Mainline612.version_file(), Kernel::Debian61.version_file());
    }

    #[test]
    fn dpkg_status_lists_only_installed_packages() {
        let text =
            "fio install ok installed\nkmod deinstall ok config-files\ng++ install ok installed\n";
        assert_eq!(parse_dpkg_status(text), ["fio", "g++"]);
    }
}
