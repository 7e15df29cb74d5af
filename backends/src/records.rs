//! Durable per-(backend, device) records: what a backend must remember across boots and read
//! **before** the filesystem is mounted (the snapshot backend's COW file extents, chunk size
//! and state; the bow backend's free space at checkpoint start).
//!
//! They live in the metadata directory beside the daemon's SQLite store
//! (`<metadata dir>/backends/<backend>-<instance>.json`), on a filesystem that is never rolled
//! back: a record describes the checkpoint of /data, so it must not live on /data. Each record
//! is a small JSON document `{"version": 1, "record": …}`, written atomically: a temporary
//! file in the same directory, `fsync`, `rename` over the old one, `fsync` of the directory.
//! A reader sees the old record or the new one, never a mix, even across a power cut.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use policy::{Action, BackendError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the records' envelope.
pub const RECORD_VERSION: u32 = 1;

/// Folder under the metadata directory.
const SUBDIR: &str = "backends";

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    record: T,
}

/// The records of every backend, in one metadata directory.
#[derive(Clone, Debug)]
pub struct Records {
    dir: PathBuf,
}

fn check_token(what: &'static str, s: &str) -> Result<(), BackendError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BackendError::Corrupt {
            what: format!("record {what} {s:?}"),
            reason: "must be 1 to 64 characters of [a-z0-9_]".into(),
        })
    }
}

impl Records {
    /// Opens (creating if needed) the records folder under `metadata_dir`, which must exist.
    pub fn open(metadata_dir: &Path) -> Result<Records, BackendError> {
        if !metadata_dir.is_dir() {
            return Err(BackendError::io(
                format!("open records in {}", metadata_dir.display()),
                std::io::Error::from(ErrorKind::NotFound),
            ));
        }
        let dir = metadata_dir.join(SUBDIR);
        match fs::create_dir(&dir) {
            Ok(()) => sync_dir(metadata_dir)?,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(BackendError::io(format!("create {}", dir.display()), e)),
        }
        Ok(Records { dir })
    }

    /// The folder holding the records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of `backend` for `instance` lives.
    pub fn path(&self, backend: &str, instance: &str) -> PathBuf {
        self.dir.join(format!("{backend}-{instance}.json"))
    }

    /// Reads a record; `None` when there is none. A record that does not parse, or has a newer
    /// version, is [`BackendError::Corrupt`]: it is never silently ignored, because it may be
    /// the only map of a COW store.
    pub fn load<T: DeserializeOwned>(
        &self,
        backend: &str,
        instance: &str,
    ) -> Result<Option<T>, BackendError> {
        check_token("backend", backend)?;
        check_token("instance", instance)?;
        let path = self.path(backend, instance);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackendError::io(format!("read {}", path.display()), e)),
        };
        let corrupt = |reason: String| BackendError::Corrupt {
            what: format!("backend record {}", path.display()),
            reason,
        };
        let head: Envelope<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if head.version != RECORD_VERSION {
            return Err(corrupt(format!(
                "version {} (this checkpointd reads {RECORD_VERSION})",
                head.version
            )));
        }
        serde_json::from_value(head.record).map(Some).map_err(|e| corrupt(e.to_string()))
    }

    /// Replaces the record atomically (temporary file, fsync, rename, fsync of the folder).
    pub fn save<T: Serialize>(
        &self,
        backend: &str,
        instance: &str,
        record: &T,
    ) -> Result<(), BackendError> {
        check_token("backend", backend)?;
        check_token("instance", instance)?;
        let path = self.path(backend, instance);
        let tmp = self.dir.join(format!(".{backend}-{instance}.json.tmp"));
        let text = serde_json::to_vec_pretty(&Envelope { version: RECORD_VERSION, record })
            .map_err(|e| BackendError::io("encode record", std::io::Error::other(e)))?;
        write_atomically(&tmp, &path, &text)?;
        sync_dir(&self.dir)
    }

    /// Where the bytes of `kind` for `instance` live (`<kind>-<instance>.<ext>`).
    pub fn bytes_path(&self, kind: &str, instance: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{kind}-{instance}.{ext}"))
    }

    /// Replaces a file of raw bytes (a backend's artefact that is not a JSON record, e.g. a
    /// write trace) atomically, like [`Records::save`].
    pub fn save_bytes(
        &self,
        kind: &str,
        instance: &str,
        ext: &str,
        bytes: &[u8],
    ) -> Result<(), BackendError> {
        check_token("kind", kind)?;
        check_token("instance", instance)?;
        check_token("extension", ext)?;
        let path = self.bytes_path(kind, instance, ext);
        let tmp = self.dir.join(format!(".{kind}-{instance}.{ext}.tmp"));
        write_atomically(&tmp, &path, bytes)?;
        sync_dir(&self.dir)
    }

    /// Removes the record; `Identity` when there was none.
    pub fn clear(&self, backend: &str, instance: &str) -> Result<Action, BackendError> {
        check_token("backend", backend)?;
        check_token("instance", instance)?;
        let path = self.path(backend, instance);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(Action::Changed)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Action::Identity),
            Err(e) => Err(BackendError::io(format!("remove {}", path.display()), e)),
        }
    }
}

