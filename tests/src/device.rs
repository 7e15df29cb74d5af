//! A checkpointed device inside the virtual device: what end-to-end scenarios and the demo boot.
//!
//! Disk 0 is the metadata partition (ext4: the state store, the backend records and the file
//! boot-control record, never rolled back); disk 1 is the raw /data partition (ext4 or f2fs).
//! [`Device::power_on`] plays the bootloader (slot selection on the file record), starts
//! checkpointd on a socket (or kernel binder with rsb_hub), then runs the boot flow as an init
//! script would: `checkpointctl boot mount` (restore or merge, needsCheckpoint, the device
//! stack, mount), `markBootAttempt`, `prepareCheckpoint`. A scenario then changes /data, cuts
//! the power, commits or aborts, and checks what the next boot sees.
//!
//! The profile (backend, file system, transport) comes from the host through environment
//! variables ([`Profile::env`] on the host, [`Profile::from_env`] in the guest).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::Kernel;
use crate::{guest, Failed};

/// Where the metadata and data partitions are mounted in the guest (the host root is
/// read-only 9p; /dev/shm is tmpfs).
pub const META_MOUNT: &str = "/dev/shm/metadata";
/// The mount point of /data.
pub const DATA_MOUNT: &str = "/dev/shm/data";
/// The daemon's socket.
pub const SOCKET: &str = "/dev/shm/checkpointd.sock";
/// The device's binaries, on the read-only image of [`binaries`] that [`crate::binimage`]
/// mounts at `/dev/shm/bin` (copying them from the 9p root to tmpfs took 16 s of every boot;
/// running them from 9p, about 1 s per start).
const CTL: &str = "/dev/shm/bin/checkpointctl";
const DAEMON: &str = "/dev/shm/bin/checkpointd";
/// The userspace-bow server, next to the daemon and checkpointctl (where they look for it).
const BOW_UBLK: &str = "/dev/shm/bin/bow-ublk";
const CONFIG: &str = "/dev/shm/checkpointd.toml";

/// Host: the binaries a boot of the device with `profile` runs, for
/// [`crate::vm::Vm::binaries`]: the daemon, `checkpointctl`, `bow-ublk` when the backend needs
/// it, and the example update client when it is built (the scenario's updater steps say how to
/// build it when it is not).
///
/// # Panics
/// When a workspace binary is not built ([`crate::cargo_bin`]).
pub fn binaries(profile: &Profile) -> Vec<(String, PathBuf)> {
    let mut names = vec!["checkpointctl", "checkpointd"];
    if profile.needs_bow_ublk() {
        names.push("bow-ublk");
    }
    let mut files: Vec<(String, PathBuf)> =
        names.into_iter().map(|n| (n.to_owned(), crate::cargo_bin(n))).collect();
    let updater = crate::paths::profile_dir().join("examples").join("updater");
    if updater.is_file() {
        files.push(("updater".to_owned(), updater));
    }
    files
}

/// The filesystem on /data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    /// ext4 with 4 KiB blocks.
    Ext4,
    /// f2fs.
    F2fs,
}

