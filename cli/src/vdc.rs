//! `checkpointctl checkpoint <method> [args]`: the grammar and exit codes of
//! `vdc checkpoint` (vold-checkpoint.md §7.2), so init scripts written for vdc work unchanged.
//!
//! One deliberate difference: vdc's `abortChanges <x> <y>` parses its FIRST argument both as the
//! retry integer and as the reboot message and ignores the second (a vdc bug). Here the first
//! argument is the message and the second the retry flag (`0`/`1`, any integer, or
//! `true`/`false`), as the method's arguments are declared.

use checkpoint_aidl::android::system::checkpoint::ICheckpoint::ICheckpoint;

/// Exit status of a usage error (too few arguments), as vdc.
pub const EXIT_USAGE: u8 = 5;
/// Exit status of an unknown or ill-sized command, a bad integer, or a service that never
/// appeared (vdc: EINVAL).
pub const EXIT_EINVAL: u8 = 22;
/// Exit status of a failed binder call (vdc: ENOTTY).
pub const EXIT_ENOTTY: u8 = 25;

/// A parsed `checkpoint` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VdcCommand {
    SupportsCheckpoint,
    SupportsBlockCheckpoint,
    SupportsFileCheckpoint,
    StartCheckpoint(i32),
    NeedsCheckpoint,
    NeedsRollback,
    CommitChanges,
    PrepareCheckpoint,
    RestoreCheckpoint(String),
    RestoreCheckpointPart(String, i32),
    MarkBootAttempt,
    AbortChanges { message: String, retry: bool },
    ResetCheckpoint,
}

/// One method of `checkpoint`, for the help text.
#[derive(Clone, Copy, Debug)]
pub struct Method {
    /// The method name, as vdc spells it.
    pub name: &'static str,
    /// Its arguments, in order.
    pub args: &'static str,
    /// What the exit status means.
    pub exit: &'static str,
    /// What it does.
    pub about: &'static str,
}

/// Every `checkpoint` method, in vdc's order (vold-checkpoint.md §7.2).
pub const METHODS: &[Method] = &[
    Method {
        name: "supportsCheckpoint",
        args: "",
        exit: "1 yes, 0 no",
        about: "whether any checkpoint backend is configured",
    },
    Method {
        name: "supportsBlockCheckpoint",
        args: "",
        exit: "1 yes, 0 no",
        about: "whether a block backend (dm-bow, snapshot) is configured",
    },
    Method {
        name: "supportsFileCheckpoint",
        args: "",
        exit: "1 yes, 0 no",
        about: "whether a file-system backend (f2fs) is configured",
    },
    Method {
        name: "startCheckpoint",
        args: "<retry>",
        exit: "0",
        about: "checkpoint the next boot with retry+1 attempts (-1: unlimited)",
    },
    Method {
        name: "needsCheckpoint",
        args: "",
        exit: "1 yes, 0 no",
        about: "whether this boot runs under a checkpoint (latched at the first call)",
    },
    Method {
        name: "needsRollback",
        args: "",
        exit: "1 yes, 0 no",
        about: "whether the budget is spent and /data must be rolled back",
    },
    Method {
        name: "commitChanges",
        args: "",
        exit: "0",
        about: "mark the slot successful, commit the backends, clear the checkpoint",
    },
    Method {
        name: "prepareCheckpoint",
        args: "",
        exit: "0",
        about: "arm the backends for this boot (init: post-fs-data)",
    },
    Method {
        name: "restoreCheckpoint",
        args: "<device>",
        exit: "0",
        about: "roll back an uncommitted block checkpoint on the raw device",
    },
    Method {
        name: "restoreCheckpointPart",
        args: "<device> <count>",
        exit: "0",
        about: "as restoreCheckpoint, stopping after <count> sectors (test hook)",
    },
    Method {
        name: "markBootAttempt",
        args: "",
        exit: "0",
        about: "count this boot against the budget (init: post-fs)",
    },
    Method {
        name: "abortChanges",
        args: "<message> <retry>",
        exit: "0",
        about: "give up on this boot's changes and reboot (retry: 0/1/true/false)",
    },
    Method {
        name: "resetCheckpoint",
        args: "",
        exit: "0",
        about: "forget the latched needsCheckpoint answer",
    },
];

