//! Startup and the daemon's life: config → store → policy → one service object → transports,
//! then the health check and the signal wait on an explicit tokio runtime.

use std::sync::Arc;
use std::time::Duration;

use policy::{
    Backend, BootControl, Checkpointer, FileBootControl, NoBootControl, PolicyOptions,
    RollbackAction, Store,
};

use crate::backend::TestNullBackend;
use crate::config::{
    BackendType, BootControlKind, CheckpointMethod, Config, DeviceConfig, RollbackActionConfig,
};
use crate::listeners::Listeners;
use crate::reboot::Rebooter;
use crate::service::{CheckpointService, Daemon};
use crate::transport;

/// Why the daemon could not start or stopped with an error. `Display` is the whole story.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The fstab could not be read.
    #[error(transparent)]
    Fstab(#[from] crate::fstab::FstabError),
    /// The state store could not be opened (corrupt, from a newer version, locked, ...).
    #[error("cannot open the state store: {0}")]
    Store(#[from] policy::StoreError),
    /// The boot control could not be set up.
    #[error("cannot set up boot control ({path}): {source}")]
    BootControl {
        /// The record file.
        path: String,
        /// Why.
        #[source]
        source: policy::BootControlError,
    },
    /// The policy could not be set up.
    #[error("cannot set up the checkpoint policy: {0}")]
    Policy(#[from] policy::PolicyError),
    /// A transport could not be set up.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The runtime or a signal handler could not be set up.
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The devices to checkpoint: the config's, then the fstab's (without duplicates).
pub fn devices(config: &Config) -> Result<Vec<DeviceConfig>, StartError> {
    let mut devices = config.devices.clone();
    if let Some(fstab) = &config.fstab {
        for entry in crate::fstab::read_checkpoint_entries(fstab)? {
            if !devices.iter().any(|d| d.device == entry.device) {
                devices.push(entry);
            }
        }
    }
    Ok(devices)
}

fn boot_control(config: &Config) -> Result<Box<dyn BootControl>, StartError> {
    match config.boot_control.kind {
        BootControlKind::None => Ok(Box::new(NoBootControl)),
        BootControlKind::File => {
            let path = config.boot_control_file();
            let boot = FileBootControl::open_or_create(&path, config.boot_control.slots).map_err(
                |source| StartError::BootControl { path: path.display().to_string(), source },
            )?;
            Ok(Box::new(boot))
        }
        BootControlKind::Hal => {
            let uri = config.boot_hal_uri();
            let wait = Duration::from_secs(config.boot_control.wait_secs);
            let boot = bootctl_hal::HalBootControl::connect_uri(&uri, wait)
                .map_err(|e| StartError::BootControl { path: uri.to_string(), source: e.into() })?;
            Ok(Box::new(boot))
        }
    }
}

fn backends(config: &Config, devices: &[DeviceConfig]) -> Vec<Box<dyn Backend>> {
    let mut out: Vec<Box<dyn Backend>> = Vec::new();
    for backend in &config.backends {
        let name = config.backend_name(backend);
        match backend.backend_type {
            BackendType::TestNull => {
                log::warn!(
                    "backend `{name}` is test-null: it protects NO data (test configurations \
                     only); commit and rollback only move the state machine"
                );
                let covered = devices
                    .iter()
                    .filter(|d| d.checkpoint == backend.kind)
                    .map(|d| d.device.display().to_string())
                    .collect();
                out.push(Box::new(TestNullBackend::new(
                    name,
                    backend.kind,
                    backend.free_bytes,
                    covered,
                )));
            }
        }
    }
    for device in devices {
        let kind_covered = config.backends.iter().any(|b| b.kind == device.checkpoint);
        if !kind_covered {
            let what = match device.checkpoint {
                CheckpointMethod::Block => "block",
                CheckpointMethod::Fs => "file-system",
            };
            log::info!(
                "{} ({}) asks for a {what} checkpoint, but this build has no {what} backend yet",
                device.device.display(),
                device.mount_point.display()
            );
        }
    }
    if out.is_empty() {
        log::info!("no checkpoint backend configured: checkpoints are not supported");
    }
    out
}

fn policy_options(config: &Config) -> PolicyOptions {
    PolicyOptions {
        dont_commit: config.policy.dont_commit,
        default_retry: config.policy.default_retry,
        rollback_action: match config.policy.rollback_action {
            RollbackActionConfig::None => RollbackAction::None,
            RollbackActionConfig::SwitchToPreviousSlot => RollbackAction::SwitchToPreviousSlot,
        },
        min_free_bytes: config.policy.min_free_bytes,
    }
}

/// Opens the store and builds the policy and the service state from `config`.
pub fn build(config: &Config) -> Result<Arc<Daemon>, StartError> {
    let devices = devices(config)?;
    let store = Store::open(&config.metadata_dir)?;
    log::info!("state store {} (schema {})", store.path().display(), store.schema_version());
    let checkpointer = Checkpointer::new(
        store,
        boot_control(config)?,
        backends(config, &devices),
        policy_options(config),
    )?;
    Ok(Arc::new(Daemon::new(
        Arc::new(checkpointer),
        config.access.clone(),
        devices,
        Arc::new(Listeners::default()),
        Rebooter::new(config.reboot.clone()),
        config.restore.clone(),
    )))
}

/// vold's health daemon, simplified to its default (`commit_on_full`): while checkpointing,
/// every `interval` ask the backends for free space; when one runs low, listeners hear
/// `onLowSpace` (through the policy event) and the checkpoint is committed to keep the device
/// usable.
async fn health_check(daemon: Arc<Daemon>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let checkpointer = Arc::clone(daemon.checkpointer());
        if !checkpointer.is_checkpointing() {
            continue;
        }
        let daemon = Arc::clone(&daemon);
        let result = tokio::task::spawn_blocking(move || {
            let low = daemon.checkpointer().check_free_space()?;
            if let Some(first) = low.first() {
                log::warn!(
                    "Low space for checkpointing ({} has {} bytes free, minimum {}). Committing \
                     changes",
                    first.backend,
                    first.free_bytes,
                    first.min_free_bytes
                );
                daemon.checkpointer().commit_changes()?;
            }
            Ok::<(), policy::PolicyError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("health check: {e}"),
            Err(e) => log::error!("health check task failed: {e}"),
        }
    }
}

async fn wait_for_termination() -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: stopping"),
        _ = int.recv() => log::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), StartError> {
    let daemon = build(&config)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let events = daemon.checkpointer().subscribe();
        let listeners = daemon.listeners();
        tokio::task::spawn_blocking(move || listeners.forward_all(events));

        let binder = CheckpointService::new(Arc::clone(&daemon)).into_binder().as_binder();
        let _socket = match &config.socket.path {
            Some(path) => Some(transport::serve_socket(binder.clone(), path, &config.socket)?),
            None => None,
        };
        let _kernel = if config.binder.enabled {
            Some(transport::serve_kernel(binder, &config.binder)?)
        } else {
            None
        };
        if config.health_check_interval_secs > 0 {
            let interval = Duration::from_secs(config.health_check_interval_secs);
            tokio::spawn(health_check(Arc::clone(&daemon), interval));
        }
        log::info!("checkpointd ready");
        wait_for_termination().await
    })?;
    // Dropping the runtime does not wait for the blocking forwarder (it ends with the process).
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