impl Fs {
    /// `ext4` / `f2fs`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::F2fs => "f2fs",
        }
    }

    fn parse(s: &str) -> Result<Fs, Failed> {
        match s {
            "ext4" => Ok(Fs::Ext4),
            "f2fs" => Ok(Fs::F2fs),
            other => Err(format!("unknown file system {other}").into()),
        }
    }

    /// Formats `image` (a host file) with this file system.
    pub fn mkfs_host(self, image: &Path) -> Result<(), Failed> {
        let mut cmd = match self {
            Fs::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-b", "4096", "-L", "userdata"]);
                c
            }
            Fs::F2fs => {
                let mut c = Command::new("mkfs.f2fs");
                c.args(["-q", "-f", "-l", "userdata"]);
                c
            }
        };
        let out = cmd.arg(image).output().map_err(|e| format!("mkfs.{}: {e}", self.as_str()))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.{} {}: {}",
                self.as_str(),
                image.display(),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(())
    }

    /// A read-only check of the unmounted device: `e2fsck -fn` / `fsck.f2fs --dry-run`.
    ///
    /// On f2fs both superblocks must be valid and its checks must have run (`[Ok..]` lines).
    pub fn fsck(self, device: &Path) -> Result<String, Failed> {
        let dev = device.display();
        match self {
            Fs::Ext4 => guest::sh(&format!("e2fsck -fn {dev} 2>&1")),
            Fs::F2fs => {
                let out = guest::sh(&format!("fsck.f2fs --dry-run {dev} 2>&1"))?;
                // fsck.f2fs exits 0 on a dry run even when it finds problems: read its report.
                if out.contains("[FAIL]") || out.contains("Fix") && out.contains("[Y]") {
                    return Err(format!("fsck.f2fs --dry-run {dev} found problems:\n{out}").into());
                }
                // It also passes with one superblock unreadable (it falls back to the other,
                // which is how a bow log in block 0 would go unnoticed), or with no f2fs at all.
                if out.contains("Can't find a valid F2FS superblock") {
                    return Err(format!(
                        "fsck.f2fs --dry-run {dev}: a superblock is not valid\n{out}"
                    )
                    .into());
                }
                if !out.contains("[Ok..]") {
                    return Err(format!("fsck.f2fs --dry-run {dev} ran no check\n{out}").into());
                }
                Ok(out)
            }
        }
    }
}

/// How the daemon is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// binder RPC on a Unix socket (no service manager needed).
    Socket,
    /// Kernel binder with rsb_hub as the service manager.
    Binder,
}

/// What a scenario boots: the backend, the file system on /data, the transport, the kernel,
/// and extra configuration lines.
#[derive(Debug, Clone)]
pub struct Profile {
    /// `[[backend]] type` (`snapshot`, `f2fs`, `auto`, `bow`, `userspace-bow`).
    pub backend: String,
    /// The kernel the host boots (host side only): the backend's own by default
    /// ([`Profile::kernel_for`]).
    pub kernel: Kernel,
    /// The file system on /data.
    pub fs: Fs,
    /// How checkpointctl reaches the daemon.
    pub transport: Transport,
    /// Extra TOML lines inside the `[[backend]]` table (e.g. `cow_bytes = 8388608`).
    pub backend_options: String,
    /// Extra top-level TOML tables appended to the config (e.g. a `[monitor]` section).
    pub extra_config: String,
    /// Whether a reboot the daemon asks for (abortChanges, the rollback action) resets the
    /// guest ([`Device::reboot_command`]); otherwise the daemon only logs it.
    pub reboot_cuts_power: bool,
}

const ENV_BACKEND: &str = "CPD_DEVICE_BACKEND";
const ENV_FS: &str = "CPD_DEVICE_FS";
const ENV_TRANSPORT: &str = "CPD_DEVICE_TRANSPORT";
const ENV_BACKEND_OPTIONS: &str = "CPD_DEVICE_BACKEND_OPTIONS";
const ENV_EXTRA: &str = "CPD_DEVICE_EXTRA_CONFIG";
const ENV_REBOOT: &str = "CPD_DEVICE_REBOOT_CUTS_POWER";

impl Profile {
    /// A profile with the socket transport, the backend's kernel and no extra options.
    pub fn new(backend: &str, fs: Fs) -> Profile {
        Profile {
            backend: backend.to_owned(),
            kernel: Profile::kernel_for(backend),
            fs,
            transport: Transport::Socket,
            backend_options: String::new(),
            extra_config: String::new(),
            reboot_cuts_power: false,
        }
    }

    /// The kernel a backend needs: 6.12 for `userspace-bow` (ublk with user recovery), the
    /// default (6.1, the out-of-tree dm-bow module's) otherwise.
    pub fn kernel_for(backend: &str) -> Kernel {
        match backend {
            "userspace-bow" => Kernel::Mainline612,
            _ => Kernel::default(),
        }
    }

