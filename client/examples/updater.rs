//! An example updater: the checkpoint half of an update_engine-style A/B update, on the
//! update-client library. The demo's update client is this program (`cargo xtask demo`).
//!
//! ```text
//! updater [--socket PATH] install [--retry N] [--allow-unprotected]   after writing the new slot
//! updater [--socket PATH] boot                                         at start after a reboot
//! updater [--socket PATH] wait-commit [--timeout S]                    before a Virtual A/B merge
//! updater [--socket PATH] mark-good                                    the new system is healthy
//! updater [--socket PATH] abort <reason> [--retry]                     give up on this boot
//! ```
//!
//! Exit status: 0 done; 1 failed (message on stderr); 2 bad command line; 3 the update has no
//! data protection (`install` without `--allow-unprotected` on a device without checkpoints)
//! or was rolled back (`boot`, `wait-commit`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use checkpoint_client::{
    state_name, BootState, CheckpointClient, CommitWait, Connect, Error, ErrorKind, StartOutcome,
};
use clap::{Parser, Subcommand};

/// The checkpoint steps of an A/B updater.
#[derive(Debug, Parser)]
struct Args {
    /// checkpointd's RPC socket (default: kernel binder).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Seconds to wait for the service on kernel binder.
    #[arg(long, global = true, default_value_t = 50)]
    service_wait: u64,
    #[command(subcommand)]
    step: Step,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// The new slot is written: checkpoint /data for the boots into it.
    Install {
        /// Boot attempts after the first (budget = retry + 1); -1 = unlimited while the new
        /// slot stays active.
        #[arg(long, default_value_t = 2, allow_hyphen_values = true)]
        retry: i32,
        /// Go on when the device cannot checkpoint (the update then has no data rollback).
        #[arg(long)]
        allow_unprotected: bool,
    },
    /// After a reboot: is this the new slot under its checkpoint, or a rollback?
    Boot,
    /// Wait until the checkpoint is committed: the point from which a Virtual A/B merge may
    /// start.
    WaitCommit {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The new system is healthy: commit.
    MarkGood,
    /// Give up on this boot's changes (the daemon reboots the device).
    Abort {
        /// The reboot reason.
        reason: String,
        /// Count this boot as an attempt only, instead of spending the budget.
        #[arg(long)]
        retry: bool,
    },
}

/// The update cannot be protected or was rolled back.
const EXIT_NO_PROTECTION: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    let mut how =
        Connect::from_options(args.socket.as_deref(), Duration::from_secs(args.service_wait));
    // Only waiting needs events; the other steps are single calls.
    how.events = matches!(args.step, Step::WaitCommit { .. });
    let result = CheckpointClient::connect(&how).and_then(|client| run(&client, &args.step));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.kind() == ErrorKind::RolledBack => {
            println!("updater: {e}");
            ExitCode::from(EXIT_NO_PROTECTION)
        }
        Err(e) => {
            eprintln!("updater: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(client: &CheckpointClient, step: &Step) -> Result<u8, Error> {
    match step {
        Step::Install { retry, allow_unprotected } => match client.start_checkpoint(*retry)? {
            StartOutcome::Started { boot_attempts } => {
                let status = client.status()?;
                let attempts = if boot_attempts < 0 {
                    "unlimited boot attempts while the new slot stays active".to_owned()
                } else {
                    format!("{boot_attempts} boot attempts")
                };
                println!(
                    "updater: checkpoint requested: {attempts}, state {}, backends {}",
                    state_name(status.state),
                    status.backends.join(",")
                );
                println!("updater: now switch the active slot and reboot");
                Ok(0)
            }
            StartOutcome::NotSupported if *allow_unprotected => {
                println!("updater: this device cannot checkpoint /data: updating without rollback");
                Ok(0)
            }
            StartOutcome::NotSupported => {
                println!(
                    "updater: this device cannot checkpoint /data; not updating \
                     (--allow-unprotected to update anyway)"
                );
                Ok(EXIT_NO_PROTECTION)
            }
        },
        Step::Boot => {
            match client.boot_state()? {
                BootState::RollbackNeeded => {
                    println!(
                        "updater: the update failed: /data was rolled back; discard the update \
                         and report it (the boot's commit acknowledges the rollback)"
                    );
                    return Ok(EXIT_NO_PROTECTION);
                }
                BootState::Checkpointing { attempts_left } => {
                    let left = attempts_left.map_or("unlimited".to_owned(), |n| n.to_string());
                    println!("updater: new slot under its checkpoint, {left} attempts left");
                }
                BootState::Pending => println!("updater: checkpoint requested, not yet active"),
                BootState::NoCheckpoint => println!("updater: no checkpoint"),
            }
            Ok(0)
        }
        Step::WaitCommit { timeout } => {
            println!("updater: waiting for the checkpoint commit before merging");
            match client.wait_for_commit(Duration::from_secs(*timeout))? {
                CommitWait::Committed => println!("updater: committed; the merge may start"),
                CommitWait::NoCheckpoint => {
                    println!("updater: no checkpoint to wait for; the merge may start")
                }
            }
            Ok(0)
        }
        Step::MarkGood => {
            client.commit()?;
            println!("updater: committed");
            Ok(0)
        }
        Step::Abort { reason, retry } => {
            client.abort(reason, *retry)?;
            println!("updater: aborted ({reason}); the device reboots");
            Ok(0)
        }
    }
}
