//! The one place that constructs backends: the real ones of the `backends` crate (bow,
//! snapshot, f2fs, userspace-bow, `auto`'s choice), their boot-flow halves, and the `test-null` backend below
//! (test configurations only). The daemon and `checkpointctl boot` both build through here.

use std::sync::Mutex;

use backends::records::Records;
use backends::reservation::Reservations;
use backends::{BootStack, DeviceSpec};
use policy::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreReport, RestoreRequest,
};

use crate::config::{CheckpointMethod, RestoreConfig, TestNullOptions};

/// A backend type after `auto` was resolved, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// dm-bow.
    Bow(backends::bow::BowOptions),
    /// dm-snapshot.
    Snapshot(backends::snapshot::SnapshotOptions),
    /// f2fs `checkpoint=disable`.
    F2fs(backends::f2fs::F2fsOptions),
    /// The userspace engine over ublk; `fallback` (set when `auto` chose it) is the snapshot
    /// a boot falls back to when the engine cannot be set up before the mount.
    UserspaceBow {
        /// Its options.
        options: backends::userspace_bow::UserspaceBowOptions,
        /// `auto`'s snapshot options for the fallback.
        fallback: Option<backends::snapshot::SnapshotOptions>,
    },
    /// Protects nothing (tests).
    TestNull(TestNullOptions),
}

impl Resolved {
    /// The type word.
    pub fn type_name(&self) -> &'static str {
        match self {
            Resolved::Bow(_) => "bow",
            Resolved::Snapshot(_) => "snapshot",
            Resolved::F2fs(_) => "f2fs",
            Resolved::UserspaceBow { .. } => "userspace-bow",
            Resolved::TestNull(_) => "test-null",
        }
    }
}

/// `auto`: dm-bow where the kernel has the target, else userspace-bow where it has ublk (with
/// snapshot as the fallback of a boot whose engine cannot start), else dm-snapshot, and why.
pub fn resolve_auto(options: &backends::select::AutoOptions) -> (Resolved, String) {
    let (chosen, reason) = backends::select::choose(options);
    let resolved = match chosen {
        backends::select::Chosen::Bow(o) => Resolved::Bow(o),
        backends::select::Chosen::UserspaceBow(options, snapshot) => {
            Resolved::UserspaceBow { options, fallback: Some(snapshot) }
        }
        backends::select::Chosen::Snapshot(o) => Resolved::Snapshot(o),
    };
    (resolved, reason)
}

/// The daemon's backend object for one device; `restore` is the `[restore]` tuning of the
/// dm-bow log restore.
pub fn daemon_backend(
    resolved: &Resolved,
    spec: &DeviceSpec,
    records: &Records,
    restore: &RestoreConfig,
) -> Result<Box<dyn Backend>, BackendError> {
    Ok(match resolved {
        Resolved::Bow(o) => Box::new(backends::bow::BowBackend::new(
            spec.clone(),
            o.clone(),
            restore.options(0),
            records.clone(),
        )?),
        Resolved::Snapshot(o) => Box::new(backends::snapshot::SnapshotBackend::new(
            spec.clone(),
            o.clone(),
            records.clone(),
        )?),
        Resolved::F2fs(o) => Box::new(
            backends::f2fs::F2fsBackend::new(spec.clone(), o.clone())?
                .with_reservations(Reservations::new(records.clone())),
        ),
        Resolved::UserspaceBow { options, fallback } => {
            let backend = backends::userspace_bow::UserspaceBowBackend::new(
                spec.clone(),
                options.clone(),
                restore.options(0),
                records.clone(),
            )?;
            Box::new(match fallback {
                Some(snapshot) => backend.with_fallback(snapshot.clone())?,
                None => backend,
            })
        }
        Resolved::TestNull(o) => Box::new(TestNullBackend::new(
            "test-null",
            o.kind.unwrap_or(CheckpointMethod::Block),
            o.free_bytes,
            vec![spec.raw.display().to_string()],
        )),
    })
}