    /// Whether the guest needs the `bow-ublk` server binary.
    pub fn needs_bow_ublk(&self) -> bool {
        self.backend == "userspace-bow"
    }

    /// The environment variables that carry this profile into the guest.
    pub fn env(&self) -> Vec<(String, String)> {
        let transport = match self.transport {
            Transport::Socket => "socket",
            Transport::Binder => "binder",
        };
        vec![
            (ENV_BACKEND.into(), self.backend.clone()),
            (ENV_FS.into(), self.fs.as_str().into()),
            (ENV_TRANSPORT.into(), transport.into()),
            (ENV_BACKEND_OPTIONS.into(), self.backend_options.clone()),
            (ENV_EXTRA.into(), self.extra_config.clone()),
            (ENV_REBOOT.into(), if self.reboot_cuts_power { "1" } else { "0" }.into()),
        ]
    }

    /// The profile the host passed (guest side).
    pub fn from_env() -> Result<Profile, Failed> {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        let backend = var(ENV_BACKEND)?;
        Ok(Profile {
            kernel: Profile::kernel_for(&backend),
            backend,
            fs: Fs::parse(&var(ENV_FS)?)?,
            transport: match var(ENV_TRANSPORT)?.as_str() {
                "binder" => Transport::Binder,
                _ => Transport::Socket,
            },
            backend_options: std::env::var(ENV_BACKEND_OPTIONS).unwrap_or_default(),
            extra_config: std::env::var(ENV_EXTRA).unwrap_or_default(),
            reboot_cuts_power: std::env::var(ENV_REBOOT).is_ok_and(|v| v == "1"),
        })
    }

    fn checkpoint_method(&self) -> &'static str {
        if self.backend == "f2fs" {
            "fs"
        } else {
            "block"
        }
    }

    /// The daemon's configuration for this device.
    pub fn config(&self, meta_dir: &Path, data_dev: &Path) -> String {
        let transport = match self.transport {
            Transport::Socket => {
                format!("[binder]\nenabled = false\n[socket]\npath = \"{SOCKET}\"\n")
            }
            Transport::Binder => "[binder]\nenabled = true\n".to_owned(),
        };
        let reboot = if self.reboot_cuts_power {
            let argv: Vec<String> =
                Device::reboot_command().iter().map(|a| format!("{a:?}")).collect();
            format!("[reboot]\naction = \"command\"\ncommand = [{}]\n", argv.join(", "))
        } else {
            String::new()
        };
        format!(
            "metadata_dir = \"{meta}\"\n\
             [[device]]\ndevice = \"{dev}\"\nmount_point = \"{DATA_MOUNT}\"\n\
             checkpoint = \"{method}\"\nfs_type = \"{fs}\"\n\
             [[backend]]\ntype = \"{backend}\"\n{options}\n\
             [policy]\nrollback_action = \"switch-to-previous-slot\"\n\
             [boot_control]\ntype = \"file\"\n\
             {transport}{reboot}{extra}\n",
            meta = meta_dir.display(),
            dev = data_dev.display(),
            method = self.checkpoint_method(),
            fs = self.fs.as_str(),
            backend = self.backend,
            options = self.backend_options,
            extra = self.extra_config,
        )
    }
}

/// One powered-on device: metadata mounted, slot chosen, the daemon running, /data mounted by
/// the boot flow.
#[derive(Debug)]
pub struct Device {
    /// What was booted.
    pub profile: Profile,
    /// The daemon's metadata directory (on disk 0).
    pub meta_dir: PathBuf,
    /// The raw /data partition (disk 1).
    pub data_dev: PathBuf,
    /// The slot the bootloader chose.
    pub slot: u32,
    daemon: Option<Child>,
    hub: Option<Child>,
}

