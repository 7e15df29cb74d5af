//! Booting the virtual device and running one program in it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

pub use crate::paths::Kernel;
use crate::paths::{self, Bench, NotInstalled};
pub use crate::status::GuestExit;
use crate::status::{self, Anomaly, Evidence, ScriptSpec};

/// The guest CPU: vng's `-cpu max` without the fast-string flags (see `vng_command`).
const GUEST_CPU: &str = "-cpu max,-erms,-fsrm";

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// Default guest CPU count: one. Under TCG a guest's vCPUs are host threads, and `cargo test`
/// runs two VM tests at once on the two-core build machines: two 2-vCPU guests then stall
/// each other (a trivial boot measured 17-20 s of guest time against 6-7 s with one vCPU each,
/// and the rollback scenarios took 468 s instead of 685 s). Benchmarks, which run one guest at
/// a time, ask for two.
pub const DEFAULT_CPUS: u32 = 1;
/// Default time a run may take, boot included, before QEMU is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default for [`Vm::boot_timeout`]: a guest that has not started the wrapper this long after
/// QEMU started is hung in boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// Boots tried when the guest hangs in boot.
const BOOT_ATTEMPTS: u32 = 3;
/// How long before the host's timeout the guest's watchdog reports what every thread is doing
/// (status::WATCHDOG): enough for the report (about 6 s under emulation) and for a boot slower
/// than the guest's clock assumed.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(30);
/// Lines of console shown in errors.
const CONSOLE_TAIL_LINES: usize = 40;

/// One boot of the virtual device, configured builder-style, then [`Vm::run`] or [`Vm::run_self`].
#[derive(Debug, Clone)]
pub struct Vm {
    name: String,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    boot_timeout: Duration,
    /// `None`: [`WATCHDOG_MARGIN`] before the timeout.
    watchdog_after: Option<Duration>,
    modules: Vec<String>,
    disks: Vec<PathBuf>,
    binaries: Vec<(String, PathBuf)>,
    env: Vec<(String, String)>,
    stream: bool,
    kernel: Kernel,
}

/// How waiting for vng ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    Exited,
    TimedOut,
    BootHang,
}

/// The result of one boot.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The scenario name given to [`Vm::new`].
    pub name: String,
    /// How the run ended.
    pub exit: GuestExit,
    /// The program's stdout and stderr (empty if it never ran or its output was lost).
    pub output: String,
    /// The console log of the VM (kernel messages and vng's own output).
    pub console: PathBuf,
    /// The writable folder shared with the guest ([`crate::guest::shared_dir`] inside).
    pub shared_dir: PathBuf,
    /// Wall time of the whole boot.
    pub duration: Duration,
}

/// Why a run could not be carried out, or did not end as expected.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The kernel or virtme-ng is missing.
    #[error(transparent)]
    NotInstalled(#[from] NotInstalled),
    /// The scenario's configuration is unusable.
    #[error("VM `{name}`: {message}")]
    Config {
        /// Scenario name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A host-side file or process operation failed.
    #[error("VM `{name}`: {what}: {source}")]
    Io {
        /// Scenario name.
        name: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A module failed to load in the guest; the program did not run.
    #[error("VM `{name}`: {message} (console log: {})", console.display())]
    ModuleLoad {
        /// Scenario name.
        name: String,
        /// The modprobe line and its output.
        message: String,
        /// Console log path.
        console: PathBuf,
    },
    /// The guest left evidence that makes no sense (rebooted, garbled status).
    #[error("VM `{name}`: {message} (console log: {})", console.display())]
    Anomaly {
        /// Scenario name.
        name: String,
        /// What was found.
        message: String,
        /// Console log path.
        console: PathBuf,
    },
    /// The run ended differently from what the test expected.
    #[error(
        "VM `{name}`: expected {expected}, got {exit:?}\n--- guest program output ---\n{output}\
         {evidence}"
    )]
    Unexpected {
        /// Scenario name.
        name: String,
        /// What the test expected.
        expected: &'static str,
        /// What happened.
        exit: GuestExit,
        /// The program's output.
        output: String,
        /// Console log path.
        console: PathBuf,
        /// The guest watchdog's report on what every thread was doing (if it fired), then the
        /// end of the console log, each under a heading.
        evidence: String,
    },
}

