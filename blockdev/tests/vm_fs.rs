//! Loop options, block ioctls and filesystem ioctls on a real kernel, checked against the
//! e2fsprogs tools: FITRIM, GETFSMAP free space vs `dumpe2fs`, FIEMAP vs `filefrag -v`,
//! f2fs pinning, statvfs, mount / remount / umount with the kernel's reason on failure.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use blockdev::fs::{self as bfs, extent_flags};
use blockdev::loopdev::{LoopDevice, LoopOptions};
use blockdev::mount::{self, MountOptions, UnmountMode};
use blockdev::{blk, Bytes, ErrorKind};
use common::{ensure, loop_file};
use testbench::vm::Vm;
use testbench::{guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;
const MNT: &str = "/dev/shm/fs-mnt";

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("loop_block_and_filesystem_ioctls_agree_with_e2fsprogs", host_fs)],
        &[("fs", guest_fs)],
    )
}

fn host_fs() -> Result<(), Failed> {
    let run = Vm::new("blockdev_fs").modules(&["loop", "dm-mod", "f2fs"]).run_self("fs", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    Ok(())
}

fn allocated(path: &Path) -> Result<u64, Failed> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

fn guest_fs(_: &[String]) -> Result<(), Failed> {
    loop_options()?;
    ext4()?;
    f2fs_pin()?;
    Ok(())
}

fn loop_options() -> Result<(), Failed> {
    // Direct I/O needs a backing filesystem with O_DIRECT (tmpfs has none before 6.6): put the
    // backing file on an ext4 made on another loop device.
    let (_h, host) = loop_file("dio-host.img", 32 * MIB, &LoopOptions::default())?;
    guest::sh(&format!("mkfs.ext4 -q {}", host.path().display()))?;
    let host_mnt = Path::new("/dev/shm/dio-mnt");
    fs::create_dir_all(host_mnt)?;
    mount::mount(host.path(), host_mnt, "ext4", &MountOptions::default())?;
    let img = host_mnt.join("opts.img");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&img)?;
    f.set_len(8 * MIB)?;
    // Block size, direct I/O.
    let opts = LoopOptions { block_size: Some(4096), direct_io: true, ..LoopOptions::default() };
    let lo = LoopDevice::attach(&f, &opts)?;
    ensure(blk::logical_block_size(lo.file())? == 4096, "block_size 4096")?;
    ensure(blk::physical_block_size(lo.file())? >= 4096, "physical >= logical")?;
    let sys = format!("/sys/block/loop{}/loop", lo.number());
    ensure(fs::read_to_string(format!("{sys}/dio"))?.trim() == "1", "direct I/O on")?;
    ensure(blk::size(lo.file())? == Bytes::new(8 * MIB), "size")?;
    blk::flush_buffers(lo.file())?;
    lo.detach()?;
    drop(f);
    // The loop device's last reference to the file may still be dropping: detach lazily.
    mount::umount(host_mnt, UnmountMode::Detach)?;
    host.detach()?;

    let path = Path::new("/dev/shm/ro.img");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    f.set_len(MIB)?;
    let ro = LoopDevice::attach(&f, &LoopOptions { read_only: true, ..LoopOptions::default() })?;
    ensure(fs::read_to_string(format!("/sys/block/loop{}/ro", ro.number()))?.trim() == "1", "ro")?;
    // Opening for write or writing must fail.
    let refused = match OpenOptions::new().write(true).open(ro.path()) {
        Err(_) => true,
        Ok(w) => w.write_all_at(&[1u8; 512], 0).and_then(|()| w.sync_all()).is_err(),
    };
    ensure(refused, "a read-only loop device refuses writes")?;
    ro.detach()?;

    let auto = LoopDevice::attach(&f, &LoopOptions { autoclear: true, ..LoopOptions::default() })?;
    let n = auto.number();
    let backing = format!("/sys/block/loop{n}/loop/backing_file");
    ensure(Path::new(&backing).exists(), "bound")?;
    drop(auto); // last close: the kernel detaches
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Path::new(&backing).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ensure(!Path::new(&backing).exists(), "autoclear detached on last close")?;
    println!("loop options ok");
    Ok(())
}