impl Device {
    /// Powers on: mounts the metadata disk, plays the bootloader, starts the daemon. The boot
    /// flow proper ([`Device::boot_mount`], [`Device::init_hooks`]) is left to the scenario.
    pub fn power_on(profile: Profile) -> Result<Device, Failed> {
        let meta_disk = guest::disk(0);
        let data_dev = guest::disk(1);
        guest::sh(&format!(
            "mkdir -p {META_MOUNT} {DATA_MOUNT} && mount -t ext4 {} {META_MOUNT}",
            meta_disk.display()
        ))?;
        let meta_dir = Path::new(META_MOUNT).join("checkpointd");
        fs::create_dir_all(&meta_dir)?;
        let bootctl = policy::FileBootControl::open_or_create(&meta_dir.join("bootctl"), 2)
            .map_err(|e| format!("boot record: {e}"))?;
        let slot = bootctl.bootloader_select().map_err(|e| format!("bootloader: {e}"))?;
        crate::binimage::mount()?;
        // Built with `--features bow-ublk/ublk`; found next to the daemon's executable.
        if profile.needs_bow_ublk() && !Path::new(BOW_UBLK).is_file() {
            return Err(format!("{BOW_UBLK} is missing: the host did not attach it").into());
        }
        fs::write(CONFIG, profile.config(&meta_dir, &data_dev))?;
        let hub = match profile.transport {
            Transport::Binder => {
                let policy =
                    crate::paths::workspace_root().join("init/rsb_hub/50-checkpointd.toml");
                Some(guest::start_rsb_hub(
                    guest::HubPolicy::File(&policy),
                    log_file("rsb_hub.log")?,
                )?)
            }
            Transport::Socket => None,
        };
        let daemon = Command::new(DAEMON)
            .arg("--config")
            .arg(CONFIG)
            .env("RUST_LOG", "info")
            .stdout(log_file("checkpointd.log")?)
            .stderr(log_file("checkpointd.log")?)
            .spawn()?;
        let device = Device { profile, meta_dir, data_dev, slot, daemon: Some(daemon), hub };
        device.wait_for_daemon()?;
        Ok(device)
    }