impl Vm {
    /// A VM for the scenario `name` (results dir `<target>/testbench/<binary>/<name>-<n>/`).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            timeout: DEFAULT_TIMEOUT,
            boot_timeout: BOOT_TIMEOUT,
            watchdog_after: None,
            modules: Vec::new(),
            disks: Vec::new(),
            binaries: Vec::new(),
            env: Vec::new(),
            stream: false,
            kernel: Kernel::default(),
        }
    }

    /// The kernel to boot (default [`Kernel::Debian61`]). Scenarios that load the out-of-tree
    /// dm-bow module keep the default: that port targets the 6.1 kernel API.
    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Guest memory in MiB (default 1024).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest CPUs (default [`DEFAULT_CPUS`]).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Time the whole run may take, boot included (default 300 s). QEMU is killed after it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long after its start a program still running has the guest report what every thread
    /// is doing ([`GuestRun::watchdog_report`]; shown with a timeout). Default: 30 s before the
    /// timeout, and none for timeouts under a minute.
    pub fn watchdog_after(mut self, after: Duration) -> Self {
        self.watchdog_after = Some(after);
        self
    }

    /// How long the guest may take to start the program before the boot counts as hung and is
    /// tried again (default [`BOOT_TIMEOUT`]; applies only when shorter than the timeout).
    pub fn boot_timeout(mut self, boot_timeout: Duration) -> Self {
        self.boot_timeout = boot_timeout;
        self
    }

    /// modprobe command lines run before the program, in order, e.g. `"loop"`,
    /// `"binder_linux devices=binder,hwbinder"`; a line that is an absolute path to a `.ko`
    /// file is loaded with `insmod` (an out-of-tree module). Modules named in
    /// [`MODULES_ENV`] are added to every VM that boots the default kernel.
    ///
    /// `"binder_linux devices=binder,hwbinder"`. A failure ends the run with
    /// [`VmError::ModuleLoad`].
    pub fn modules(mut self, lines: &[&str]) -> Self {
        self.modules.extend(lines.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Attaches a raw image file as a virtio-blk disk. The guest finds the i-th attached disk with
    /// [`crate::guest::disk`]. Writes reach the file; a later boot with the same file sees them.
    pub fn disk(mut self, image: impl AsRef<Path>) -> Self {
        self.disks.push(image.as_ref().to_path_buf());
        self
    }

    /// Puts host files (name in the guest, host path), e.g. the workspace's binaries, on a
    /// read-only disk the guest mounts with [`crate::binimage::mount`]: far faster to run or
    /// read than the same files over the 9p root (see [`crate::binimage`]).
    pub fn binaries(mut self, files: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        self.binaries.extend(files);
        self
    }

    /// Sets an environment variable for the guest program. The guest does not inherit the
    /// host's environment; the harness passes on only `CHECKPOINTD_CACHE` (always),
    /// `RUST_BACKTRACE` and `RUST_LOG` (when set).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Copies the program's output to this process's stdout while it runs (for `cargo xtask vm`).
    pub fn stream_output(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    /// Runs the current executable as `<exe> --guest <entry> [args]` in the guest
    /// (see [`crate::main`]).
    pub fn run_self(&self, entry: &str, args: &[&str]) -> Result<GuestRun, VmError> {
        let exe =
            std::env::current_exe().map_err(|source| self.io("finding current_exe", source))?;
        let mut all = vec!["--guest", entry];
        all.extend_from_slice(args);
        self.run(&exe, &all)
    }

    /// Runs `sh -c <command>` in the guest.
    pub fn run_shell(&self, command: &str) -> Result<GuestRun, VmError> {
        self.run(Path::new("/bin/sh"), &["-c", command])
    }

    /// Boots the VM and runs `program` (any host path: the host's root is visible read-only) with
    /// `args` as root in the guest.
    pub fn run(&self, program: &Path, args: &[&str]) -> Result<GuestRun, VmError> {
        let bench = Bench::locate_kernel(self.kernel)?;
        self.check_config()?;
        self.check_vng_safe(&bench.pvh_image)?;
        let program = fs::canonicalize(program)
            .map_err(|e| self.io(format!("finding program {}", program.display()), e))?;
        let disks = self.disks()?;
        let bin_image = if self.binaries.is_empty() {
            None
        } else {
            let image = crate::binimage::image(&self.binaries)
                .map_err(|e| self.io("building the binaries' disk image", e))?;
            self.check_vng_safe(&image)?;
            Some(image)
        };
        let results = self.create_results_dir()?;
        let shared = results.join("shared");
        let tb = shared.join(status::TB_DIR);
        fs::create_dir_all(&tb).map_err(|e| self.io(format!("creating {}", tb.display()), e))?;
        for p in std::iter::once(&shared).chain(&disks) {
            self.check_vng_safe(p)?;
        }

        let mut modules = Vec::new();
        if !disks.is_empty() || bin_image.is_some() {
            modules.push("virtio_blk".to_owned());
        }
        modules.extend(self.modules.iter().cloned());
        // Out-of-tree modules (`--module PATH` of cargo xtask test/demo), after dm-mod so that a
        // device-mapper target module (an out-of-tree dm-bow) finds the core it builds on.
        // They are built for the default kernel only: another kernel would refuse them.
        let extra = if self.kernel == Kernel::default() { extra_modules() } else { Vec::new() };
        if !extra.is_empty() {
            modules.push("dm-mod".to_owned());
            modules.extend(extra.iter().map(|p| p.to_string_lossy().into_owned()));
        }
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        // The guest does not inherit the host's environment: pass on what the harness and
        // Rust need, then the scenario's own variables (which win).
        let mut env =
            vec![(paths::CACHE_ENV.to_owned(), paths::cache_dir().to_string_lossy().into_owned())];
        for key in ["RUST_BACKTRACE", "RUST_LOG"] {
            if let Ok(value) = std::env::var(key) {
                env.push((key.to_owned(), value));
            }
        }
        env.extend(self.env.iter().cloned());
        let script = status::guest_script(&ScriptSpec {
            shared: &shared,
            modules: &modules,
            env: &env,
            program: &program,
            args: &args,
            // Counted from the program's start, so it fires before the host's timeout (which
            // counts the boot too) as long as the boot takes less than the margin.
            watchdog_after: self
                .watchdog_after
                .or_else(|| {
                    self.timeout.checked_sub(WATCHDOG_MARGIN).filter(|d| *d >= WATCHDOG_MARGIN)
                })
                .map(|d| d.as_secs().max(1)),
        });
        let script_path = tb.join(status::SCRIPT);
        fs::write(&script_path, script)
            .and_then(|()| fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755)))
            .map_err(|e| self.io("writing the guest script", e))?;

        let console = results.join("console.log");
        let mut cmd = self.vng_command(&bench, &shared, &disks, bin_image.as_deref(), &script_path);

        // Held until this guest is gone (crate::slots: guests across every test process).
        let _slot = crate::slots::acquire().map_err(|e| self.io("taking a guest slot", e))?;
        let start = Instant::now();
        let mut attempt = 1;
        let timed_out = loop {
            let log = File::create(&console).map_err(|e| self.io("creating console.log", e))?;
            let log2 = log.try_clone().map_err(|e| self.io("opening console.log", e))?;
            cmd.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
            let child = cmd.spawn().map_err(|e| self.io("starting vng", e))?;
            match self.wait(child, Instant::now(), &tb)? {
                Waited::Exited => break false,
                Waited::TimedOut => break true,
                Waited::BootHang if attempt >= BOOT_ATTEMPTS => break true,
                Waited::BootHang => {
                    // The guest kernel hung before the wrapper started (seen rarely under TCG on
                    // a loaded host): nothing of the scenario ran, so boot again.
                    let kept = results.join(format!("console.boot-hang-{attempt}.log"));
                    let _ = fs::rename(&console, &kept);
                    eprintln!(
                        "testbench: VM `{}` hung during boot (no start after {:.0} s); booting \
                         again (console kept: {})",
                        self.name,
                        self.boot_timeout.as_secs_f64(),
                        kept.display()
                    );
                    attempt += 1;
                }
            }
        };
        let duration = start.elapsed();
        // Bookkeeping only: a failure to record must not fail the trial.
        if let Err(e) = crate::guest_time::record(
            &crate::guest_time::log_path(),
            &binary_name(),
            &self.name,
            duration,
        ) {
            eprintln!("testbench: recording the guest time of `{}`: {e}", self.name);
        }

        let read = |name: &str| fs::read_to_string(tb.join(name)).ok();
        let console_text = fs::read(&console).map(|b| String::from_utf8_lossy(&b).into_owned());
        let evidence = Evidence {
            status: read(status::STATUS),
            setup_error: read(status::SETUP_ERROR),
            starts: read(status::STARTED).map_or(0, |s| s.lines().count()),
            power_cut_marker: tb.join(status::POWER_CUT).exists(),
            console_reset: console_text
                .as_deref()
                .is_ok_and(|c| c.contains(status::SYSRQ_RESET_LINE)),
            timed_out,
        };
        let output = fs::read(tb.join(status::OUTPUT))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let exit = status::classify(&evidence).map_err(|a| match a {
            Anomaly::Setup(message) => {
                VmError::ModuleLoad { name: self.name.clone(), message, console: console.clone() }
            }
            Anomaly::Rebooted(n) => VmError::Anomaly {
                name: self.name.clone(),
                message: format!("the guest started the command {n} times (QEMU rebooted it)"),
                console: console.clone(),
            },
            Anomaly::BadStatus(s) => VmError::Anomaly {
                name: self.name.clone(),
                message: format!("unreadable status file {s:?}"),
                console: console.clone(),
            },
        })?;
        Ok(GuestRun {
            name: self.name.clone(),
            exit,
            output,
            console,
            shared_dir: shared,
            duration,
        })
    }

    fn vng_command(
        &self,
        bench: &Bench,
        shared: &Path,
        disks: &[PathBuf],
        bin_image: Option<&Path>,
        script: &Path,
    ) -> Command {
        let mut cmd = Command::new(bench.venv_bin.join("vng"));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![bench.venv_bin.clone()];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs).unwrap_or(path));
        cmd.arg("--run")
            .arg(&bench.kernel_image)
            .args(["--disable-kvm", "--force-9p", "--verbose", "--user=root"])
            // The kernel's crypto self-tests run at every boot under TCG: about 1 s of each
            // (docs/testing.md). Nothing here tests the kernel's crypto; the algorithms are the
            // same, only their start-up self-checks are skipped.
            .arg("--append=cryptomgr.notests")
            .arg(format!("--memory={}M", self.memory_mib))
            .arg(format!("--cpus={}", self.cpus))
            .arg(format!("--rwdir={}", shared.display()))
            .arg(format!("--cwd={}", shared.display()));
        // vng joins its arguments into one shell command line; paths were checked to be safe.
        // QEMU 7.2's TCG runs `rep movsb` one byte per helper call, and the guest kernel and glibc
        // pick it for every copy when the CPU advertises ERMS/FSRM, as vng's `-cpu max` does.
        // Hiding those two flags made page-cache copies 2.2x faster and vm_full_userspace_bow's
        // ext4 chain 1.25x (docs/testing.md), and changes nothing the tests check (the last
        // `-cpu` wins).
        let mut qemu = vec![GUEST_CPU.to_string()];
        // The uncompressed kernel, booted through its PVH entry (crate::kernel_image): QEMU
        // takes the last `-kernel`. vng still gets the `vmlinuz`, from which it reads the
        // release and finds the modules.
        qemu.push(format!("-kernel {}", bench.pvh_image.display()));
        for (i, disk) in disks.iter().enumerate() {
            qemu.push(format!("-drive file={},if=none,id=tbd{i},format=raw", disk.display()));
            qemu.push(format!(
                "-device virtio-blk-pci,drive=tbd{i},serial={}{i}",
                status::DISK_SERIAL_PREFIX
            ));
        }
        // Last, so that the scenario's disks keep their names (vda, vdb, ...).
        if let Some(image) = bin_image {
            qemu.push(format!(
                "-drive file={},if=none,id=tbbin,format=raw,readonly=on",
                image.display()
            ));
            qemu.push(format!(
                "-device virtio-blk-pci,drive=tbbin,serial={}",
                crate::binimage::SERIAL
            ));
        }
        cmd.arg("--exec").arg(script);
        // Must come last: vng's --qemu-opts takes the rest of its line.
        cmd.arg(format!("--qemu-opts={}", qemu.join(" ")));
        cmd
    }

    /// Waits for vng to exit, killing its process group at the timeout, or when the guest has
    /// not started the wrapper [`BOOT_TIMEOUT`] after the start (if that is before the timeout).
    fn wait(&self, mut child: Child, start: Instant, tb: &Path) -> Result<Waited, VmError> {
        let done = AtomicBool::new(false);
        let output = tb.join(status::OUTPUT);
        let started = tb.join(status::STARTED);
        let boot_watch = self.boot_timeout < self.timeout;
        std::thread::scope(|scope| {
            if self.stream {
                scope.spawn(|| stream_file(&output, &done));
            }
            let result = loop {
                match child.try_wait() {
                    Ok(Some(_)) => break Ok(Waited::Exited),
                    Ok(None) if start.elapsed() >= self.timeout => {
                        kill_group(&mut child);
                        break Ok(Waited::TimedOut);
                    }
                    Ok(None)
                        if boot_watch
                            && start.elapsed() >= self.boot_timeout
                            && !started.exists() =>
                    {
                        kill_group(&mut child);
                        break Ok(Waited::BootHang);
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => {
                        kill_group(&mut child);
                        break Err(self.io("waiting for vng", e));
                    }
                }
            };
            done.store(true, Ordering::Release);
            result
        })
    }

    fn check_config(&self) -> Result<(), VmError> {
        if let Some((k, _)) = self.env.iter().find(|(k, _)| !status::valid_env_key(k)) {
            return Err(self.config(format!("invalid environment variable name {k:?}")));
        }
        if self.memory_mib < 128 || self.cpus == 0 {
            return Err(self.config("needs at least 128 MiB and one CPU".to_owned()));
        }
        Ok(())
    }

    fn disks(&self) -> Result<Vec<PathBuf>, VmError> {
        self.disks
            .iter()
            .map(|d| {
                let abs = fs::canonicalize(d)
                    .map_err(|e| self.io(format!("disk image {}", d.display()), e))?;
                if abs.is_file() {
                    Ok(abs)
                } else {
                    Err(self.config(format!("disk image {} is not a regular file", d.display())))
                }
            })
            .collect()
    }

    /// vng passes paths through a shell and QEMU splits options on commas: allow plain paths only.
    fn check_vng_safe(&self, path: &Path) -> Result<(), VmError> {
        let s = path.to_string_lossy();
        let ok = s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+@".contains(c));
        if ok {
            Ok(())
        } else {
            Err(self.config(format!(
                "path {s:?} has characters vng/QEMU would misread (use [A-Za-z0-9/._-+@])"
            )))
        }
    }

    fn create_results_dir(&self) -> Result<PathBuf, VmError> {
        let name = sanitize(&self.name);
        let base = paths::target_dir().join("testbench").join(binary_name());
        fs::create_dir_all(&base)
            .map_err(|e| self.io(format!("creating {}", base.display()), e))?;
        remove_stale_results(&base, &name);
        for n in 1u32.. {
            let dir = base.join(format!("{name}-{n}"));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.io(format!("creating {}", dir.display()), e)),
            }
        }
        Err(self.config("no free results dir".to_owned()))
    }

    fn io(&self, what: impl Into<String>, source: io::Error) -> VmError {
        VmError::Io { name: self.name.clone(), what: what.into(), source }
    }

    fn config(&self, message: String) -> VmError {
        VmError::Config { name: self.name.clone(), message }
    }
}

