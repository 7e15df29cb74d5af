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
    /// Registered listeners.
    pub listeners: ListenersConfig,
    /// What abortChanges (and a rollback slot switch) does to reboot.
    pub reboot: RebootConfig,
    /// How restoreCheckpoint uses memory and I/O.
    pub restore: RestoreConfig,
    /// The health monitor (backup space while checkpointing).
    pub monitor: MonitorConfig,
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
            listeners: ListenersConfig::default(),
            reboot: RebootConfig::default(),
            restore: RestoreConfig::default(),
            monitor: MonitorConfig::default(),
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
    /// Filesystem type for the boot flow's mount (`ext4`, `f2fs`); absent: the kernel probes.
    #[serde(default)]
    pub fs_type: Option<String>,
    /// Extra mount options (comma-separated, as fstab's fourth field); default none.
    #[serde(default)]
    pub mount_options: String,
    /// The `[[backend]]` (by name) that checkpoints this device; default: the only backend
    /// for its `checkpoint` method.
    #[serde(default)]
    pub backend: Option<String>,
}

/// The options of a `test-null` backend.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TestNullOptions {
    /// Which kind of checkpoint it stands for (`block` or `fs`; default `block`).
    pub kind: Option<CheckpointMethod>,
    /// The free backup space it reports, in bytes (default: unknown).
    pub free_bytes: Option<u64>,
}

/// A backend type with its options: `[[backend]] type = "..."` plus that type's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendType {
    /// Android's dm-bow (`type = "bow"`).
    Bow(backends::bow::BowOptions),
    /// dm-snapshot with a COW file on the filesystem (`type = "snapshot"`).
    Snapshot(backends::snapshot::SnapshotOptions),
    /// f2fs `checkpoint=disable` (`type = "f2fs"`).
    F2fs(backends::f2fs::F2fsOptions),
    /// The userspace backup-on-write engine over ublk (`type = "userspace-bow"`).
    UserspaceBow(backends::userspace_bow::UserspaceBowOptions),
    /// dm-bow where the kernel has it, else userspace-bow where it has ublk, else dm-snapshot
    /// (`type = "auto"`).
    Auto(backends::select::AutoOptions),
    /// A backend that protects no data: prepare and commit only move the state machine. For
    /// test configurations only (the daemon warns at start).
    TestNull(TestNullOptions),
}

impl BackendType {
    /// The word of its `type` key.
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendType::Bow(_) => "bow",
            BackendType::Snapshot(_) => "snapshot",
            BackendType::F2fs(_) => "f2fs",
            BackendType::UserspaceBow(_) => "userspace-bow",
            BackendType::Auto(_) => "auto",
            BackendType::TestNull(_) => "test-null",
        }
    }

    /// The devices it checkpoints: `checkpoint = "block"` for bow, snapshot and auto, `"fs"`
    /// for f2fs, test-null's `kind`.
    pub fn method(&self) -> CheckpointMethod {
        match self {
            BackendType::Bow(_)
            | BackendType::Snapshot(_)
            | BackendType::UserspaceBow(_)
            | BackendType::Auto(_) => CheckpointMethod::Block,
            BackendType::F2fs(_) => CheckpointMethod::Fs,
            BackendType::TestNull(o) => o.kind.unwrap_or(CheckpointMethod::Block),
        }
    }
}

/// One `[[backend]]` entry: `type`, an optional `name`, and the keys of that type (flat, in
/// the same table). Unknown keys are refused with the type's list of known keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Its name in status and history (default: the type).
    pub name: Option<String>,
    /// The type and its options.
    pub backend: BackendType,
}

/// The `type` words, for the error of an unknown one.
const BACKEND_TYPES: &[&str] = &["bow", "snapshot", "f2fs", "userspace-bow", "auto", "test-null"];

impl<'de> Deserialize<'de> for BackendConfig {
    /// serde's internally tagged enums cannot refuse unknown keys of a variant that embeds
    /// another struct (`flatten` turns `deny_unknown_fields` off), so the table is split by
    /// hand: `type` and `name` are taken out, and the rest goes to the type's own options
    /// struct, whose `deny_unknown_fields` names any stray key.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(deserializer)?;
        let type_name = match table.remove("type") {
            Some(toml::Value::String(t)) => t,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "key `type`: expected a string, found {}",
                    other.type_str()
                )))
            }
            None => return Err(D::Error::missing_field("type")),
        };
        let name = match table.remove("name") {
            Some(toml::Value::String(n)) => Some(n),
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "key `name`: expected a string, found {}",
                    other.type_str()
                )))
            }
            None => None,
        };
        fn options<T: serde::de::DeserializeOwned, E: Error>(
            type_name: &str,
            table: toml::Table,
        ) -> Result<T, E> {
            T::deserialize(toml::Value::Table(table))
                .map_err(|e| E::custom(format!("backend type `{type_name}`: {e}")))
        }
        let backend = match type_name.as_str() {
            "bow" => BackendType::Bow(options(&type_name, table)?),
            "snapshot" => BackendType::Snapshot(options(&type_name, table)?),
            "f2fs" => BackendType::F2fs(options(&type_name, table)?),
            "userspace-bow" => BackendType::UserspaceBow(options(&type_name, table)?),
            "auto" => BackendType::Auto(options(&type_name, table)?),
            "test-null" => BackendType::TestNull(options(&type_name, table)?),
            other => return Err(D::Error::unknown_variant(other, BACKEND_TYPES)),
        };
        Ok(BackendConfig { name, backend })
    }
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            default_retry: 2,
            dont_commit: false,
            rollback_action: RollbackActionConfig::None,
        }
    }
}

