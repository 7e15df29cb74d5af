//! The protocol between the host and the guest wrapper script, as pure functions.
//!
//! The host writes a small shell script into `<shared>/.testbench/` and boots the VM with it as
//! the command. The script loads modules, runs the program with its output in a file, and writes
//! the program's exit status to a file; the host reads those files back after QEMU has exited
//! (`vng` itself exits 255 even on success, so its own status means nothing).

use std::fmt::Write as _;
use std::path::Path;

/// Subfolder of the shared dir used by the harness.
pub const TB_DIR: &str = ".testbench";
/// The wrapper script.
pub const SCRIPT: &str = "run.sh";
/// One line appended each time the wrapper starts (more than one means the guest rebooted).
pub const STARTED: &str = "started";
/// The program's stdout and stderr.
pub const OUTPUT: &str = "output";
/// The program's exit status, decimal, written after it exited.
pub const STATUS: &str = "status";
/// Written instead of running the program when a module failed to load.
pub const SETUP_ERROR: &str = "setup-error";
/// Written by `guest::power_cut` just before it resets the machine.
pub const POWER_CUT: &str = "power-cut";
/// Kernel console line printed by sysrq 'b' (the reset that `guest::power_cut` triggers).
pub const SYSRQ_RESET_LINE: &str = "sysrq: Resetting";
/// Written by the wrapper's watchdog when the program still runs shortly before the host's
/// timeout: what every thread of the guest was doing (the host shows it with the timeout).
pub const WATCHDOG: &str = "watchdog";
/// Serial number prefix of extra disks: disk `i` has serial `tbdisk<i>`.
pub const DISK_SERIAL_PREFIX: &str = "tbdisk";

/// How a guest run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The program ran to its end with this exit status (128+N if killed by signal N).
    Exited(i32),
    /// The guest reset itself without syncing (`guest::power_cut`, or sysrq 'b').
    PowerCut,
    /// The host killed QEMU after the run's timeout.
    TimedOut,
    /// QEMU stopped with no status and no power cut: a kernel panic, a failed init, a killed VM.
    /// The console log says which.
    Crashed,
}

/// What the host found after QEMU exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Contents of the status file, if written.
    pub status: Option<String>,
    /// Contents of the setup-error file, if written.
    pub setup_error: Option<String>,
    /// Number of lines in the `started` file.
    pub starts: usize,
    /// The power-cut marker exists.
    pub power_cut_marker: bool,
    /// The console shows the sysrq reset line.
    pub console_reset: bool,
    /// The host killed QEMU at the timeout.
    pub timed_out: bool,
}

/// Why the evidence does not describe a run of the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// A module failed to load; the program did not run.
    Setup(String),
    /// The wrapper started more than once: QEMU rebooted the guest instead of exiting.
    Rebooted(usize),
    /// The status file does not hold a number.
    BadStatus(String),
}

/// Parses the status file: one decimal exit status.
pub fn parse_status(text: &str) -> Result<i32, Anomaly> {
    text.trim().parse().map_err(|_| Anomaly::BadStatus(text.to_owned()))
}

/// Decides how the run ended from what the guest left behind.
pub fn classify(ev: &Evidence) -> Result<GuestExit, Anomaly> {
    if ev.starts > 1 {
        return Err(Anomaly::Rebooted(ev.starts));
    }
    if let Some(msg) = &ev.setup_error {
        return Err(Anomaly::Setup(msg.trim().to_owned()));
    }
    if let Some(status) = &ev.status {
        return parse_status(status).map(GuestExit::Exited);
    }
    if ev.timed_out {
        return Ok(GuestExit::TimedOut);
    }
    if ev.power_cut_marker || ev.console_reset {
        return Ok(GuestExit::PowerCut);
    }
    Ok(GuestExit::Crashed)
}

/// Quotes `s` as one word for `/bin/sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `key` is a valid shell environment variable name.
pub fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Everything the wrapper script needs.
#[derive(Debug, Clone)]
pub struct ScriptSpec<'a> {
    /// The shared dir as seen in the guest (same path as on the host).
    pub shared: &'a Path,
    /// modprobe command lines, in order.
    pub modules: &'a [String],
    /// Environment for the program.
    pub env: &'a [(String, String)],
    /// The program and its arguments.
    pub program: &'a Path,
    /// Arguments for the program.
    pub args: &'a [String],
    /// Seconds after which a program still running is reported on ([`WATCHDOG`]).
    pub watchdog_after: Option<u64>,
}