/// `checkpointctl checkpoint --help`: the methods, their arguments and exit statuses.
pub fn help_text() -> String {
    let mut text = String::from(
        "Usage: checkpointctl [--socket PATH] [--timeout S] checkpoint [--wait] <method> [args]\n\n\
         vdc-compatible: the grammar and exit statuses of `vdc checkpoint`. Integers are read as\n\
         libbase's ParseInt reads them (decimal, or hex after 0x).\n\n  \
         method and arguments                    exit status  what it does\n",
    );
    for m in METHODS {
        let call =
            if m.args.is_empty() { m.name.to_owned() } else { format!("{} {}", m.name, m.args) };
        text.push_str(&format!("  {call:<39} {:<12} {}\n", m.exit, m.about));
    }
    text.push_str(
        "\nOther exit statuses: 5 no method; 22 unknown method, wrong argument count, bad integer,\n\
         or service not found; 25 the call failed (\"Command: ... Failed: ...\").\n\
         isCheckpointing is not a vdc command: use `checkpointctl status`.\n",
    );
    text
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Call a method.
    Call(VdcCommand),
    /// `--help` / `-h`: print [`help_text`], exit 0.
    Help,
}

/// Why a command line is not a command; each maps to vdc's exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VdcError {
    /// Fewer than one method name (vdc: fewer than 2 arguments).
    Usage,
    /// An argument that must be an integer is not one.
    BadInteger(String, IntError),
    /// Unknown method or wrong number of arguments.
    Unknown(Vec<String>),
}

impl VdcError {
    /// The process exit status vdc uses.
    pub fn exit_code(&self) -> u8 {
        match self {
            VdcError::Usage => EXIT_USAGE,
            VdcError::BadInteger(..) | VdcError::Unknown(_) => EXIT_EINVAL,
        }
    }

    /// What to log (vdc logs the usage at INFO, the rest at ERROR).
    pub fn message(&self) -> String {
        match self {
            VdcError::Usage => {
                let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
                format!(
                    "Usage: checkpointctl checkpoint [--wait] <method> [args...]\n\
                     methods: {} (checkpointctl checkpoint --help)",
                    names.join(" ")
                )
            }
            VdcError::BadInteger(arg, IntError::NotAnInteger) => {
                format!("Not an integer: `{arg}` (decimal, or hex after 0x)")
            }
            VdcError::BadInteger(arg, IntError::OutOfRange) => {
                format!("Out of range for an int: `{arg}`")
            }
            VdcError::Unknown(args) => format!(
                "Raw commands are no longer supported (`checkpoint {}`; see checkpointctl \
                 checkpoint --help)",
                args.join(" ")
            ),
        }
    }
}

/// Why an argument is not an `int` as libbase reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntError {
    /// No digits, a character that is not one, or something after the digits.
    NotAnInteger,
    /// A number, but outside `int` (`-2147483648..=2147483647`).
    OutOfRange,
}

/// White space as C's `isspace` sees it in the "C" locale (what libbase skips).
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// `android::base::ParseInt<int>` (libbase `parseint.h`), which vdc uses for every integer
/// argument: leading white space is skipped; the base is 16 when what follows starts with
/// `0x` or `0X` and 10 otherwise (no octal: `010` is ten); then `strtoll` in that base: in
/// base 10 an optional `+` or `-`, then digits up to the end of the string with nothing after
/// (trailing white space included); a value outside `int` fails. So `-0x10` and `+0x10` fail
/// (a sign selects base 10, which stops at the `x`), and `0x` needs at least one hex digit.
/// This is current libbase; releases whose `ParseInt` did not skip the white space itself
/// chose the base on the raw string, so there ` 0x10` failed (base 10) while ` 16` passed.
pub fn parse_int(arg: &str) -> Result<i32, IntError> {
    let s = arg.trim_start_matches(is_c_space);
    let (radix, body) = match s.get(..2) {
        Some("0x" | "0X") => (16, &s[2..]),
        _ => (10, s),
    };
    let (negative, digits) = match (radix, body.as_bytes().first()) {
        (10, Some(b'-')) => (true, &body[1..]),
        (10, Some(b'+')) => (false, &body[1..]),
        _ => (false, body),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(IntError::NotAnInteger);
    }
    // Accumulated negatively so i32::MIN fits; any overflow is out of range (strtoll's
    // ERANGE, or beyond int).
    let mut value: i32 = 0;
    for c in digits.chars() {
        let digit = i32::try_from(c.to_digit(radix).unwrap_or(0)).unwrap_or(0);
        value = value
            .checked_mul(i32::try_from(radix).unwrap_or(10))
            .and_then(|v| v.checked_sub(digit))
            .ok_or(IntError::OutOfRange)?;
    }
    if negative {
        Ok(value)
    } else {
        value.checked_neg().ok_or(IntError::OutOfRange)
    }
}