/// `[monitor]`: the health monitor (docs/configuration.md has the sizing argument).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Milliseconds between polls of the backends' free backup space while checkpointing
    /// (0 = no monitor).
    pub interval_ms: u64,
    /// Below this much free backup space: one warning (history, listeners).
    pub warn_free_bytes: u64,
    /// Below this much: grow the backup area if the backend can, else the `action` (vold's
    /// `ro.sys.cp_min_free_bytes`).
    pub action_free_bytes: u64,
    /// `commit` (vold's `commit_on_full`) or `abort-and-reboot`.
    pub action: LowSpaceActionConfig,
    /// The fastest the device writes, for the sizing check: `interval_ms` of writes at this
    /// rate must fit in `action_free_bytes`.
    pub max_write_bytes_per_sec: u64,
    /// After a failed attempt, wait this long before the next one; doubled per failure.
    pub backoff_initial_ms: u64,
    /// The longest wait between attempts.
    pub backoff_max_ms: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval_ms: 500,
            warn_free_bytes: 256 << 20,
            action_free_bytes: 100 << 20,
            action: LowSpaceActionConfig::Commit,
            max_write_bytes_per_sec: 100 << 20,
            backoff_initial_ms: 1000,
            backoff_max_ms: 300_000,
        }
    }
}

/// `monitor.action`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LowSpaceActionConfig {
    /// Commit the checkpoint (vold's default, `ro.sys.cp_commit_on_full`): the device stays
    /// usable, the rollback is given up.
    Commit,
    /// `abortChanges("checkpoint,low_space", retry=false)` and reboot: the next boot rolls
    /// back.
    AbortAndReboot,
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
    /// `none`, `file`, `hal`, `uboot-env` or `grubenv`.
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
    /// `uboot-env`: the file or block device holding the environment (fw_env.config's first
    /// column). Required.
    pub env_path: Option<PathBuf>,
    /// `uboot-env`: byte offset of the environment in `env_path`.
    pub env_offset: u64,
    /// `uboot-env`: bytes per copy, U-Boot's `CONFIG_ENV_SIZE`. Required.
    pub env_size: Option<u64>,
    /// `uboot-env`: the second copy of a redundant environment: its file or device (default
    /// `env_path`). The environment is redundant when this or `env_redundant_offset` is set.
    pub env_redundant_path: Option<PathBuf>,
    /// `uboot-env`: byte offset of the second copy.
    pub env_redundant_offset: Option<u64>,
    /// `uboot-env`: the CRC is stored big endian (a big-endian target, `mkenvimage -b`).
    pub env_crc_big_endian: bool,
    /// `uboot-env`: the lock file shared with `fw_printenv` / `fw_setenv`.
    pub env_lock_file: PathBuf,
    /// `uboot-env`: the variable naming the slot U-Boot boots.
    pub slot_var: String,
    /// `uboot-env`, `grubenv`: the environment's names of slot 0, 1, … (default `a`, `b` for
    /// `uboot-env`, `A`, `B` for `grubenv`).
    pub slot_names: Option<Vec<String>>,
    /// `uboot-env` (`bootlimit`), `grubenv` (`<slot>_LEFT`): boots a slot made active gets.
    pub tries: u32,
    /// `grubenv`: GRUB's environment block.
    pub grubenv_path: PathBuf,
    /// `uboot-env`, `grubenv`: the kernel command line parameter the boot script sets to the
    /// slot it booted.
    pub cmdline_param: String,
    /// `uboot-env`, `grubenv`: the file that parameter is read from.
    pub cmdline_file: PathBuf,
}

