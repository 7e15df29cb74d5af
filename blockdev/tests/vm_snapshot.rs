//! snapshot-origin + persistent snapshot whose COW store is a FIEMAP-mapped file inside the
//! filesystem it protects; rollback with snapshot-merge (verified bit-exact with O_DIRECT) and
//! commit by dropping the snapshot. The sequence follows vm-bench.md.

mod common;

use std::fs::{self, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use blockdev::dm::target::{
    LinearParams, Persistence, SnapshotOriginParams, SnapshotParams, SnapshotStatus,
};
use blockdev::dm::{
    DevRef, DeviceMapper, DmName, SuspendMode, Table, TableSlot, Target, TargetLine,
};
use blockdev::loopdev::LoopOptions;
use blockdev::names::{self, object_name, Role};
use blockdev::{fs as bfs, Bytes, DevId, Sectors};
use common::{ensure, loop_file, read_direct, write_direct, MODULES};
use testbench::vm::Vm;
use testbench::{guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;
const DATA_SIZE: u64 = 128 * MIB;
const COW_SIZE: u64 = 16 * MIB;
const CHUNK: Sectors = Sectors::new(8);
const MNT: &str = "/dev/shm/snap-mnt";

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![vm_trial("snapshot_on_fiemap_cow_rollback_and_commit", host_snapshot)],
        &[("snapshot", guest_snapshot)],
    )
}

