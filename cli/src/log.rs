//! `checkpointctl log …`: offline tools for the dm-bow log, no daemon needed.
//!
//! * `log inspect <device|image> [--json]` decodes the log: header, every log sector of the
//!   chain, each entry with its CRC status, what a restore would write.
//! * `log restore <device|image> [--dry-run] [--policy roll-forward|refuse] [--limit N]`
//!   restores in place (vold's `restoreCheckpoint`, crash-safe; see docs/restore.md). It refuses
//!   a device that is mounted or an image that backs a loop device.
//!
//! Both take only a regular file or a block device: anything else (a FIFO, a socket, a
//! character device) is refused before it is opened, since opening or reading it could block
//! forever or read a stream that is no device.
//!
//! Exit codes: 0 done (restored, rolled forward, no log, dry run, a valid log inspected);
//! 1 error (I/O, bad arguments, mounted device); 2 the log is invalid and was left alone
//! (`--policy refuse`, a half-restored log that fails validation, or `inspect` of an invalid
//! log); 3 the `--limit` stopped the restore before the end (vold's EAGAIN).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bow::device::{BlockDevice, DeviceError, FileDevice};
use bow::restore::{
    self, CorruptLogPolicy, Phase, PlannedAction, Progress, RestoreError, RestoreOptions,
    RestoreOutcome,
};

/// The `log` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LogCommand {
    /// Decode and print the dm-bow log of an unmounted device or an image file.
    Inspect {
        /// Block device or image file.
        device: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a device or image file to its state at checkpoint start, in place.
    Restore {
        /// Block device or image file (must not be mounted).
        device: PathBuf,
        /// Validate and print the plan; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// What to do with a log that fails validation.
        #[arg(long, value_enum, default_value_t = PolicyArg::RollForward)]
        policy: PolicyArg,
        /// Stop after this many log entries, like vold's restoreCheckpointPart (testing).
        #[arg(long)]
        limit: Option<u64>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// vold's behaviour: keep the new data, put the live block 0 back.
    RollForward,
    /// Leave the device untouched.
    Refuse,
}

/// How a command ended (mapped to the exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Done,
    InvalidLog,
    LimitReached,
}

/// Why a command failed.
#[derive(Debug)]
enum CliError {
    Open(PathBuf, DeviceError),
    NotADevice(PathBuf, &'static str),
    Restore(RestoreError),
    Mounted(PathBuf, String),
    Output(std::io::Error),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Open(p, e) => write!(f, "cannot open {}: {e}", p.display()),
            CliError::NotADevice(p, what) => write!(
                f,
                "{} is {what}, not a block device or an image file; refusing to read it",
                p.display()
            ),
            CliError::Restore(e) => write!(f, "{e}"),
            CliError::Mounted(p, how) => {
                write!(f, "{} is in use ({how}); unmount it before restoring", p.display())
            }
            CliError::Output(e) => write!(f, "cannot write output: {e}"),
        }
    }
}

fn json_error(e: serde_json::Error) -> CliError {
    CliError::Output(std::io::Error::other(e))
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Output(e)
    }
}

/// Runs a `log` subcommand, printing to stdout and stderr.
pub fn run(cmd: LogCommand) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let bar = std::io::stderr().is_terminal();
    match execute(cmd, &mut out, bar) {
        Ok(Status::Done) => ExitCode::SUCCESS,
        Ok(Status::InvalidLog) => ExitCode::from(2),
        Ok(Status::LimitReached) => ExitCode::from(3),
        Err(e) => {
            let _ = out.flush();
            eprintln!("checkpointctl log: {e}");
            ExitCode::from(1)
        }
    }
}

/// Refuses what is neither a regular file nor a block device, by what the path leads to
/// (links followed, as `open` follows them), before anything opens it. (A path swapped for a
/// FIFO between this check and the open could still block; these tools run as root on paths
/// their caller names, in folders others cannot write.)
fn check_device_type(path: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Missing or unreadable: the open reports it with its OS error.
        return Ok(());
    };
    let kind = meta.file_type();
    let what = if kind.is_file() || kind.is_block_device() {
        return Ok(());
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(CliError::NotADevice(path.to_owned(), what))
}