/// The watchdog's report: every thread's state, where it sleeps and its CPU time, twice, five
/// seconds apart (a thread whose time grows and that stays runnable is spinning; one in `D`
/// waits for I/O), the kernel stacks of the threads in `R` or `D`, and the kernel's list of
/// blocked tasks (sysrq `w`, on the console).
const WATCHDOG_REPORT: &str = "ps -eLo pid,tid,stat,wchan:32,time,comm; sleep 5; \
echo '--- five seconds later:'; ps -eLo pid,tid,stat,wchan:32,time,comm; \
for t in /proc/[0-9]*/task/[0-9]*; do \
st=$(sed 's/.*) //' \"$t/stat\" 2>/dev/null | cut -d' ' -f1); \
case \"$st\" in R|D) echo \"--- $t ($(cat \"$t/comm\" 2>/dev/null)) $st:\"; \
cat \"$t/stack\" 2>/dev/null;; esac; done; \
echo w > /proc/sysrq-trigger; echo '--- blocked tasks: sysrq w on the console'";

/// Writes the guest wrapper script.
pub fn guest_script(spec: &ScriptSpec<'_>) -> String {
    let tb = spec.shared.join(TB_DIR);
    let q = |p: &Path| sh_quote(&p.to_string_lossy());
    let mut s = String::new();
    s.push_str("#!/bin/sh\n# Written by testbench: runs one guest program, reports to the host.\n");
    let _ = writeln!(s, "TB={}", q(&tb));
    let _ = writeln!(s, "echo start >> \"$TB/{STARTED}\"");
    let _ = writeln!(
        s,
        "setup_failed() {{ printf '%s\\n' \"$1\" > \"$TB/{SETUP_ERROR}.tmp\"; \
         mv \"$TB/{SETUP_ERROR}.tmp\" \"$TB/{SETUP_ERROR}\"; \
         echo \"testbench: $1\"; exit 0; }}"
    );
    for line in spec.modules {
        // An absolute path is an out-of-tree module file; anything else is a modprobe line.
        let cmd = if line.starts_with('/') {
            format!("insmod {}", sh_quote(line))
        } else {
            format!("modprobe {line}")
        };
        let _ = writeln!(
            s,
            "out=$({cmd} 2>&1) || setup_failed {}\"$out\"",
            sh_quote(&format!("{cmd} failed: "))
        );
    }
    let _ = writeln!(s, "export TESTBENCH_GUEST=1 TESTBENCH_SHARED={}", q(spec.shared));
    for (k, v) in spec.env {
        let _ = writeln!(s, "export {k}={}", sh_quote(v));
    }
    let _ = writeln!(s, "cd {} || exit 0", q(spec.shared));
    if let Some(secs) = spec.watchdog_after {
        let _ = writeln!(
            s,
            "( sleep {secs}; {{ echo \"testbench watchdog: the program still runs after {secs} \
             s\"; {WATCHDOG_REPORT}; }} > \"$TB/{WATCHDOG}.tmp\" 2>&1; \
             mv \"$TB/{WATCHDOG}.tmp\" \"$TB/{WATCHDOG}\" ) &"
        );
        let _ = writeln!(s, "watchdog=$!");
    }
    let mut cmd = q(spec.program);
    for a in spec.args {
        cmd.push(' ');
        cmd.push_str(&sh_quote(a));
    }
    let _ = writeln!(s, "{cmd} > \"$TB/{OUTPUT}\" 2>&1 < /dev/null");
    let _ = writeln!(s, "code=$?");
    if spec.watchdog_after.is_some() {
        let _ = writeln!(s, "kill \"$watchdog\" 2>/dev/null");
    }
    let _ = writeln!(
        s,
        "echo \"$code\" > \"$TB/{STATUS}.tmp\" && mv \"$TB/{STATUS}.tmp\" \"$TB/{STATUS}\""
    );
    let _ = writeln!(s, "echo \"testbench: program exited with status $code; its output:\"");
    let _ = writeln!(s, "cat \"$TB/{OUTPUT}\"");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Evidence {
        Evidence { starts: 1, ..Evidence::default() }
    }

    #[test]
    fn status_file_is_one_decimal_number() {
        assert_eq!(parse_status("0\n"), Ok(0));
        assert_eq!(parse_status(" 137 \n"), Ok(137));
        assert_eq!(parse_status("-1"), Ok(-1));
        assert_eq!(parse_status(""), Err(Anomaly::BadStatus(String::new())));
        assert!(parse_status("ok").is_err());
    }

    #[test]
    fn a_status_file_means_the_program_exited() {
        let e = Evidence { status: Some("3\n".into()), ..ev() };
        assert_eq!(classify(&e), Ok(GuestExit::Exited(3)));
        // A status beats a later timeout (QEMU hung while powering off after the program ended).
        let e = Evidence { status: Some("0".into()), timed_out: true, ..ev() };
        assert_eq!(classify(&e), Ok(GuestExit::Exited(0)));
    }

    #[test]
    fn power_cut_is_recognised_by_marker_or_console() {
        assert_eq!(classify(&Evidence { power_cut_marker: true, ..ev() }), Ok(GuestExit::PowerCut));
        assert_eq!(classify(&Evidence { console_reset: true, ..ev() }), Ok(GuestExit::PowerCut));
    }

    #[test]
    fn timeout_and_crash_are_distinct_from_power_cut() {
        assert_eq!(classify(&Evidence { timed_out: true, ..ev() }), Ok(GuestExit::TimedOut));
        assert_eq!(classify(&ev()), Ok(GuestExit::Crashed));
        assert_eq!(classify(&Evidence { starts: 0, ..ev() }), Ok(GuestExit::Crashed));
    }

    #[test]
    fn reboot_into_the_command_again_is_an_anomaly() {
        let e = Evidence { starts: 2, power_cut_marker: true, ..ev() };
        assert_eq!(classify(&e), Err(Anomaly::Rebooted(2)));
    }

    #[test]
    fn module_failure_is_reported() {
        let e = Evidence { setup_error: Some("modprobe nope failed: x\n".into()), ..ev() };
        assert_eq!(classify(&e), Err(Anomaly::Setup("modprobe nope failed: x".into())));
    }

    #[test]
    fn sh_quote_survives_single_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn env_keys_are_checked() {
        assert!(valid_env_key("RUST_LOG"));
        assert!(valid_env_key("_x1"));
        assert!(!valid_env_key("1x"));
        assert!(!valid_env_key("A-B"));
        assert!(!valid_env_key(""));
    }

    #[test]
    fn script_loads_modules_then_runs_the_program() {
        let modules = vec!["loop".to_owned(), "binder_linux devices=binder,hwbinder".to_owned()];
        let env = vec![("RUST_LOG".to_owned(), "debug".to_owned())];
        let args = vec!["--guest".to_owned(), "it's".to_owned()];
        let script = guest_script(&ScriptSpec {
            shared: Path::new("/t/x-1/shared"),
            modules: &modules,
            env: &env,
            program: Path::new("/bin/prog"),
            args: &args,
            watchdog_after: None,
        });
        let load_loop = script.find("modprobe loop 2>&1").unwrap();
        let load_binder = script.find("modprobe binder_linux devices=binder,hwbinder").unwrap();
        let run = script.find(r"'/bin/prog' '--guest' 'it'\''s' >").unwrap();
        assert!(load_loop < load_binder && load_binder < run);
        assert!(script.contains("export RUST_LOG='debug'"));
        assert!(script.contains("TB='/t/x-1/shared/.testbench'"));
        assert!(script.find("echo start").unwrap() < load_loop);
    }

    #[test]
    fn script_insmods_out_of_tree_module_files() {
        let modules = vec!["dm-mod".to_owned(), "/opt/mods/dm-bow.ko".to_owned()];
        let script = guest_script(&ScriptSpec {
            shared: Path::new("/t/s"),
            modules: &modules,
            env: &[],
            program: Path::new("/bin/prog"),
            args: &[],
            watchdog_after: None,
        });
        let core = script.find("modprobe dm-mod 2>&1").unwrap();
        let bow = script.find("insmod '/opt/mods/dm-bow.ko' 2>&1").unwrap();
        assert!(core < bow);
        assert!(script[bow..].lines().next().unwrap().contains("|| setup_failed"));
        assert!(!script.contains("modprobe /opt"));
    }

    /// The wrapper run on the host (it needs only a shell): a program that outlives the
    /// watchdog is reported on, sleeping, with the second sample; one that ends first is not.
    #[test]
    fn the_watchdog_reports_a_program_that_outlives_it_and_no_other() {
        // `linger`: how long to wait after the wrapper ended before reading the report.
        let run = |secs: &str, watchdog: u64, linger: u64| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join(TB_DIR)).unwrap();
            let args = vec![secs.to_owned()];
            let script = guest_script(&ScriptSpec {
                shared: dir.path(),
                modules: &[],
                env: &[],
                program: Path::new("/bin/sleep"),
                args: &args,
                watchdog_after: Some(watchdog),
            });
            let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
            assert!(out.status.success(), "{out:?}");
            let status = std::fs::read_to_string(dir.path().join(TB_DIR).join(STATUS));
            assert_eq!(status.unwrap(), "0\n");
            std::thread::sleep(std::time::Duration::from_secs(linger));
            std::fs::read_to_string(dir.path().join(TB_DIR).join(WATCHDOG)).ok()
        };
        let report = run("8", 1, 0).expect("a program running past the watchdog is reported");
        assert!(report.starts_with("testbench watchdog: the program still runs after 1 s"));
        let sleeping = |l: &str| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 6 && f[2].starts_with('S') && f[5] == "sleep"
        };
        let (first, second) = report.split_once("five seconds later").unwrap();
        assert!(first.lines().any(sleeping) && second.lines().any(sleeping), "{report}");
        assert!(report.contains("blocked tasks"), "{report}");
        // Killed with the program's end: nothing written, not even after its sleep.
        assert_eq!(run("0", 1, 2), None);
    }
}
