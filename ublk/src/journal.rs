//! The engine's op journal file, `<state dir>/<dev id>.journal` (the format is
//! `bow_engine::journal`'s). The state directory is a tmpfs (`/run/bow-ublk` by default): the
//! journal must outlive the server's process, which is all it is for (after a power cut the
//! checkpoint is restored at the next boot), so it is written with plain `write()`s into the
//! page cache and never synced.
//!
//! `serve` creates it fresh (0600, in a 0700 directory); `recover` reads it, and after the
//! engine is rebuilt replaces it with the part that describes the rebuilt engine. A symbolic
//! link in its place is refused, never followed.
//!
//! The server appends through a shared memory mapping of the file ([`MappedJournal`]), not
//! `write()`: every batch that changes a decision appends a frame before it issues anything,
//! and under emulation a system call per request was a measurable part of a write's cost. The
//! mapping's pages are the file's page-cache pages, so what was stored survives the process.
//! The file is grown in steps and its unwritten rest is zero; a frame's length is stored last,
//! so a process killed inside an append leaves a zero length where the frame starts, which the
//! reader takes as the end (`bow_engine::journal::read`).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, Ordering};

/// What went wrong with the journal file.
#[derive(Debug, thiserror::Error)]
pub enum JournalFileError {
    #[error("{path} is a symbolic link; refusing to use it as the engine's journal")]
    Symlink { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// The error of `what` on `path` (ELOOP, from `O_NOFOLLOW`, as a refused link).
pub(crate) fn io_error<'a>(
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
        Err(e) => Err(io_error("inspecting", path)(e)),
    }
}

pub(crate) fn create_new(path: &Path) -> Result<File, JournalFileError> {
    if refuse_symlink(path)? {
        std::fs::remove_file(path).map_err(io_error("removing the old", path))?;
    }
    // Read and write: a shared writable mapping needs both.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error("creating", path))
}

/// Creates device `dev_id`'s journal fresh (an old one is replaced).
pub fn create(state_dir: &Path, dev_id: u32) -> Result<JournalFile, JournalFileError> {
    create_state_dir(state_dir)?;
    let path = path(state_dir, dev_id);
    let file = create_new(&path)?;
    Ok(JournalFile { path, file })
}

/// Creates the state directory (0700) if it is not there; a link in its place is refused.
pub(crate) fn create_state_dir(state_dir: &Path) -> Result<(), JournalFileError> {
    refuse_symlink(state_dir)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_error("creating the state directory", state_dir))
}

/// Reads device `dev_id`'s journal; `None` if there is none.
pub fn read(state_dir: &Path, dev_id: u32) -> Result<Option<OldJournal>, JournalFileError> {
    let path = path(state_dir, dev_id);
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", &path)(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_error("reading", &path))?;
    Ok(Some(OldJournal { path, bytes }))
}

/// Replaces `old` with its first `len` bytes (the part that describes the rebuilt engine: a
/// dropped last step, a torn frame and a mapped journal's zero rest go), through a new file
/// renamed over it; returns the new file open for appending.
pub fn cut(old: &OldJournal, len: usize) -> Result<File, JournalFileError> {
    let mut new_path = old.path.clone().into_os_string();
    new_path.push(".new");
    let new_path = PathBuf::from(new_path);
    let mut file = create_new(&new_path)?;
    file.write_all(&old.bytes[..len.min(old.bytes.len())])
        .map_err(io_error("writing", &new_path))?;
    std::fs::rename(&new_path, &old.path).map_err(io_error("renaming", &new_path))?;
    Ok(file)
}

/// The first mapping, and the least a growth adds.
const MAP_STEP: usize = 1 << 20;

/// Appends to a journal file through a shared mapping of it (see the module's documentation).
///
/// Contract with the writer of the frames (`bow_engine`'s journal sink): every `write` call
/// begins with a whole frame or the header. The call's first four bytes (a frame's length) are
/// stored after the rest, so an append cut short by the process's death reads as the end.
#[derive(Debug)]
pub struct MappedJournal {
    path: PathBuf,
    file: File,
    map: NonNull<u8>,
    /// Bytes mapped; the file is exactly this long.
    mapped: usize,
    /// Bytes written; the file's bytes from here on are zero.
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only touched through `&mut self`.
unsafe impl Send for MappedJournal {}

impl MappedJournal {
    /// Maps `file` (at `path`), whose first `len` bytes are the journal so far and the rest (if
    /// any) zero, for appending after them.
    pub fn new(path: PathBuf, file: File, len: usize) -> Result<MappedJournal, JournalFileError> {
        let mapped = round_up(len.max(1), MAP_STEP);
        file.set_len(mapped as u64).map_err(io_error("growing", &path))?;
        let map = map_shared(&file, mapped, &path)?;
        Ok(MappedJournal { path, file, map, mapped, len })
    }

