//! The reboot that abortChanges (and a rollback slot switch) asks for.
//!
//! vold calls `android_reboot(ANDROID_RB_RESTART2, 0, reason)`, i.e. sets `sys.powerctl` to
//! `reboot,<reason>` and returns at once; init performs the reboot. Here the action is
//! configured (`[reboot]`): that property on Android, a command elsewhere (e.g. `systemctl
//! reboot`), or nothing. The call returns once the action is started, as in vold.

use std::process::Command;

use crate::config::{RebootAction, RebootConfig};

/// Performs the configured reboot action.
#[derive(Clone, Debug)]
pub struct Rebooter {
    config: RebootConfig,
}

/// A reboot action that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// The configured command could not be spawned.
    #[error("cannot run reboot command `{program}`: {source}")]
    Spawn {
        /// argv[0].
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting sys.powerctl failed (Android).
    #[error("cannot set sys.powerctl: {0}")]
    Property(String),
}

impl Rebooter {
    /// A rebooter for `config` (validated by `Config::validate`).
    pub fn new(config: RebootConfig) -> Self {
        Rebooter { config }
    }

    /// The argv of the `command` action for `reason`.
    pub fn command_for(&self, reason: &str) -> Vec<String> {
        self.config.command.iter().map(|arg| arg.replace("{reason}", reason)).collect()
    }

    /// Starts the reboot with `reason` (vold: "reboot,<reason>").
    pub fn reboot(&self, reason: &str) -> Result<(), RebootError> {
        match self.config.action {
            RebootAction::None => {
                log::warn!("reboot requested (reason `{reason}`) but reboot.action is none");
                Ok(())
            }
            RebootAction::Command => {
                let argv = self.command_for(reason);
                let (program, args) = argv.split_first().expect("validated: command is not empty");
                log::info!("rebooting (reason `{reason}`): running {argv:?}");
                let mut child = Command::new(program)
                    .args(args)
                    .spawn()
                    .map_err(|source| RebootError::Spawn { program: program.clone(), source })?;
                // Reap the child without making the caller wait for it.
                std::thread::spawn(move || match child.wait() {
                    Ok(status) if status.success() => {}
                    Ok(status) => log::error!("reboot command exited with {status}"),
                    Err(e) => log::error!("waiting for the reboot command: {e}"),
                });
                Ok(())
            }
            RebootAction::AndroidPowerctl => powerctl(reason),
        }
    }
}

#[cfg(target_os = "android")]
fn powerctl(reason: &str) -> Result<(), RebootError> {
    let value = if reason.is_empty() { "reboot".to_owned() } else { format!("reboot,{reason}") };
    log::info!("rebooting: sys.powerctl={value}");
    rsproperties::set("sys.powerctl", &value).map_err(|e| RebootError::Property(e.to_string()))
}

#[cfg(not(target_os = "android"))]
fn powerctl(_reason: &str) -> Result<(), RebootError> {
    // Config::validate refuses android-powerctl off Android.
    Err(RebootError::Property("sys.powerctl exists only on Android".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_gets_the_reason() {
        let rebooter = Rebooter::new(RebootConfig {
            action: RebootAction::Command,
            command: vec!["/bin/sh".into(), "-c".into(), "echo {reason} > /dev/null".into()],
        });
        assert_eq!(
            rebooter.command_for("abort-staged-install")[2],
            "echo abort-staged-install > /dev/null"
        );
        rebooter.reboot("x").expect("spawned");
    }

    #[test]
    fn missing_program_is_reported() {
        let rebooter = Rebooter::new(RebootConfig {
            action: RebootAction::Command,
            command: vec!["/nonexistent/reboot".into()],
        });
        let err = rebooter.reboot("x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/reboot"));
    }
}
