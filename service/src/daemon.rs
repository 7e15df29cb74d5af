//! Startup and the daemon's life: config → store → backends → policy → one service object →
//! transports, then the boot control HAL lookup, the health monitor (`monitor.rs`), readiness
//! and the signal wait on an explicit tokio runtime.
//!
//! Start order: the service is registered before anything waits for the boot control HAL
//! (`boot_hal.rs`), and readiness (`READY=1`) is sent once it is registered. Methods that need
//! no HAL answer at once; those that do wait for it, bounded by `boot_control.wait_secs`.

use std::sync::Arc;
use std::time::Duration;

use policy::{
    Backend, BootControl, Checkpointer, FileBootControl, NoBootControl, PolicyEvent, PolicyOptions,
    RollbackAction, Store,
};

use backends::records::Records;
use backends::reservation::Reservations;

use crate::backend::{Named, Resolved, TestNullBackend};
use crate::boot_hal::{BootHalGate, LazyBootControl, LazyHal};
use crate::config::{
    BackendType, BootControlKind, CheckpointMethod, Config, DeviceConfig, RollbackActionConfig,
};
use crate::listeners::Listeners;
use crate::notify;
use crate::plan;
use crate::reboot::Rebooter;
use crate::service::{CheckpointService, Daemon, SpacePlanning};
use crate::space::DeviceBackend;
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
    /// The devices could not be paired with their backends.
    #[error("invalid device/backend configuration: {0}")]
    Plan(String),
    /// A backend could not be set up.
    #[error("cannot set up backend {name}: {source}")]
    Backend {
        /// The backend object's name.
        name: String,
        /// Why.
        #[source]
        source: policy::BackendError,
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

/// The policy's boot control, and for the HAL the lookup to start once the service is
/// registered.
struct BootControlParts {
    boot: Box<dyn BootControl>,
    hal: Option<Arc<LazyHal>>,
}

fn boot_control(config: &Config) -> Result<BootControlParts, StartError> {
    match config.boot_control.kind {
        BootControlKind::None => Ok(BootControlParts { boot: Box::new(NoBootControl), hal: None }),
        BootControlKind::File => {
            let path = config.boot_control_file();
            let boot = FileBootControl::open_or_create(&path, config.boot_control.slots).map_err(
                |source| StartError::BootControl { path: path.display().to_string(), source },
            )?;
            Ok(BootControlParts { boot: Box::new(boot), hal: None })
        }
        BootControlKind::Hal => {
            let wait = Duration::from_secs(config.boot_control.wait_secs);
            let hal = LazyHal::new(config.boot_hal_uri(), wait);
            let boot = Box::new(LazyBootControl::new(Arc::clone(&hal)));
            Ok(BootControlParts { boot, hal: Some(hal) })
        }
        BootControlKind::UbootEnv | BootControlKind::Grubenv => {
            Ok(BootControlParts { boot: bootloader_env(&config.boot_control)?, hal: None })
        }
    }
}

/// `uboot-env` / `grubenv`: the booted slot from the kernel command line, then the env.
fn bootloader_env(
    config: &crate::config::BootControlConfig,
) -> Result<Box<dyn BootControl>, StartError> {
    let at = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| StartError::BootControl { path, source }
    };
    let booted = policy::kernel_cmdline_value(&config.cmdline_file, &config.cmdline_param)
        .map_err(at(&config.cmdline_file))?;
    if config.kind == BootControlKind::Grubenv {
        let boot =
            policy::GrubEnvBootControl::open(&config.grubenv_path, config.grub_scheme(), &booted)
                .map_err(at(&config.grubenv_path))?;
        return Ok(Box::new(boot));
    }
    let layout = config.uboot_env_layout()?;
    let path = layout.primary.path.clone();
    let boot = policy::UBootEnvBootControl::open(
        layout,
        Some(config.env_lock_file.clone()),
        config.uboot_scheme(),
        &booted,
    )
    .map_err(at(&path))?;
    Ok(Box::new(boot))
}

