//! checkpointd's configuration: one TOML file, one serde struct (docs/configuration.md).
//!
//! Every key has a documented default, unknown keys are refused, and [`Config::validate`]
//! names the offending key in its error.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/checkpointd/checkpointd.toml";

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder of the state store; it must not be rolled back (Android: under /metadata).
    pub metadata_dir: PathBuf,
    /// An Android fstab whose `checkpoint=block` / `checkpoint=fs` entries are checkpointed.
    pub fstab: Option<PathBuf>,
    /// Devices to checkpoint, in addition to those of `fstab`.
    #[serde(rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Checkpoint backends. None configured: checkpoints are not supported (as vold without
    /// any `checkpoint=` fstab flag).
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// The boot-attempt policy.
    pub policy: PolicyConfig,
    /// Boot control (slots).
    pub boot_control: BootControlConfig,
    /// Who may call the service.
    pub access: AccessConfig,
    /// Kernel binder transport.
    pub binder: BinderConfig,
    /// RPC-over-Unix-socket transport.
    pub socket: SocketConfig,
    /// What abortChanges (and a rollback slot switch) does to reboot.
    pub reboot: RebootConfig,
    /// How restoreCheckpoint uses memory and I/O.
    pub restore: RestoreConfig,
    /// Seconds between free-space checks while checkpointing (0 = never).
    pub health_check_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            metadata_dir: PathBuf::from("/metadata/checkpointd"),
            fstab: None,
            devices: Vec::new(),
            backends: Vec::new(),
            policy: PolicyConfig::default(),
            boot_control: BootControlConfig::default(),
            access: AccessConfig::default(),
            binder: BinderConfig::default(),
            socket: SocketConfig::default(),
            reboot: RebootConfig::default(),
            restore: RestoreConfig::default(),
            health_check_interval_secs: 1,
        }
    }
}

/// How a device is checkpointed (the fs_mgr flag `checkpoint=block|fs`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMethod {
    /// Block-level checkpoint (dm-bow, dm-snapshot).
    Block,
    /// File-system checkpoint (f2fs `checkpoint=disable`).
    Fs,
}

impl fmt::Display for CheckpointMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointMethod::Block => "block",
            CheckpointMethod::Fs => "fs",
        })
    }
}

/// One `[[device]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The raw block device (absolute path).
    pub device: PathBuf,
    /// Where it is mounted (absolute path).
    pub mount_point: PathBuf,
    /// `block` or `fs`.
    pub checkpoint: CheckpointMethod,
}

/// The backend types this build knows.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendType {
    /// A backend that protects no data: prepare and commit only move the state machine. For
    /// test configurations only (the daemon warns at start). Real backends: ROADMAP item 1.
    TestNull,
}

/// One `[[backend]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend type.
    #[serde(rename = "type")]
    pub backend_type: BackendType,
    /// Its name in status and history (default: the type).
    pub name: Option<String>,
    /// Which kind of checkpoint it stands for (`block` or `fs`; default `block`).
    #[serde(default = "default_backend_kind")]
    pub kind: CheckpointMethod,
    /// test-null only: the free backup space it reports, in bytes (default: unknown).
    pub free_bytes: Option<u64>,
}

fn default_backend_kind() -> CheckpointMethod {
    CheckpointMethod::Block
}

/// `[policy]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The retry count used when an update client asks for the default budget: 2 = three boot
    /// attempts, then rollback.
    pub default_retry: i32,
    /// Never commit (vold's persist.vold.dont_commit_checkpoint=1, for tests).
    pub dont_commit: bool,
    /// What to do when the budget is spent: `none` or `switch-to-previous-slot`.
    pub rollback_action: RollbackActionConfig,
    /// Below this much free backup space the health check reports low space (bytes).
    pub min_free_bytes: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            default_retry: 2,
            dont_commit: false,
            rollback_action: RollbackActionConfig::None,
            min_free_bytes: 100 * 1024 * 1024,
        }
    }
}

/// `policy.rollback_action`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackActionConfig {
    /// Only report needsRollback.
    None,
    /// Also make the previous slot active and reboot into it.
    SwitchToPreviousSlot,
}