    fn wait_for_daemon(&self) -> Result<(), Failed> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, _, err) = self.ctl(&["checkpoint", "supportsCheckpoint"])?;
            if code == 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "checkpointd did not answer supportsCheckpoint with 1 (exit {code}: {err})\n\
                     --- checkpointd.log ---\n{}",
                    daemon_log()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The file boot-control record (the bootloader's and the update client's view).
    pub fn bootctl(&self) -> Result<policy::FileBootControl, Failed> {
        policy::FileBootControl::open(&self.meta_dir.join("bootctl"))
            .map_err(|e| format!("boot record: {e}").into())
    }

    /// `checkpointctl [transport] args...` → (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> Result<(i32, String, String), Failed> {
        let mut cmd = Command::new(CTL);
        if self.profile.transport == Transport::Socket {
            cmd.args(["--socket", SOCKET]);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs checkpointctl, prints the call, and fails unless it exits with `want`.
    pub fn ctl_expect(&self, args: &[&str], want: i32) -> Result<String, Failed> {
        let started = std::time::Instant::now();
        let (code, out, err) = self.ctl(args)?;
        println!(
            "  $ checkpointctl {}  -> exit {code} ({:.1} s)",
            args.join(" "),
            started.elapsed().as_secs_f64()
        );
        if code != want {
            return Err(format!(
                "checkpointctl {args:?}: exit {code}, expected {want}\n--- stdout ---\n{out}\
                 --- stderr ---\n{err}--- checkpointd.log (tail) ---\n{}",
                crate::vm::tail(&daemon_log(), 30)
            )
            .into());
        }
        Ok(out)
    }

    /// The boot flow's mount step (fs_mgr's role): restore or merge, needsCheckpoint, the
    /// device stack, mount /data.
    pub fn boot_mount(&self) -> Result<String, Failed> {
        let out = self.ctl_expect(&["boot", "mount", "--config", CONFIG], 0)?;
        // Not a failure (docs/snapcow.md, step 4), but worth seeing: a growth over blocks the
        // boot wrote, or a write past the store, whose writer is not known.
        for line in daemon_log().lines().filter(|l| l.contains("now in the COW file left out")) {
            println!("  note: {line}");
        }
        Ok(out)
    }

    /// The init hooks after the mount: markBootAttempt (post-fs), prepareCheckpoint
    /// (post-fs-data).
    pub fn init_hooks(&self) -> Result<(), Failed> {
        self.ctl_expect(&["checkpoint", "markBootAttempt"], 0)?;
        self.ctl_expect(&["checkpoint", "prepareCheckpoint"], 0)?;
        Ok(())
    }

    /// Fails unless this boot's `prepareCheckpoint` armed every backend. vold's contract lets
    /// the call succeed when a backend fails to arm (the boot then runs unprotected), so the
    /// daemon's log is what tells.
    pub fn expect_armed(&self) -> Result<(), Failed> {
        let log = daemon_log();
        if log.contains("left unarmed") || !log.contains(" armed (") {
            return Err(format!(
                "prepareCheckpoint did not arm the backend\n--- checkpointd.log (tail) ---\n{}",
                crate::vm::tail(&log, 30)
            )
            .into());
        }
        println!("  check: the backend is armed");
        Ok(())
    }

    /// `checkpointctl status --json`.
    pub fn status(&self) -> Result<serde_json::Value, Failed> {
        let out = self.ctl_expect(&["status", "--json"], 0)?;
        serde_json::from_str(&out).map_err(|e| format!("status --json: {e}: {out}").into())
    }

    /// Whether /data is mounted.
    pub fn data_mounted(&self) -> bool {
        fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(DATA_MOUNT)))
    }

    /// Clean shutdown: stop the daemon and the hub, unmount /data and remove the boot flow's
    /// device stack, unmount the metadata disk.
    pub fn shutdown(mut self) -> Result<(), Failed> {
        self.stop_daemon()?;
        if self.data_mounted() {
            guest::sh(&format!("umount {DATA_MOUNT}"))?;
        }
        // What the boot flow built is removed as a shutdown would; nothing else may remain.
        guest::sh(&format!(
            "{CTL} boot teardown --config {CONFIG} >> {} 2>&1",
            guest::shared_dir().join("checkpointctl.log").display()
        ))?;
        guest::sh(&format!("sync && umount {META_MOUNT}"))?;
        Ok(())
    }

    /// Stops the daemon (SIGTERM) and rsb_hub.
    pub fn stop_daemon(&mut self) -> Result<(), Failed> {
        if let Some(mut child) = self.daemon.take() {
            terminate(&mut child)?;
        }
        if let Some(mut child) = self.hub.take() {
            terminate(&mut child)?;
        }
        Ok(())
    }

    /// The reboot command for `[reboot] action = "command"` that ends the run as a power cut
    /// the harness recognises (after a sync, as a reboot would).
    pub fn reboot_command() -> Vec<String> {
        let marker = guest::shared_dir().join(crate::status::TB_DIR).join(crate::status::POWER_CUT);
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "sync; touch {}; echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger",
                marker.display()
            ),
        ]
    }
}

/// Device-mapper, loop and ublk devices present in the guest (leftovers after a scenario).
pub fn kernel_objects() -> Result<Vec<String>, Failed> {
    let mut out = Vec::new();
    let dm = guest::sh("dmsetup ls 2>&1")?;
    out.extend(
        dm.lines()
            .filter(|l| !l.contains("No devices found") && !l.trim().is_empty())
            .map(|l| format!("dm: {}", l.trim())),
    );
    let loops = guest::sh("losetup -a 2>&1")?;
    out.extend(loops.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("loop: {l}")));
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("ublkb") {
            out.push(format!("ublk: {name}"));
        }
    }
    Ok(out)
}

/// Fails when any device-mapper, loop or ublk device is left.
pub fn expect_no_kernel_objects() -> Result<(), Failed> {
    let left = kernel_objects()?;
    if !left.is_empty() {
        return Err(format!("kernel objects left behind: {left:?}").into());
    }
    println!("  check: no device-mapper, loop or ublk device left");
    Ok(())
}