fn int_arg(arg: &str) -> Result<i32, VdcError> {
    parse_int(arg).map_err(|e| VdcError::BadInteger(arg.to_owned(), e))
}

fn parse_bool(arg: &str) -> Result<bool, VdcError> {
    match arg {
        "true" => Ok(true),
        "false" => Ok(false),
        other => int_arg(other).map(|n| n != 0),
    }
}

/// Parses the arguments after `checkpoint` (a leading `--wait` is ignored, as vdc does).
pub fn parse(args: &[String]) -> Result<Request, VdcError> {
    let args = match args.first() {
        Some(first) if first == "--wait" => &args[1..],
        _ => args,
    };
    let Some((method, rest)) = args.split_first() else { return Err(VdcError::Usage) };
    if rest.is_empty() && matches!(method.as_str(), "--help" | "-h") {
        return Ok(Request::Help);
    }
    let unknown = || VdcError::Unknown(args.to_vec());
    let command = match (method.as_str(), rest) {
        ("supportsCheckpoint", []) => VdcCommand::SupportsCheckpoint,
        ("supportsBlockCheckpoint", []) => VdcCommand::SupportsBlockCheckpoint,
        ("supportsFileCheckpoint", []) => VdcCommand::SupportsFileCheckpoint,
        ("startCheckpoint", [retry]) => VdcCommand::StartCheckpoint(int_arg(retry)?),
        ("needsCheckpoint", []) => VdcCommand::NeedsCheckpoint,
        ("needsRollback", []) => VdcCommand::NeedsRollback,
        ("commitChanges", []) => VdcCommand::CommitChanges,
        ("prepareCheckpoint", []) => VdcCommand::PrepareCheckpoint,
        ("restoreCheckpoint", [device]) => VdcCommand::RestoreCheckpoint(device.clone()),
        ("restoreCheckpointPart", [device, count]) => {
            VdcCommand::RestoreCheckpointPart(device.clone(), int_arg(count)?)
        }
        ("markBootAttempt", []) => VdcCommand::MarkBootAttempt,
        ("abortChanges", [message, retry]) => {
            VdcCommand::AbortChanges { message: message.clone(), retry: parse_bool(retry)? }
        }
        // vdc does not check resetCheckpoint's argument count.
        ("resetCheckpoint", _) => VdcCommand::ResetCheckpoint,
        _ => return Err(unknown()),
    };
    Ok(Request::Call(command))
}

/// The result of a call: a boolean answer (exit 1/0) or nothing (exit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Bool(bool),
    Done,
}

impl Answer {
    /// vdc's exit status: booleans as 1/0, everything else 0.
    pub fn exit_code(self) -> u8 {
        match self {
            Answer::Bool(true) => 1,
            Answer::Bool(false) | Answer::Done => 0,
        }
    }
}

