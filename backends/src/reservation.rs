//! Backup-space reservations: space set aside on the checkpointed filesystem between the
//! update's download and the reboot into it, so the checkpoint finds it free (issue 11).
//!
//! A reservation is one preallocated file per device, `<mount>/.checkpointd/reserved`
//! (beside the snapshot backend's COW file), `fallocate`d (never sparse), pinned first on f2fs,
//! mode 0600, made by the daemon (root). Its record (device, size, creation time, inode, extents)
//! lives in the backends' records folder in the metadata directory
//! (`<metadata dir>/backends/reservation-<instance>.json`), so both survive reboots.
//!
//! At checkpoint start each backend's `prepare` hands the space over (docs/backends.md,
//! "Reservation"): `snapshot` moves the file into its COW file, `bow` and `f2fs` release it
//! before they need the free space. `abort` releases it (the update is abandoned), `teardown`
//! repairs what a crash left (see [`Condition`]).
//!
//! Crash ordering: `reserve` writes the record as `creating` **before** the file exists, and
//! as `held` only once the file is allocated and synced; `release` unlinks the file (folder
//! synced) **before** it clears the record. So every crash leaves a record `creating` (with or
//! without a partial file), a record `held` without its file, or nothing: never an unrecorded
//! file of ours. [`Reservations::status`] reports each such state and
//! [`Reservations::release`] (or a new `reserve`) repairs it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use policy::{Action, BackendError};
use serde::{Deserialize, Serialize};

use crate::mountinfo::{find_mount, read_mountinfo};
use crate::records::Records;
use crate::snapshot::{normalize_extents, CowExtent};
use crate::{errors, DeviceSpec};

/// The reservation file, relative to the mount point (beside the default COW file).
pub const RESERVATION_FILE: &str = ".checkpointd/reserved";

/// The records' "backend" token for reservations.
const RECORD: &str = "reservation";

/// Where a reservation's creation is, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Written before the file is made: a `reserve` that has not answered yet (or crashed).
    /// Such a reservation was never handed out; it is removed, never used.
    Creating,
    /// The file is allocated and synced: the reservation is held.
    Held,
}

/// The durable record of a reservation ([`Records`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// Creating or held.
    pub state: RecordState,
    /// The raw device of the filesystem it was made on: a reservation is handed over only to
    /// a backend of that device.
    pub raw: PathBuf,
    /// The mount point it was made under.
    pub mount_point: PathBuf,
    /// The file, relative to the mount point.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// When it was made (seconds since the Unix epoch).
    pub created_unix_secs: u64,
    /// The file's inode number once made: tells our file from another at the same path.
    pub inode: Option<u64>,
    /// Its extents on the raw device once made (empty where FIEMAP is not supported).
    pub extents: Vec<CowExtent>,
}

impl ReservationRecord {
    fn belongs_to(&self, spec: &DeviceSpec) -> bool {
        self.raw == spec.raw && self.mount_point == spec.mount_point
    }
}

/// What [`Reservations::status`] found, file and record together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Recorded as held, and the file is the one made (same inode and size).
    Held,
    /// Recorded as `creating`: a `reserve` crashed before it finished (the file may be
    /// partial or absent). Never handed over; `release` removes it.
    Incomplete,
    /// Recorded as held, but the file is gone: a crash between unlink and record removal,
    /// or /data was rolled back to before the reservation. `release` clears the record.
    FileMissing,
    /// Recorded as held, but the file at the path is not the one made (another inode or
    /// size). `release` removes it (the path is ours) and clears the record.
    FileMismatch,
    /// A file at the path without a record (a record lost with the metadata directory).
    /// `release` removes it.
    Unrecorded,
}

/// A reservation as [`Reservations::status`] and [`Reservations::reserve`] report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationInfo {
    /// The file.
    pub path: PathBuf,
    /// Reserved bytes (the recorded size; for an unrecorded file, its length).
    pub bytes: u64,
    /// When it was made (for an unrecorded file, its modification time).
    pub created_unix_secs: u64,
    /// Whether file and record agree.
    pub condition: Condition,
}

/// The reservations of every device, recorded in one metadata directory.
#[derive(Clone, Debug)]
pub struct Reservations {
    records: Records,
}

