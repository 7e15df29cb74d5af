//! Workspace binaries for the guest, on a read-only disk image.
//!
//! The guest's root is the host's over 9p, which under TCG reads about 10 MB/s. Copying the
//! device's debug binaries (`checkpointd`, `checkpointctl`, `bow-ublk`: about 105 MB) to tmpfs
//! took 16 s of every scenario boot, and running them from 9p in place reads every page they
//! touch again at each start (about 1 s per `checkpointctl` call). Instead the host puts them
//! on a small ext4 image ([`image`]), [`crate::vm::Vm::binaries`] attaches it read-only as one
//! more virtio disk (after the scenario's own, so their names do not move), and the guest
//! mounts it ([`mount`]) and runs them from there: only the pages they touch are read, from
//! virtio-blk, once per boot.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::{guest, paths, Failed};

/// The serial number of the image's virtio disk in the guest.
pub const SERIAL: &str = "tbbin";
/// Where the guest mounts the image.
pub const MOUNT: &str = "/dev/shm/bin";

/// Host: the image holding `files` (name in the image, host path). Built once per set of
/// files, by name, size and modification time, under [`images_dir`]; concurrent test
/// processes each build into a file of their own and rename it into place.
///
/// Nothing here deletes an image: a test process may hold an image's path for many minutes
/// while it waits for a guest slot, and another process deleting "old" images took one away
/// from under a waiting boot (a failed CI run). `cargo xtask test` empties the folder before
/// its VM phase, when no test process runs ([`remove_images`]).
pub fn image(files: &[(String, PathBuf)]) -> io::Result<PathBuf> {
    let dir = images_dir();
    fs::create_dir_all(&dir)?;
    let mut hasher = DefaultHasher::new();
    let mut bytes = 0u64;
    for (name, path) in files {
        let meta = fs::metadata(path).map_err(|e| annotate(e, path))?;
        (name, path, meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
        bytes += meta.len();
    }
    let image = dir.join(format!("bin-{:016x}.img", hasher.finish()));
    // A test binary boots its trials from several threads at once: one builds, the others
    // find its image (other processes may still build the same image; the rename settles it).
    static BUILDING: Mutex<()> = Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if image.is_file() {
        return Ok(image);
    }
    let stage = tempfile::Builder::new().prefix("stage").tempdir_in(&dir)?;
    for (name, path) in files {
        // A hard link when the target dir shares the file system, else a copy.
        let to = stage.path().join(name);
        if fs::hard_link(path, &to).is_err() {
            fs::copy(path, &to).map_err(|e| annotate(e, path))?;
        }
    }
    let partial = tempfile::Builder::new().prefix("partial").suffix(".img").tempfile_in(&dir)?;
    // The files, a tenth more for ext4's metadata, and room for small ones: no journal (the
    // image is never written in the guest).
    let size = (bytes + bytes / 10 + (8 << 20)).div_ceil(1 << 20) << 20;
    partial.as_file().set_len(size)?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-O", "^has_journal", "-E", "root_owner=0:0", "-d"])
        .arg(stage.path())
        .arg(partial.path())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running mkfs.ext4: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.ext4 -d {} {}: {}",
            stage.path().display(),
            partial.path().display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    partial.persist(&image).map_err(|e| e.error)?;
    Ok(image)
}

/// Where the images are kept: `<target>/testbench/bin-images/`.
pub fn images_dir() -> PathBuf {
    paths::target_dir().join("testbench").join("bin-images")
}

/// Deletes every image (and any left-over of an interrupted build). Only while no test
/// process can be using one: `cargo xtask test` calls it before its VM phase.
pub fn remove_images() -> io::Result<()> {
    match fs::remove_dir_all(images_dir()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Guest: mounts the image read-only at [`MOUNT`] (once per boot) and returns [`MOUNT`].
///
/// # Errors
/// When the VM has no image attached ([`crate::vm::Vm::binaries`]) or the mount fails.
pub fn mount() -> Result<PathBuf, Failed> {
    let dir = PathBuf::from(MOUNT);
    let mounted = fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(MOUNT));
    if !mounted {
        let disk = guest::disk_by_serial(SERIAL).ok_or_else(|| {
            format!("no disk with serial {SERIAL}: attach the binaries with Vm::binaries")
        })?;
        guest::sh(&format!(
            "mkdir -p {MOUNT} && mount -t ext4 -o ro,noload {} {MOUNT}",
            disk.display()
        ))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs_cat(image: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat /{name}")])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs, installed by cargo xtask setup)");
        assert!(out.status.success(), "debugfs: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    #[test]
    fn the_image_holds_the_files_and_is_rebuilt_only_when_one_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"first program").unwrap();
        fs::write(&b, vec![7u8; 300_000]).unwrap();
        let files = vec![("one".to_owned(), a.clone()), ("two".to_owned(), b.clone())];
        let image = super::image(&files).unwrap();
        assert_eq!(debugfs_cat(&image, "one"), b"first program");
        assert!(debugfs_cat(&image, "two") == vec![7u8; 300_000]);
        // The same files: the same image, not rebuilt.
        let built = fs::metadata(&image).unwrap().modified().unwrap();
        assert_eq!(super::image(&files).unwrap(), image);
        assert_eq!(fs::metadata(&image).unwrap().modified().unwrap(), built);
        // A changed file (another size): another image, with the new contents.
        fs::write(&a, b"second program, longer").unwrap();
        let again = super::image(&files).unwrap();
        assert_ne!(again, image);
        assert_eq!(debugfs_cat(&again, "one"), b"second program, longer");
        for i in [image, again] {
            let _ = fs::remove_file(i);
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let missing = PathBuf::from("/nonexistent/checkpointd-binimage-test");
        let err = super::image(&[("x".to_owned(), missing.clone())]).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }
}