impl Default for BootControlConfig {
    fn default() -> Self {
        BootControlConfig {
            kind: BootControlKind::None,
            file: None,
            slots: 2,
            hal_uri: None,
            wait_secs: 10,
            env_path: None,
            env_offset: 0,
            env_size: None,
            env_redundant_path: None,
            env_redundant_offset: None,
            env_crc_big_endian: false,
            env_lock_file: PathBuf::from(policy::FW_ENV_LOCK_FILE),
            slot_var: policy::UBootAbScheme::default().slot_var,
            slot_names: None,
            tries: 3,
            grubenv_path: PathBuf::from("/boot/grub/grubenv"),
            cmdline_param: "checkpointd.slot".to_string(),
            cmdline_file: PathBuf::from(policy::PROC_CMDLINE),
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
    /// U-Boot's environment and boot-count feature (`policy::UBootEnvBootControl`).
    UbootEnv,
    /// GRUB's `grubenv` block (`policy::GrubEnvBootControl`).
    Grubenv,
}

/// Largest `boot_control.env_size` accepted (U-Boot environments are KiB, not MiB).
const MAX_ENV_SIZE: u64 = 16 << 20;

/// An A/B scheme setting the policy refuses, as the config key that holds it.
fn scheme_error(error: &policy::BootControlError) -> ConfigError {
    let key = match error {
        policy::BootControlError::BadScheme { setting, .. } => match setting {
            policy::SchemeSetting::SlotVariable => "boot_control.slot_var",
            policy::SchemeSetting::SlotNames => "boot_control.slot_names",
            policy::SchemeSetting::Tries => "boot_control.tries",
        },
        _ => "boot_control",
    };
    invalid(key, error.to_string())
}

impl BootControlConfig {
    /// The `uboot-env` and `grubenv` keys; the others are checked in [`Config::validate`].
    fn validate_boot_env(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("boot_control.{k}");
        match self.kind {
            BootControlKind::UbootEnv => {
                let layout = self.uboot_env_layout()?;
                check_absolute(&key("env_path"), &layout.primary.path)?;
                if let Some(second) = &layout.redundant {
                    check_absolute(&key("env_redundant_path"), &second.path)?;
                    let size = self.env_size.unwrap_or(0);
                    let overlap = second.path == layout.primary.path
                        && second.offset < layout.primary.offset.saturating_add(size)
                        && layout.primary.offset < second.offset.saturating_add(size);
                    if overlap {
                        return Err(invalid(
                            key("env_redundant_offset"),
                            format!(
                                "the copies overlap ({:#x} and {:#x}, {size:#x} bytes each)",
                                layout.primary.offset, second.offset
                            ),
                        ));
                    }
                }
                check_absolute(&key("env_lock_file"), &self.env_lock_file)?;
                if let Some(names) = self.slot_names.as_ref().filter(|n| n.len() != 2) {
                    return Err(invalid(
                        key("slot_names"),
                        format!("\"uboot-env\" has exactly two slots, got {names:?}"),
                    ));
                }
                self.uboot_scheme().check().map_err(|e| scheme_error(&e))?;
            }
            BootControlKind::Grubenv => {
                check_absolute(&key("grubenv_path"), &self.grubenv_path)?;
                self.grub_scheme().check().map_err(|e| scheme_error(&e))?;
            }
            BootControlKind::None | BootControlKind::File | BootControlKind::Hal => return Ok(()),
        }
        if self.cmdline_param.is_empty() || self.cmdline_param.contains(['=', ' ']) {
            return Err(invalid(key("cmdline_param"), "must be one word without '='"));
        }
        check_absolute(&key("cmdline_file"), &self.cmdline_file)
    }

    /// `uboot-env`: where the environment lives; `env_path` and `env_size` are required.
    pub fn uboot_env_layout(&self) -> Result<policy::UBootEnvLayout, ConfigError> {
        let path = self
            .env_path
            .clone()
            .ok_or_else(|| invalid("boot_control.env_path", "required for type \"uboot-env\""))?;
        let size = self.env_size.ok_or_else(|| {
            invalid("boot_control.env_size", "required for type \"uboot-env\" (CONFIG_ENV_SIZE)")
        })?;
        let size = usize::try_from(size).ok().filter(|_| (16..=MAX_ENV_SIZE).contains(&size));
        let size = size.ok_or_else(|| {
            invalid(
                "boot_control.env_size",
                format!("must be 16 to {MAX_ENV_SIZE} bytes, got {:?}", self.env_size),
            )
        })?;
        let redundant = (self.env_redundant_path.is_some() || self.env_redundant_offset.is_some())
            .then(|| policy::EnvLocation {
                path: self.env_redundant_path.clone().unwrap_or_else(|| path.clone()),
                offset: self.env_redundant_offset.unwrap_or(0),
            });
        Ok(policy::UBootEnvLayout {
            primary: policy::EnvLocation { path, offset: self.env_offset },
            redundant,
            size,
            crc_byte_order: if self.env_crc_big_endian {
                policy::CrcByteOrder::Big
            } else {
                policy::CrcByteOrder::Little
            },
        })
    }

    /// `uboot-env`: the A/B variable scheme.
    pub fn uboot_scheme(&self) -> policy::UBootAbScheme {
        let mut scheme = policy::UBootAbScheme {
            slot_var: self.slot_var.clone(),
            boot_limit: self.tries,
            ..policy::UBootAbScheme::default()
        };
        match self.slot_names.as_deref() {
            Some([a, b]) => scheme.slot_values = [a.clone(), b.clone()],
            // Not two names: an empty pair, refused by check() with the values shown.
            Some(_) => scheme.slot_values = [String::new(), String::new()],
            None => {}
        }
        scheme
    }

    /// `grubenv`: the A/B variable scheme.
    pub fn grub_scheme(&self) -> policy::GrubAbScheme {
        let default = policy::GrubAbScheme::default();
        policy::GrubAbScheme {
            slot_names: self.slot_names.clone().unwrap_or(default.slot_names),
            tries: self.tries,
        }
    }
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

/// `[socket]`. The session limits keep an unprivileged local user from locking state-changing
/// callers out (docs/limits.md, "Hostile clients: sessions and listeners"); a session here is
/// one connection (a client with callbacks, such as `checkpointctl watch`, holds two).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Serve binder RPC on this Unix socket (absent: no socket).
    pub path: Option<PathBuf>,
    /// Permission bits of the socket file (default 0o666: callers are checked per call by
    /// their peer credentials).
    pub mode: Option<u32>,
    /// Connections served at once, all UIDs together (each costs one fd, and up to two
    /// threads: rsbinder's worker and reaper).
    pub max_sessions: usize,
    /// Connections one UID outside `access.change_uids` may hold at once.
    pub max_sessions_per_uid: usize,
    /// Of `max_sessions`, how many only `access.change_uids` may use.
    pub reserved_sessions: usize,
    /// A connection must finish the RPC handshake within this (ms).
    pub handshake_timeout_ms: u64,
    /// A connection that has made no call this long after its handshake is closed (ms).
    pub first_call_timeout_ms: u64,
    /// A send to a peer that does not read (a reply, a listener event) fails after this (ms).
    pub write_timeout_ms: u64,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: None,
            mode: None,
            max_sessions: 256,
            max_sessions_per_uid: 32,
            reserved_sessions: 32,
            handshake_timeout_ms: 5_000,
            first_call_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
        }
    }
}