impl GuestRun {
    /// Ok if the program exited with status 0; otherwise an error with its output and the end
    /// of the console log.
    pub fn expect_success(&self) -> Result<&Self, VmError> {
        self.expect(GuestExit::Exited(0), "exit status 0")
    }

    /// Ok if the guest ended by a power cut.
    pub fn expect_power_cut(&self) -> Result<&Self, VmError> {
        self.expect(GuestExit::PowerCut, "a power cut")
    }

    fn expect(&self, want: GuestExit, expected: &'static str) -> Result<&Self, VmError> {
        if self.exit == want {
            return Ok(self);
        }
        Err(VmError::Unexpected {
            name: self.name.clone(),
            expected,
            exit: self.exit,
            output: self.output.clone(),
            console: self.console.clone(),
            evidence: format!(
                "{}--- last lines of the console log {} ---\n{}",
                self.watchdog_report().map_or_else(String::new, |r| {
                    format!("--- the guest's watchdog report ---\n{r}")
                }),
                self.console.display(),
                self.console_tail(CONSOLE_TAIL_LINES)
            ),
        })
    }

    /// What the guest's watchdog reported, if it fired (the program ran until shortly before
    /// the timeout).
    pub fn watchdog_report(&self) -> Option<String> {
        let path = self.shared_dir.join(status::TB_DIR).join(status::WATCHDOG);
        fs::read(path).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The last `lines` lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})\n", self.console.display()));
        tail(&text, lines)
    }
}