    /// Creates device `dev_id`'s journal fresh ([`create`]) and maps it.
    pub fn create(state_dir: &Path, dev_id: u32) -> Result<MappedJournal, JournalFileError> {
        let JournalFile { path, file } = create(state_dir, dev_id)?;
        MappedJournal::new(path, file, 0)
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes room for `need` bytes in all: the file grows (zero-filled) and the mapping follows.
    fn reserve(&mut self, need: usize) -> std::io::Result<()> {
        if need <= self.mapped {
            return Ok(());
        }
        let new = round_up(need.max(self.mapped.saturating_mul(2)), MAP_STEP);
        self.file.set_len(new as u64)?;
        // SAFETY: remaps this value's own mapping; nothing else holds a pointer into it.
        let addr = unsafe {
            libc::mremap(self.map.as_ptr().cast(), self.mapped, new, libc::MREMAP_MAYMOVE)
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.map = NonNull::new(addr.cast::<u8>()).expect("mremap does not return null");
        self.mapped = new;
        Ok(())
    }
}

/// Maps the first `len` bytes of `file` (at `path`) shared, readable and writable. The caller
/// owns the mapping: it unmaps it (`munmap`) before `file` goes.
pub(crate) fn map_shared(
    file: &File,
    len: usize,
    path: &Path,
) -> Result<NonNull<u8>, JournalFileError> {
    // SAFETY: a fresh shared mapping of an open file; no memory of ours is passed.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io_error("mapping", path)(std::io::Error::last_os_error()));
    }
    Ok(NonNull::new(addr.cast::<u8>()).expect("mmap does not return null on success"))
}

/// Runs `child` in a forked child and SIGKILLs it after a random delay below `spread_us`
/// microseconds (the next of `seed`'s xorshift steps), for the tests that show a writer killed
/// at any moment leaves a readable file. `child` returns whether it succeeded; a child that
/// finished before the kill must have. The child must only store into memory and make system
/// calls (it may not return into the test harness, which it never does: it exits).
#[cfg(test)]
pub(crate) fn kill_at_random(seed: &mut u64, spread_us: u64, child: impl FnOnce() -> bool) {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let delay = std::time::Duration::from_micros(*seed % spread_us.max(1));
    // SAFETY: the child runs `child` (stores and system calls only) and exits without
    // unwinding into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = if child() { 0 } else { 1 };
        // SAFETY: ends the forked child without unwinding into the harness.
        unsafe { libc::_exit(code) };
    }
    std::thread::sleep(delay);
    // SAFETY: our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: reaps our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let killed = libc::WIFSIGNALED(status);
    assert!(killed || libc::WEXITSTATUS(status) == 0, "writer failed: {status}");
}

fn round_up(n: usize, step: usize) -> usize {
    n.div_ceil(step).saturating_mul(step)
}

impl Write for MappedJournal {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.len.checked_add(buf.len()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        self.reserve(end)?;
        // SAFETY: `len..end` lies inside the mapping (reserved above) and `buf` is not in it.
        unsafe {
            let at = self.map.as_ptr().add(self.len);
            match <[u8; 4]>::try_from(buf.get(..4).unwrap_or_default()) {
                Ok(head) => {
                    std::ptr::copy_nonoverlapping(buf[4..].as_ptr(), at.add(4), buf.len() - 4);
                    // The length goes in after the body, in one store: a process killed
                    // before it leaves zero there, which the reader takes as the end.
                    compiler_fence(Ordering::Release);
                    std::ptr::write_unaligned(at.cast::<u32>(), u32::from_ne_bytes(head));
                }
                // Shorter than a frame's length field: never a frame, stored as it comes.
                Err(_) => std::ptr::copy_nonoverlapping(buf.as_ptr(), at, buf.len()),
            }
        }
        self.len = end;
        Ok(buf.len())
    }