/// One backend object per (backend, covered device) of `plan`, with its records in the
/// metadata directory (`records`: opened when `plan` has a device); `test-null` is one object
/// over all its devices (it touches none).
fn backends(
    config: &Config,
    devices: &[DeviceConfig],
    plan: &[plan::DevicePlan],
    records: Option<&Records>,
) -> Result<Vec<Box<dyn Backend>>, StartError> {
    let mut out: Vec<Box<dyn Backend>> = Vec::new();
    for backend in &config.backends {
        let name = config.backend_name(backend);
        if let BackendType::TestNull(options) = &backend.backend {
            log::warn!(
                "backend `{name}` is test-null: it protects NO data (test configurations \
                 only); commit and rollback only move the state machine"
            );
            let covered = plan
                .iter()
                .filter(|p| p.backend == Resolved::TestNull(options.clone()))
                .filter(|p| p.name == name || p.name.starts_with(&format!("{name}@")))
                .map(|p| p.device.device.display().to_string())
                .collect();
            out.push(Box::new(TestNullBackend::new(
                name,
                options.kind.unwrap_or(CheckpointMethod::Block),
                options.free_bytes,
                covered,
            )));
            continue;
        }
        let mine: Vec<&plan::DevicePlan> = plan
            .iter()
            .filter(|p| p.name == name || p.name.starts_with(&format!("{name}@")))
            .collect();
        if mine.is_empty() {
            log::warn!(
                "backend `{name}` ({}) checkpoints no device: no [[device]] or fstab entry with \
                 checkpoint = \"{}\"",
                backend.backend.type_name(),
                backend.backend.method()
            );
        }
        for p in mine {
            if !p.reason.is_empty() {
                log::info!(
                    "backend `{}` for {}: {} ({})",
                    p.name,
                    p.spec.mount_point.display(),
                    p.backend.type_name(),
                    p.reason
                );
            }
            let records = records.ok_or_else(|| StartError::Backend {
                name: p.name.clone(),
                source: policy::BackendError::NotSetUp { backend: "records".into() },
            })?;
            let inner =
                crate::backend::daemon_backend(&p.backend, &p.spec, records, &config.restore)
                    .map_err(|source| StartError::Backend { name: p.name.clone(), source })?;
            out.push(Box::new(Named::new(p.name.clone(), p.reason.clone(), inner)));
        }
    }
    for device in devices {
        if config.backend_for(device).ok().flatten().is_none() {
            log::warn!(
                "{} ({}) asks for a {} checkpoint, but no backend of that kind is configured",
                device.device.display(),
                device.mount_point.display(),
                device.checkpoint
            );
        }
    }
    if out.is_empty() {
        log::info!("no checkpoint backend configured: checkpoints are not supported");
    }
    Ok(out)
}

fn policy_options(config: &Config) -> PolicyOptions {
    PolicyOptions {
        dont_commit: config.policy.dont_commit,
        default_retry: config.policy.default_retry,
        rollback_action: match config.policy.rollback_action {
            RollbackActionConfig::None => RollbackAction::None,
            RollbackActionConfig::SwitchToPreviousSlot => RollbackAction::SwitchToPreviousSlot,
        },
    }
}

/// What AIDL version 2's estimate, reservation and learning work on: each device with the
/// backend chosen for it, the monitor's action threshold as headroom, the reservation records.
fn space_planning(
    config: &Config,
    planned: Vec<plan::DevicePlan>,
    records: Option<Records>,
) -> SpacePlanning {
    SpacePlanning {
        devices: planned
            .into_iter()
            .map(|p| DeviceBackend {
                spec: p.spec,
                backend_name: p.name,
                backend: p.backend,
                reason: p.reason,
            })
            .collect(),
        headroom_bytes: config.monitor.action_free_bytes,
        reservations: records.map(Reservations::new),
    }
}

/// The daemon before it serves.
#[derive(Debug)]
pub struct Built {
    /// The service state.
    pub daemon: Arc<Daemon>,
    /// The boot control HAL (`boot_control.type = "hal"`), not yet looked up: [`run`] starts
    /// the lookup after registering the service.
    pub boot_hal: Option<Arc<LazyHal>>,
}