/// Environment variable listing out-of-tree kernel modules (absolute `.ko` paths, separated
/// by `:`) that every VM loads before its program: `cargo xtask test --module PATH` and
/// `cargo xtask demo --module PATH` set it, so a machine with a dm-bow module for the guest
/// kernel runs the very same scenarios on the real target.
pub const MODULES_ENV: &str = "TESTBENCH_MODULES";

/// The out-of-tree modules of [`MODULES_ENV`].
pub fn extra_modules() -> Vec<PathBuf> {
    std::env::var_os(MODULES_ENV)
        .map(|v| std::env::split_paths(&v).filter(|p| p.is_absolute()).collect())
        .unwrap_or_default()
}

/// A sparse raw image of `bytes` bytes under `<target>/testbench/scratch/`, for [`Vm::disk`];
/// deleted when the returned path is dropped.
pub fn scratch_image(bytes: u64) -> io::Result<tempfile::TempPath> {
    let dir = paths::target_dir().join("testbench").join("scratch");
    fs::create_dir_all(&dir)?;
    let file = tempfile::Builder::new().prefix("disk").suffix(".img").tempfile_in(&dir)?;
    file.as_file().set_len(bytes)?;
    Ok(file.into_temp_path())
}

/// The last `lines` lines of `text`, each ending in a newline.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    all[from..].iter().map(|l| format!("{l}\n")).collect()
}