/// `tmp` written and synced, then renamed over `path` (the caller syncs the folder).
fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), BackendError> {
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    };
    write().map_err(|e| BackendError::io(format!("write {}", path.display()), e))
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackendError::io(format!("fsync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        extents: Vec<(u64, u64)>,
        state: String,
    }

    #[test]
    fn save_load_reopen_clear() {
        let meta = tempfile::tempdir().unwrap();
        let r = Records::open(meta.path()).unwrap();
        assert_eq!(r.load::<Rec>("snapshot", "data").unwrap(), None);
        let rec = Rec { extents: vec![(4096, 8192)], state: "armed".into() };
        r.save("snapshot", "data", &rec).unwrap();
        let again = Records::open(meta.path()).unwrap();
        assert_eq!(again.load::<Rec>("snapshot", "data").unwrap(), Some(rec.clone()));
        let rec2 = Rec { state: "merged".into(), ..rec };
        again.save("snapshot", "data", &rec2).unwrap();
        assert_eq!(r.load::<Rec>("snapshot", "data").unwrap(), Some(rec2));
        // No temporary file is left behind.
        let names: Vec<_> =
            fs::read_dir(r.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["snapshot-data.json"]);
        assert_eq!(r.clear("snapshot", "data").unwrap(), Action::Changed);
        assert_eq!(r.clear("snapshot", "data").unwrap(), Action::Identity);
        assert_eq!(r.load::<Rec>("snapshot", "data").unwrap(), None);
    }

    #[test]
    fn a_leftover_temporary_file_does_not_hide_the_record() {
        let meta = tempfile::tempdir().unwrap();
        let r = Records::open(meta.path()).unwrap();
        let rec = Rec { extents: vec![], state: "armed".into() };
        r.save("snapshot", "data", &rec).unwrap();
        // A crash after writing the temporary file and before the rename.
        fs::write(r.dir().join(".snapshot-data.json.tmp"), b"{\"version\":1,\"rec").unwrap();
        assert_eq!(r.load::<Rec>("snapshot", "data").unwrap(), Some(rec.clone()));
        r.save("snapshot", "data", &rec).unwrap();
        assert_eq!(r.load::<Rec>("snapshot", "data").unwrap(), Some(rec));
    }

    #[test]
    fn corrupt_or_newer_records_are_refused_not_ignored() {
        let meta = tempfile::tempdir().unwrap();
        let r = Records::open(meta.path()).unwrap();
        fs::write(r.path("snapshot", "data"), b"{not json").unwrap();
        let e = r.load::<Rec>("snapshot", "data").unwrap_err();
        assert!(matches!(e, BackendError::Corrupt { .. }), "{e}");
        fs::write(r.path("snapshot", "data"), br#"{"version":2,"record":{}}"#).unwrap();
        let e = r.load::<Rec>("snapshot", "data").unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        fs::write(r.path("snapshot", "data"), br#"{"version":1,"record":{"state":3}}"#).unwrap();
        assert!(matches!(r.load::<Rec>("snapshot", "data"), Err(BackendError::Corrupt { .. })));
    }

    #[test]
    fn names_are_checked_and_a_missing_metadata_dir_is_an_error() {
        let meta = tempfile::tempdir().unwrap();
        let r = Records::open(meta.path()).unwrap();
        assert!(r.save("snapshot", "../etc", &1u8).is_err());
        assert!(r.load::<u8>("Snap", "data").is_err());
        assert!(Records::open(&meta.path().join("missing")).is_err());
    }
}