fn invalid(operation: String, reason: &str) -> BackendError {
    BackendError::InvalidArgument { operation, reason: reason.to_owned() }
}

fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| errors::io(format!("fsync {}", dir.display()), e))
}

fn sync_parent(path: &Path) -> Result<(), BackendError> {
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

fn is_f2fs(spec: &DeviceSpec) -> Result<bool, BackendError> {
    if let Some(t) = &spec.fs_type {
        return Ok(t == "f2fs");
    }
    Ok(find_mount(&read_mountinfo()?, &spec.mount_point).is_some_and(|m| m.fs_type == "f2fs"))
}

impl Reservations {
    /// Reservations recorded in `records`' folder.
    pub fn new(records: Records) -> Reservations {
        Reservations { records }
    }

    /// Where `spec`'s reservation file lives.
    pub fn path(spec: &DeviceSpec) -> PathBuf {
        spec.mount_point.join(RESERVATION_FILE)
    }

    /// The record under `spec`'s instance, whoever it belongs to.
    pub fn record(&self, spec: &DeviceSpec) -> Result<Option<ReservationRecord>, BackendError> {
        self.records.load(RECORD, &spec.instance)
    }

    /// The record, refused when it was made for another device under the same instance name
    /// (never touched, never reported as ours).
    fn own_record(
        &self,
        spec: &DeviceSpec,
        operation: &'static str,
    ) -> Result<Option<ReservationRecord>, BackendError> {
        match self.record(spec)? {
            Some(r) if !r.belongs_to(spec) => Err(BackendError::InvalidState {
                backend: RECORD.into(),
                state: format!(
                    "recorded for {} on {}, not {} on {}",
                    r.raw.display(),
                    r.mount_point.display(),
                    spec.raw.display(),
                    spec.mount_point.display()
                ),
                operation,
            }),
            other => Ok(other),
        }
    }

    fn inspect(
        spec: &DeviceSpec,
        rec: Option<&ReservationRecord>,
    ) -> Result<Option<ReservationInfo>, BackendError> {
        let path = Self::path(spec);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(errors::io(format!("stat {}", path.display()), e)),
        };
        let info = |bytes, created_unix_secs, condition| ReservationInfo {
            path: path.clone(),
            bytes,
            created_unix_secs,
            condition,
        };
        Ok(match (rec, meta) {
            (None, None) => None,
            (None, Some(m)) => {
                Some(info(m.len(), u64::try_from(m.mtime()).unwrap_or(0), Condition::Unrecorded))
            }
            (Some(r), meta) => {
                let condition = match (r.state, meta) {
                    (RecordState::Creating, _) => Condition::Incomplete,
                    (RecordState::Held, None) => Condition::FileMissing,
                    (RecordState::Held, Some(m)) => {
                        if m.is_file() && Some(m.ino()) == r.inode && m.len() == r.bytes {
                            Condition::Held
                        } else {
                            Condition::FileMismatch
                        }
                    }
                };
                Some(info(r.bytes, r.created_unix_secs, condition))
            }
        })
    }

    /// The reservation of `spec`, with whether file and record agree; `None` when there is
    /// neither. A record made for another device under the same instance is `InvalidState`.
    pub fn status(&self, spec: &DeviceSpec) -> Result<Option<ReservationInfo>, BackendError> {
        let rec = self.own_record(spec, "report a reservation")?;
        Self::inspect(spec, rec.as_ref())
    }

    /// Preallocates a reservation file of `bytes` on `spec`'s mounted filesystem (fallocate,
    /// not sparse; pinned first on f2fs; file and folder fsynced) and records it durably.
    ///
    /// Refused, with nothing reserved and nothing removed: 0 bytes or more than the whole
    /// filesystem (EINVAL), more than is free (`NoSpace`, with the free bytes), a second
    /// reservation while one is held (`InvalidState`). What a crash left (see [`Condition`])
    /// is repaired first.
    pub fn reserve(&self, spec: &DeviceSpec, bytes: u64) -> Result<ReservationInfo, BackendError> {
        let path = Self::path(spec);
        let op = |what: &str| format!("{what} {}", path.display());
        if bytes == 0 {
            return Err(invalid(op("reserve 0 bytes at"), "nothing to reserve"));
        }
        let space = |what: &str| {
            blockdev::fs::statvfs(&spec.mount_point).map_err(|e| {
                errors::fs(format!("{what}: statvfs {}", spec.mount_point.display()), e)
            })
        };
        let total = space("reserve")?.total.get();
        if bytes > total || i64::try_from(bytes).is_err() {
            return Err(invalid(
                format!("reserve {bytes} bytes at {}", path.display()),
                &format!("more than the whole filesystem ({total} bytes)"),
            ));
        }
        let rec = self.own_record(spec, "reserve")?;
        if let Some(found) = Self::inspect(spec, rec.as_ref())? {
            if found.condition == Condition::Held {
                return Err(BackendError::InvalidState {
                    backend: RECORD.into(),
                    state: format!(
                        "held ({} bytes at {}, since {})",
                        found.bytes,
                        found.path.display(),
                        found.created_unix_secs
                    ),
                    operation: "reserve again (release it first)",
                });
            }
            log::warn!(
                "reservation {}: {:?} (left by a crash); removing it before reserving again",
                found.path.display(),
                found.condition
            );
            self.remove(spec)?;
        }
        let available = space("reserve")?.available.get();
        if bytes > available {
            return Err(BackendError::NoSpace {
                operation: op("reserve"),
                needed: bytes,
                available,
            });
        }
        // 1. The record first: a crash from here on leaves `creating`, which is removed, never
        //    used.
        let mut rec = ReservationRecord {
            state: RecordState::Creating,
            raw: spec.raw.clone(),
            mount_point: spec.mount_point.clone(),
            file: RESERVATION_FILE.into(),
            bytes,
            created_unix_secs: now_unix_secs(),
            inode: None,
            extents: Vec::new(),
        };
        self.records.save(RECORD, &spec.instance, &rec)?;
        // 2. The file.
        let made = self.make_file(spec, &path, bytes);
        let (inode, extents) = match made {
            Ok(v) => v,
            Err(e) => {
                // Nothing reserved: the partial file and the record go.
                if let Err(undo) = self.remove(spec) {
                    log::error!("reservation {}: cannot undo a failed reserve: {undo}", op(""));
                }
                return Err(e);
            }
        };
        // 3. Held.
        rec.state = RecordState::Held;
        rec.inode = Some(inode);
        rec.extents = extents;
        self.records.save(RECORD, &spec.instance, &rec)?;
        log::info!(
            "reserved {bytes} bytes of backup space at {} ({} extents)",
            path.display(),
            rec.extents.len()
        );
        Ok(ReservationInfo {
            path,
            bytes,
            created_unix_secs: rec.created_unix_secs,
            condition: Condition::Held,
        })
    }

    /// Creates, pins (f2fs), allocates and syncs the file; returns its inode and extents.
    fn make_file(
        &self,
        spec: &DeviceSpec,
        path: &Path,
        bytes: u64,
    ) -> Result<(u64, Vec<CowExtent>), BackendError> {
        let op = |what: &str| format!("{what} {}", path.display());
        if let Some(dir) = path.parent() {
            if !dir.is_dir() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| errors::io(op("create the folder of"), e))?;
                sync_parent(dir)?;
            }
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| errors::io(op("create"), e))?;
        // The umask cannot widen 0600, but an explicit mode says what we mean.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| errors::io(op("chmod"), e))?;
        if is_f2fs(spec)? {
            // Before fallocate, as for the COW file: the snapshot backend may map it by FIEMAP.
            blockdev::fs::f2fs_pin_file(&f, true).map_err(|e| errors::fs(op("pin"), e))?;
        }
        let len = i64::try_from(bytes)
            .map_err(|_| invalid(op("reserve"), "larger than a file can be"))?;
        nix::fcntl::fallocate(f.as_fd(), nix::fcntl::FallocateFlags::empty(), 0, len).map_err(
            |e| {
                let available = blockdev::fs::statvfs(&spec.mount_point)
                    .map(|s| s.available.get())
                    .unwrap_or(0);
                if e == nix::errno::Errno::ENOSPC {
                    BackendError::NoSpace { operation: op("fallocate"), needed: bytes, available }
                } else {
                    errors::io(op("fallocate"), std::io::Error::from(e))
                }
            },
        )?;
        f.sync_all().map_err(|e| errors::io(op("fsync"), e))?;
        sync_parent(path)?;
        let inode = f.metadata().map_err(|e| errors::io(op("stat"), e))?.ino();
        // The map is kept for diagnosis and to show the hand-over moved the same blocks;
        // filesystems without FIEMAP (tmpfs) simply have none.
        let extents = match blockdev::fs::mappable_extents(&f) {
            Ok(e) => normalize_extents(&e),
            Err(e) => {
                log::debug!("reservation {}: no extent map: {e}", path.display());
                Vec::new()
            }
        };
        Ok((inode, extents))
    }

    /// Gives the reservation back: the file unlinked (folder fsynced), then the record
    /// cleared. Repairs every [`Condition`] a crash can leave. `Identity` when there is none.
    pub fn release(&self, spec: &DeviceSpec) -> Result<Action, BackendError> {
        let rec = self.own_record(spec, "release")?;
        let Some(found) = Self::inspect(spec, rec.as_ref())? else {
            return Ok(Action::Identity);
        };
        self.remove(spec)?;
        log::info!(
            "released the reservation {} ({} bytes, {:?})",
            found.path.display(),
            found.bytes,
            found.condition
        );
        Ok(Action::Changed)
    }

    /// Unlink (synced), then clear the record: a crash between leaves a record without a
    /// file ([`Condition::FileMissing`]), which the next release clears.
    fn remove(&self, spec: &DeviceSpec) -> Result<(), BackendError> {
        let path = Self::path(spec);
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(errors::io(format!("remove {}", path.display()), e)),
        }
        let _ = self.records.clear(RECORD, &spec.instance)?;
        Ok(())
    }

    // ---- hand-over at checkpoint start (the backends' prepare) and cleanup ----

    /// `Some(record or none)` when the reservation under `spec`'s instance is `spec`'s (or
    /// there is none); `None` when it belongs to another device: logged and left alone.
    #[allow(clippy::option_option)] // "not ours" and "ours, none" are different answers
    fn own_or_leave(
        &self,
        spec: &DeviceSpec,
        who: &str,
    ) -> Result<Option<Option<ReservationRecord>>, BackendError> {
        match self.record(spec)? {
            Some(r) if !r.belongs_to(spec) => {
                log::info!(
                    "{who}: the reservation recorded for {} on {} is not {}'s; left alone",
                    r.raw.display(),
                    r.mount_point.display(),
                    spec.raw.display()
                );
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// `bow`/`f2fs` hand-over and `abort`: releases `spec`'s reservation (whatever its
    /// condition) so the checkpoint can use the space; returns the bytes it held, `None` when
    /// there was none (or it belongs to another device).
    pub(crate) fn release_for(
        &self,
        spec: &DeviceSpec,
        who: &str,
    ) -> Result<Option<u64>, BackendError> {
        let Some(rec) = self.own_or_leave(spec, who)? else { return Ok(None) };
        let Some(found) = Self::inspect(spec, rec.as_ref())? else { return Ok(None) };
        self.remove(spec)?;
        log::info!(
            "{who}: released the reservation {} ({} bytes, {:?})",
            found.path.display(),
            found.bytes,
            found.condition
        );
        Ok(Some(found.bytes))
    }

    /// `teardown` on a boot that is not checkpointing: repairs what a crash left (every
    /// condition but [`Condition::Held`]). A held reservation stays: such boots include a
    /// reboot between `reserveSpace` and the update's reboot, and reservations survive those.
    pub(crate) fn repair_for(&self, spec: &DeviceSpec, who: &str) -> Result<Action, BackendError> {
        let Some(rec) = self.own_or_leave(spec, who)? else { return Ok(Action::Identity) };
        match Self::inspect(spec, rec.as_ref())? {
            Some(found) if found.condition != Condition::Held => {
                log::warn!(
                    "{who}: removed the reservation {} left {:?}",
                    found.path.display(),
                    found.condition
                );
                self.remove(spec)?;
                Ok(Action::Changed)
            }
            _ => Ok(Action::Identity),
        }
    }

    /// `snapshot` hand-over: moves a held reservation of `spec` to `to` (the COW file; same
    /// filesystem, so a rename: the blocks stay where they are) and returns its record. The
    /// record is cleared later by [`Reservations::forget_moved`], once the caller has recorded
    /// the file as its own. A reservation in any other condition is removed (repair) and
    /// `None` returned.
    pub(crate) fn take_for(
        &self,
        spec: &DeviceSpec,
        to: &Path,
        who: &str,
    ) -> Result<Option<ReservationRecord>, BackendError> {
        let Some(rec) = self.own_or_leave(spec, who)? else { return Ok(None) };
        let Some(found) = Self::inspect(spec, rec.as_ref())? else { return Ok(None) };
        let Some(rec) = rec.filter(|_| found.condition == Condition::Held) else {
            log::warn!(
                "{who}: the reservation {} is {:?}; removed, not adopted",
                found.path.display(),
                found.condition
            );
            self.remove(spec)?;
            return Ok(None);
        };
        let op = || format!("move the reservation {} to {}", found.path.display(), to.display());
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(|e| errors::io(op(), e))?;
        }
        fs::rename(&found.path, to).map_err(|e| errors::io(op(), e))?;
        sync_parent(to)?;
        sync_parent(&found.path)?;
        Ok(Some(rec))
    }

    /// After a [`Reservations::take_for`]: clears `spec`'s record when its file is gone (moved).
    /// Also clears a record whose file vanished otherwise. A crash before this leaves a held
    /// record without a file, which every later step treats as [`Condition::FileMissing`].
    pub(crate) fn forget_moved(&self, spec: &DeviceSpec) -> Result<Action, BackendError> {
        match self.record(spec)? {
            Some(r) if r.belongs_to(spec) && !Self::path(spec).exists() => {
                self.records.clear(RECORD, &spec.instance)
            }
            _ => Ok(Action::Identity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bench {
        _mnt: tempfile::TempDir,
        _meta: tempfile::TempDir,
        spec: DeviceSpec,
        records: Records,
        res: Reservations,
    }

    fn bench() -> Bench {
        // A plain folder stands for the mount point: statvfs and fallocate work on the host's
        // filesystems; `fs_type` says it is not f2fs (no pin).
        let mnt = tempfile::tempdir().unwrap();
        let meta = tempfile::tempdir().unwrap();
        let records = Records::open(meta.path()).unwrap();
        let spec = DeviceSpec {
            raw: "/dev/vdb".into(),
            mount_point: mnt.path().to_owned(),
            fs_type: Some("ext4".into()),
            mount_options: String::new(),
            instance: "data".into(),
        };
        let res = Reservations::new(records.clone());
        Bench { _mnt: mnt, _meta: meta, spec, records, res }
    }

    /// The code the daemon answers for `e` (policy's one errno table).
    fn errno(e: &BackendError) -> Option<i32> {
        Some(policy::errno::code(e.kind(), e.os_errno()))
    }

    #[test]
    fn reserve_allocates_records_and_release_gives_it_back() {
        let b = bench();
        assert_eq!(b.res.status(&b.spec).unwrap(), None);
        let info = b.res.reserve(&b.spec, 8 << 20).unwrap();
        assert_eq!(info.path, b.spec.mount_point.join(RESERVATION_FILE));
        assert_eq!((info.bytes, info.condition), (8 << 20, Condition::Held));
        let m = fs::metadata(&info.path).unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(m.blocks() * 512 >= 8 << 20, "allocated, not sparse: {} blocks", m.blocks());
        assert_eq!(m.mode() & 0o777, 0o600);
        let rec = b.res.record(&b.spec).unwrap().expect("record");
        assert_eq!(rec.state, RecordState::Held);
        assert_eq!(rec.inode, Some(m.ino()));
        assert_eq!(b.res.status(&b.spec).unwrap(), Some(info.clone()));
        // Survives a "restart": a new object over a reopened records folder sees it.
        let again = Reservations::new(Records::open(b.records.dir().parent().unwrap()).unwrap());
        assert_eq!(again.status(&b.spec).unwrap(), Some(info.clone()));
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
        assert!(!info.path.exists());
        assert_eq!(b.res.record(&b.spec).unwrap(), None);
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Identity);
        assert_eq!(b.res.status(&b.spec).unwrap(), None);
    }

    #[test]
    fn bad_sizes_and_a_second_reservation_are_refused_with_nothing_changed() {
        let b = bench();
        let e = b.res.reserve(&b.spec, 0).unwrap_err();
        assert_eq!(errno(&e), Some(policy::errno::EINVAL), "{e}");
        let e = b.res.reserve(&b.spec, u64::MAX).unwrap_err();
        assert_eq!(errno(&e), Some(policy::errno::EINVAL), "{e}");
        assert!(e.to_string().contains("more than the whole filesystem"), "{e}");
        assert_eq!(b.res.status(&b.spec).unwrap(), None, "nothing reserved");
        assert!(!b.spec.mount_point.join(".checkpointd").exists(), "nothing created");

        let held = b.res.reserve(&b.spec, 1 << 20).unwrap();
        let e = b.res.reserve(&b.spec, 1 << 20).unwrap_err();
        assert!(matches!(e, BackendError::InvalidState { .. }), "{e}");
        assert!(e.to_string().contains("release it first"), "{e}");
        // More than free (but less than the filesystem), while one is held: still refused as
        // a second reservation, the held one intact.
        assert_eq!(b.res.status(&b.spec).unwrap(), Some(held));
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
    }

    #[test]
    fn more_than_free_is_refused_and_says_how_much_is_free() {
        let b = bench();
        let s = blockdev::fs::statvfs(&b.spec.mount_point).unwrap();
        let too_much = s.available.get() + (1 << 30);
        if too_much > s.total.get() {
            // A filesystem almost empty: more than free is more than the whole filesystem.
            let e = b.res.reserve(&b.spec, too_much).unwrap_err();
            assert_eq!(errno(&e), Some(policy::errno::EINVAL), "{e}");
        } else {
            let e = b.res.reserve(&b.spec, too_much).unwrap_err();
            match &e {
                BackendError::NoSpace { needed, available, .. } => {
                    assert_eq!(*needed, too_much);
                    assert!(*available < too_much, "{e}");
                    assert!(e.to_string().contains("available"), "{e}");
                }
                other => panic!("expected NoSpace, got {other}"),
            }
            assert_eq!(e.kind(), policy::ErrorKind::NoSpace);
        }
        assert_eq!(b.res.status(&b.spec).unwrap(), None, "nothing reserved");
        assert_eq!(b.res.record(&b.spec).unwrap(), None, "no record left");
    }

    #[test]
    fn a_crash_while_creating_is_reported_and_repaired() {
        let b = bench();
        // The record written, then the crash (a partial file, or none).
        let rec = ReservationRecord {
            state: RecordState::Creating,
            raw: b.spec.raw.clone(),
            mount_point: b.spec.mount_point.clone(),
            file: RESERVATION_FILE.into(),
            bytes: 4 << 20,
            created_unix_secs: 1,
            inode: None,
            extents: vec![],
        };
        b.records.save(RECORD, "data", &rec).unwrap();
        assert_eq!(b.res.status(&b.spec).unwrap().unwrap().condition, Condition::Incomplete);
        let path = Reservations::path(&b.spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, vec![0u8; 4096]).unwrap();
        assert_eq!(b.res.status(&b.spec).unwrap().unwrap().condition, Condition::Incomplete);
        // Never handed over: the snapshot hand-over removes it instead.
        let cow = b.spec.mount_point.join(".checkpointd/cow");
        assert_eq!(b.res.take_for(&b.spec, &cow, "test").unwrap(), None);
        assert!(!path.exists() && !cow.exists());
        assert_eq!(b.res.record(&b.spec).unwrap(), None);
        // And a new reserve over a creating record repairs it first.
        b.records.save(RECORD, "data", &rec).unwrap();
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        assert_eq!((info.bytes, info.condition), (1 << 20, Condition::Held));
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
    }

    #[test]
    fn a_crash_between_unlink_and_record_removal_is_reported_and_repaired() {
        let b = bench();
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        fs::remove_file(&info.path).unwrap(); // unlinked, record not yet cleared
        let now = b.res.status(&b.spec).unwrap().unwrap();
        assert_eq!(now.condition, Condition::FileMissing);
        assert_eq!(now.bytes, 1 << 20);
        // Teardown repairs it; a held one it keeps.
        assert_eq!(b.res.repair_for(&b.spec, "test").unwrap(), Action::Changed);
        assert_eq!(b.res.status(&b.spec).unwrap(), None);
        let _ = b.res.reserve(&b.spec, 1 << 20).unwrap();
        assert_eq!(b.res.repair_for(&b.spec, "test").unwrap(), Action::Identity);
        assert_eq!(b.res.status(&b.spec).unwrap().unwrap().condition, Condition::Held);
        // Release of a missing file clears the record.
        fs::remove_file(&info.path).unwrap();
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
        assert_eq!(b.res.record(&b.spec).unwrap(), None);
    }

    #[test]
    fn an_unrecorded_or_replaced_file_is_reported_and_removed_by_release() {
        let b = bench();
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        // Replaced by another file at the same path.
        fs::remove_file(&info.path).unwrap();
        fs::write(&info.path, b"not ours").unwrap();
        assert_eq!(b.res.status(&b.spec).unwrap().unwrap().condition, Condition::FileMismatch);
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
        assert!(!info.path.exists());
        // A file without a record.
        fs::write(&info.path, vec![0u8; 8192]).unwrap();
        let found = b.res.status(&b.spec).unwrap().unwrap();
        assert_eq!((found.condition, found.bytes), (Condition::Unrecorded, 8192));
        // A reserve removes it first and makes its own.
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        assert_eq!(info.condition, Condition::Held);
        assert_eq!(b.res.release(&b.spec).unwrap(), Action::Changed);
    }

    #[test]
    fn a_reservation_of_another_device_is_left_alone() {
        let b = bench();
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        let other = DeviceSpec { raw: "/dev/vdc".into(), ..b.spec.clone() };
        assert!(matches!(b.res.status(&other), Err(BackendError::InvalidState { .. })));
        assert!(matches!(b.res.release(&other), Err(BackendError::InvalidState { .. })));
        assert!(matches!(b.res.reserve(&other, 4096), Err(BackendError::InvalidState { .. })));
        // The hand-overs skip it.
        assert_eq!(b.res.release_for(&other, "test").unwrap(), None);
        assert_eq!(b.res.repair_for(&other, "test").unwrap(), Action::Identity);
        let cow = other.mount_point.join(".checkpointd/cow");
        assert_eq!(b.res.take_for(&other, &cow, "test").unwrap(), None);
        assert!(info.path.exists() && !cow.exists());
        assert_eq!(b.res.status(&b.spec).unwrap(), Some(info));
    }

    #[test]
    fn the_snapshot_hand_over_moves_the_file_and_keeps_its_blocks() {
        let b = bench();
        let info = b.res.reserve(&b.spec, 2 << 20).unwrap();
        let ino = fs::metadata(&info.path).unwrap().ino();
        let cow = b.spec.mount_point.join(".checkpointd/cow");
        let rec = b.res.take_for(&b.spec, &cow, "test").unwrap().expect("adopted");
        assert_eq!(rec.bytes, 2 << 20);
        assert!(!info.path.exists());
        assert_eq!(fs::metadata(&cow).unwrap().ino(), ino, "the same file, renamed");
        // Until the caller records the COW file, the reservation reads as moved away.
        assert_eq!(b.res.status(&b.spec).unwrap().unwrap().condition, Condition::FileMissing);
        assert_eq!(b.res.forget_moved(&b.spec).unwrap(), Action::Changed);
        assert_eq!(b.res.status(&b.spec).unwrap(), None);
        assert_eq!(fs::metadata(&cow).unwrap().len(), 2 << 20);
    }

    #[test]
    fn the_bow_and_f2fs_hand_over_releases_and_abort_releases() {
        let b = bench();
        assert_eq!(b.res.release_for(&b.spec, "test").unwrap(), None, "none held");
        let info = b.res.reserve(&b.spec, 1 << 20).unwrap();
        assert_eq!(b.res.release_for(&b.spec, "test").unwrap(), Some(1 << 20));
        assert!(!info.path.exists());
        assert_eq!(b.res.record(&b.spec).unwrap(), None);
    }
}