/// `[boot_control]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootControlConfig {
    /// `none`, `file` or `hal`.
    #[serde(rename = "type")]
    pub kind: BootControlKind,
    /// The record file of the `file` boot control (default: `<metadata_dir>/bootctl`).
    pub file: Option<PathBuf>,
    /// Number of slots when the record file is created (2..=4).
    pub slots: u32,
    /// `hal`: the rsbinder URI of the IBootControl HAL (default: its default instance on kernel
    /// binder, through `binder.driver` if set).
    pub hal_uri: Option<String>,
    /// `hal`: seconds to wait for the HAL to be registered (at start and on reconnect).
    pub wait_secs: u64,
}

impl Default for BootControlConfig {
    fn default() -> Self {
        BootControlConfig {
            kind: BootControlKind::None,
            file: None,
            slots: 2,
            hal_uri: None,
            wait_secs: 10,
        }
    }
}

/// `boot_control.type`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BootControlKind {
    /// No boot control (non-A/B device): no slot is ever marked.
    None,
    /// The file-based bootloader record (Linux, the virtual device).
    File,
    /// Android's `android.hardware.boot.IBootControl` AIDL HAL (crate bootctl-hal).
    Hal,
}

/// `[access]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// UIDs allowed to change state (start, commit, abort, mark, prepare, restore, reset).
    pub change_uids: Vec<u32>,
    /// UIDs allowed to query; absent = anyone who can reach the service.
    pub query_uids: Option<Vec<u32>>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig { change_uids: vec![0, 1000], query_uids: None }
    }
}

/// `[binder]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BinderConfig {
    /// Serve on kernel binder and register with the service manager.
    pub enabled: bool,
    /// The binder device (default: rsbinder's choice, /dev/binderfs/binder else /dev/binder).
    pub driver: Option<PathBuf>,
    /// The service-manager name.
    pub service_name: String,
}

impl Default for BinderConfig {
    fn default() -> Self {
        BinderConfig {
            enabled: true,
            driver: None,
            service_name: checkpoint_aidl::SERVICE_NAME.to_owned(),
        }
    }
}

/// `[socket]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Serve binder RPC on this Unix socket (absent: no socket).
    pub path: Option<PathBuf>,
    /// Permission bits of the socket file (default 0o666: callers are checked per call by
    /// their peer credentials).
    pub mode: Option<u32>,
}

/// `[reboot]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RebootConfig {
    /// `none`, `command` or `android-powerctl`.
    pub action: RebootAction,
    /// For `command`: argv; `{reason}` in an argument is replaced by the reboot reason.
    pub command: Vec<String>,
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig { action: RebootAction::None, command: Vec::new() }
    }
}

/// `[restore]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    /// Saved copies kept in memory between validation and apply, in MiB (0: read them again).
    pub memory_budget_mib: u64,
    /// Reads or writes in flight while validating and applying (one thread each).
    pub queue_depth: u32,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        let defaults = bow::restore::RestoreOptions::default();
        RestoreConfig {
            memory_budget_mib: u64::try_from(defaults.memory_budget >> 20).unwrap_or(256),
            queue_depth: u32::try_from(defaults.queue_depth).unwrap_or(8),
        }
    }
}

impl RestoreConfig {
    /// The bow restore's options for a call with `limit` entries (0 = all).
    pub fn options(&self, limit: u64) -> bow::restore::RestoreOptions {
        bow::restore::RestoreOptions {
            limit: (limit > 0).then_some(limit),
            queue_depth: usize::try_from(self.queue_depth).unwrap_or(1),
            memory_budget: usize::try_from(self.memory_budget_mib << 20).unwrap_or(usize::MAX),
            ..Default::default()
        }
    }
}

/// `reboot.action`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RebootAction {
    /// Log the request only.
    None,
    /// Run `reboot.command`.
    Command,
    /// Android: set sys.powerctl to `reboot,<reason>` (as vold's android_reboot).
    AndroidPowerctl,
}

/// A configuration error; `Display` names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (serde names the key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with the key and position.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: key `{key}`: {message}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

