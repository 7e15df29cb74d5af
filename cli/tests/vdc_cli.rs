//! `checkpointctl checkpoint` as a process: the help, vdc's integer grammar and exit codes
//! before any connection, and the log destination when init (PID 1) is the parent.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Output};

const CTL: &str = env!("CARGO_BIN_EXE_checkpointctl");

/// A socket path nobody serves: commands that get past parsing fail to connect (exit 22).
const NO_SOCKET: &str = "/nonexistent/checkpointd.sock";

fn ctl(args: &[&str]) -> Output {
    Command::new(CTL).args(["--socket", NO_SOCKET]).args(args).output().expect("run checkpointctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn checkpoint_help_lists_every_method_and_exits_zero() {
    for flag in ["--help", "-h"] {
        let out = ctl(&["checkpoint", flag]);
        assert_eq!(out.status.code(), Some(0), "{flag}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        for method in [
            "supportsCheckpoint",
            "supportsBlockCheckpoint",
            "supportsFileCheckpoint",
            "startCheckpoint <retry>",
            "needsCheckpoint",
            "needsRollback",
            "commitChanges",
            "prepareCheckpoint",
            "restoreCheckpoint <device>",
            "restoreCheckpointPart <device> <count>",
            "markBootAttempt",
            "abortChanges <message> <retry>",
            "resetCheckpoint",
        ] {
            assert!(help.contains(method), "{flag}: help lacks {method}:\n{help}");
        }
        assert!(!help.contains("Raw commands"), "{help}");
    }
}

#[test]
fn integer_arguments_are_checked_before_connecting() {
    // Parse errors: exit 22 with the reason, and no connection attempted.
    for (args, reason) in [
        (&["checkpoint", "startCheckpoint", "0x"][..], "Not an integer: `0x`"),
        (&["checkpoint", "startCheckpoint", "-0x1"], "Not an integer: `-0x1`"),
        (&["checkpoint", "startCheckpoint", "1 "], "Not an integer: `1 `"),
        (&["checkpoint", "startCheckpoint", "0x80000000"], "Out of range for an int"),
        (&["checkpoint", "restoreCheckpointPart", "/dev/vdb", "2147483648"], "Out of range"),
    ] {
        let out = ctl(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(22), "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
        assert!(!err.contains("does not exist"), "{args:?} tried to connect: {err}");
    }
    // Accepted integers get as far as the connection (which fails here: exit 22 too, but with
    // the connection's message).
    for value in ["0x2", " 2", "010", "+3", "-1"] {
        let out = ctl(&["checkpoint", "startCheckpoint", value]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(22), "{value:?}: {err}");
        assert!(err.contains("does not exist"), "{value:?} was not accepted: {err}");
    }
    let out = ctl(&["checkpoint"]);
    assert_eq!(out.status.code(), Some(5), "no method: usage");
}

/// Runs `checkpointctl … checkpoint <method>` as the child of a PID 1 (a new PID namespace
/// whose init is `sh`), optionally as user nobody. Returns its exit code and stderr.
fn under_init(method: &str, as_nobody: bool) -> (i32, String) {
    for tool in ["/usr/bin/unshare", "/usr/bin/setpriv"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: apt-get install util-linux");
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test makes a PID namespace (init as the parent) and needs root"
    );
    let drop = if as_nobody { "setpriv --reuid 65534 --regid 65534 --clear-groups " } else { "" };
    // `sh` is PID 1 of the namespace; the trailing `exit` keeps it from exec'ing the command,
    // so checkpointctl's parent is PID 1.
    let script = format!("{drop}{CTL} --socket {NO_SOCKET} checkpoint {method}; exit $?");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    (out.status.code().expect("exit code"), text(&out.stderr))
}

/// Kernel-log records written after this point.
struct KmsgReader {
    file: File,
}

impl KmsgReader {
    fn open() -> KmsgReader {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open("/dev/kmsg")
            .expect("open /dev/kmsg for reading (root)");
        file.seek(SeekFrom::End(0)).expect("seek to the end of the kernel log");
        KmsgReader { file }
    }

    /// The messages of the records since `open` (each read returns one record).
    fn messages(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = text(&buf[..n]);
                    // "<prio>,<seq>,<usec>,<flags>;<message>\n"
                    if let Some((_, message)) = record.split_once(';') {
                        out.push(message.trim_end().to_owned());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // A record overwritten while reading (EPIPE): go on with the next.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(e) => panic!("reading /dev/kmsg: {e}"),
            }
        }
        out
    }
}

#[test]
fn under_init_errors_go_to_the_kernel_log() {
    let marker = format!("frobnicate-{}", std::process::id());
    let mut kmsg = KmsgReader::open();
    let (code, stderr) = under_init(&marker, false);
    assert_eq!(code, 22, "{stderr}");
    assert!(!stderr.contains(&marker), "logged to stderr instead of kmsg: {stderr}");
    let messages = kmsg.messages();
    let line = messages
        .iter()
        .find(|m| m.contains(&marker))
        .unwrap_or_else(|| panic!("no kernel-log record with {marker}: {messages:?}"));
    assert!(line.starts_with("checkpointctl: Raw commands are no longer supported"), "{line}");
}

#[test]
fn under_init_without_access_to_kmsg_errors_go_to_stderr() {
    let marker = format!("frobnicate-nobody-{}", std::process::id());
    let (code, stderr) = under_init(&marker, true);
    assert_eq!(code, 22, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "checkpointctl: Raw commands are no longer supported (`checkpoint {marker}"
        )),
        "{stderr}"
    );
}

#[test]
fn outside_init_errors_go_to_stderr() {
    let out = ctl(&["checkpoint", "frobnicate"]);
    assert_eq!(out.status.code(), Some(22));
    assert!(text(&out.stderr).starts_with("checkpointctl: Raw commands are no longer supported"));
}