fn ext4() -> Result<(), Failed> {
    let (_img, lo) = loop_file("fs.img", 64 * MIB, &LoopOptions::default())?;
    let img = Path::new("/dev/shm/fs.img");
    guest::sh(&format!("mkfs.ext4 -q -b 4096 -E nodiscard {}", lo.path().display()))?;
    fs::create_dir_all(MNT)?;
    let mnt = Path::new(MNT);

    // A refused mount carries the filesystem's reason.
    let bad = MountOptions { data: "bogus_option".into(), ..MountOptions::default() };
    let e = mount::mount(lo.path(), mnt, "ext4", &bad).unwrap_err();
    println!("bad mount: {e}");
    ensure(e.kind() == ErrorKind::Invalid, "EINVAL")?;
    ensure(e.kernel_message.as_deref().is_some_and(|m| m.contains("bogus_option")), "reason")?;

    mount::mount(lo.path(), mnt, "ext4", &MountOptions { noatime: true, ..Default::default() })?;
    // Some data, then delete part of it so there is free space to trim.
    for i in 0..8u8 {
        fs::write(mnt.join(format!("f{i}")), common::pattern(i, 2 << 20))?;
    }
    guest::sh("sync")?;
    for i in 0..6u8 {
        fs::remove_file(mnt.join(format!("f{i}")))?;
    }
    guest::sh("sync")?;

    // ---- FITRIM: trims bytes; the loop device punches holes in the backing file ----
    let before = allocated(img)?;
    let dir = File::open(mnt)?;
    let trimmed = bfs::fitrim_all(&dir)?;
    let after = allocated(img)?;
    println!("FITRIM trimmed {trimmed} bytes; backing file {before} -> {after} bytes allocated");
    ensure(trimmed.get() > 10 * MIB && trimmed.get() <= 64 * MIB, "trimmed bytes")?;
    ensure(after < before, "holes punched")?;

    // ---- statvfs ----
    let space = bfs::statvfs(mnt)?;
    println!("statvfs: {space:?}");
    ensure(space.block_size == Bytes::new(4096) && space.available.get() > 0, "statvfs")?;
    ensure(space.total.get() <= 64 * MIB && space.total.get() > 48 * MIB, "total")?;

    // ---- FIEMAP vs filefrag ----
    let frag = mnt.join("frag.bin");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&frag)?;
    for part in 0..4u64 {
        // Written apart, with holes, so the file has several extents.
        f.write_all_at(&common::pattern(0x70, 64 * 1024), part * MIB)?;
        f.sync_all()?;
        fs::write(mnt.join(format!("spacer{part}")), common::pattern(1, 256 * 1024))?;
        guest::sh("sync")?;
    }
    let ours: Vec<(u64, u64, u64)> = bfs::fiemap(&f, true)?
        .iter()
        .map(|e| (e.logical.get() / 4096, e.physical.get() / 4096, e.length.get() / 4096))
        .collect();
    let out = guest::sh(&format!("filefrag -v -b4096 {}", frag.display()))?;
    let theirs = parse_filefrag(&out);
    println!("FIEMAP {ours:?}\nfilefrag {theirs:?}");
    ensure(ours.len() >= 4, "several extents")?;
    ensure(ours == theirs, "FIEMAP agrees with filefrag")?;
    let all = bfs::fiemap(&f, true)?;
    ensure(all.last().is_some_and(|e| e.flags & extent_flags::LAST != 0), "last flag")?;
    for e in &all {
        bfs::check_extent(e)?;
    }
    // A fallocated file: unwritten extents pass the policy.
    let pre = File::create(mnt.join("prealloc.bin"))?;
    nix::fcntl::fallocate(pre.as_fd(), nix::fcntl::FallocateFlags::empty(), 0, 4 << 20)?;
    let pre_ext = bfs::mappable_extents(&pre)?;
    ensure(pre_ext.iter().all(|e| e.flags & extent_flags::UNWRITTEN != 0), "unwritten")?;
    drop((f, pre));

    // ---- remount read-only: writes are refused ----
    drop(dir);
    mount::remount(mnt, &MountOptions { read_only: true, ..Default::default() })?;
    let e = File::create(mnt.join("after-ro")).expect_err("read-only after remount");
    ensure(e.raw_os_error() == Some(libc::EROFS), format!("{e}"))?;

    // ---- GETFSMAP free space vs dumpe2fs, on a freshly mounted read-only filesystem (a
    // mounted ext4 counts its in-memory preallocations as used; the on-disk bitmap does not) ----
    mount::umount(mnt, UnmountMode::Normal)?;
    mount::mount(lo.path(), mnt, "ext4", &MountOptions { read_only: true, ..Default::default() })?;
    let dir = File::open(mnt)?;
    let records = bfs::getfsmap(&dir)?;
    ensure(records.last().is_some_and(|r| r.flags & bfs::FMR_OF_LAST != 0), "last record flagged")?;
    let free: Vec<(u64, u64)> = merge(
        bfs::free_extents(&dir)?.iter().map(|(o, l)| (o.get() / 4096, l.get() / 4096)).collect(),
    );
    let dump = guest::sh(&format!("dumpe2fs {} 2>/dev/null", lo.path().display()))?;
    let theirs = merge(parse_dumpe2fs_free(&dump));
    println!("GETFSMAP: {} records, free {:?}; dumpe2fs free {:?}", records.len(), free, theirs);
    ensure(!free.is_empty() && free == theirs, "GETFSMAP free space agrees with dumpe2fs")?;
    let dev = records[0].device_id().ok_or("device id")?;
    ensure(dev == lo.dev(), format!("fmr_device {dev} is the loop device {}", lo.dev()))?;
    // The continuation protocol: three records per call gives the same map.
    let small = bfs::getfsmap_batched(&dir, 3)?;
    ensure(small == records, format!("batched map differs: {small:?}"))?;
    let mut end = 0u64;
    for r in &records {
        ensure(r.physical.get() >= end, "records ordered, not overlapping")?;
        end = r.physical.get() + r.length.get();
    }
    drop(dir);
    mount::umount(mnt, UnmountMode::Normal)?;

    // ---- BLKDISCARD on the loop device punches the backing file ----
    let before = allocated(img)?;
    let rw = OpenOptions::new().read(true).write(true).open(lo.path())?;
    blk::discard(&rw, Bytes::new(0), Bytes::new(64 * MIB))?;
    drop(rw);
    let after = allocated(img)?;
    println!("BLKDISCARD: {before} -> {after} bytes allocated");
    ensure(after < before && after <= MIB, "discard punched the whole file")?;
    lo.detach()?;
    println!("ext4 ok");
    Ok(())
}