fn execute(cmd: LogCommand, out: &mut dyn Write, bar: bool) -> Result<Status, CliError> {
    match &cmd {
        LogCommand::Inspect { device, .. } | LogCommand::Restore { device, .. } => {
            check_device_type(device)?;
        }
    }
    match cmd {
        LogCommand::Inspect { device, json } => {
            let dev = FileDevice::open_read_only(&device).map_err(|e| CliError::Open(device, e))?;
            let report = bow::inspect::inspect(&dev).map_err(CliError::Restore)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(json_error)?)?;
            } else {
                write!(out, "{}", report.render_text())?;
            }
            Ok(if report.problem.is_some() { Status::InvalidLog } else { Status::Done })
        }
        LogCommand::Restore { device, dry_run, policy, limit, json } => {
            let opts = RestoreOptions {
                policy: match policy {
                    PolicyArg::RollForward => CorruptLogPolicy::RollForward,
                    PolicyArg::Refuse => CorruptLogPolicy::Refuse,
                },
                limit,
                dry_run,
                ..RestoreOptions::default()
            };
            let dev = if dry_run {
                FileDevice::open_read_only(&device)
            } else {
                if let Some(how) = in_use(&device) {
                    return Err(CliError::Mounted(device, how));
                }
                FileDevice::open(&device)
            }
            .map_err(|e| CliError::Open(device.clone(), e))?
            .with_direct_reads();
            let report = restore_with_bar(&dev, &opts, bar).map_err(CliError::Restore)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(json_error)?)?;
            } else {
                write!(out, "{}", describe(&report.outcome))?;
            }
            Ok(match report.outcome {
                RestoreOutcome::Refused { .. } => Status::InvalidLog,
                RestoreOutcome::DryRun {
                    action: PlannedAction::Refuse { .. } | PlannedAction::RollForward { .. },
                } => Status::InvalidLog,
                RestoreOutcome::LimitReached { .. } => Status::LimitReached,
                _ => Status::Done,
            })
        }
    }
}

fn restore_with_bar(
    dev: &impl BlockDevice,
    opts: &RestoreOptions,
    bar: bool,
) -> Result<restore::RestoreReport, RestoreError> {
    if !bar {
        return restore::restore(dev, opts, &mut |_| {});
    }
    let pb = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    let mut report = |p: Progress| {
        pb.set_message(match p.phase {
            Phase::Validate => "validating",
            Phase::Apply => "restoring",
        });
        pb.set_length(p.total.max(p.done));
        pb.set_position(p.done);
    };
    let result = restore::restore(dev, opts, &mut report);
    pb.finish_and_clear();
    result
}

/// One or two lines saying what happened.
fn describe(outcome: &RestoreOutcome) -> String {
    match outcome {
        RestoreOutcome::NoLog => "no dm-bow log on the device: nothing to restore\n".into(),
        RestoreOutcome::Restored { entries, blocks_written, mode, resumed } => format!(
            "restored: {entries} log entries, {blocks_written} blocks written ({mode:?}){}\n",
            if *resumed { ", finishing an interrupted restore" } else { "" }
        ),
        RestoreOutcome::RolledForward { reason, sector0 } => format!(
            "WARNING: the log is invalid ({reason}); rolled forward: block 0 restored from \
             {sector0}, all new data kept, checkpoint discarded\n"
        ),
        RestoreOutcome::Refused { reason } => {
            format!("the log is invalid ({reason}); device left untouched\n")
        }
        RestoreOutcome::LimitReached { entries_applied, entries_remaining } => format!(
            "stopped at the limit: {entries_applied} entries restored, {entries_remaining} left \
             (run again to finish)\n"
        ),
        RestoreOutcome::DryRun { action } => match action {
            PlannedAction::Restore(plan) => format!("dry run, nothing written\n{}", plan.render()),
            PlannedAction::RollForward { reason, sector0 } => format!(
                "dry run: the log is invalid ({reason}); would roll forward from {sector0}\n"
            ),
            PlannedAction::Refuse { reason } => {
                format!("dry run: the log is invalid ({reason}); would leave the device alone\n")
            }
        },
    }
}