/// Performs `command` on `service`.
pub fn call(service: &dyn ICheckpoint, command: &VdcCommand) -> rsbinder::BinderResult<Answer> {
    Ok(match command {
        VdcCommand::SupportsCheckpoint => Answer::Bool(service.supportsCheckpoint()?),
        VdcCommand::SupportsBlockCheckpoint => Answer::Bool(service.supportsBlockCheckpoint()?),
        VdcCommand::SupportsFileCheckpoint => Answer::Bool(service.supportsFileCheckpoint()?),
        VdcCommand::StartCheckpoint(retry) => {
            service.startCheckpoint(*retry)?;
            Answer::Done
        }
        VdcCommand::NeedsCheckpoint => Answer::Bool(service.needsCheckpoint()?),
        VdcCommand::NeedsRollback => Answer::Bool(service.needsRollback()?),
        VdcCommand::CommitChanges => {
            service.commitChanges()?;
            Answer::Done
        }
        VdcCommand::PrepareCheckpoint => {
            service.prepareCheckpoint()?;
            Answer::Done
        }
        VdcCommand::RestoreCheckpoint(device) => {
            service.restoreCheckpoint(device)?;
            Answer::Done
        }
        VdcCommand::RestoreCheckpointPart(device, count) => {
            service.restoreCheckpointPart(device, *count)?;
            Answer::Done
        }
        VdcCommand::MarkBootAttempt => {
            service.markBootAttempt()?;
            Answer::Done
        }
        VdcCommand::AbortChanges { message, retry } => {
            service.abortChanges(message, *retry)?;
            Answer::Done
        }
        VdcCommand::ResetCheckpoint => {
            service.resetCheckpoint()?;
            Answer::Done
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<VdcCommand, VdcError> {
        match parse(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())? {
            Request::Call(command) => Ok(command),
            Request::Help => panic!("{args:?} parsed as a help request"),
        }
    }

    #[test]
    fn every_vdc_method_parses() {
        assert_eq!(p(&["supportsCheckpoint"]), Ok(VdcCommand::SupportsCheckpoint));
        assert_eq!(p(&["supportsBlockCheckpoint"]), Ok(VdcCommand::SupportsBlockCheckpoint));
        assert_eq!(p(&["supportsFileCheckpoint"]), Ok(VdcCommand::SupportsFileCheckpoint));
        assert_eq!(p(&["startCheckpoint", "2"]), Ok(VdcCommand::StartCheckpoint(2)));
        assert_eq!(p(&["startCheckpoint", "-1"]), Ok(VdcCommand::StartCheckpoint(-1)));
        assert_eq!(p(&["needsCheckpoint"]), Ok(VdcCommand::NeedsCheckpoint));
        assert_eq!(p(&["needsRollback"]), Ok(VdcCommand::NeedsRollback));
        assert_eq!(p(&["commitChanges"]), Ok(VdcCommand::CommitChanges));
        assert_eq!(p(&["prepareCheckpoint"]), Ok(VdcCommand::PrepareCheckpoint));
        assert_eq!(
            p(&["restoreCheckpoint", "/dev/vdb"]),
            Ok(VdcCommand::RestoreCheckpoint("/dev/vdb".into()))
        );
        assert_eq!(
            p(&["restoreCheckpointPart", "/dev/vdb", "10"]),
            Ok(VdcCommand::RestoreCheckpointPart("/dev/vdb".into(), 10))
        );
        assert_eq!(p(&["markBootAttempt"]), Ok(VdcCommand::MarkBootAttempt));
        assert_eq!(p(&["resetCheckpoint"]), Ok(VdcCommand::ResetCheckpoint));
        assert_eq!(p(&["resetCheckpoint", "extra"]), Ok(VdcCommand::ResetCheckpoint));
    }

    #[test]
    fn leading_wait_is_ignored() {
        assert_eq!(p(&["--wait", "markBootAttempt"]), Ok(VdcCommand::MarkBootAttempt));
    }

    #[test]
    fn abort_changes_takes_message_then_retry() {
        // The fixed grammar: message first, retry second (vdc swaps them, see module doc).
        assert_eq!(
            p(&["abortChanges", "abort-staged-install", "0"]),
            Ok(VdcCommand::AbortChanges { message: "abort-staged-install".into(), retry: false })
        );
        assert_eq!(
            p(&["abortChanges", "apexd_initiated", "1"]),
            Ok(VdcCommand::AbortChanges { message: "apexd_initiated".into(), retry: true })
        );
        assert_eq!(
            p(&["abortChanges", "x", "true"]),
            Ok(VdcCommand::AbortChanges { message: "x".into(), retry: true })
        );
        assert_eq!(p(&["abortChanges", "x", "maybe"]).unwrap_err().exit_code(), EXIT_EINVAL);
        assert_eq!(p(&["abortChanges", "x"]).unwrap_err().exit_code(), EXIT_EINVAL);
    }

    #[test]
    fn exit_codes_of_bad_command_lines_are_vdcs() {
        assert_eq!(p(&[]).unwrap_err().exit_code(), EXIT_USAGE);
        assert_eq!(p(&["--wait"]).unwrap_err().exit_code(), EXIT_USAGE);
        for bad in [
            &["isCheckpointing"][..],
            &["frobnicate"],
            &["startCheckpoint"],
            &["startCheckpoint", "1", "2"],
            &["needsRollback", "now"],
            &["restoreCheckpointPart", "/dev/vdb"],
        ] {
            let err = p(bad).unwrap_err();
            assert_eq!(err.exit_code(), EXIT_EINVAL, "{bad:?}");
            assert!(err.message().starts_with("Raw commands are no longer supported"), "{bad:?}");
        }
        for bad in [&["startCheckpoint", "two"][..], &["restoreCheckpointPart", "/dev/x", "1x"]] {
            assert_eq!(
                p(bad).unwrap_err(),
                VdcError::BadInteger(bad[bad.len() - 1].into(), IntError::NotAnInteger)
            );
        }
        let err = p(&["startCheckpoint", "0x80000000"]).unwrap_err();
        assert_eq!(err, VdcError::BadInteger("0x80000000".into(), IntError::OutOfRange));
        assert_eq!(err.exit_code(), EXIT_EINVAL);
    }

    /// What libbase's ParseInt<int> accepts, case by case (parseint.h: white space skipped,
    /// base 16 after `0x`/`0X`, else 10; strtoll; whole string; int range).
    #[test]
    fn integers_are_read_as_libbase_parse_int_reads_them() {
        let accepted: &[(&str, i32)] = &[
            ("0", 0),
            ("2", 2),
            ("-1", -1),
            ("+7", 7),
            ("-0", 0),
            ("0x10", 16),
            ("0X1f", 31),
            ("0xABCDEF", 0x00ab_cdef),
            ("0x0", 0),
            ("0x7fffffff", i32::MAX),
            // Leading zeros are decimal: there is no octal.
            ("010", 10),
            ("0009", 9),
            ("08", 8),
            // Leading C white space, before a sign or a 0x too.
            (" 3", 3),
            ("\t\n\x0b\x0c\r 4", 4),
            ("  -5", -5),
            (" 0x20", 32),
            ("2147483647", i32::MAX),
            ("-2147483648", i32::MIN),
            ("000000000000000000000000000001", 1),
        ];
        for &(text, want) in accepted {
            assert_eq!(parse_int(text), Ok(want), "{text:?}");
        }
        let not_integers = [
            "", " ", "x", "two", "1x", "1 ", "1\n", "1.0", "1e3", "--1", "+-1", "- 1", "+", "-",
            "0x", "0x ", "0xg", "0x-1", "0x+1", "-0x10", "+0x10", " -0x1", "0b101", "0o17", "١",
            "\u{a0}1", "1_000", "0x0x1", "0xx1",
        ];
        for text in not_integers {
            assert_eq!(parse_int(text), Err(IntError::NotAnInteger), "{text:?}");
        }
        let out_of_range = [
            "2147483648",
            "-2147483649",
            "0x80000000",
            "0xffffffff",
            "9223372036854775808",
            "99999999999999999999999",
            "0xffffffffffffffffff",
        ];
        for text in out_of_range {
            assert_eq!(parse_int(text), Err(IntError::OutOfRange), "{text:?}");
        }
    }

    #[test]
    fn every_integer_argument_takes_hex() {
        assert_eq!(p(&["startCheckpoint", "0x2"]), Ok(VdcCommand::StartCheckpoint(2)));
        assert_eq!(
            p(&["restoreCheckpointPart", "/dev/vdb", "0x10"]),
            Ok(VdcCommand::RestoreCheckpointPart("/dev/vdb".into(), 16))
        );
        assert_eq!(
            p(&["abortChanges", "m", "0x0"]),
            Ok(VdcCommand::AbortChanges { message: "m".into(), retry: false })
        );
        assert_eq!(
            p(&["abortChanges", "m", " 0x1"]),
            Ok(VdcCommand::AbortChanges { message: "m".into(), retry: true })
        );
    }

    #[test]
    fn help_lists_every_method_and_each_parses_with_its_arguments() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(parse(&args(&["--help"])), Ok(Request::Help));
        assert_eq!(parse(&args(&["-h"])), Ok(Request::Help));
        assert_eq!(parse(&args(&["--wait", "--help"])), Ok(Request::Help));
        assert_eq!(parse(&args(&["--help", "x"])).unwrap_err().exit_code(), EXIT_EINVAL);
        let help = help_text();
        for m in METHODS {
            assert!(help.contains(m.name), "help lacks {}", m.name);
            // The table and the parser agree on each method's arguments.
            let sample: Vec<&str> = m
                .args
                .split_whitespace()
                .map(|a| match a {
                    "<retry>" | "<count>" => "1",
                    "<device>" => "/dev/vdb",
                    _ => "text",
                })
                .collect();
            let mut line = vec![m.name];
            line.extend(sample);
            assert!(p(&line).is_ok(), "{line:?} does not parse");
        }
        assert_eq!(METHODS.len(), 13, "vdc has 13 checkpoint methods");
    }

    #[test]
    fn booleans_exit_one_or_zero() {
        assert_eq!(Answer::Bool(true).exit_code(), 1);
        assert_eq!(Answer::Bool(false).exit_code(), 0);
        assert_eq!(Answer::Done.exit_code(), 0);
    }
}
