//! checkpointctl: vdc-compatible checkpoint commands, status, history and events of checkpointd.
//!
//! `checkpointctl checkpoint <method> [args]` has the grammar and exit codes of
//! `vdc checkpoint` (see `vdc.rs`); the other commands are checkpointctl's own.

mod boot;
mod kmsg;
mod log;
mod vdc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use checkpoint_client::{
    state_name, BackupEstimate, CheckpointClient, CheckpointStatus, Connect, EstimateBasis,
    EstimateOptions, Event, HistoryEvent, HistoryEventKind, ICheckpoint, ReservationInfo,
};
use clap::{Parser, Subcommand};

/// Talk to checkpointd: vdc-compatible checkpoint commands, status, history and events.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Reach checkpointd over binder RPC on this Unix socket instead of kernel binder.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Seconds to wait for the service to appear on kernel binder (vdc waits 50).
    #[arg(long, global = true, default_value_t = 50)]
    timeout: u64,
    /// Ignored (vdc compatibility).
    #[arg(long, hide = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// vdc-compatible: `checkpoint <method> [args]`; booleans are the exit status (1/0).
    #[command(disable_help_flag = true)]
    Checkpoint {
        /// The method and its arguments, exactly as for `vdc checkpoint`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Show the checkpoint state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the checkpoint history, newest first.
    History {
        /// At most this many entries (0 = all).
        #[arg(long, default_value_t = 20)]
        limit: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Estimate the backup space the next checkpoint needs (docs/estimate.md).
    Estimate {
        /// The update's expected write trace (our trace format); opened here and passed to
        /// the daemon as a descriptor.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Sizes of the files the update will rewrite: bytes, or with a suffix K, M, G, T
        /// (powers of 1024; e.g. 512M).
        #[arg(long, value_name = "BYTES", num_args = 1.., value_parser = parse_size)]
        declared: Vec<u64>,
        /// The checkpointed mount point (default: /data, or the only device).
        #[arg(long, value_name = "PATH")]
        mount_point: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reserve backup space on /data until the checkpoint starts (a preallocated file).
    Reserve {
        /// Bytes, or with a suffix K, M, G, T (powers of 1024; e.g. 512M, 2G).
        #[arg(value_parser = parse_size)]
        bytes: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give the reservation back.
    Release,
    /// Print listener events until interrupted.
    Watch {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The boot flow, in order: `boot mount` (fs_mgr's role), then `checkpoint
    /// markBootAttempt`, `checkpoint prepareCheckpoint`, and `boot commit` once the boot is
    /// good (docs/boot-flow.md).
    Boot {
        #[command(subcommand)]
        cmd: boot::BootCommand,
    },
    /// Offline dm-bow log tools (no daemon needed).
    Log {
        #[command(subcommand)]
        cmd: log::LogCommand,
    },
}

/// Connects as `--socket` / `--timeout` say; `events` opens the listener callback path.
fn connect(
    socket: Option<&Path>,
    timeout: Duration,
    events: bool,
) -> Result<CheckpointClient, checkpoint_client::Error> {
    let mut how = Connect::from_options(socket, timeout);
    how.events = events;
    CheckpointClient::connect(&how)
}

fn kind_name(kind: HistoryEventKind) -> String {
    match kind {
        HistoryEventKind::CHECKPOINT_STARTED => "start".to_owned(),
        HistoryEventKind::BOOT_ATTEMPT => "boot-attempt".to_owned(),
        HistoryEventKind::COMMITTED => "commit".to_owned(),
        HistoryEventKind::COMMIT_FAILED => "commit-failed".to_owned(),
        HistoryEventKind::ABORTED => "abort".to_owned(),
        HistoryEventKind::RESTORED => "restore".to_owned(),
        HistoryEventKind::ROLLBACK_ACKNOWLEDGED => "rollback-acknowledged".to_owned(),
        HistoryEventKind::ROLLBACK_SLOT_SWITCH => "rollback-slot-switch".to_owned(),
        HistoryEventKind::RECOVERY => "recovery".to_owned(),
        other => format!("other({})", other.0),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from milliseconds since the epoch (civil-from-days).
fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn bytes(value: i64) -> String {
    if value < 0 {
        "unknown".to_owned()
    } else {
        format!("{value} bytes")
    }
}

fn event_json(e: &HistoryEvent) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "timestamp_ms": e.timestampMs,
        "kind": kind_name(e.kind),
        "requested_retry": (e.requestedRetry != -2).then_some(e.requestedRetry),
        "attempts_left": (e.attemptsLeft >= 0).then_some(e.attemptsLeft),
        "slot": (e.slot >= 0).then_some(e.slot),
        "device": (!e.device.is_empty()).then_some(&e.device),
        "outcome": (!e.outcome.is_empty()).then_some(&e.outcome),
        "message": (!e.message.is_empty()).then_some(&e.message),
        "backup_bytes": (e.backupBytes >= 0).then_some(e.backupBytes),
        "estimated_bytes": known(e.estimatedBytes),
    })
}

fn event_line(e: &HistoryEvent) -> String {
    let mut line =
        format!("#{:<4} {}  {:<22}", e.id, format_time(e.timestampMs), kind_name(e.kind));
    if e.requestedRetry != -2 {
        line.push_str(&format!(" retry={}", e.requestedRetry));
    }
    if e.attemptsLeft >= 0 {
        line.push_str(&format!(" left={}", e.attemptsLeft));
    }
    if e.slot >= 0 {
        line.push_str(&format!(" slot={}", e.slot));
    }
    for (key, value) in [("device", &e.device), ("outcome", &e.outcome), ("message", &e.message)] {
        if !value.is_empty() {
            line.push_str(&format!(" {key}={value:?}"));
        }
    }
    if e.backupBytes >= 0 {
        line.push_str(&format!(" backup={}", e.backupBytes));
    }
    if e.estimatedBytes >= 0 {
        line.push_str(&format!(" estimated={}", e.estimatedBytes));
    }
    line
}

/// A size argument: decimal bytes, or with a suffix `K`, `M`, `G`, `T` (powers of 1024, any
/// case, optionally followed by `iB` or `B`): `4096`, `512M`, `2G`, `1GiB`.
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size (bytes, or a number with K, M, G or T: 512M, 2G)");
    let lower = text.trim().to_ascii_lowercase();
    let number_end = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, suffix) = lower.split_at(number_end);
    if digits.is_empty() {
        return Err(bad());
    }
    let unit: u64 = match suffix.trim_end_matches("ib").trim_end_matches('b') {
        "" if suffix.is_empty() || suffix == "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number.checked_mul(unit).ok_or_else(|| format!("`{text}` is more than 2^64 bytes"))
}

fn basis_name(basis: EstimateBasis) -> String {
    match basis {
        EstimateBasis::TRACE => "trace".to_owned(),
        EstimateBasis::HISTORY => "history".to_owned(),
        EstimateBasis::DECLARED => "declared".to_owned(),
        EstimateBasis::HISTORY_AND_DECLARED => "history_and_declared".to_owned(),
        EstimateBasis::DEFAULT => "default".to_owned(),
        other => format!("other({})", other.0),
    }
}

fn known(value: i64) -> Option<i64> {
    (value >= 0).then_some(value)
}

fn estimate_json(e: &BackupEstimate) -> serde_json::Value {
    serde_json::json!({
        "mount_point": e.mountPoint,
        "backend": e.backend,
        "basis": basis_name(e.basis),
        "predicted_bytes": e.predictedBytes,
        "needed_bytes": e.neededBytes,
        "free_bytes": e.freeBytes,
        "new_data_bytes": known(e.newDataBytes),
        "shortfall_bytes": e.shortfallBytes,
        "breakdown": {
            "data_bytes": e.dataBytes,
            "overhead_bytes": e.overheadBytes,
            "margin_bytes": e.marginBytes,
            "headroom_bytes": e.headroomBytes,
        },
        "history_samples": e.historySamples,
    })
}

fn print_estimate(e: &BackupEstimate) {
    println!("mount point:      {}", e.mountPoint);
    println!("backend:          {}", e.backend);
    println!("basis:            {}", basis_name(e.basis));
    println!("needed:           {}", bytes(e.neededBytes));
    println!(
        "  predicted:      {} (data {}, log/metadata {})",
        bytes(e.predictedBytes),
        e.dataBytes,
        e.overheadBytes
    );
    println!("  margin:         {}", bytes(e.marginBytes));
    println!("  headroom:       {}", bytes(e.headroomBytes));
    println!("free:             {}", bytes(e.freeBytes));
    if e.newDataBytes >= 0 {
        println!("new data:         {}", bytes(e.newDataBytes));
    }
    println!("shortfall:        {}", bytes(e.shortfallBytes));
    println!("history samples:  {}", e.historySamples);
}

fn reservation_json(r: &ReservationInfo) -> serde_json::Value {
    serde_json::json!({
        "mount_point": r.mountPoint,
        "path": r.path,
        "bytes": r.bytes,
        "created_unix_secs": r.createdUnixSecs,
    })
}

fn reservation_line(r: &ReservationInfo) -> String {
    format!(
        "{} bytes at {} (since {})",
        r.bytes,
        r.path,
        format_time(r.createdUnixSecs.saturating_mul(1000))
    )
}

/// "estimate E, actual A (A/E)" for the learning report; `-` parts when unknown.
fn estimate_vs_actual(estimated: i64, actual: i64) -> String {
    let part = |v: i64| if v < 0 { "-".to_owned() } else { format!("{v} bytes") };
    let mut out = format!("estimated {}, actual {}", part(estimated), part(actual));
    if estimated > 0 && actual >= 0 {
        // Integer percent: how much of the estimate was used.
        let percent = i128::from(actual) * 100 / i128::from(estimated);
        out.push_str(&format!(" ({percent}% of the estimate)"));
    }
    out
}

fn status_json(s: &CheckpointStatus) -> serde_json::Value {
    serde_json::json!({
        "state": state_name(s.state),
        "is_checkpointing": s.isCheckpointing,
        "needs_rollback": s.needsRollback,
        "budget": s.budget,
        "attempts_used": s.attemptsUsed,
        "attempts_left": (s.attemptsLeft >= 0).then_some(s.attemptsLeft),
        "slot_suffix": s.slotSuffix,
        "current_slot_suffix": s.currentSlotSuffix,
        "backends": s.backends,
        "devices": s.devices,
        "backup_bytes_used": (s.backupBytesUsed >= 0).then_some(s.backupBytesUsed),
        "backup_bytes_free": (s.backupBytesFree >= 0).then_some(s.backupBytesFree),
        "last_restore": s.lastRestore.as_ref().map(event_json),
        "backends_in_use": s.backendsInUse.iter().map(|b| serde_json::json!({
            "mount_point": b.mountPoint,
            "name": b.name,
            "type": b.r#type,
            "reason": b.reason,
        })).collect::<Vec<_>>(),
        "reservation": s.reservation.as_ref().map(reservation_json),
        "last_estimate": known(s.lastEstimateNeededBytes).map(|needed| serde_json::json!({
            "needed_bytes": needed,
            "predicted_bytes": known(s.lastEstimatePredictedBytes),
            "timestamp_ms": known(s.lastEstimateTimestampMs),
        })),
        "checkpoint_estimated_bytes": known(s.checkpointEstimatedBytes),
        "backup_bytes_high_water": known(s.backupBytesHighWater),
        "last_checkpoint": known(s.lastActualBytes).map(|actual| serde_json::json!({
            "actual_bytes": actual,
            "estimated_bytes": known(s.lastEstimatedBytes),
        })),
    })
}

fn print_status(s: &CheckpointStatus) {
    let budget = match s.budget {
        -1 => "unlimited while the requesting slot stays active".to_owned(),
        0 => "no checkpoint requested".to_owned(),
        n => format!("{n} boot attempts"),
    };
    let left = if s.attemptsLeft < 0 { "-".to_owned() } else { s.attemptsLeft.to_string() };
    let none = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
    println!("state:            {}", state_name(s.state));
    println!("checkpointing:    {}", if s.isCheckpointing { "yes" } else { "no" });
    println!("needs rollback:   {}", if s.needsRollback { "yes" } else { "no" });
    println!("budget:           {budget}");
    println!("attempts:         {} used, {left} left", s.attemptsUsed);
    println!("requesting slot:  {}", none(&s.slotSuffix));
    println!("current slot:     {}", none(&s.currentSlotSuffix));
    let backends = if s.backends.is_empty() {
        "none (checkpoints not supported)".to_owned()
    } else {
        s.backends.join(", ")
    };
    println!("backends:         {backends}");
    println!("devices:          {}", none(&s.devices.join(", ")));
    println!("backup used:      {}", bytes(s.backupBytesUsed));
    println!("backup free:      {}", bytes(s.backupBytesFree));
    match &s.lastRestore {
        Some(e) => println!("last restore:     {}", event_line(e)),
        None => println!("last restore:     -"),
    }
    for b in &s.backendsInUse {
        println!("backend in use:   {} -> {} ({}): {}", b.mountPoint, b.name, b.r#type, b.reason);
    }
    match &s.reservation {
        Some(r) => println!("reservation:      {}", reservation_line(r)),
        None => println!("reservation:      -"),
    }
    if s.lastEstimateNeededBytes >= 0 {
        println!(
            "last estimate:    {} needed ({} predicted), {}",
            bytes(s.lastEstimateNeededBytes),
            bytes(s.lastEstimatePredictedBytes),
            format_time(s.lastEstimateTimestampMs)
        );
    } else {
        println!("last estimate:    -");
    }
    if s.checkpointEstimatedBytes >= 0 || s.backupBytesHighWater >= 0 {
        println!(
            "this checkpoint:  {}",
            estimate_vs_actual(s.checkpointEstimatedBytes, s.backupBytesHighWater)
        );
    }
    if s.lastActualBytes >= 0 {
        println!(
            "last checkpoint:  {}",
            estimate_vs_actual(s.lastEstimatedBytes, s.lastActualBytes)
        );
    }
}

/// A listener event as `watch` prints it.
fn event_text(event: Event) -> String {
    match event {
        Event::StateChanged(state) => format!("state {}", state_name(state)),
        Event::RestoreProgress { done, total } => format!("restore-progress {done}/{total}"),
        Event::LowSpace { free_bytes } => format!("low-space {free_bytes}"),
    }
}

/// Exit status for checkpointctl's own commands when the call fails.
const EXIT_FAILED: u8 = 1;

fn binder_failure(what: &str, status: &rsbinder::Status) -> String {
    format!("{what} failed: {status}")
}

/// `checkpointctl checkpoint …`: vdc's grammar, exit statuses and log destination (kmsg.rs).
fn run_checkpoint(cli: &Cli, args: &[String]) -> u8 {
    let out = kmsg::Sink::for_this_process();
    let command = match vdc::parse(args) {
        Ok(vdc::Request::Call(command)) => command,
        Ok(vdc::Request::Help) => {
            print!("{}", vdc::help_text());
            return 0;
        }
        Err(e) => {
            let level = match e {
                vdc::VdcError::Usage => kmsg::Level::Info,
                _ => kmsg::Level::Error,
            };
            out.log(level, &e.message());
            return e.exit_code();
        }
    };
    let connection = match connect(cli.socket.as_deref(), Duration::from_secs(cli.timeout), false) {
        Ok(c) => c,
        Err(e) => {
            out.error(&e.to_string());
            return vdc::EXIT_EINVAL;
        }
    };
    match vdc::call(connection.service(), &command) {
        Ok(answer) => answer.exit_code(),
        Err(status) => {
            out.error(&format!("Command: checkpoint {} Failed: {status}", args.join(" ")));
            vdc::EXIT_ENOTTY
        }
    }
}

/// The boot flow may run before the daemon has created its socket (a unit started in
/// parallel): wait for it up to the timeout, as kernel binder waits for the service.
fn wait_for_socket(socket: Option<&Path>, timeout: Duration) {
    let Some(path) = socket else { return };
    let deadline = Instant::now() + timeout;
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `checkpointctl boot …`: logs each step on stderr (`checkpointctl boot: ...`), exits with
/// the step's status (boot.rs).
fn run_boot(cli: &Cli, cmd: &boot::BootCommand) -> u8 {
    let mut log = |line: String| eprintln!("checkpointctl boot: {line}");
    let result = (|| -> Result<(), boot::BootError> {
        let config_error = |m: String| boot::BootError { code: boot::EXIT_CONFIG, message: m };
        let daemon_error = |m: String| boot::BootError { code: boot::EXIT_DAEMON, message: m };
        let timeout = Duration::from_secs(cli.timeout);
        let connect_daemon = || {
            wait_for_socket(cli.socket.as_deref(), timeout);
            connect(cli.socket.as_deref(), timeout, false)
        };
        match cmd {
            boot::BootCommand::Mount { config } => {
                let (config, plans) = checkpointd::plan::load(config).map_err(config_error)?;
                let machine = boot::Kernel::new(&config.metadata_dir, &mut log);
                if plans.is_empty() {
                    log("no checkpointed device configured: nothing to mount".into());
                    return Ok(());
                }
                let connection = connect_daemon().map_err(|e| daemon_error(e.to_string()))?;
                let service: &dyn ICheckpoint = connection.service();
                boot::mount_all(&plans, &service, &machine, &mut log)?;
            }
            boot::BootCommand::Teardown { config } => {
                let (config, plans) = checkpointd::plan::load(config).map_err(config_error)?;
                let machine = boot::Kernel::new(&config.metadata_dir, &mut log);
                boot::teardown_all(&plans, &machine, &mut log)?;
            }
            boot::BootCommand::Commit => {
                let connection = connect_daemon().map_err(|e| daemon_error(e.to_string()))?;
                connection.commit().map_err(|e| daemon_error(e.to_string()))?;
                log("boot declared good: commitChanges done".into());
            }
            boot::BootCommand::Status { config } => {
                let (config, plans) = checkpointd::plan::load(config).map_err(config_error)?;
                let machine = boot::Kernel::new(&config.metadata_dir, &mut log);
                for line in boot::status_lines(&plans, &machine) {
                    println!("{line}");
                }
                match connect_daemon() {
                    Ok(c) => match c.service().getStatus() {
                        Ok(s) => println!(
                            "daemon: {}, checkpointing {}, needs rollback {}",
                            state_name(s.state),
                            if s.isCheckpointing { "yes" } else { "no" },
                            if s.needsRollback { "yes" } else { "no" }
                        ),
                        Err(e) => return Err(daemon_error(binder_failure("getStatus", &e))),
                    },
                    Err(e) => return Err(daemon_error(e.to_string())),
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => boot::EXIT_OK,
        Err(e) => {
            eprintln!("checkpointctl boot: error: {}", e.message);
            e.code
        }
    }
}

fn run_own(cli: &Cli) -> Result<(), String> {
    let timeout = Duration::from_secs(cli.timeout);
    let watching = matches!(cli.command, Command::Watch { .. });
    let connection =
        connect(cli.socket.as_deref(), timeout, watching).map_err(|e| e.to_string())?;
    let service = connection.service();
    match &cli.command {
        Command::Status { json } => {
            let status = service.getStatus().map_err(|e| binder_failure("getStatus", &e))?;
            if *json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
        }
        Command::History { limit, json } => {
            let events =
                service.getHistory(*limit).map_err(|e| binder_failure("getHistory", &e))?;
            if *json {
                let all: Vec<_> = events.iter().map(event_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else if events.is_empty() {
                println!("no history");
            } else {
                for event in &events {
                    println!("{}", event_line(event));
                }
            }
        }
        Command::Estimate { trace, declared, mount_point, json } => {
            let trace = match trace {
                Some(path) => Some(
                    std::fs::File::open(path)
                        .map_err(|e| format!("cannot open the trace {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let options = EstimateOptions {
                trace,
                declared_bytes: declared.clone(),
                mount_point: mount_point.clone(),
            };
            let estimate = connection.estimate(options).map_err(|e| e.to_string())?;
            if *json {
                println!("{}", estimate_json(&estimate));
            } else {
                print_estimate(&estimate);
            }
        }
        Command::Reserve { bytes, json } => {
            let bytes = i64::try_from(*bytes)
                .map_err(|_| format!("{bytes} bytes is more than a reservation can hold"))?;
            let info = connection.reserve(bytes).map_err(|e| e.to_string())?;
            if *json {
                println!("{}", reservation_json(&info));
            } else {
                println!("reserved {}", reservation_line(&info));
            }
        }
        Command::Release => {
            connection.release().map_err(|e| e.to_string())?;
            println!("reservation released");
        }
        Command::Watch { count } => {
            let events = connection.subscribe().map_err(|e| e.to_string())?;
            eprintln!("watching checkpointd events (Ctrl-C to stop)");
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let event = events.recv().ok_or_else(|| "the listener stopped".to_owned())?;
                println!("{}", event_text(event));
                seen += 1;
            }
        }
        Command::Checkpoint { .. } | Command::Log { .. } | Command::Boot { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Checkpoint { args } => return ExitCode::from(run_checkpoint(&cli, args)),
        Command::Log { cmd } => return log::run(cmd.clone()),
        Command::Boot { cmd } => return ExitCode::from(run_boot(&cli, cmd)),
        _ => {}
    }
    match run_own(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("checkpointctl: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_formatted_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_798_502_400_123), "2026-12-29 00:00:00 UTC");
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        for (text, value) in [
            ("4096", 4096),
            ("0", 0),
            ("512M", 512 << 20),
            ("2g", 2 << 30),
            ("1GiB", 1 << 30),
            ("3KB", 3 << 10),
            ("1T", 1 << 40),
            ("7b", 7),
        ] {
            assert_eq!(parse_size(text), Ok(value), "{text}");
        }
        for text in ["", "-1", "M", "1.5G", "12Q", "1 G", "1Gx"] {
            let err = parse_size(text).expect_err(text);
            assert!(err.contains("is not a size"), "{text}: {err}");
        }
        assert!(parse_size("16777216T").expect_err("overflow").contains("2^64"));
    }

    #[test]
    fn estimate_against_actual_shows_the_share_used() {
        assert_eq!(
            estimate_vs_actual(200, 150),
            "estimated 200 bytes, actual 150 bytes (75% of the estimate)"
        );
        assert_eq!(estimate_vs_actual(-1, 150), "estimated -, actual 150 bytes");
        assert_eq!(estimate_vs_actual(200, -1), "estimated 200 bytes, actual -");
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn checkpoint_takes_raw_arguments() {
        let cli =
            Cli::try_parse_from(["checkpointctl", "checkpoint", "--wait", "startCheckpoint", "-1"])
                .expect("parses");
        match cli.command {
            Command::Checkpoint { args } => assert_eq!(args, ["--wait", "startCheckpoint", "-1"]),
            other => panic!("{other:?}"),
        }
    }
}