fn terminate(child: &mut Child) -> Result<(), Failed> {
    guest::sh(&format!("kill -TERM {}", child.id()))?;
    // Generous: a guest slowed by other guests on the host's cores is not a daemon that hangs
    // (systemd allows 90 s by default).
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            return Err(format!("process {} did not stop on SIGTERM", child.id()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_file(name: &str) -> Result<fs::File, Failed> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(guest::shared_dir().join(name))?)
}

/// What checkpointd logged in this boot.
pub fn daemon_log() -> String {
    fs::read_to_string(guest::shared_dir().join("checkpointd.log")).unwrap_or_default()
}

// ================================ app data ================================

/// Deterministic pseudo-random numbers (xorshift64*), so a seed reproduces a workload.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Realistic app data under `root`: a SQLite database (an app's settings and messages), many
/// small files (thumbnails, shared prefs), a few large ones (media, an APK).
pub fn populate_app_data(root: &Path, seed: u64) -> Result<(), Failed> {
    let mut rng = Rng::new(seed);
    let app = root.join("data/com.example.mail");
    fs::create_dir_all(app.join("databases"))?;
    fs::create_dir_all(app.join("shared_prefs"))?;
    let db = rusqlite::Connection::open(app.join("databases/mail.db"))?;
    db.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE message (id INTEGER PRIMARY KEY, folder TEXT, subject TEXT, body BLOB);
         CREATE INDEX message_folder ON message (folder);",
    )?;
    {
        // One transaction, as an app's first sync would be (2000 autocommits = 2000 fsyncs).
        let tx = db.unchecked_transaction()?;
        let mut insert =
            tx.prepare("INSERT INTO message (folder, subject, body) VALUES (?1, ?2, ?3)")?;
        for i in 0..2000u64 {
            let folder = ["inbox", "sent", "archive"][usize::try_from(i % 3).unwrap_or(0)];
            let body_len = 200 + usize::try_from(rng.below(1800)).unwrap_or(0);
            insert.execute(rusqlite::params![
                folder,
                format!("message {i}"),
                rng.bytes(body_len)
            ])?;
        }
        drop(insert);
        tx.commit()?;
    }
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    drop(db);
    for i in 0..40u64 {
        fs::write(
            app.join("shared_prefs").join(format!("pref{i}.xml")),
            format!("<map><int name=\"launches\" value=\"{}\" /></map>\n", rng.below(1000)),
        )?;
    }
    let thumbs = root.join("media/0/DCIM/.thumbnails");
    fs::create_dir_all(&thumbs)?;
    for i in 0..300u64 {
        let len = 1024 + usize::try_from(rng.below(7 * 1024)).unwrap_or(0);
        fs::write(thumbs.join(format!("{i:04}.jpg")), rng.bytes(len))?;
    }
    fs::write(root.join("media/0/DCIM/holiday.mp4"), rng.bytes(6 << 20))?;
    fs::create_dir_all(root.join("app/com.example.mail-1"))?;
    fs::write(root.join("app/com.example.mail-1/base.apk"), rng.bytes(3 << 20))?;
    guest::sh(&format!("sync -f {}", root.display()))?;
    Ok(())
}