/// Whether `path` is mounted (by device number or by name in /proc/self/mountinfo), or is
/// an image file backing a loop device. `Some(how)` when in use.
fn in_use(path: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if meta.file_type().is_block_device() {
        let (major, minor) = dev_numbers(meta.rdev());
        return mounted_in(&mountinfo, Some((major, minor)), &canonical);
    }
    if let Some(how) = mounted_in(&mountinfo, None, &canonical) {
        return Some(how);
    }
    loop_backed_by(Path::new("/sys/block"), &canonical)
}

/// Splits a Linux `dev_t` into major and minor (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn dev_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// Looks for a mount of device `numbers` or with source `path` in mountinfo text.
fn mounted_in(mountinfo: &str, numbers: Option<(u64, u64)>, path: &Path) -> Option<String> {
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(devno), Some(mount_point)) = (fields.get(2), fields.get(4)) else { continue };
        let source = fields
            .iter()
            .position(|&f| f == "-")
            .and_then(|i| fields.get(i + 2))
            .map(|s| unescape(s));
        let same_number = numbers.is_some_and(|(ma, mi)| *devno == format!("{ma}:{mi}"));
        let same_source = source.as_deref().is_some_and(|s| {
            Path::new(s) == path || std::fs::canonicalize(s).is_ok_and(|c| c == path)
        });
        if same_number || same_source {
            return Some(format!("mounted on {}", unescape(mount_point)));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) if bytes[i] == b'\\' => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds a loop device under `sys_block` whose backing file is `path`.