fn host_snapshot() -> Result<(), Failed> {
    let run =
        Vm::new("blockdev_snapshot").modules(MODULES).memory_mib(1536).run_self("snapshot", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    Ok(())
}

fn linear_table(size: Sectors, dev: DevId) -> Result<Table, Failed> {
    Ok(Table::single(size, Target::Linear(LinearParams { device: dev, offset: Sectors::new(0) }))?)
}

/// A 4 KiB block's fingerprint: the CRC32s of its two halves (crc32fast, optimised even in
/// debug builds; a debug SipHash is slow under TCG).
fn block_fingerprint(block: &[u8]) -> u64 {
    let (a, b) = block.split_at(block.len() / 2);
    (u64::from(crc32fast::hash(a)) << 32) | u64::from(crc32fast::hash(b))
}

/// Per-4-KiB-block fingerprints of a device, read with O_DIRECT.
fn block_hashes(path: &Path, size: u64) -> Result<Vec<u64>, Failed> {
    let f = common::open_direct(path, false)?;
    let mut buf = common::Aligned::new(MIB_USIZE);
    let mut out = Vec::new();
    use std::os::unix::fs::FileExt;
    for off in (0..size).step_by(MIB_USIZE) {
        f.read_exact_at(buf.as_mut(), off)?;
        out.extend(buf.as_ref().chunks(4096).map(block_fingerprint));
    }
    Ok(out)
}

fn file_pattern(seed: u8) -> Vec<u8> {
    common::pattern(seed, MIB_USIZE)
}

fn snapshot_status(dm: &DeviceMapper, name: &DmName) -> Result<SnapshotStatus, Failed> {
    let s = dm.status(DevRef::Name(name), TableSlot::Active)?;
    Ok(s.first().ok_or("no status line")?.text.parse()?)
}

fn guest_snapshot(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    let (_img, raw_lo) = loop_file("snap-data.img", DATA_SIZE, &LoopOptions::default())?;
    let raw = raw_lo.dev();
    let size = Bytes::new(DATA_SIZE).to_sectors_exact()?;
    let base = object_name(Role::Base, "data")?;
    let origin = object_name(Role::Origin, "data")?;
    let snap = object_name(Role::Snapshot, "data")?;
    let cow = object_name(Role::Cow, "data")?;

    // The filesystem is mounted through a dm device (dm holds the raw device exclusively).
    let base_info = dm.create_device(&base.name, Some(&base.uuid), &linear_table(size, raw)?)?;
    let base_node = dm.node_path(&base.name);
    guest::sh(&format!("mkfs.ext4 -q -b 4096 {}", base_node.display()))?;
    fs::create_dir_all(MNT)?;
    let mnt = Path::new(MNT);
    blockdev::mount::mount(&base_node, mnt, "ext4", &Default::default())?;
    fs::write(mnt.join("keep.bin"), file_pattern(0x11))?;
    fs::write(mnt.join("change.bin"), file_pattern(0x22))?;

    // The COW store: a fallocated file, mapped by FIEMAP onto the raw device.
    let cow_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.join("cow.img"))?;
    let len = i64::try_from(COW_SIZE)?;
    nix::fcntl::fallocate(cow_file.as_fd(), nix::fcntl::FallocateFlags::empty(), 0, len)?;
    cow_file.sync_all()?;
    let extents = bfs::mappable_extents(&cow_file)?;
    let filefrag = guest::sh(&format!("filefrag -v {}", mnt.join("cow.img").display()))?;
    println!("{}", filefrag.trim_end());
    println!("cow file: {} extents", extents.len());
    let mut lines = Vec::new();
    let mut at = 0u64;
    for e in &extents {
        let len = e.length.to_sectors_exact()?;
        // The filesystem's device (base) maps 1:1 onto the raw device.
        lines.push(TargetLine::new(
            Sectors::new(at),
            len,
            Target::Linear(LinearParams { device: raw, offset: e.physical.to_sectors_exact()? }),
        ));
        at += len.get();
    }
    ensure(at * 512 == COW_SIZE, format!("extents cover {at} sectors"))?;
    // The dm table now addresses the blocks; the file stays allocated but need not stay open
    // (an open file would keep the filesystem busy at unmount).
    drop(cow_file);
    let cow_info = dm.create_device(&cow.name, Some(&cow.uuid), &Table::new(lines)?)?;
    let cow_node = dm.node_path(&cow.name);
    write_direct(&cow_node, 0, &vec![0u8; 4096])?; // a reused store must start with a zero chunk
    guest::sh("sync")?;

    // ---- start the snapshot: base suspended while the stack is built ----
    dm.suspend(DevRef::Name(&base.name), SuspendMode::Flush)?;
    let before = block_hashes(raw_lo.path(), DATA_SIZE)?;
    let snap_params = SnapshotParams {
        origin: raw,
        cow: cow_info.dev,
        persistence: Persistence::Persistent,
        chunk: CHUNK,
        features: vec![],
    };
    dm.create_device(
        &snap.name,
        Some(&snap.uuid),
        &Table::single(size, Target::Snapshot(snap_params.clone()))?,
    )?;
    let origin_info = dm.create_device(
        &origin.name,
        Some(&origin.uuid),
        &Table::single(size, Target::SnapshotOrigin(SnapshotOriginParams { origin: raw }))?,
    )?;
    dm.load_table(DevRef::Name(&base.name), &linear_table(size, origin_info.dev)?)?;
    dm.resume(DevRef::Name(&base.name))?;
    let t = dm.table(DevRef::Name(&snap.name), TableSlot::Active)?;
    println!("snapshot table line: {:?}", t[0].text);
    ensure(t[0].text.parse::<SnapshotParams>()? == snap_params, "snapshot table parses back")?;
    let st0 = snapshot_status(&dm, &snap.name)?;
    println!(
        "snapshot status at start: {:?}",
        dm.status(DevRef::Name(&snap.name), TableSlot::Active)?[0].text
    );

    // ---- write through the origin ----
    fs::write(mnt.join("change.bin"), file_pattern(0x33))?;
    fs::write(mnt.join("new.bin"), file_pattern(0x44))?;
    guest::sh("sync")?;
    let st1 = snapshot_status(&dm, &snap.name)?;
    println!(
        "snapshot status after writes: {:?}",
        dm.status(DevRef::Name(&snap.name), TableSlot::Active)?[0].text
    );
    match (st0, st1) {
        (
            SnapshotStatus::Active { allocated: a0, .. },
            SnapshotStatus::Active { allocated: a1, metadata, total },
        ) => {
            ensure(a1 > a0 && a1 > metadata, "writes allocated exceptions")?;
            ensure(total == Bytes::new(COW_SIZE).to_sectors_exact()?, "total = COW size")?;
        }
        other => return Err(format!("unexpected statuses {other:?}").into()),
    }

    // ---- ROLLBACK: merge the snapshot back (handover sequence) ----
    blockdev::mount::umount(mnt, Default::default())?;
    let merge = Table::single(size, Target::SnapshotMerge(snap_params.clone()))?;
    dm.load_table(DevRef::Name(&origin.name), &merge)?;
    dm.suspend(DevRef::Name(&snap.name), SuspendMode::Flush)?;
    dm.suspend(DevRef::Name(&origin.name), SuspendMode::Flush)?;
    dm.resume(DevRef::Name(&origin.name))?;
    dm.remove_device(&snap.name)?;
    let started = Instant::now();
    loop {
        let st = snapshot_status(&dm, &origin.name)?;
        if st.merge_complete() {
            break;
        }
        ensure(started.elapsed() < Duration::from_secs(60), format!("merge stuck at {st:?}"))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("merge took {:?}", started.elapsed());
    dm.reload(DevRef::Name(&origin.name), &linear_table(size, raw)?)?;

    // Bit-exact: every block outside the COW store is as it was when the snapshot started.
    let after = block_hashes(raw_lo.path(), DATA_SIZE)?;
    let in_cow = |block: u64| {
        extents.iter().any(|e| {
            let b = block * 4096;
            b >= e.physical.get() && b < e.physical.get() + e.length.get()
        })
    };
    let mut differing = 0;
    for (i, (x, y)) in before.iter().zip(&after).enumerate() {
        if x != y && !in_cow(u64::try_from(i)?) {
            differing += 1;
        }
    }
    ensure(
        differing == 0,
        format!("{differing} blocks outside the COW store differ after rollback"),
    )?;
    blockdev::mount::mount(&base_node, mnt, "ext4", &Default::default())?;
    ensure(
        read_file_direct(&mnt.join("change.bin"))? == file_pattern(0x22),
        "change.bin rolled back",
    )?;
    ensure(read_file_direct(&mnt.join("keep.bin"))? == file_pattern(0x11), "keep.bin intact")?;
    ensure(!mnt.join("new.bin").exists(), "new.bin gone")?;
    println!("rollback ok");

    // ---- COMMIT: a second snapshot, then drop it ----
    dm.suspend(DevRef::Name(&base.name), SuspendMode::Flush)?;
    write_direct(&cow_node, 0, &vec![0u8; 4096])?;
    dm.create_device(
        &snap.name,
        Some(&snap.uuid),
        &Table::single(size, Target::Snapshot(snap_params))?,
    )?;
    dm.reload(
        DevRef::Name(&origin.name),
        &Table::single(size, Target::SnapshotOrigin(SnapshotOriginParams { origin: raw }))?,
    )?;
    dm.resume(DevRef::Name(&base.name))?;
    fs::write(mnt.join("change.bin"), file_pattern(0x55))?;
    guest::sh("sync")?;
    let st = snapshot_status(&dm, &snap.name)?;
    ensure(!st.merge_complete(), format!("second snapshot holds exceptions: {st:?}"))?;
    dm.reload(DevRef::Name(&origin.name), &linear_table(size, raw)?)?;
    dm.remove_device(&snap.name)?;
    blockdev::mount::umount(mnt, Default::default())?;
    blockdev::mount::mount(&base_node, mnt, "ext4", &Default::default())?;
    ensure(
        read_file_direct(&mnt.join("change.bin"))? == file_pattern(0x55),
        "commit kept the new data",
    )?;
    ensure(read_file_direct(&mnt.join("keep.bin"))? == file_pattern(0x11), "keep.bin intact")?;
    blockdev::mount::umount(mnt, Default::default())?;
    guest::sh(&format!("e2fsck -fn {}", base_node.display()))?;
    println!("commit ok");

    // ---- what is left is found and removed by name ----
    let report = names::cleanup_stale(&dm)?;
    println!("cleanup removed {:?}", report.removed);
    ensure(report.failed.is_empty() && report.removed.len() == 3, format!("{report:?}"))?;
    let pos = |n: &DmName| report.removed.iter().position(|r| r == n.as_str());
    ensure(pos(&base.name) < pos(&origin.name), "base removed before the origin under it")?;
    ensure(base_info.dev != origin_info.dev, "distinct devices")?;
    raw_lo.detach()?;
    Ok(())
}

/// Reads a whole file with O_DIRECT (the page cache may hold pre-merge data).
fn read_file_direct(path: &Path) -> Result<Vec<u8>, Failed> {
    let len = usize::try_from(fs::metadata(path)?.len())?;
    read_direct(path, 0, len)
}
