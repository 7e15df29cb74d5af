//! dm-bow control through sysfs (`/sys/block/dm-N/bow/{state,free}`), see dm-bow-format.md §1.3
//! and vold-checkpoint.md §6.4.
//!
//! The sysfs root is a parameter so the lookup runs on the host against a fake tree.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::ErrorKind;
use crate::units::{Bytes, DevId};

/// Deepest device stack we follow through `slaves/`.
const MAX_DEPTH: usize = 16;

/// dm-bow's state (the number in `bow/state`): the one type, shared with the engine model.
/// The only legal writes are `Trim → Checkpoint` and `Checkpoint → Committed`.
pub use bow::model::BowState;

/// Parses what `bow/state` holds ("0\n", "1\n", "2\n").
fn state_from_text(s: &str) -> Option<BowState> {
    s.trim().parse::<u8>().ok().and_then(BowState::from_value)
}

/// A dm-bow sysfs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BowError {
    /// Reading or writing a sysfs file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A sysfs file held something unexpected.
    #[error("{path}: unexpected content {text:?}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// Its content.
        text: String,
    },
    /// The kernel accepted the write but the state did not change (dm-bow returns positive
    /// block-layer status codes from failed transitions, which look like a short write).
    #[error("bow state is {now:?} after writing {wanted:?}")]
    StateNotChanged {
        /// What was written.
        wanted: BowState,
        /// What the state is.
        now: BowState,
    },
}

impl BowError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { source, .. } => ErrorKind::from_io(source),
            Self::BadValue { .. } => ErrorKind::Corrupt,
            Self::StateNotChanged { .. } => ErrorKind::Invalid,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BowError + '_ {
    move |source| BowError::Io { path: path.to_owned(), source }
}