/// The running binary's name without cargo's hash (`vm_rollback-0123abcd` -> `vm_rollback`),
/// so scenarios of different test binaries keep separate results.
pub(crate) fn binary_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("vm");
    sanitize(strip_cargo_hash(stem))
}

fn strip_cargo_hash(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((base, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            base
        }
        _ => stem,
    }
}

/// Scenario names become folder names.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    if s.is_empty() {
        "vm".to_owned()
    } else {
        s
    }
}

/// The first boot of `name` in this process removes `<name>-<n>` dirs left by earlier runs, so
/// the target dir holds the latest run of each scenario (failed or not).
fn remove_stale_results(base: &Path, name: &str) {
    static CLEANED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut guard = CLEANED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !guard.get_or_insert_with(HashSet::new).insert(name.to_owned()) {
        return;
    }
    let Ok(entries) = fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|f| f.strip_prefix(name)) else { continue };
        let is_run = rest
            .strip_prefix('-')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if is_run {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Kills vng's process group (QEMU included), reaps vng, and waits (up to 10 s) until no live
/// member of the group is left.
fn kill_group(child: &mut Child) {
    let Ok(pgid) = i32::try_from(child.id()) else { return };
    // The child leads its own process group (process_group(0)): this reaches QEMU too.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while group_has_live_members(pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether any process in group `pgid` is alive (zombies do not count).
fn group_has_live_members(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|stat| parse_stat_state_pgrp(&stat))
            .is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X')
    })
}