/// One step of what a new system does to /data on its first boots: database migrations and
/// churn, files rewritten in place, new files, deletions. Returns a description.
pub fn update_step(root: &Path, rng: &mut Rng) -> Result<String, Failed> {
    let app = root.join("data/com.example.mail");
    Ok(match rng.below(6) {
        0 => {
            let db = rusqlite::Connection::open(app.join("databases/mail.db"))?;
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS message_v2 AS SELECT * FROM message WHERE 0;
                 INSERT INTO message_v2 SELECT * FROM message WHERE id % 7 = 0;",
            )?;
            "mail.db: migration step (message_v2)".into()
        }
        1 => {
            let db = rusqlite::Connection::open(app.join("databases/mail.db"))?;
            let residue = i64::try_from(rng.below(50)).unwrap_or(0);
            db.execute(
                "UPDATE message SET body = ?1 WHERE id % 50 = ?2",
                rusqlite::params![rng.bytes(1500), residue],
            )?;
            "mail.db: rewrote 40 message bodies".into()
        }
        2 => {
            let i = rng.below(300);
            let path = root.join(format!("media/0/DCIM/.thumbnails/{i:04}.jpg"));
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(4096);
            fs::write(&path, rng.bytes(usize::try_from(len).unwrap_or(4096)))?;
            format!("thumbnail {i:04} rewritten in place")
        }
        3 => {
            let i = rng.below(300);
            let _ = fs::remove_file(root.join(format!("media/0/DCIM/.thumbnails/{i:04}.jpg")));
            format!("thumbnail {i:04} deleted")
        }
        4 => {
            let dir = root.join("data/com.example.mail/files");
            fs::create_dir_all(&dir)?;
            let i = rng.below(1_000_000);
            fs::write(dir.join(format!("cache{i}.bin")), rng.bytes(256 << 10))?;
            format!("new cache file cache{i}.bin (256 KiB)")
        }
        _ => {
            use std::os::unix::fs::FileExt;
            let f =
                fs::OpenOptions::new().write(true).open(root.join("media/0/DCIM/holiday.mp4"))?;
            let at = rng.below(6 << 20) & !4095;
            f.write_all_at(&rng.bytes(64 << 10), at)?;
            f.sync_data()?;
            format!("holiday.mp4: 64 KiB rewritten at {at}")
        }
    })
}

/// Every regular file under `root` with its SHA-256, sorted by path (`sha256sum` output).
/// checkpointd's own folder (`.checkpointd/`, the snapshot backend's COW file) is not user
/// data: a rollback returns to the moment the checkpoint was armed, when it already existed.
pub fn manifest(root: &Path) -> Result<String, Failed> {
    guest::sh(&format!(
        "cd {} && find . -path ./.checkpointd -prune -o -type f -print0 | sort -z \
         | xargs -0 sha256sum",
        root.display()
    ))
}

/// Compares two manifests; the error lists what differs.
pub fn compare_manifests(expected: &str, got: &str) -> Result<usize, Failed> {
    let parse = |m: &str| -> BTreeMap<String, String> {
        m.lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, p)| (p.to_owned(), h.to_owned()))
            .collect()
    };
    let (want, have) = (parse(expected), parse(got));
    let mut diffs = Vec::new();
    for (path, hash) in &want {
        match have.get(path) {
            None => diffs.push(format!("missing: {path}")),
            Some(h) if h != hash => diffs.push(format!("changed: {path}")),
            Some(_) => {}
        }
    }
    for path in have.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("extra: {path}"));
    }
    if diffs.is_empty() {
        Ok(want.len())
    } else {
        let n = diffs.len();
        diffs.truncate(20);
        Err(format!("{n} files differ from the manifest: {diffs:#?}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_compare_by_path_and_hash() {
        let a = "aa  ./x\nbb  ./y\n";
        assert_eq!(compare_manifests(a, a).unwrap(), 2);
        let e = compare_manifests(a, "aa  ./x\ncc  ./y\ndd  ./z\n").unwrap_err();
        let msg = e.message().unwrap();
        assert!(msg.contains("changed: ./y") && msg.contains("extra: ./z"), "{msg}");
        assert!(compare_manifests(a, "aa  ./x\n").is_err());
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.bytes(100), b.bytes(100));
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
    }

    #[test]
    fn profile_config_names_the_backend_and_device() {
        let mut p = Profile::new("snapshot", Fs::Ext4);
        p.backend_options = "cow_bytes = 1048576".into();
        let c = p.config(Path::new("/m"), Path::new("/dev/vdb"));
        assert!(c.contains("type = \"snapshot\"\ncow_bytes = 1048576"), "{c}");
        assert!(c.contains("checkpoint = \"block\""));
        assert!(c.contains(&format!("path = \"{SOCKET}\"")));
        let f = Profile::new("f2fs", Fs::F2fs).config(Path::new("/m"), Path::new("/dev/vdb"));
        assert!(f.contains("checkpoint = \"fs\""));
    }
}