fn loop_backed_by(sys_block: &Path, path: &Path) -> Option<String> {
    for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(text) = std::fs::read_to_string(&backing) {
            if Path::new(text.trim_end()) == path {
                return Some(format!("backs {}", entry.file_name().to_string_lossy()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bow::device::MemDevice;
    use bow::restore::synth::LogWriter;
    use bow::units::BlockSize;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: LogCommand,
    }

    /// An image with a log: 256 blocks of 512 bytes, block b filled with b, blocks 1..=20
    /// overwritten with 0xEE during the checkpoint.
    fn image() -> (tempfile::NamedTempFile, Vec<u8>) {
        let original: Vec<u8> =
            (0..256 * 512usize).map(|i| u8::try_from(i / 512 % 251).unwrap()).collect();
        let dev = MemDevice::from_bytes(original.clone());
        let mut w = LogWriter::start(&dev, BlockSize::B512, &(100..250).collect::<Vec<_>>())
            .expect("start");
        for b in 1..=20 {
            w.write(b, &[0xEE; 512]).expect("write");
        }
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(tmp.path(), dev.snapshot()).expect("write image");
        (tmp, original)
    }

    fn exec(args: &[&str]) -> (Result<Status, String>, String) {
        let cli = Cli::try_parse_from(std::iter::once("log").chain(args.iter().copied()))
            .expect("arguments parse");
        let mut out = Vec::new();
        let r = execute(cli.cmd, &mut out, false).map_err(|e| e.to_string());
        (r, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn inspect_text_and_json() {
        let (tmp, _) = image();
        let p = tmp.path().to_str().unwrap();
        let (r, text) = exec(&["inspect", p]);
        assert_eq!(r, Ok(Status::Done));
        assert!(text.contains("log sector 1 (block 0"), "{text}");
        assert!(text.contains("valid; restore writes"), "{text}");
        let (r, json) = exec(&["inspect", "--json", p]);
        assert_eq!(r, Ok(Status::Done));
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["header"]["sequence"], 1);
        assert_eq!(v["sectors"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn dry_run_then_restore_then_no_log() {
        let (tmp, original) = image();
        let p = tmp.path().to_str().unwrap();
        let before = std::fs::read(tmp.path()).unwrap();
        let (r, text) = exec(&["restore", "--dry-run", p]);
        assert_eq!(r, Ok(Status::Done));
        assert!(text.contains("dry run, nothing written"), "{text}");
        assert_eq!(std::fs::read(tmp.path()).unwrap(), before);
        let (r, text) = exec(&["restore", p]);
        assert_eq!(r, Ok(Status::Done), "{text}");
        // 20 backups, the original block 0 and one saved log sector.
        assert!(text.starts_with("restored: 22 log entries"), "{text}");
        let after = std::fs::read(tmp.path()).unwrap();
        assert_eq!(after[..100 * 512], original[..100 * 512]);
        let (r, text) = exec(&["restore", "--json", p]);
        assert_eq!(r, Ok(Status::Done));
        assert!(text.contains("\"NoLog\""), "{text}");
    }

    #[test]
    fn limit_then_finish() {
        let (tmp, original) = image();
        let p = tmp.path().to_str().unwrap();
        let (r, text) = exec(&["restore", "--limit", "5", p]);
        assert_eq!(r, Ok(Status::LimitReached), "{text}");
        let (r, _) = exec(&["restore", p]);
        assert_eq!(r, Ok(Status::Done));
        assert_eq!(std::fs::read(tmp.path()).unwrap()[..100 * 512], original[..100 * 512]);
    }

    #[test]
    fn corrupt_log_refused_or_rolled_forward() {
        let (tmp, _) = image();
        let p = tmp.path().to_str().unwrap();
        // Damage the saved copy of block 1 (the first backup after the two block-0 copies).
        let mut img = std::fs::read(tmp.path()).unwrap();
        img[102 * 512] ^= 0xFF;
        std::fs::write(tmp.path(), &img).unwrap();
        let (r, text) = exec(&["restore", "--policy", "refuse", p]);
        assert_eq!(r, Ok(Status::InvalidLog), "{text}");
        assert_eq!(std::fs::read(tmp.path()).unwrap(), img, "refuse writes nothing");
        let (r, text) = exec(&["inspect", p]);
        assert_eq!(r, Ok(Status::InvalidLog));
        assert!(text.contains("MISMATCH"), "{text}");
        let (r, text) = exec(&["restore", p]);
        assert_eq!(r, Ok(Status::Done));
        assert!(text.starts_with("WARNING: the log is invalid"), "{text}");
    }

    #[test]
    fn fifos_sockets_and_character_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(status.success());
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let link = dir.path().join("link-to-fifo");
        std::os::unix::fs::symlink(&fifo, &link).expect("symlink");
        for (path, what) in [
            (fifo.to_str().unwrap(), "a FIFO"),
            (link.to_str().unwrap(), "a FIFO"),
            (socket.to_str().unwrap(), "a socket"),
            ("/dev/null", "a character device"),
            ("/dev/zero", "a character device"),
        ] {
            for args in [
                vec!["inspect", path],
                vec!["inspect", "--json", path],
                vec!["restore", "--dry-run", path],
                vec!["restore", path],
            ] {
                let (r, out) = exec(&args);
                let err = r.expect_err("must be refused");
                assert!(
                    err.contains(what) && err.contains("refusing to read it"),
                    "{args:?}: {err}"
                );
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn missing_device_is_an_error() {
        let (r, _) = exec(&["inspect", "/nonexistent/device"]);
        assert!(r.unwrap_err().starts_with("cannot open /nonexistent/device"));
    }

    #[test]
    fn mountinfo_matching() {
        let info = "22 1 8:3 / / rw,relatime shared:1 - ext4 /dev/sda3 rw\n\
                    30 22 7:0 / /mnt/my\\040img rw - ext4 /dev/loop0 rw\n";
        assert_eq!(
            mounted_in(info, Some((8, 3)), Path::new("/dev/whatever")),
            Some("mounted on /".into())
        );
        assert_eq!(
            mounted_in(info, None, Path::new("/dev/loop0")),
            Some("mounted on /mnt/my img".into())
        );
        assert_eq!(mounted_in(info, Some((8, 4)), Path::new("/dev/sdb")), None);
        assert_eq!(dev_numbers(0x0803), (8, 3));
        assert_eq!(dev_numbers((259 << 8) | 1), (259, 1));
    }

    #[test]
    fn loop_backing_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("loop3/loop")).unwrap();
        std::fs::write(dir.path().join("loop3/loop/backing_file"), "/images/data.img\n").unwrap();
        assert_eq!(
            loop_backed_by(dir.path(), Path::new("/images/data.img")),
            Some("backs loop3".into())
        );
        assert_eq!(loop_backed_by(dir.path(), Path::new("/images/other.img")), None);
    }

    #[test]
    fn a_plain_image_is_not_in_use() {
        let (tmp, _) = image();
        assert_eq!(in_use(tmp.path()), None);
    }
}