/// The boot flow's half for one device; `None` for test-null (the raw device is mounted as
/// it is). `records` (the metadata dir's) lets f2fs hand a backup-space reservation over
/// before its `checkpoint=disable` mount, and lets `auto`'s userspace-bow record a fallback to
/// snapshot for the daemon (without records it cannot, so it does not fall back).
pub fn boot_stack(resolved: &Resolved, records: Option<&Records>) -> Option<Box<dyn BootStack>> {
    match resolved {
        Resolved::Bow(o) => Some(Box::new(backends::bow::BowStack::new(o.clone()))),
        Resolved::Snapshot(o) => Some(Box::new(backends::snapshot::SnapshotStack::new(o.clone()))),
        Resolved::F2fs(o) => {
            let stack = backends::f2fs::F2fsStack::new(o.clone());
            Some(Box::new(match records {
                Some(r) => stack.with_reservations(Reservations::new(r.clone())),
                None => stack,
            }))
        }
        Resolved::UserspaceBow { options, fallback } => {
            let stack = backends::userspace_bow::UserspaceBowStack::new(options.clone());
            Some(Box::new(match (fallback, records) {
                (Some(snapshot), Some(r)) => stack.with_fallback(
                    backends::snapshot::SnapshotStack::new(snapshot.clone()),
                    r.clone(),
                ),
                _ => stack,
            }))
        }
        Resolved::TestNull(_) => None,
    }
}

/// A backend under the name the configuration gives it, with `auto`'s reason.
#[derive(Debug)]
pub struct Named {
    name: String,
    reason: String,
    inner: Box<dyn Backend>,
}

impl Named {
    /// `inner` called `name`, chosen for `reason` (empty: configured explicitly).
    pub fn new(name: String, reason: String, inner: Box<dyn Backend>) -> Self {
        Named { name, reason, inner }
    }
}

impl Backend for Named {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn selection_reason(&self) -> &str {
        // A reason the backend found at run time (auto's userspace-bow fell back to snapshot
        // in this boot) is newer than the plan's.
        match self.inner.selection_reason() {
            "" => &self.reason,
            newer => newer,
        }
    }
    fn covers(&self, device: &str) -> bool {
        self.inner.covers(device)
    }
    fn restore(
        &self,
        device: &str,
        request: &RestoreRequest,
        progress: &dyn Fn(u64, u64),
    ) -> Result<RestoreReport, BackendError> {
        self.inner.restore(device, request, progress)
    }
    fn prepare(&self) -> Result<Action, BackendError> {
        self.inner.prepare()
    }
    fn commit(&self) -> Result<Action, BackendError> {
        self.inner.commit()
    }
    fn abort(&self) -> Result<Action, BackendError> {
        self.inner.abort()
    }
    fn teardown(&self) -> Result<Action, BackendError> {
        self.inner.teardown()
    }
    fn grow(&self) -> Result<Action, BackendError> {
        self.inner.grow()
    }
    fn space(&self) -> Result<BackupSpace, BackendError> {
        self.inner.space()
    }
    fn free_space(&self) -> Result<Option<u64>, BackendError> {
        self.inner.free_space()
    }
    fn status(&self) -> Result<BackendStatus, BackendError> {
        self.inner.status()
    }
}

/// A backend that protects NO data: `prepare` and `commit` only record the state, so the
/// policy (budget, latch, commit order, history) can be driven end to end on a machine without
/// dm-bow, dm-snapshot or f2fs. Rollback with it restores nothing. The daemon logs a warning
/// at start when one is configured.
#[derive(Debug)]
pub struct TestNullBackend {
    name: String,
    kind: BackendKind,
    free_bytes: Option<u64>,
    devices: Vec<String>,
    state: Mutex<BackendState>,
}

impl TestNullBackend {
    /// A test-null backend called `name` standing for checkpoints of kind `kind` on `devices`.
    pub fn new(
        name: &str,
        kind: CheckpointMethod,
        free_bytes: Option<u64>,
        devices: Vec<String>,
    ) -> Self {
        let kind = match kind {
            CheckpointMethod::Block => BackendKind::Block,
            CheckpointMethod::Fs => BackendKind::File,
        };
        TestNullBackend {
            name: name.to_owned(),
            kind,
            free_bytes,
            devices,
            state: Mutex::new(BackendState::Idle),
        }
    }

    fn set_state(&self, state: BackendState) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }
}