/// Opens the store and builds the policy and the service state from `config`. Nothing here
/// waits for another process.
pub fn build(config: &Config) -> Result<Built, StartError> {
    let devices = plan::devices(config)?;
    // The whole configuration (fstab devices included) is checked before the store creates
    // the metadata directory: a refused configuration leaves nothing behind.
    let planned = plan::plan(config, &devices).map_err(StartError::Plan)?;
    let store = Store::open(&config.metadata_dir)?;
    log::info!("state store {} (schema {})", store.path().display(), store.schema_version());
    let BootControlParts { boot, hal: boot_hal } = boot_control(config)?;
    // Opened once, for the backends and the reservations, and only when a device is checkpointed.
    let records = match planned.is_empty() {
        true => None,
        false => Some(
            Records::open(&config.metadata_dir)
                .map_err(|source| StartError::Backend { name: "backend records".into(), source })?,
        ),
    };
    let backends = backends(config, &devices, &planned, records.as_ref())?;
    let checkpointer = Checkpointer::new(store, boot, backends, policy_options(config))?;
    let gate = match &boot_hal {
        Some(hal) => {
            BootHalGate::new(Arc::clone(hal), Duration::from_secs(config.boot_control.wait_secs))
        }
        None => BootHalGate::default(),
    };
    let daemon = Daemon::new(
        Arc::new(checkpointer),
        config.access.clone(),
        devices,
        Arc::new(Listeners::new(config.listeners.clone())),
        Rebooter::new(config.reboot.clone()),
        config.restore.clone(),
    )
    .with_boot_hal(gate)
    .with_space(space_planning(config, planned, records));
    Ok(Built { daemon: Arc::new(daemon), boot_hal })
}

/// Gives the commit signal (`notify::checkpoint_committed`: the Android property, systemd's
/// status) for every commit the policy reports, whoever ran it (a caller, the monitor).
fn spawn_commit_signal(daemon: &Daemon) -> Result<(), StartError> {
    let events = daemon.checkpointer().subscribe();
    std::thread::Builder::new().name("commit-signal".into()).spawn(move || {
        for event in events {
            if matches!(event, PolicyEvent::Committed) {
                notify::checkpoint_committed();
            }
        }
    })?;
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment this exists: made before the service is
/// registered, so a stop right after READY=1 is a clean stop, not death by signal.
struct Termination {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Termination {
    fn catch() -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Termination {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => log::info!("SIGTERM: stopping"),
            _ = self.int.recv() => log::info!("SIGINT: stopping"),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), StartError> {
    let Built { daemon, boot_hal } = build(&config)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let termination = Termination::catch()?;
        let events = daemon.checkpointer().subscribe();
        let listeners = daemon.listeners();
        tokio::task::spawn_blocking(move || listeners.forward_all(events));
        spawn_commit_signal(&daemon)?;

        let binder = CheckpointService::new(Arc::clone(&daemon)).into_binder().as_binder();
        let _socket = match &config.socket.path {
            Some(path) => Some(transport::serve_socket(
                binder.clone(),
                path,
                &config.socket,
                &config.access.change_uids,
            )?),
            None => None,
        };
        let _kernel = if config.binder.enabled {
            Some(transport::serve_kernel(binder, &config.binder)?)
        } else {
            None
        };
        // Only now, with the service registered: the HAL may start after us (Android's
        // `early_hal` class starts at late-fs), and rsbinder binds a process to the first
        // binder driver it opens, which must be the one we serve on.
        if let Some(hal) = &boot_hal {
            hal.spawn_lookup()?;
        }
        if config.monitor.interval_ms > 0 {
            crate::monitor::spawn(Arc::clone(&daemon), config.monitor.clone())?;
        }
        log::info!("checkpointd ready");
        notify::sd_notify_logged("READY=1\nSTATUS=serving");
        termination.wait().await;
        notify::sd_notify_logged("STOPPING=1");
        Ok::<(), StartError>(())
    })?;
    // Dropping the runtime does not wait for the blocking forwarder (it ends with the process).
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
