//! The engine's op journal file, `<state dir>/<dev id>.journal` (the format is
//! `bow_engine::journal`'s). The state directory is a tmpfs (`/run/bow-ublk` by default): the
//! journal must outlive the server's process, which is all it is for (after a power cut the
//! checkpoint is restored at the next boot), so it is written with plain `write()`s into the
//! page cache and never synced.
//!
//! `serve` creates it fresh (0600, in a 0700 directory); `recover` reads it, and after the
//! engine is rebuilt replaces it with the part that describes the rebuilt engine. A symbolic
//! link in its place is refused, never followed.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What went wrong with the journal file.
#[derive(Debug, thiserror::Error)]
pub enum JournalFileError {
    #[error("{path} is a symbolic link; refusing to use it as the engine's journal")]
    Symlink { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JournalFileError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            JournalFileError::Symlink { path: path.to_owned() }
        } else {
            JournalFileError::Io { what, path: path.to_owned(), source }
        }
    }
}

/// The journal of device `dev_id`.
pub fn path(state_dir: &Path, dev_id: u32) -> PathBuf {
    state_dir.join(format!("{dev_id}.journal"))
}

/// A journal file open for appending.
#[derive(Debug)]
pub struct JournalFile {
    pub path: PathBuf,
    pub file: File,
}

/// A journal as a dead server left it.
#[derive(Debug)]
pub struct OldJournal {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

fn refuse_symlink(path: &Path) -> Result<bool, JournalFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(JournalFileError::Symlink { path: path.to_owned() })
        }
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("inspecting", path)(e)),
    }
}

fn create_new(path: &Path) -> Result<File, JournalFileError> {
    if refuse_symlink(path)? {
        std::fs::remove_file(path).map_err(io("removing the old", path))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("creating", path))
}

/// Creates device `dev_id`'s journal fresh (an old one is replaced).
pub fn create(state_dir: &Path, dev_id: u32) -> Result<JournalFile, JournalFileError> {
    refuse_symlink(state_dir)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io("creating the state directory", state_dir))?;
    let path = path(state_dir, dev_id);
    let file = create_new(&path)?;
    Ok(JournalFile { path, file })
}

/// Reads device `dev_id`'s journal; `None` if there is none.
pub fn read(state_dir: &Path, dev_id: u32) -> Result<Option<OldJournal>, JournalFileError> {
    let path = path(state_dir, dev_id);
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("opening", &path)(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("reading", &path))?;
    Ok(Some(OldJournal { path, bytes }))
}

/// Replaces `old` with its first `len` bytes (the part that describes the rebuilt engine: a
/// dropped last step and a torn frame go), through a new file renamed over it; returns the new
/// file open for appending.
pub fn cut(old: &OldJournal, len: usize) -> Result<File, JournalFileError> {
    let mut new_path = old.path.clone().into_os_string();
    new_path.push(".new");
    let new_path = PathBuf::from(new_path);
    let mut file = create_new(&new_path)?;
    file.write_all(&old.bytes[..len.min(old.bytes.len())]).map_err(io("writing", &new_path))?;
    std::fs::rename(&new_path, &old.path).map_err(io("renaming", &new_path))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn created_fresh_private_and_cut_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("run").join("bow-ublk");
        let mut j = create(&state, 3).unwrap();
        j.file.write_all(b"old journal").unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        // serve again: fresh, not appended to.
        let mut j = create(&state, 3).unwrap();
        assert_eq!(j.path, state.join("3.journal"));
        assert_eq!(std::fs::metadata(&j.path).unwrap().mode() & 0o777, 0o600);
        j.file.write_all(b"0123456789").unwrap();
        let old = read(&state, 3).unwrap().unwrap();
        assert_eq!(old.bytes, b"0123456789");
        let mut f = cut(&old, 4).unwrap();
        f.write_all(b"ab").unwrap();
        assert_eq!(read(&state, 3).unwrap().unwrap().bytes, b"0123ab");
        assert!(read(&state, 4).unwrap().is_none());
    }

    #[test]
    fn a_symlink_in_place_of_the_journal_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("5.journal")).unwrap();
        let e = create(dir.path(), 5).unwrap_err();
        assert!(matches!(e, JournalFileError::Symlink { .. }), "{e}");
        let e = read(dir.path(), 5).unwrap_err();
        assert!(matches!(e, JournalFileError::Symlink { .. }), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        // A state directory that is a link is refused too.
        let link = dir.path().join("state");
        std::os::unix::fs::symlink(dir.path().join("real"), &link).unwrap();
        assert!(matches!(create(&link, 1), Err(JournalFileError::Symlink { .. })));
    }
}