/// `[listeners]`: registered ICheckpointListener callbacks.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    /// Listeners registered at once, all UIDs together.
    pub max: usize,
    /// Listeners one UID may register.
    pub max_per_uid: usize,
    /// Events queued for one listener; a listener that falls further behind is dropped.
    pub queue: usize,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig { max: 256, max_per_uid: 16, queue: 64 }
    }
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

/// The backend options' own checks (the backends crate's `validate`, whose messages start
/// with `<key> = <value>:`), with the error under the dotted key of this entry.
fn validate_backend_options(i: usize, backend: &BackendType) -> Result<(), ConfigError> {
    let named = |result: Result<(), String>| {
        result.map_err(|message| {
            let key = message.split(" = ").next().filter(|k| !k.contains(' ')).unwrap_or("type");
            invalid(format!("backend[{i}].{key}"), message.clone())
        })
    };
    match backend {
        BackendType::Bow(o) => named(o.validate()),
        BackendType::Snapshot(o) => named(o.validate()),
        BackendType::F2fs(o) => named(o.validate()),
        BackendType::UserspaceBow(o) => named(o.validate()),
        BackendType::Auto(o) => named(o.validate()),
        BackendType::TestNull(_) => Ok(()),
    }
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

/// The longest socket path: a Unix socket address holds 108 bytes (`sun_path`), with the
/// terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The longest metadata directory: its files' paths (the longest is the store's write-ahead
/// log, `/checkpointd.db-wal`, and the marker `/checkpointd.db.created`) must fit PATH_MAX
/// (4096, with the NUL). Room is left for the backends' records.
pub const MAX_METADATA_DIR_BYTES: usize = 3072;

fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(invalid(
            "socket.path",
            format!(
                "is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH_BYTES} \
                 bytes (sun_path)"
            ),
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid("socket.path", "must not contain a NUL byte"));
    }
    Ok(())
}

