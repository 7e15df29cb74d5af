//! The guest side of a capture, shared by the crash suite's VM tests (`vm_crash.rs`,
//! `vm_crash_ublk.rs`): loop devices in the guest's tmpfs, dm devices and dm-log-writes marks,
//! the seeded checkpointed workload, and saving a log into the shared folder; and the few
//! host-side helpers both tests use (the long mode, checks, counts, where failures are kept).

use std::fs;
use std::path::{Path, PathBuf};

use blockdev::loopdev::{LoopDevice, LoopOptions};
use testbench::device::{update_step, Rng};
use testbench::{guest, Failed};

const MIB: u64 = 1 << 20;

/// `CPD_CRASH_LONG=1`: the deep run (`cargo xtask test --long`), passed on to the guest.
pub const LONG_ENV: &str = "CPD_CRASH_LONG";

pub fn long_mode() -> bool {
    std::env::var(LONG_ENV).is_ok_and(|v| v == "1")
}

pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// A count for `cargo xtask test`'s summary.
pub fn report(line: &str) {
    blockcopy::crashdev::report_count(line);
}

/// Where a failing crash state's image and log are kept.
pub fn failures_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("crash-failures")
}

pub fn loop_file(name: &str, size: u64) -> Result<(fs::File, LoopDevice), Failed> {
    let path = Path::new("/dev/shm").join(name);
    let file =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(size)?;
    let dev = LoopDevice::attach(&file, &LoopOptions::default())?;
    Ok((file, dev))
}

pub fn majmin(dev: &Path) -> Result<String, Failed> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(dev)?.rdev();
    // Linux's dev_t encoding (MAJOR/MINOR in <linux/kdev_t.h>, glibc's gnu_dev_major).
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    Ok(format!("{major}:{minor}"))
}

/// Creates a dm device with `table` by dmsetup (no udev in the guest) and returns its node.
pub fn dm_create(name: &str, table: &str) -> Result<PathBuf, Failed> {
    guest::sh(&format!("dmsetup create --noudevsync {name} --table '{table}'"))?;
    let minor = guest::sh(&format!("dmsetup info -c --noheadings -o minor {name}"))?;
    Ok(PathBuf::from(format!("/dev/dm-{}", minor.trim())))
}

pub fn mark(log_dev: &str, label: &str) -> Result<(), Failed> {
    guest::sh(&format!("dmsetup message {log_dev} 0 mark {label}"))?;
    Ok(())
}

pub fn mkfs_ext4(dev: &Path) -> Result<(), Failed> {
    guest::sh(&format!(
        "mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0,nodiscard {}",
        dev.display()
    ))?;
    Ok(())
}

/// fsx/fsstress-like random operations (seeded): writes at random offsets, overwrites,
/// truncates, renames, unlinks, creates, fsync and fdatasync.
pub fn fsx(root: &Path, rng: &mut Rng, ops: usize) -> Result<(), Failed> {
    use std::os::unix::fs::FileExt;
    let dir = root.join("fsx");
    fs::create_dir_all(&dir)?;
    let name = |i: u64| dir.join(format!("f{i}"));
    for _ in 0..ops {
        let i = rng.below(6);
        match rng.below(10) {
            0..=3 => {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(name(i))?;
                let at = rng.below(2 * MIB);
                let len = 1 + usize::try_from(rng.below(192 << 10))?;
                f.write_all_at(&rng.bytes(len), at)?;
                if rng.below(3) == 0 {
                    f.sync_data()?;
                }
            }
            4 => {
                if let Ok(f) = fs::OpenOptions::new().write(true).open(name(i)) {
                    f.set_len(rng.below(MIB))?;
                }
            }
            5 => {
                let _ = fs::rename(name(i), name(rng.below(6)));
            }
            6 => {
                let _ = fs::remove_file(name(i));
            }
            7 => {
                if let Ok(f) = fs::File::open(name(i)) {
                    f.sync_all()?;
                }
            }
            8 => {
                let f = fs::File::create(name(i))?;
                let len = usize::try_from(rng.below(64 << 10))?;
                f.write_all_at(&rng.bytes(len), 0)?;
                f.sync_all()?;
            }
            _ => {
                guest::sh(&format!("sync -f {}", root.display()))?;
            }
        }
    }
    Ok(())
}

/// The checkpointed workload: a short version of the demo's update, then fsx-like operations.
/// `flush_dev`: a block device to flush (fsync of its node) every few operations. f2fs with
/// `checkpoint=disable` issues almost no flushes, and dm-log-writes logs completed writes
/// only at a flush: without these the whole workload would be logged at the commit.
pub fn workload(
    root: &Path,
    log_dev: &str,
    seed: u64,
    long: bool,
    flush_dev: Option<&Path>,
) -> Result<(), Failed> {
    let flush = || -> Result<(), Failed> {
        if let Some(dev) = flush_dev {
            fs::File::open(dev)?.sync_all()?;
        }
        Ok(())
    };
    let mut rng = Rng::new(seed);
    mark(log_dev, "update")?;
    for _ in 0..if long { 40 } else { 8 } {
        update_step(root, &mut rng)?;
        flush()?;
    }
    guest::sh(&format!("sync -f {}", root.display()))?;
    mark(log_dev, "fsx")?;
    for _ in 0..if long { 40 } else { 6 } {
        fsx(root, &mut rng, 10)?;
        flush()?;
    }
    guest::sh(&format!("sync -f {}", root.display()))?;
    flush()?;
    Ok(())
}

/// A small file written and fsynced: ext4 commits its journal with a flush.
pub fn flush_through_journal(root: &Path) -> Result<(), Failed> {
    let f = fs::File::create(root.join(".flush"))?;
    std::io::Write::write_all(&mut &f, b"flush")?;
    f.sync_all()?;
    Ok(())
}

/// The used part of a log device (every entry), copied into the shared folder.
pub fn save_log(log_file: &Path, to: &Path) -> Result<(), Failed> {
    let mut r = blockdev::logwrites::LogReader::new(fs::File::open(log_file)?)?;
    let entries = r.entries()?;
    let s = u64::from(r.super_block().sector_size);
    let end = entries.last().map_or(s, |e| {
        let data = if e.is_data_write() { e.nr_sectors * s } else { 0 };
        e.data_offset + data
    });
    let mut src = fs::File::open(log_file)?;
    let mut dst = fs::File::create(to)?;
    std::io::copy(&mut std::io::Read::take(&mut src, end), &mut dst)?;
    println!(
        "{}: {} entries, {} MiB, summary {:?}",
        to.display(),
        entries.len(),
        end / MIB,
        blockdev::logwrites::summarize(&entries)
    );
    Ok(())
}
