//! Where `checkpointctl checkpoint` logs: the kernel log when init runs it, else stderr.
//!
//! vdc does the same (`getppid() == 1` → android-base's `KernelLogger`): during boot init's
//! children have no console worth reading, and the kernel log is what a bug report keeps. The
//! records have `KernelLogger`'s shape, `<level>tag: message`, one per line of the message,
//! levels 6 (info) and 3 (error). Two deliberate differences:
//! - when `/dev/kmsg` cannot be opened (SELinux, a container), messages go to stderr instead of
//!   nowhere;
//! - under systemd (PID 1 too) a stderr that systemd already connects to the journal
//!   (`$JOURNAL_STREAM` names it) is kept: the journal attributes it to the unit.
//!
//! A line too long for one record (1024 bytes with its prefix, printk's limit) is cut at a
//! character boundary and marked, where libbase would replace it by a note of its length.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The kernel log device.
pub const KMSG: &str = "/dev/kmsg";
/// The tag of every record (vdc's is its program name).
const TAG: &str = "checkpointctl";
/// printk's record limit, prefix and newline included.
const RECORD_MAX: usize = 1024;

/// Kernel log levels `KernelLogger` maps its severities to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// KERN_INFO (6): vdc's usage text.
    Info,
    /// KERN_ERR (3): failures.
    Error,
}

impl Level {
    fn kernel(self) -> u8 {
        match self {
            Level::Info => 6,
            Level::Error => 3,
        }
    }
}

/// Where messages go.
#[derive(Debug)]
pub enum Sink {
    /// `checkpointctl: message` on stderr.
    Stderr,
    /// Records on the kernel log.
    Kmsg(File),
}

impl Sink {
    /// The kernel log when the parent is init and stderr is not the journal, else stderr.
    pub fn for_this_process() -> Sink {
        if wants_kmsg(std::os::unix::process::parent_id(), stderr_is_journal()) {
            Sink::open_kmsg(Path::new(KMSG))
        } else {
            Sink::Stderr
        }
    }

    /// The kernel log device at `path`, or stderr when it cannot be opened for writing.
    pub fn open_kmsg(path: &Path) -> Sink {
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => Sink::Kmsg(file),
            Err(_) => Sink::Stderr,
        }
    }

    /// Logs `message`, one record per line.
    pub fn log(&self, level: Level, message: &str) {
        for line in message.lines() {
            match self {
                Sink::Stderr => eprintln!("{TAG}: {line}"),
                Sink::Kmsg(file) => {
                    // Nothing sensible to do if the kernel refuses a record (rate limit).
                    let _ = (&*file).write_all(&record(level, line));
                }
            }
        }
    }

    /// Logs `message` at [`Level::Error`].
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }
}

/// Whether to log to the kernel: the parent is init (PID 1), and stderr is not a stream
/// systemd already sends to the journal.
pub fn wants_kmsg(parent_pid: u32, stderr_is_journal: bool) -> bool {
    parent_pid == 1 && !stderr_is_journal
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it connects a service's
/// stderr/stdout to; it is ours only when fd 2 still is that stream.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    value.to_str() == Some(format!("{}:{}", meta.dev(), meta.ino()).as_str())
}

/// One kernel-log record: `<level>checkpointctl: line\n`, at most [`RECORD_MAX`] bytes.
pub fn record(level: Level, line: &str) -> Vec<u8> {
    let prefix = format!("<{}>{TAG}: ", level.kernel());
    let full = format!("{prefix}{line}\n");
    if full.len() <= RECORD_MAX {
        return full.into_bytes();
    }
    const MARK: &str = "...[cut]\n";
    let mut end = RECORD_MAX - prefix.len() - MARK.len();
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{prefix}{}{MARK}", &line[..end]).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_kernel_logger_shape() {
        assert_eq!(record(Level::Error, "Failed: x"), b"<3>checkpointctl: Failed: x\n");
        assert_eq!(record(Level::Info, "Usage: y"), b"<6>checkpointctl: Usage: y\n");
    }

    #[test]
    fn long_lines_are_cut_to_one_record_at_a_char_boundary() {
        let long = "é".repeat(1000);
        let rec = record(Level::Error, &long);
        assert!(rec.len() <= RECORD_MAX, "{}", rec.len());
        let text = String::from_utf8(rec).expect("still UTF-8");
        assert!(text.starts_with("<3>checkpointctl: éé"));
        assert!(text.ends_with("...[cut]\n"));
    }

    #[test]
    fn only_a_child_of_init_logs_to_the_kernel_and_not_into_the_journal() {
        assert!(wants_kmsg(1, false));
        assert!(!wants_kmsg(1, true), "systemd's journal stream is kept");
        assert!(!wants_kmsg(4242, false));
        assert!(!wants_kmsg(0, false));
    }

    #[test]
    fn a_kmsg_that_cannot_be_opened_falls_back_to_stderr() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(Sink::open_kmsg(&dir.path().join("no/kmsg")), Sink::Stderr));
    }

    #[test]
    fn each_line_is_its_own_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "").expect("stand-in device");
        let sink = Sink::open_kmsg(&path);
        assert!(matches!(sink, Sink::Kmsg(_)));
        sink.log(Level::Info, "Usage: a\nmethods: b");
        sink.error("Failed: c");
        let written = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(
            written,
            "<6>checkpointctl: Usage: a\n<6>checkpointctl: methods: b\n<3>checkpointctl: Failed: c\n"
        );
    }
}