fn check_metadata_dir(path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_METADATA_DIR_BYTES {
        return Err(invalid(
            "metadata_dir",
            format!("is {len} bytes long, more than the {MAX_METADATA_DIR_BYTES} allowed"),
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid("metadata_dir", "must not contain a NUL byte"));
    }
    Ok(())
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
        check_metadata_dir(&self.metadata_dir)?;
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
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                return Err(invalid(
                    format!("backend[{i}].name"),
                    format!("`{name}`: must be one word of [A-Za-z0-9_-]"),
                ));
            }
            if !names.insert(name.to_owned()) {
                return Err(invalid(
                    format!("backend[{i}].name"),
                    format!("`{name}` is used by two backends"),
                ));
            }
            validate_backend_options(i, &backend.backend)?;
        }
        for (i, device) in self.devices.iter().enumerate() {
            self.backend_for(device).map_err(|m| {
                let key = if device.backend.is_some() { "backend" } else { "checkpoint" };
                invalid(format!("device[{i}].{key}"), m)
            })?;
            if let Some(fs) = &device.fs_type {
                if fs.is_empty() || fs.contains([',', ' ']) {
                    return Err(invalid(format!("device[{i}].fs_type"), "must be one word"));
                }
            }
            if device.mount_options.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("device[{i}].mount_options"),
                    "comma-separated, without white space",
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
        self.boot_control.validate_boot_env()?;
        if self.policy.rollback_action == RollbackActionConfig::SwitchToPreviousSlot
            && self.boot_control.kind == BootControlKind::None
        {
            return Err(invalid(
                "policy.rollback_action",
                "switch-to-previous-slot needs a boot control (boot_control.type other than \"none\")",
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
            check_socket_path(path)?;
        }
        if let Some(mode) = self.socket.mode {
            if mode > 0o777 {
                return Err(invalid(
                    "socket.mode",
                    format!("must be at most 0o777, got {mode:#o}"),
                ));
            }
        }
        self.validate_socket_limits()?;
        if !self.binder.enabled && self.socket.path.is_none() {
            return Err(invalid(
                "binder.enabled",
                "is false and socket.path is not set: the service would be unreachable",
            ));
        }
        self.validate_monitor()?;
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
        backend.name.as_deref().unwrap_or(backend.backend.type_name())
    }

    /// The backend that checkpoints `device`: the one its `backend` key names, else the only
    /// backend for its `checkpoint` method. `Ok(None)`: no backend is configured for that
    /// method (the device is listed, not checkpointed). The error says why it is ambiguous or
    /// wrong.
    pub fn backend_for(&self, device: &DeviceConfig) -> Result<Option<&BackendConfig>, String> {
        if let Some(wanted) = &device.backend {
            let backend = self
                .backends
                .iter()
                .find(|b| self.backend_name(b) == wanted)
                .ok_or_else(|| format!("no [[backend]] is called `{wanted}`"))?;
            if backend.backend.method() != device.checkpoint {
                return Err(format!(
                    "backend `{wanted}` ({}) checkpoints `{}` devices, this one is `{}`",
                    backend.backend.type_name(),
                    backend.backend.method(),
                    device.checkpoint
                ));
            }
            return Ok(Some(backend));
        }
        let mut matching = self.backends.iter().filter(|b| b.backend.method() == device.checkpoint);
        let first = matching.next();
        if first.is_some() && matching.next().is_some() {
            return Err(format!(
                "several backends checkpoint `{}` devices: name one with `backend = \"<name>\"`",
                device.checkpoint
            ));
        }
        Ok(first)
    }

    fn validate_socket_limits(&self) -> Result<(), ConfigError> {
        let socket = &self.socket;
        if socket.max_sessions == 0 {
            return Err(invalid("socket.max_sessions", "must be at least 1"));
        }
        if socket.reserved_sessions >= socket.max_sessions {
            return Err(invalid(
                "socket.reserved_sessions",
                format!("must be less than socket.max_sessions ({})", socket.max_sessions),
            ));
        }
        if socket.max_sessions_per_uid == 0 {
            return Err(invalid("socket.max_sessions_per_uid", "must be at least 1"));
        }
        for (key, ms) in [
            ("socket.handshake_timeout_ms", socket.handshake_timeout_ms),
            ("socket.first_call_timeout_ms", socket.first_call_timeout_ms),
            ("socket.write_timeout_ms", socket.write_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let listeners = &self.listeners;
        for (key, n) in [
            ("listeners.max", listeners.max),
            ("listeners.max_per_uid", listeners.max_per_uid),
            ("listeners.queue", listeners.queue),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }

    fn validate_monitor(&self) -> Result<(), ConfigError> {
        let m = &self.monitor;
        if m.interval_ms == 0 {
            return Ok(());
        }
        if m.interval_ms > 60_000 {
            return Err(invalid("monitor.interval_ms", "must be at most 60000 (or 0 = off)"));
        }
        if m.warn_free_bytes < m.action_free_bytes {
            return Err(invalid(
                "monitor.warn_free_bytes",
                format!("must be at least monitor.action_free_bytes ({})", m.action_free_bytes),
            ));
        }
        // Between two polls the device may write interval × rate bytes; they must fit in the
        // space left at the action threshold, or the backup layer runs out before the monitor
        // sees it (docs/configuration.md, [monitor]).
        let per_poll = u128::from(m.max_write_bytes_per_sec) * u128::from(m.interval_ms) / 1000;
        if per_poll >= u128::from(m.action_free_bytes) {
            return Err(invalid(
                "monitor.interval_ms",
                format!(
                    "{} ms at monitor.max_write_bytes_per_sec = {} writes {per_poll} bytes \
                     between polls, not less than monitor.action_free_bytes = {}: poll more \
                     often or raise the threshold",
                    m.interval_ms, m.max_write_bytes_per_sec, m.action_free_bytes
                ),
            ));
        }
        if m.backoff_initial_ms == 0 || m.backoff_max_ms < m.backoff_initial_ms {
            return Err(invalid(
                "monitor.backoff_max_ms",
                "backoff_initial_ms must be > 0 and backoff_max_ms at least backoff_initial_ms",
            ));
        }
        Ok(())
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
            [monitor]
            interval_ms = 250
            warn_free_bytes = 300000000
            action_free_bytes = 200000000
            action = "abort-and-reboot"
            "#,
        )
        .expect("valid");
        assert_eq!(config.devices[0].checkpoint, CheckpointMethod::Block);
        assert_eq!(config.backends[0].backend.method(), CheckpointMethod::Fs);
        assert_eq!(config.monitor.action, LowSpaceActionConfig::AbortAndReboot);
        assert_eq!(config.monitor.interval_ms, 250);
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
            (format!("[socket]\npath = \"/{}\"", "s".repeat(107)).as_str(), "socket.path"),
            ("[socket]\npath = \"/run/a\\u0000b\"", "socket.path"),
            (format!("metadata_dir = \"/{}\"", "m".repeat(3072)).as_str(), "metadata_dir"),
            ("metadata_dir = \"/metadata/a\\u0000b\"", "metadata_dir"),
            ("[socket]\nmode = 4095", "socket.mode"),
            ("[socket]\nmax_sessions = 0", "socket.max_sessions"),
            ("[socket]\nmax_sessions = 8\nreserved_sessions = 8", "socket.reserved_sessions"),
            ("[socket]\nmax_sessions_per_uid = 0", "socket.max_sessions_per_uid"),
            ("[socket]\nhandshake_timeout_ms = 0", "socket.handshake_timeout_ms"),
            ("[socket]\nfirst_call_timeout_ms = 0", "socket.first_call_timeout_ms"),
            ("[socket]\nwrite_timeout_ms = 0", "socket.write_timeout_ms"),
            ("[listeners]\nmax = 0", "listeners.max"),
            ("[listeners]\nmax_per_uid = 0", "listeners.max_per_uid"),
            ("[listeners]\nqueue = 0", "listeners.queue"),
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
    fn uboot_env_and_grubenv_boot_controls_parse_into_the_policy_types() {
        let config = validate_text(
            "[boot_control]\ntype = \"uboot-env\"\nenv_path = \"/dev/mmcblk0\"\n\
             env_offset = 0x3f8000\nenv_size = 0x4000\nenv_redundant_offset = 0x3fc000\n\
             slot_var = \"mender_boot_part\"\nslot_names = [\"2\", \"3\"]\ntries = 5",
        )
        .expect("valid");
        let layout = config.boot_control.uboot_env_layout().unwrap();
        assert_eq!(layout.primary.offset, 0x3f8000);
        let second = layout.redundant.expect("redundant");
        assert_eq!((second.path.to_str(), second.offset), (Some("/dev/mmcblk0"), 0x3fc000));
        assert_eq!(layout.size, 0x4000);
        let scheme = config.boot_control.uboot_scheme();
        assert_eq!(scheme.slot_var, "mender_boot_part");
        assert_eq!(scheme.slot_values, ["2".to_string(), "3".to_string()]);
        assert_eq!(scheme.boot_limit, 5);

        let config =
            validate_text("[boot_control]\ntype = \"grubenv\"\nslot_names = [\"A\", \"B\", \"C\"]")
                .expect("valid");
        assert_eq!(config.boot_control.grubenv_path, PathBuf::from("/boot/grub/grubenv"));
        assert_eq!(config.boot_control.grub_scheme().slot_names.len(), 3);
        assert_eq!(config.boot_control.cmdline_param, "checkpointd.slot");
    }

    #[test]
    fn bad_uboot_env_and_grubenv_keys_are_named() {
        let uboot = "[boot_control]\ntype = \"uboot-env\"\n";
        let env = "env_path = \"/dev/mmcblk0\"\nenv_size = 0x2000\n";
        for (text, key) in [
            (format!("{uboot}env_size = 0x2000"), "boot_control.env_path"),
            (format!("{uboot}env_path = \"/dev/mmcblk0\""), "boot_control.env_size"),
            (format!("{uboot}env_path = \"dev\"\nenv_size = 8192"), "boot_control.env_path"),
            (format!("{uboot}env_path = \"/e\"\nenv_size = 8"), "boot_control.env_size"),
            (
                format!("{uboot}{env}env_redundant_offset = 0x1000"),
                "boot_control.env_redundant_offset",
            ),
            (format!("{uboot}{env}env_redundant_path = \"x\""), "boot_control.env_redundant_path"),
            (format!("{uboot}{env}slot_names = [\"a\", \"b\", \"c\"]"), "boot_control.slot_names"),
            (format!("{uboot}{env}slot_names = [\"a\", \"a\"]"), "boot_control.slot_names"),
            (format!("{uboot}{env}slot_var = \"bootcount\""), "boot_control.slot_var"),
            (format!("{uboot}{env}tries = 0"), "boot_control.tries"),
            (format!("{uboot}{env}cmdline_param = \"a=b\""), "boot_control.cmdline_param"),
            (
                "[boot_control]\ntype = \"grubenv\"\ngrubenv_path = \"g\"".to_string(),
                "boot_control.grubenv_path",
            ),
            ("[boot_control]\ntype = \"grubenv\"\ntries = 10".to_string(), "boot_control.tries"),
            (
                "[boot_control]\ntype = \"grubenv\"\nslot_names = [\"A-1\", \"B\"]".to_string(),
                "boot_control.slot_names",
            ),
        ] {
            let err = validate_text(&text).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_backend_type_is_refused_with_the_known_ones() {
        let err = validate_text("[[backend]]\ntype = \"zfs\"").unwrap_err();
        assert!(
            err.contains("zfs") && err.contains("snapshot") && err.contains("test-null"),
            "{err}"
        );
        let err = validate_text("[[backend]]\nname = \"x\"").unwrap_err();
        assert!(err.contains("type"), "{err}");
        let err = validate_text("[[backend]]\ntype = 3").unwrap_err();
        assert!(err.contains("`type`"), "{err}");
    }

    #[test]
    fn every_backend_type_parses_with_its_options() {
        let config = validate_text(
            r#"
            [[backend]]
            type = "bow"
            block_size_4096 = true
            sysfs_root = "/tmp/sys"
            [[backend]]
            type = "snapshot"
            name = "snap"
            cow_bytes = 8388608
            chunk_kib = 8
            rollback = "kernel-merge"
            [[backend]]
            type = "f2fs"
            max_unusable_percent = 30
            [[backend]]
            type = "auto"
            [backend.snapshot]
            cow_free_percent = 10
            [backend.bow]
            block_size_4096 = true
            [[backend]]
            type = "test-null"
            kind = "fs"
            free_bytes = 5
            "#,
        )
        .expect("valid");
        let b = &config.backends;
        assert!(matches!(&b[0].backend, BackendType::Bow(o) if o.block_size_4096
            && o.sysfs_root == Path::new("/tmp/sys")));
        assert_eq!(b[0].name, None);
        assert_eq!(config.backend_name(&b[0]), "bow");
        assert_eq!(config.backend_name(&b[1]), "snap");
        match &b[1].backend {
            BackendType::Snapshot(o) => {
                assert_eq!((o.cow_bytes, o.chunk_kib), (Some(8 << 20), 8));
                assert_eq!(o.rollback, backends::snapshot::RollbackMethod::KernelMerge);
                assert_eq!(o.cow_file, backends::snapshot::SnapshotOptions::default().cow_file);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&b[2].backend, BackendType::F2fs(o) if o.max_unusable_percent == Some(30))
        );
        match &b[3].backend {
            BackendType::Auto(o) => {
                assert_eq!(o.snapshot.cow_free_percent, 10);
                assert!(o.bow.block_size_4096);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&b[4].backend, BackendType::TestNull(o)
            if o.kind == Some(CheckpointMethod::Fs) && o.free_bytes == Some(5)));
        assert_eq!(b[2].backend.method(), CheckpointMethod::Fs);
        assert_eq!(b[3].backend.method(), CheckpointMethod::Block);
    }

    #[test]
    fn a_key_of_another_backend_type_is_refused_and_named() {
        for (text, key) in [
            ("[[backend]]\ntype = \"bow\"\ncow_bytes = 1", "cow_bytes"),
            ("[[backend]]\ntype = \"snapshot\"\nblock_size_4096 = true", "block_size_4096"),
            ("[[backend]]\ntype = \"f2fs\"\nchunk_kib = 4", "chunk_kib"),
            ("[[backend]]\ntype = \"test-null\"\ncow_file = \"x\"", "cow_file"),
            ("[[backend]]\ntype = \"auto\"\ncow_bytes = 1", "cow_bytes"),
            ("[[backend]]\ntype = \"auto\"\n[backend.snapshot]\ncow_byts = 1", "cow_byts"),
            ("[[backend]]\ntype = \"snapshot\"\nkind = \"fs\"", "kind"),
        ] {
            let err = validate_text(text).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
            assert!(err.contains("unknown field"), "{text}: {err}");
        }
    }

    #[test]
    fn backend_option_values_are_checked_and_named() {
        for (text, key) in [
            ("[[backend]]\ntype = \"snapshot\"\nchunk_kib = 3", "backend[0].chunk_kib"),
            ("[[backend]]\ntype = \"snapshot\"\ncow_file = \"/abs\"", "backend[0].cow_file"),
            ("[[backend]]\ntype = \"snapshot\"\ncow_bytes = 1", "backend[0].cow_bytes"),
            (
                "[[backend]]\ntype = \"auto\"\n[backend.snapshot]\ncow_free_percent = 0",
                "backend[0].snapshot.cow_free_percent",
            ),
            ("[[backend]]\ntype = \"bow\"\nsysfs_root = \"sys\"", "backend[0].sysfs_root"),
            (
                "[[backend]]\ntype = \"f2fs\"\nmax_unusable_percent = 101",
                "backend[0].max_unusable_percent",
            ),
            ("[[backend]]\ntype = \"test-null\"\nname = \"two words\"", "backend[0].name"),
        ] {
            let err = validate_text(text).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
    }

    const DEVICE: &str = "[[device]]\ndevice = \"/dev/vdb\"\nmount_point = \"/data\"\n";

    #[test]
    fn devices_pair_with_the_backend_of_their_method() {
        let config = validate_text(&format!(
            "{DEVICE}checkpoint = \"block\"\nfs_type = \"ext4\"\nmount_options = \"noatime,discard\"\n\
             [[backend]]\ntype = \"snapshot\"\n[[backend]]\ntype = \"f2fs\"\n"
        ))
        .expect("valid");
        let d = &config.devices[0];
        assert_eq!(
            (d.fs_type.as_deref(), d.mount_options.as_str()),
            (Some("ext4"), "noatime,discard")
        );
        let b = config.backend_for(d).unwrap().expect("a backend");
        assert_eq!(config.backend_name(b), "snapshot");
        // Two block backends: the device must name one.
        let two = format!(
            "{DEVICE}checkpoint = \"block\"\n[[backend]]\ntype = \"snapshot\"\n[[backend]]\ntype = \"bow\"\n"
        );
        let err = validate_text(&two).unwrap_err();
        assert!(err.contains("`device[0].checkpoint`") && err.contains("several"), "{err}");
        let named =
            two.replace("checkpoint = \"block\"\n", "checkpoint = \"block\"\nbackend = \"bow\"\n");
        let config = validate_text(&named).expect("valid");
        assert_eq!(
            config.backend_name(config.backend_for(&config.devices[0]).unwrap().unwrap()),
            "bow"
        );
        // Naming a backend of the other method, or none that exists.
        let err = validate_text(&format!(
            "{DEVICE}checkpoint = \"fs\"\nbackend = \"snapshot\"\n[[backend]]\ntype = \"snapshot\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("`device[0].backend`"), "{err}");
        let err = validate_text(&format!("{DEVICE}checkpoint = \"fs\"\nbackend = \"nope\"\n"))
            .unwrap_err();
        assert!(err.contains("`device[0].backend`") && err.contains("nope"), "{err}");
        let err =
            validate_text(&format!("{DEVICE}checkpoint = \"fs\"\nmount_options = \"a, b\"\n"))
                .unwrap_err();
        assert!(err.contains("`device[0].mount_options`"), "{err}");
    }

    #[test]
    fn the_monitor_refuses_an_interval_too_long_for_its_threshold() {
        // 100 MiB/s × 2 s = 200 MiB between polls, more than the 100 MiB threshold.
        let err = validate_text("[monitor]\ninterval_ms = 2000").unwrap_err();
        assert!(err.contains("`monitor.interval_ms`"), "{err}");
        validate_text("[monitor]\ninterval_ms = 2000\nmax_write_bytes_per_sec = 10000000").unwrap();
        let err = validate_text("[monitor]\nwarn_free_bytes = 1").unwrap_err();
        assert!(err.contains("`monitor.warn_free_bytes`"), "{err}");
        let err = validate_text("[monitor]\nbackoff_max_ms = 10").unwrap_err();
        assert!(err.contains("`monitor.backoff_max_ms`"), "{err}");
        // Off: no sizing check.
        validate_text("[monitor]\ninterval_ms = 0\nwarn_free_bytes = 1").unwrap();
        let err = validate_text("[monitor]\nintervl_ms = 5").unwrap_err();
        assert!(err.contains("intervl_ms"), "{err}");
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