/// A sysfs tree (normally `/sys`).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// The system's `/sys`.
    pub fn system() -> Self {
        Self { root: PathBuf::from("/sys") }
    }

    /// A tree rooted elsewhere (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Finds the dm-bow device at or below `dev`: start at `/sys/dev/block/M:m`; a directory
    /// without `dm/name` is not a dm device (not found); one with a `bow/` control directory is
    /// the answer; otherwise follow `slaves/` if it has exactly one entry (`/sys/block/<it>`).
    /// This is fs_mgr's walk, except that it recognises dm-bow by its `bow/` directory rather
    /// than by the device name `bow` (Android names the device `bow`; we name it by
    /// [`crate::names`]).
    pub fn find_bow(&self, dev: DevId) -> Result<Option<BowControl>, BowError> {
        let mut dir = self.root.join("dev/block").join(dev.to_string());
        for _ in 0..MAX_DEPTH {
            if !dir.join("dm/name").is_file() {
                return Ok(None);
            }
            let bow = dir.join("bow");
            if bow.join("state").is_file() {
                let dir = fs::canonicalize(&bow).unwrap_or(bow);
                return Ok(Some(BowControl { dir }));
            }
            let slaves = dir.join("slaves");
            let entries = match fs::read_dir(&slaves) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(&slaves)(e)),
            };
            let names: Vec<_> = entries
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err(&slaves))?
                .into_iter()
                .map(|e| e.file_name())
                .collect();
            match &names[..] {
                [one] => dir = self.root.join("block").join(one),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// The `bow/` control directory of one dm-bow device.
#[derive(Debug, Clone)]
pub struct BowControl {
    dir: PathBuf,
}

impl BowControl {
    /// The control directory (`.../dm-N/bow`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `bow/state`.
    pub fn state(&self) -> Result<BowState, BowError> {
        let path = self.dir.join("state");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        state_from_text(&text).ok_or(BowError::BadValue { path, text })
    }

    /// Writes `bow/state` and checks that the state changed.
    pub fn set_state(&self, state: BowState) -> Result<(), BowError> {
        let path = self.dir.join("state");
        let mut f = fs::OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
        f.write_all(state.value().to_string().as_bytes()).map_err(io_err(&path))?;
        drop(f);
        let now = self.state()?;
        if now != state {
            return Err(BowError::StateNotChanged { wanted: state, now });
        }
        Ok(())
    }

    /// Reads `bow/free`: bytes of free (trimmed) space left for backups.
    pub fn free(&self) -> Result<Bytes, BowError> {
        let path = self.dir.join("free");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        text.trim().parse().map(Bytes::new).map_err(|_| BowError::BadValue { path, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Builds: loop0 (7:0) <- dm-0 "cpd-data-bow" (bow) <- dm-1 "default-key" (254:1),
    /// and dm-2 (254:2) with two slaves, and dm-3 (254:3) plain linear.
    fn fake_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let dev = |name: &str, num: &str, dm_name: Option<&str>, slaves: &[&str]| {
            let d = r.join("devices/virtual/block").join(name);
            fs::create_dir_all(d.join("slaves")).unwrap();
            if let Some(n) = dm_name {
                fs::create_dir_all(d.join("dm")).unwrap();
                fs::write(d.join("dm/name"), format!("{n}\n")).unwrap();
            }
            for s in slaves {
                symlink(format!("../../{s}"), d.join("slaves").join(s)).unwrap();
            }
            fs::create_dir_all(r.join("block")).unwrap();
            fs::create_dir_all(r.join("dev/block")).unwrap();
            symlink(format!("../devices/virtual/block/{name}"), r.join("block").join(name))
                .unwrap();
            symlink(format!("../../devices/virtual/block/{name}"), r.join("dev/block").join(num))
                .unwrap();
            d
        };
        dev("loop0", "7:0", None, &[]);
        let bow = dev("dm-0", "254:0", Some("cpd-data-bow"), &["loop0"]);
        fs::create_dir_all(bow.join("bow")).unwrap();
        fs::write(bow.join("bow/state"), "0\n").unwrap();
        fs::write(bow.join("bow/free"), "104857600\n").unwrap();
        dev("dm-1", "254:1", Some("default-key"), &["dm-0"]);
        dev("dm-2", "254:2", Some("two"), &["dm-0", "loop0"]);
        dev("dm-3", "254:3", Some("plain"), &["loop0"]);
        t
    }

    fn id(s: &str) -> DevId {
        s.parse().unwrap()
    }

    #[test]
    fn finds_bow_directly_and_through_one_slave() {
        let t = fake_tree();
        let sys = Sysfs::at(t.path());
        let direct = sys.find_bow(id("254:0")).unwrap().unwrap();
        assert!(direct.dir().ends_with("dm-0/bow"));
        let stacked = sys.find_bow(id("254:1")).unwrap().unwrap();
        assert!(stacked.dir().ends_with("dm-0/bow"));
        assert_eq!(stacked.state().unwrap(), BowState::Trim);
        assert_eq!(stacked.free().unwrap(), Bytes::new(104_857_600));
    }

    #[test]
    fn no_bow_when_not_dm_or_ambiguous_or_absent() {
        let t = fake_tree();
        let sys = Sysfs::at(t.path());
        assert!(sys.find_bow(id("7:0")).unwrap().is_none(), "loop device is not dm");
        assert!(sys.find_bow(id("254:2")).unwrap().is_none(), "two slaves");
        assert!(sys.find_bow(id("254:3")).unwrap().is_none(), "linear over loop");
        assert!(sys.find_bow(id("254:9")).unwrap().is_none(), "no such device");
    }

    #[test]
    fn state_write_is_verified() {
        let t = fake_tree();
        let ctl = Sysfs::at(t.path()).find_bow(id("254:0")).unwrap().unwrap();
        // A plain file takes the write, so the state reads back as written.
        ctl.set_state(BowState::Checkpoint).unwrap();
        assert_eq!(ctl.state().unwrap(), BowState::Checkpoint);
        fs::write(ctl.dir().join("state"), "7\n").unwrap();
        assert!(matches!(ctl.state(), Err(BowError::BadValue { .. })));
    }
}