impl Backend for TestNullBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self) -> Result<Action, BackendError> {
        self.set_state(BackendState::Armed);
        Ok(Action::Changed)
    }

    fn commit(&self) -> Result<Action, BackendError> {
        self.set_state(BackendState::Committed);
        Ok(Action::Changed)
    }

    fn space(&self) -> Result<BackupSpace, BackendError> {
        // It backs nothing up, so it uses nothing (as its status says): learning records 0.
        Ok(BackupSpace {
            free_bytes: self.free_bytes,
            used_bytes: Some(0),
            ..BackupSpace::default()
        })
    }

    fn status(&self) -> Result<BackendStatus, BackendError> {
        let state = *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(BackendStatus {
            state,
            backup_used_bytes: Some(0),
            free_bytes: self.free_bytes,
            devices: self.devices.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_reports_its_name_and_auto_reason() {
        let inner =
            TestNullBackend::new("t", CheckpointMethod::Block, None, vec!["/dev/vdb".into()]);
        let why = "auto: the kernel has no dm-bow target, using snapshot".to_owned();
        let named = Named::new("snapshot@data".into(), why.clone(), Box::new(inner));
        assert_eq!(named.name(), "snapshot@data");
        assert_eq!(named.selection_reason(), why);
    }

    #[test]
    fn userspace_bow_is_configured_with_its_keys_and_without_a_fallback() {
        let text = r#"
            [[device]]
            device = "/dev/vdb"
            mount_point = "/data"
            checkpoint = "block"
            [[backend]]
            type = "userspace-bow"
            server = "/usr/libexec/bow-ublk"
            start_timeout_ms = 2500
            "#;
        let config = crate::config::Config::parse(text).expect("parses");
        config.validate().expect("valid");
        let plan = crate::plan::plan(&config, &config.devices).expect("plan");
        match &plan[0].backend {
            Resolved::UserspaceBow { options, fallback } => {
                assert_eq!(options.start_timeout_ms, 2500);
                assert_eq!(options.server.as_deref(), Some("/usr/libexec/bow-ublk".as_ref()));
                assert_eq!(*fallback, None, "only auto falls back");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plan[0].backend.type_name(), "userspace-bow");
        // A relative server path and an unknown key are refused, naming the key.
        let bad = crate::config::Config::parse(&text.replace("/usr/libexec/bow-ublk", "bow-ublk"))
            .expect("parses");
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("server"), "{e}");
        let e = crate::config::Config::parse(&text.replace("start_timeout_ms", "start_timeout"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("start_timeout"), "{e}");
    }

    #[test]
    fn named_prefers_the_backends_own_newer_reason() {
        #[derive(Debug)]
        struct FellBack(TestNullBackend);
        impl Backend for FellBack {
            fn kind(&self) -> BackendKind {
                self.0.kind()
            }
            fn name(&self) -> &str {
                self.0.name()
            }
            fn selection_reason(&self) -> &str {
                "auto: userspace-bow could not be set up (x), using snapshot"
            }
            fn prepare(&self) -> Result<Action, BackendError> {
                self.0.prepare()
            }
            fn commit(&self) -> Result<Action, BackendError> {
                self.0.commit()
            }
            fn space(&self) -> Result<BackupSpace, BackendError> {
                self.0.space()
            }
            fn status(&self) -> Result<BackendStatus, BackendError> {
                self.0.status()
            }
        }
        let inner = TestNullBackend::new("t", CheckpointMethod::Block, None, vec![]);
        let named = Named::new(
            "auto".into(),
            "auto: ... using userspace-bow".into(),
            Box::new(FellBack(inner)),
        );
        assert!(named.selection_reason().contains("could not be set up"));
    }

    #[test]
    fn records_prepare_and_commit() {
        let backend =
            TestNullBackend::new("t", CheckpointMethod::Fs, Some(7), vec!["/dev/vdb".into()]);
        assert_eq!(backend.kind(), BackendKind::File);
        assert_eq!(backend.status().expect("status").state, BackendState::Idle);
        assert_eq!(backend.prepare().expect("prepare"), Action::Changed);
        assert_eq!(backend.status().expect("status").state, BackendState::Armed);
        assert_eq!(backend.commit().expect("commit"), Action::Changed);
        let status = backend.status().expect("status");
        assert_eq!(status.state, BackendState::Committed);
        assert_eq!(status.free_bytes, Some(7));
        assert_eq!(backend.free_space().expect("free"), Some(7));
    }
}