    /// Nothing to do: the stores are in the page cache already, which is all the journal needs.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for MappedJournal {
    fn drop(&mut self) {
        // SAFETY: this value's own mapping, not used after this.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.mapped) };
    }
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

    use bow::units::{BlockSize, Sectors};
    use bow_engine::journal::{self as format, Entry, JournalIo};
    use bow_engine::Allocator;

    const DEVICE: u64 = 64 << 20;

    fn parse(bytes: &[u8]) -> format::ReadJournal {
        format::read(bytes, BlockSize::B4096, DEVICE, Allocator::FarEnd).unwrap()
    }

    /// `n` entries of varied frame sizes (batches of up to `96 * 4 * scale` I/Os).
    fn entries(n: usize, scale: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| match i % 5 {
                0 => Entry::Flush,
                1 => Entry::State(1),
                k => Entry::Batch(
                    (0..(i % 97) * k * scale)
                        .map(|j| JournalIo::Write {
                            sector: Sectors((i * 8 + j * 16) as u64),
                            len: 4096,
                        })
                        .collect(),
                ),
            })
            .collect()
    }

    #[test]
    fn a_mapped_journal_reads_back_grows_and_resumes_after_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = MappedJournal::create(dir.path(), 7).unwrap();
        let header = format::header(BlockSize::B4096, DEVICE, Allocator::FarEnd);
        j.write_all(&header).unwrap();
        let all = entries(3000, 4);
        let mut written = header.len();
        for e in &all {
            let f = format::frame(e);
            written += f.len();
            j.write_all(&f).unwrap();
        }
        assert!(written > 2 * MAP_STEP, "the test must grow the mapping ({written} bytes)");
        drop(j);
        let old = read(dir.path(), 7).unwrap().unwrap();
        // The file runs ahead of its contents, zero-filled, in whole steps.
        assert_eq!(old.bytes.len() % MAP_STEP, 0);
        assert!(old.bytes[written..].iter().all(|&b| b == 0));
        let r = parse(&old.bytes);
        assert_eq!(r.entries, all);
        assert_eq!(r.torn_tail, old.bytes.len() - written);
        // Recovery: cut after entry 1000, map again, append the rest: the same journal.
        let keep = r.ends[999];
        let file = cut(&old, keep).unwrap();
        let mut j = MappedJournal::new(old.path.clone(), file, keep).unwrap();
        for e in &all[1000..] {
            j.write_all(&format::frame(e)).unwrap();
        }
        drop(j);
        assert_eq!(parse(&read(dir.path(), 7).unwrap().unwrap().bytes).entries, all);
    }

    /// A writer process SIGKILLed at random moments leaves a journal that reads as a prefix of
    /// what it appended, never as damage: the length-last store at work, across growths.
    #[test]
    fn a_writer_killed_at_any_moment_leaves_a_readable_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let header = format::header(BlockSize::B4096, DEVICE, Allocator::FarEnd);
        let all = entries(6_000, 1);
        let frames: Vec<Vec<u8>> = all.iter().map(format::frame).collect();
        // Kills land anywhere in the time a whole append run takes here.
        let spread = {
            let mut j = MappedJournal::create(dir.path(), u32::MAX).unwrap();
            let t = std::time::Instant::now();
            frames.iter().for_each(|f| j.write_all(f).unwrap());
            u64::try_from(t.elapsed().as_micros()).unwrap().max(100) * 3 / 2
        };
        let (mut cut_short, mut complete, mut none) = (0, 0, 0);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for trial in 0..40u32 {
            let mut j = MappedJournal::create(dir.path(), trial).unwrap();
            j.write_all(&header).unwrap();
            kill_at_random(&mut seed, spread, || {
                for f in &frames {
                    if j.write_all(f).is_err() {
                        return false;
                    }
                }
                true
            });
            drop(j);
            let bytes = read(dir.path(), trial).unwrap().unwrap().bytes;
            let r = parse(&bytes);
            assert_eq!(r.entries[..], all[..r.entries.len()], "trial {trial}: not a prefix");
            match r.entries.len() {
                0 => none += 1,
                n if n == all.len() => complete += 1,
                _ => cut_short += 1,
            }
        }
        println!(
            "killed writers: {cut_short} cut short, {complete} complete, {none} before any frame"
        );
        assert!(cut_short >= 10, "too few kills landed inside the appends: {cut_short}");
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
