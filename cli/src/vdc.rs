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

/// Why a command line is not a command; each maps to vdc's exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VdcError {
    /// Fewer than one method name (vdc: fewer than 2 arguments).
    Usage,
    /// An argument that must be an integer is not one.
    BadInteger(String),
    /// Unknown method or wrong number of arguments.
    Unknown(Vec<String>),
}

impl VdcError {
    /// The process exit status vdc uses.
    pub fn exit_code(&self) -> u8 {
        match self {
            VdcError::Usage => EXIT_USAGE,
            VdcError::BadInteger(_) | VdcError::Unknown(_) => EXIT_EINVAL,
        }
    }

    /// What to print on stderr.
    pub fn message(&self) -> String {
        match self {
            VdcError::Usage => "Usage: checkpointctl checkpoint [--wait] <method> [args...]\n\
                 methods: supportsCheckpoint supportsBlockCheckpoint supportsFileCheckpoint \
                 startCheckpoint <retry> needsCheckpoint needsRollback commitChanges \
                 prepareCheckpoint restoreCheckpoint <device> restoreCheckpointPart <device> \
                 <count> markBootAttempt abortChanges <message> <retry> resetCheckpoint"
                .to_owned(),
            VdcError::BadInteger(arg) => format!("Not an integer: `{arg}`"),
            VdcError::Unknown(args) => {
                format!("Raw commands are no longer supported (`checkpoint {}`)", args.join(" "))
            }
        }
    }
}

/// vold's `android::base::ParseInt` for an `int`: optional sign, decimal digits (leading
/// white space allowed, nothing after the digits).
fn parse_int(arg: &str) -> Result<i32, VdcError> {
    arg.trim_start().parse::<i32>().map_err(|_| VdcError::BadInteger(arg.to_owned()))
}

fn parse_bool(arg: &str) -> Result<bool, VdcError> {
    match arg {
        "true" => Ok(true),
        "false" => Ok(false),
        other => parse_int(other).map(|n| n != 0),
    }
}

/// Parses the arguments after `checkpoint` (a leading `--wait` is ignored, as vdc does).
pub fn parse(args: &[String]) -> Result<VdcCommand, VdcError> {
    let args = match args.first() {
        Some(first) if first == "--wait" => &args[1..],
        _ => args,
    };
    let Some((method, rest)) = args.split_first() else { return Err(VdcError::Usage) };
    let unknown = || VdcError::Unknown(args.to_vec());
    let command = match (method.as_str(), rest) {
        ("supportsCheckpoint", []) => VdcCommand::SupportsCheckpoint,
        ("supportsBlockCheckpoint", []) => VdcCommand::SupportsBlockCheckpoint,
        ("supportsFileCheckpoint", []) => VdcCommand::SupportsFileCheckpoint,
        ("startCheckpoint", [retry]) => VdcCommand::StartCheckpoint(parse_int(retry)?),
        ("needsCheckpoint", []) => VdcCommand::NeedsCheckpoint,
        ("needsRollback", []) => VdcCommand::NeedsRollback,
        ("commitChanges", []) => VdcCommand::CommitChanges,
        ("prepareCheckpoint", []) => VdcCommand::PrepareCheckpoint,
        ("restoreCheckpoint", [device]) => VdcCommand::RestoreCheckpoint(device.clone()),
        ("restoreCheckpointPart", [device, count]) => {
            VdcCommand::RestoreCheckpointPart(device.clone(), parse_int(count)?)
        }
        ("markBootAttempt", []) => VdcCommand::MarkBootAttempt,
        ("abortChanges", [message, retry]) => {
            VdcCommand::AbortChanges { message: message.clone(), retry: parse_bool(retry)? }
        }
        // vdc does not check resetCheckpoint's argument count.
        ("resetCheckpoint", _) => VdcCommand::ResetCheckpoint,
        _ => return Err(unknown()),
    };
    Ok(command)
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
        parse(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
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
            assert_eq!(p(bad).unwrap_err(), VdcError::BadInteger(bad[bad.len() - 1].into()));
        }
    }

    #[test]
    fn booleans_exit_one_or_zero() {
        assert_eq!(Answer::Bool(true).exit_code(), 1);
        assert_eq!(Answer::Bool(false).exit_code(), 0);
        assert_eq!(Answer::Done.exit_code(), 0);
    }
}