/// `filefrag -v` extent lines: `   0:        0..      15:      34816..     34831:     16: ...`.
fn parse_filefrag(out: &str) -> Vec<(u64, u64, u64)> {
    let mut v = Vec::new();
    for line in out.lines() {
        let parts: Vec<&str> = line.split(':').map(str::trim).collect();
        if parts.len() < 4 || parts[0].parse::<u64>().is_err() {
            continue;
        }
        let logical = parts[1].split("..").next().and_then(|s| s.trim().parse().ok());
        let physical = parts[2].split("..").next().and_then(|s| s.trim().parse().ok());
        let len = parts[3].trim().parse().ok();
        if let (Some(l), Some(p), Some(n)) = (logical, physical, len) {
            v.push((l, p, n));
        }
    }
    v
}

/// The per-group `  Free blocks: 1234-5678, 9000` lines of dumpe2fs, as (start, length) in blocks.
fn parse_dumpe2fs_free(out: &str) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for line in out.lines() {
        // Group lines are indented; the superblock's unindented "Free blocks:" is a count.
        if !line.starts_with(' ') {
            continue;
        }
        let Some(rest) = line.trim().strip_prefix("Free blocks:") else { continue };
        for range in rest.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                v.push((a, b - a + 1));
            }
        }
    }
    v
}

/// Sorts and merges adjacent ranges.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in v {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => out.push((s, l)),
        }
    }
    out
}

fn f2fs_pin() -> Result<(), Failed> {
    let (_img, lo) = loop_file("f2fs.img", 128 * MIB, &LoopOptions::default())?;
    guest::sh(&format!("mkfs.f2fs -q {}", lo.path().display()))?;
    let mnt = Path::new("/dev/shm/f2fs-mnt");
    fs::create_dir_all(mnt)?;
    mount::mount(lo.path(), mnt, "f2fs", &MountOptions::default())?;
    let f = File::create(mnt.join("pinned.bin"))?;
    bfs::f2fs_pin_file(&f, true)?;
    nix::fcntl::fallocate(f.as_fd(), nix::fcntl::FallocateFlags::empty(), 0, 8 << 20)?;
    let ext = bfs::mappable_extents(&f)?;
    println!("pinned f2fs file: {} extents, first at {}", ext.len(), ext[0].physical);
    ensure(ext.iter().map(|e| e.length.get()).sum::<u64>() == 8 * MIB, "covers the file")?;
    drop(f);
    mount::umount(mnt, UnmountMode::Normal)?;
    lo.detach()?;
    println!("f2fs pin ok");
    Ok(())
}
