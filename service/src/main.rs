//! checkpointd: the userdata checkpoint-and-rollback daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use checkpointd::config::{Config, DEFAULT_CONFIG_PATH};

/// checkpointd: userdata checkpoints and rollback for A/B updates (vold-compatible).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file (docs/configuration.md).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging() {
    #[cfg(target_os = "android")]
    android_logger::init_once(
        android_logger::Config::default()
            .with_tag("checkpointd")
            .with_max_level(log::LevelFilter::Info),
    );
    #[cfg(not(target_os = "android"))]
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

fn try_main(args: Args) -> Result<(), String> {
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if args.check_config {
        println!("{}: OK", args.config.display());
        return Ok(());
    }
    checkpointd::daemon::run(config).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    match try_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error!("{message}");
            eprintln!("checkpointd: {message}");
            ExitCode::FAILURE
        }
    }
}
