//! Which backend checkpoints which device: the one resolution the daemon (its backend
//! objects) and the boot flow (`checkpointctl boot mount`, its device stacks) share, so both
//! see the same devices, names and `auto` choice.

use std::path::Path;

use backends::DeviceSpec;

use crate::backend::{resolve_auto, Resolved};
use crate::config::{BackendType, Config, DeviceConfig};

/// One checkpointed device and its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    /// The device as configured (`[[device]]` or fstab).
    pub device: DeviceConfig,
    /// The backends crate's view of it.
    pub spec: DeviceSpec,
    /// The backend object's name: the `[[backend]]` name, plus `@<instance>` when that
    /// backend checkpoints several devices.
    pub name: String,
    /// The backend type after `auto` was resolved, with its options.
    pub backend: Resolved,
    /// Why `auto` chose it (empty for an explicit type).
    pub reason: String,
}

/// The backends crate's description of `device`.
pub fn device_spec(device: &DeviceConfig) -> DeviceSpec {
    DeviceSpec {
        raw: device.device.clone(),
        mount_point: device.mount_point.clone(),
        fs_type: device.fs_type.clone(),
        mount_options: device.mount_options.clone(),
        instance: backends::instance_for(&device.mount_point),
    }
}

/// Pairs every device with its backend (`Config::backend_for`); devices whose checkpoint
/// method has no backend are left out (logged by the caller). `auto` is resolved once per
/// backend entry.
pub fn plan(config: &Config, devices: &[DeviceConfig]) -> Result<Vec<DevicePlan>, String> {
    let mut out = Vec::new();
    for backend in &config.backends {
        let name = config.backend_name(backend);
        let covered: Vec<&DeviceConfig> = devices
            .iter()
            .filter(|d| {
                config.backend_for(d).ok().flatten().is_some_and(|b| config.backend_name(b) == name)
            })
            .collect();
        if covered.is_empty() {
            continue;
        }
        let (resolved, reason) = match &backend.backend {
            BackendType::Bow(o) => (Resolved::Bow(o.clone()), String::new()),
            BackendType::Snapshot(o) => (Resolved::Snapshot(o.clone()), String::new()),
            BackendType::F2fs(o) => (Resolved::F2fs(o.clone()), String::new()),
            BackendType::UserspaceBow(o) => {
                (Resolved::UserspaceBow { options: o.clone(), fallback: None }, String::new())
            }
            BackendType::TestNull(o) => (Resolved::TestNull(o.clone()), String::new()),
            BackendType::Auto(o) => resolve_auto(o),
        };
        for device in &covered {
            let spec = device_spec(device);
            let name = if covered.len() == 1 {
                name.to_owned()
            } else {
                format!("{name}@{}", spec.instance)
            };
            out.push(DevicePlan {
                device: (*device).clone(),
                spec,
                name,
                backend: resolved.clone(),
                reason: reason.clone(),
            });
        }
    }
    for device in devices {
        if let Err(e) = config.backend_for(device) {
            return Err(format!("{}: {e}", device.device.display()));
        }
    }
    Ok(out)
}

/// The devices to checkpoint: the config's, then the fstab's (without duplicates).
pub fn devices(config: &Config) -> Result<Vec<DeviceConfig>, crate::fstab::FstabError> {
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

/// The plan of `config` read from disk as the daemon reads it (config file, then fstab).
pub fn load(config_path: &Path) -> Result<(Config, Vec<DevicePlan>), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let devices = devices(&config).map_err(|e| e.to_string())?;
    let plan = plan(&config, &devices)?;
    Ok((config, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let c = Config::parse(text).expect("parses");
        c.validate().expect("valid");
        c
    }

    #[test]
    fn each_device_goes_to_the_backend_of_its_method() {
        let c = config(
            r#"
            [[device]]
            device = "/dev/vdb"
            mount_point = "/data"
            checkpoint = "block"
            fs_type = "ext4"
            [[device]]
            device = "/dev/vdc"
            mount_point = "/cache"
            checkpoint = "fs"
            [[backend]]
            type = "snapshot"
            cow_bytes = 1048576
            [[backend]]
            type = "f2fs"
            name = "flash"
            "#,
        );
        let p = plan(&c, &c.devices).expect("plan");
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].name.as_str(), p[0].spec.instance.as_str()), ("snapshot", "data"));
        assert!(matches!(&p[0].backend, Resolved::Snapshot(o) if o.cow_bytes == Some(1 << 20)));
        assert_eq!(p[0].spec.fs_type.as_deref(), Some("ext4"));
        assert_eq!(p[1].name, "flash");
        assert!(matches!(p[1].backend, Resolved::F2fs(_)));
    }

    #[test]
    fn a_backend_over_several_devices_names_each_object_by_instance() {
        let c = config(
            r#"
            [[device]]
            device = "/dev/vdb"
            mount_point = "/data"
            checkpoint = "block"
            [[device]]
            device = "/dev/vdc"
            mount_point = "/var/lib/app"
            checkpoint = "block"
            [[backend]]
            type = "test-null"
            "#,
        );
        let names: Vec<String> =
            plan(&c, &c.devices).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["test-null@data", "test-null@var_lib_app"]);
    }

    #[test]
    fn a_device_without_a_backend_of_its_method_is_not_planned() {
        let c = config(
            r#"
            [[device]]
            device = "/dev/vdb"
            mount_point = "/data"
            checkpoint = "fs"
            [[backend]]
            type = "test-null"
            "#,
        );
        assert!(plan(&c, &c.devices).unwrap().is_empty());
    }
}