/// State and process group from `/proc/<pid>/stat` (`pid (comm) state ppid pgrp ...`).
fn parse_stat_state_pgrp(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Copies what is appended to `path` to stdout until `done`, then copies the rest.
fn stream_file(path: &Path, done: &AtomicBool) {
    let mut pos = 0u64;
    let mut out = io::stdout();
    loop {
        let finished = done.load(Ordering::Acquire);
        if let Ok(mut f) = File::open(path) {
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(pos)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                pos += u64::try_from(buf.len()).unwrap_or(0);
                let _ = out.write_all(&buf);
                let _ = out.flush();
            }
        }
        if finished {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a", 5), "a\n");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn proc_stat_gives_state_and_process_group() {
        let stat = "1436 (qemu-system-x86) S 1 1400 1400 0 -1 4194560 2 0";
        assert_eq!(parse_stat_state_pgrp(stat), Some(('S', 1400)));
        let odd = "7 (a) b) Z 1 9 9 0";
        assert_eq!(parse_stat_state_pgrp(odd), Some(('Z', 9)));
        assert_eq!(parse_stat_state_pgrp("garbage"), None);
    }

    #[test]
    fn cargo_hashes_are_stripped_from_binary_names() {
        assert_eq!(strip_cargo_hash("bench_is_real-23f904361ba387c4"), "bench_is_real");
        assert_eq!(strip_cargo_hash("xtask"), "xtask");
        assert_eq!(strip_cargo_hash("vm-binder"), "vm-binder");
    }

    #[test]
    fn names_become_folder_names() {
        assert_eq!(sanitize("power cut/1"), "power_cut_1");
        assert_eq!(sanitize(""), "vm");
    }

    #[test]
    fn stale_results_of_the_same_name_only_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["abc-1", "abc-22", "abc-x", "abcd-1", "other-1"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        remove_stale_results(dir.path(), "abc");
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["abc-x", "abcd-1", "other-1"]);
    }

    #[test]
    fn unexpected_exit_reports_output_and_console_path() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        fs::write(&console, "boot\nKernel panic\n").unwrap();
        let run = GuestRun {
            name: "x".into(),
            exit: GuestExit::Exited(1),
            output: "assertion failed\n".into(),
            console: console.clone(),
            shared_dir: dir.path().into(),
            duration: Duration::ZERO,
        };
        let err = run.expect_success().unwrap_err().to_string();
        assert!(err.contains("assertion failed"), "{err}");
        assert!(err.contains("Kernel panic"), "{err}");
        assert!(err.contains(&console.display().to_string()), "{err}");
        assert!(run.expect_power_cut().is_err());
    }
}