fn check_absolute(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(key, format!("must be an absolute path, got {}", path.display())))
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Config::parse(&text)
            .map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no validation). The error is the TOML error text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_absolute("metadata_dir", &self.metadata_dir)?;
        if let Some(fstab) = &self.fstab {
            check_absolute("fstab", fstab)?;
        }
        for (i, device) in self.devices.iter().enumerate() {
            check_absolute(&format!("device[{i}].device"), &device.device)?;
            check_absolute(&format!("device[{i}].mount_point"), &device.mount_point)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, backend) in self.backends.iter().enumerate() {
            let name = self.backend_name(backend);
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(invalid(format!("backend[{i}].name"), "must be one non-empty word"));
            }
            if !names.insert(name.to_owned()) {
                return Err(invalid(
                    format!("backend[{i}].name"),
                    format!("`{name}` is used by two backends"),
                ));
            }
        }
        if self.policy.default_retry < -1 {
            return Err(invalid(
                "policy.default_retry",
                format!("must be -1 or more, got {}", self.policy.default_retry),
            ));
        }
        if !(2..=4).contains(&self.boot_control.slots) {
            return Err(invalid(
                "boot_control.slots",
                format!("must be 2, 3 or 4, got {}", self.boot_control.slots),
            ));
        }
        if let Some(file) = &self.boot_control.file {
            check_absolute("boot_control.file", file)?;
        }
        if let Some(uri) = &self.boot_control.hal_uri {
            let parsed = rsbinder::Uri::parse(uri)
                .map_err(|e| invalid("boot_control.hal_uri", format!("`{uri}`: {e}")))?;
            if parsed.service().is_none() {
                return Err(invalid(
                    "boot_control.hal_uri",
                    format!("`{uri}` names no service (add `#{}`)", bootctl_hal::INSTANCE),
                ));
            }
        }
        if self.policy.rollback_action == RollbackActionConfig::SwitchToPreviousSlot
            && self.boot_control.kind == BootControlKind::None
        {
            return Err(invalid(
                "policy.rollback_action",
                "switch-to-previous-slot needs a boot control (boot_control.type = \"file\")",
            ));
        }
        if self.access.change_uids.is_empty() {
            return Err(invalid("access.change_uids", "must allow at least one UID"));
        }
        if self.binder.service_name.is_empty() {
            return Err(invalid("binder.service_name", "must not be empty"));
        }
        if let Some(driver) = &self.binder.driver {
            check_absolute("binder.driver", driver)?;
        }
        if let Some(path) = &self.socket.path {
            check_absolute("socket.path", path)?;
        }
        if let Some(mode) = self.socket.mode {
            if mode > 0o777 {
                return Err(invalid(
                    "socket.mode",
                    format!("must be at most 0o777, got {mode:#o}"),
                ));
            }
        }
        if !self.binder.enabled && self.socket.path.is_none() {
            return Err(invalid(
                "binder.enabled",
                "is false and socket.path is not set: the service would be unreachable",
            ));
        }
        if !(1..=64).contains(&self.restore.queue_depth) {
            return Err(invalid("restore.queue_depth", "must be 1..=64"));
        }
        if self.restore.memory_budget_mib > 1 << 20 {
            return Err(invalid("restore.memory_budget_mib", "must be at most 1048576 (1 TiB)"));
        }
        match self.reboot.action {
            RebootAction::Command if self.reboot.command.is_empty() => {
                return Err(invalid("reboot.command", "must name a program for action `command`"))
            }
            RebootAction::AndroidPowerctl if !cfg!(target_os = "android") => {
                return Err(invalid("reboot.action", "android-powerctl works only on Android"))
            }
            _ => {}
        }
        Ok(())
    }

    /// A backend's name (its `name`, or its type).
    pub fn backend_name<'a>(&self, backend: &'a BackendConfig) -> &'a str {
        backend.name.as_deref().unwrap_or(match backend.backend_type {
            BackendType::TestNull => "test-null",
        })
    }

    /// The URI of the boot control HAL.
    pub fn boot_hal_uri(&self) -> rsbinder::Uri {
        if let Some(uri) =
            self.boot_control.hal_uri.as_deref().and_then(|u| rsbinder::Uri::parse(u).ok())
        {
            return uri;
        }
        let mut endpoint = rsbinder::entry::KernelEndpoint::default();
        if let Some(driver) = &self.binder.driver {
            endpoint = endpoint.with_driver(driver);
        }
        rsbinder::Uri::new(rsbinder::Endpoint::Kernel(endpoint)).with_service(bootctl_hal::INSTANCE)
    }

    /// The boot-control record file.
    pub fn boot_control_file(&self) -> PathBuf {
        self.boot_control
            .file
            .clone()
            .unwrap_or_else(|| self.metadata_dir.join(policy::FileBootControl::DEFAULT_FILE_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_text(text: &str) -> Result<Config, String> {
        let config = Config::parse(text)?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = validate_text("").expect("valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.policy.default_retry, 2);
        assert_eq!(config.access.change_uids, vec![0, 1000]);
        assert_eq!(config.metadata_dir, PathBuf::from("/metadata/checkpointd"));
    }

    #[test]
    fn full_example_parses() {
        let config = validate_text(
            r#"
            metadata_dir = "/var/lib/checkpointd"
            fstab = "/etc/fstab.device"
            health_check_interval_secs = 5
            [[device]]
            device = "/dev/vdb"
            mount_point = "/data"
            checkpoint = "block"
            [[backend]]
            type = "test-null"
            kind = "fs"
            free_bytes = 1000
            [policy]
            default_retry = -1
            dont_commit = true
            rollback_action = "switch-to-previous-slot"
            [boot_control]
            type = "file"
            slots = 2
            [access]
            change_uids = [0]
            query_uids = [0, 2000]
            [binder]
            enabled = false
            [socket]
            path = "/run/checkpointd.sock"
            mode = 0o660
            [reboot]
            action = "command"
            command = ["systemctl", "reboot", "--reboot-argument={reason}"]
            "#,
        )
        .expect("valid");
        assert_eq!(config.devices[0].checkpoint, CheckpointMethod::Block);
        assert_eq!(config.backends[0].kind, CheckpointMethod::Fs);
        assert_eq!(config.socket.mode, Some(0o660));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = validate_text("metadata_dri = \"/x\"").unwrap_err();
        assert!(err.contains("metadata_dri"), "{err}");
        let err = validate_text("[policy]\nretry = 3").unwrap_err();
        assert!(err.contains("retry"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = validate_text("[policy]\ndefault_retry = \"three\"").unwrap_err();
        assert!(err.contains("default_retry"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (text, key) in [
            ("metadata_dir = \"relative\"", "metadata_dir"),
            ("[policy]\ndefault_retry = -2", "policy.default_retry"),
            ("[boot_control]\nslots = 9", "boot_control.slots"),
            ("[boot_control]\ntype = \"hal\"\nhal_uri = \"nonsense\"", "boot_control.hal_uri"),
            ("[boot_control]\ntype = \"hal\"\nhal_uri = \"binder://\"", "boot_control.hal_uri"),
            ("[access]\nchange_uids = []", "access.change_uids"),
            ("[socket]\npath = \"x.sock\"", "socket.path"),
            ("[socket]\nmode = 4095", "socket.mode"),
            ("[binder]\nenabled = false", "binder.enabled"),
            ("[reboot]\naction = \"command\"", "reboot.command"),
            ("[restore]\nqueue_depth = 0", "restore.queue_depth"),
            ("[restore]\nmemory_budget_mib = 2000000", "restore.memory_budget_mib"),
            ("[policy]\nrollback_action = \"switch-to-previous-slot\"", "policy.rollback_action"),
            (
                "[[backend]]\ntype = \"test-null\"\n[[backend]]\ntype = \"test-null\"",
                "backend[1].name",
            ),
            (
                "[[device]]\ndevice = \"vdb\"\nmount_point = \"/data\"\ncheckpoint = \"fs\"",
                "device[0].device",
            ),
        ] {
            let err = validate_text(text).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_enum_value_is_refused() {
        let err = validate_text("[[backend]]\ntype = \"bow\"").unwrap_err();
        assert!(err.contains("bow") && err.contains("type"), "{err}");
    }

    #[test]
    fn restore_section_sets_the_restore_options() {
        let config = validate_text("[restore]\nmemory_budget_mib = 3\nqueue_depth = 2").unwrap();
        let opts = config.restore.options(5);
        assert_eq!(opts.memory_budget, 3 << 20);
        assert_eq!(opts.queue_depth, 2);
        assert_eq!(opts.limit, Some(5));
        assert_eq!(config.restore.options(0).limit, None);
        let defaults = Config::default().restore.options(0);
        assert_eq!(defaults.memory_budget, bow::restore::RestoreOptions::default().memory_budget);
    }
}
