//! The backends on a real kernel (the virtual device), in as few boots as possible:
//!
//! 1. `snapshot_ext4`: auto selection falls back to snapshot (no dm-bow) and says why; on ext4:
//!    setup, mount, prepare (twice), changes, grow while mounted, a simulated next boot
//!    (unmount, stack teardown), restore by the userspace merge, files and every block outside
//!    the COW file back as at checkpoint start, `e2fsck -fn` clean, teardown drops the COW
//!    file; the same with the kernel merge; then a commit (twice) that keeps the new data and
//!    leaves no snapshot/COW device, no COW file, no record. Then a backup-space reservation:
//!    refusals (more than free, 0, more than the filesystem, a second one) that leave nothing;
//!    reserve; prepare adopts the reservation as the COW file (the same extents, no second
//!    file, free space unchanged by the hand-over); changes; rollback as exact as above. Last,
//!    a growth over blocks written and freed during the checkpoint, and the store used past its
//!    old size: the rollback is still exact ([`snapshot_grow_over_freed_blocks`]).
//! 2. `f2fs`: the f2fs backend on a virtio disk: checkpoint=disable, commit (twice) by
//!    remounting, then a checkpointed session ended by a power cut; a second boot with the same
//!    disk: restore reports nothing to do, the mount rolls the uncommitted file back, the
//!    committed one stays. Before that, in the first boot, the reservation on f2fs: released
//!    by the boot flow's step before the checkpoint=disable mount (its space free in the
//!    checkpointed mount), and prepare's fallback release (the space only after commit). Then
//!    snapshot on f2fs (COW file pinned): the snapshot's view does
//!    not move during the checkpoint, and the userspace and the kernel merge each roll back
//!    every block outside the COW file exactly (read with O_DIRECT), `fsck.f2fs` clean.
//!
//! Every boot ends by checking that no device-mapper or loop device is left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use backends::f2fs::{release_reservation_before_mount, F2fsBackend, F2fsOptions, F2fsStack};
use backends::records::Records;
use backends::reservation::{Condition, ReservationRecord, Reservations};
use backends::select::{self, AutoOptions, Chosen};
use backends::snapshot::{
    CowState, RollbackMethod, SnapshotBackend, SnapshotOptions, SnapshotRecord, SnapshotStack,
};
use backends::{Action, BootStack, DeviceSpec};
use blockcopy::device::IoBuf;
use blockdev::dm::{DevRef, DeviceMapper, TableSlot};
use blockdev::loopdev::{LoopDevice, LoopOptions};
use blockdev::names::{object_name, Role, UUID_PREFIX};
use bow::device::{BlockDevice, FileDevice};
use policy::{Backend, BackendState, RestoreOutcome, RestoreRequest};
use testbench::device::Fs;
use testbench::vm::{scratch_image, Vm};
use testbench::{guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;
const MODULES: &[&str] = &["loop", "dm-mod", "dm-snapshot"];

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("snapshot_ext4_rollback_both_merges_commit_grow_auto", host_snapshot_ext4),
            vm_trial("f2fs_snapshot_and_checkpoint_disable_with_power_cut", host_f2fs),
        ],
        &[
            ("snapshot_ext4", guest_snapshot_ext4),
            ("f2fs_first", guest_f2fs_first),
            ("f2fs_second", guest_f2fs_second),
        ],
    )
}

fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

fn host_snapshot_ext4() -> Result<(), Failed> {
    let run = Vm::new("backends_snapshot_ext4")
        .modules(MODULES)
        .memory_mib(1536)
        .run_self("snapshot_ext4", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    println!("boot took {:?}", run.duration);
    Ok(())
}

fn host_f2fs() -> Result<(), Failed> {
    let disk = scratch_image(256 * MIB)?;
    let first = Vm::new("backends_f2fs_first")
        .modules(&["loop", "dm-mod", "dm-snapshot", "f2fs"])
        .memory_mib(1536)
        .disk(&disk)
        .run_self("f2fs_first", &[])?;
    first.expect_power_cut()?;
    print!("{}", first.output);
    let second = Vm::new("backends_f2fs_second")
        .modules(&["loop", "dm-mod", "dm-snapshot", "f2fs"])
        .memory_mib(1536)
        .disk(&disk)
        .run_self("f2fs_second", &[])?;
    second.expect_success()?;
    print!("{}", second.output);
    println!("boots took {:?} and {:?}", first.duration, second.duration);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// guest helpers

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed ^ u8::try_from(i % 251).unwrap_or(0)).collect()
}

/// A sparse file under /dev/shm on a loop device.
fn loop_file(name: &str, size: u64) -> Result<(fs::File, LoopDevice), Failed> {
    let path = Path::new("/dev/shm").join(name);
    let file =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(size)?;
    let dev = LoopDevice::attach(&file, &LoopOptions::default())?;
    Ok((file, dev))
}

fn spec(raw: &Path, mnt: &str, fs_type: &str) -> Result<DeviceSpec, Failed> {
    fs::create_dir_all(mnt)?;
    Ok(DeviceSpec {
        raw: raw.to_owned(),
        mount_point: PathBuf::from(mnt),
        fs_type: Some(fs_type.into()),
        mount_options: String::new(),
        instance: backends::instance_for(Path::new(mnt)),
    })
}

/// Per-4-KiB-block hashes of a device, read uncached.
/// A 4 KiB block's fingerprint: the CRC32s of its two halves (crc32fast, optimised even in
/// debug builds; a debug SipHash made these scans the slowest part of the test).
fn block_fingerprint(block: &[u8]) -> u64 {
    let (a, b) = block.split_at(block.len() / 2);
    (u64::from(crc32fast::hash(a)) << 32) | u64::from(crc32fast::hash(b))
}

fn block_hashes(path: &Path) -> Result<Vec<u64>, Failed> {
    let dev = FileDevice::open_read_only(path)?.with_direct_reads();
    ensure(dev.direct_reads(), format!("{} cannot be read with O_DIRECT", path.display()))?;
    let mut buf = IoBuf::new(MIB_USIZE);
    let mut out = Vec::new();
    let size = dev.size();
    for off in (0..size).step_by(MIB_USIZE) {
        let n = usize::try_from((size - off).min(MIB))?;
        buf.set_len(n);
        dev.read_at(buf.as_mut_slice(), off)?;
        out.extend(buf.as_slice().chunks(4096).map(block_fingerprint));
    }
    Ok(out)
}

/// Blocks that differ between `a` and `b`, outside the COW file's extents (the first ones are
/// printed with the extents, to diagnose).
fn differing_outside(a: &[u64], b: &[u64], rec: &SnapshotRecord) -> usize {
    let in_cow = |block: u64| {
        rec.extents
            .iter()
            .any(|e| block * 4096 >= e.physical && block * 4096 < e.physical + e.length)
    };
    let differ: Vec<usize> = a
        .iter()
        .zip(b)
        .enumerate()
        .filter(|(i, (x, y))| x != y && !in_cow(u64::try_from(*i).unwrap_or(u64::MAX)))
        .map(|(i, _)| i)
        .collect();
    if !differ.is_empty() {
        println!("blocks differing outside the COW file: {:?}", &differ[..differ.len().min(16)]);
        println!("COW extents: {:?}", rec.extents);
    }
    differ.len()
}

/// Our device-mapper devices (uuid prefix), by name.
fn our_devices(dm: &DeviceMapper) -> Result<Vec<String>, Failed> {
    Ok(dm
        .list_devices()?
        .into_iter()
        .filter(|d| d.uuid.as_deref().is_some_and(|u| u.starts_with(UUID_PREFIX)))
        .map(|d| d.name)
        .collect())
}

fn nothing_left(dm: &DeviceMapper) -> Result<(), Failed> {
    let devs = our_devices(dm)?;
    ensure(devs.is_empty(), format!("device-mapper devices left behind: {devs:?}"))?;
    let all = dm.list_devices()?;
    ensure(all.is_empty(), format!("other dm devices left: {all:?}"))?;
    let loops = guest::sh("losetup -a")?;
    ensure(loops.trim().is_empty(), format!("loop devices left behind: {loops}"))?;
    println!("no DM or loop device left behind");
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Failed> {
    fs::write(path, data)?;
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// The test's files: (name, contents at checkpoint start).
fn seed_files(mnt: &Path, seed: u8) -> Result<Vec<(PathBuf, Vec<u8>)>, Failed> {
    let mut files = Vec::new();
    for (i, len) in [(0u8, 3 * MIB_USIZE), (1, 4096), (2, 700_000), (3, 5 * MIB_USIZE)] {
        let p = mnt.join(format!("file{i}"));
        let data = pattern(seed.wrapping_add(i), len);
        write_file(&p, &data)?;
        files.push((p, data));
    }
    guest::sh("sync")?;
    Ok(files)
}

/// Changes made during the checkpoint: overwrite two files, delete one, add one.
fn change_files(mnt: &Path, files: &[(PathBuf, Vec<u8>)], seed: u8) -> Result<(), Failed> {
    write_file(&files[0].0, &pattern(seed, files[0].1.len()))?;
    let mut part = files[3].1.clone();
    part[MIB_USIZE..2 * MIB_USIZE].copy_from_slice(&pattern(seed ^ 0x5a, MIB_USIZE));
    write_file(&files[3].0, &part)?;
    fs::remove_file(&files[1].0)?;
    write_file(&mnt.join("added"), &pattern(seed, 2 * MIB_USIZE))?;
    guest::sh("sync")?;
    Ok(())
}

fn files_are_back(mnt: &Path, files: &[(PathBuf, Vec<u8>)]) -> Result<(), Failed> {
    for (p, data) in files {
        let now = fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        ensure(&now == data, format!("{} differs from checkpoint start", p.display()))?;
    }
    ensure(!mnt.join("added").exists(), "the file added during the checkpoint is gone")?;
    Ok(())
}

fn mount(stack: &dyn BootStack, spec: &DeviceSpec, checkpointing: bool) -> Result<(), Failed> {
    let plan = stack.setup(spec, checkpointing)?;
    backends::mount(&plan, &spec.mount_point)?;
    Ok(())
}

fn umount(spec: &DeviceSpec) -> Result<(), Failed> {
    blockdev::mount::umount(&spec.mount_point, Default::default())?;
    Ok(())
}

fn record(records: &Records, spec: &DeviceSpec) -> Result<Option<SnapshotRecord>, Failed> {
    Ok(records.load::<SnapshotRecord>("snapshot", &spec.instance)?)
}

fn fs_free(spec: &DeviceSpec) -> Result<u64, Failed> {
    Ok(blockdev::fs::statvfs(&spec.mount_point)?.free.get())
}

/// Between the download and the reboot: the refusals change nothing, then `bytes` are
/// reserved. Returns the reservation's record.
fn reserve_before_update(
    spec: &DeviceSpec,
    records: &Records,
    bytes: u64,
) -> Result<ReservationRecord, Failed> {
    let res = Reservations::new(records.clone());
    let space = blockdev::fs::statvfs(&spec.mount_point)?;
    let too_much = space.available.get() + 8 * MIB;
    match res.reserve(spec, too_much) {
        Err(policy::BackendError::NoSpace { needed, available, .. }) => {
            println!("reserve {needed} refused: {available} bytes available");
            ensure(needed == too_much && available < too_much, "NoSpace names the free bytes")?;
        }
        other => return Err(format!("reserve more than free: {other:?}").into()),
    }
    for bad in [0, space.total.get() + 1] {
        let e = res.reserve(spec, bad).err().ok_or(format!("reserve {bad} accepted"))?;
        ensure(
            matches!(e, backends::BackendError::InvalidArgument { .. })
                && policy::errno::code(e.kind(), e.os_errno()) == policy::errno::EINVAL,
            format!("reserve {bad}: {e}"),
        )?;
    }
    ensure(res.status(spec)?.is_none(), "refusals reserved nothing")?;
    ensure(res.record(spec)?.is_none(), "refusals recorded nothing")?;
    ensure(!Reservations::path(spec).exists(), "refusals made no file")?;
    let before = fs_free(spec)?;
    let info = res.reserve(spec, bytes)?;
    ensure(info.condition == Condition::Held && info.bytes == bytes, format!("{info:?}"))?;
    let after = fs_free(spec)?;
    println!("reserved {bytes} bytes: free {before} -> {after}");
    ensure(before - after >= bytes, "the reservation takes its bytes out of free space")?;
    let e = res.reserve(spec, MIB).err().ok_or("a second reservation was accepted")?;
    ensure(matches!(e, policy::BackendError::InvalidState { .. }), format!("second: {e}"))?;
    ensure(res.status(spec)? == Some(info), "the held reservation is intact")?;
    let rec = res.record(spec)?.ok_or("no reservation record")?;
    ensure(!rec.extents.is_empty(), "ext4 maps the reservation (FIEMAP)")?;
    Ok(rec)
}

/// One checkpointed boot and the rollback at the next one, with `method`; with `reserve`, a
/// reservation of that many bytes is made before the boot and adopted as the COW file.
/// Returns the time the restore took.
fn snapshot_rollback(
    dm: &DeviceMapper,
    spec: &DeviceSpec,
    records: &Records,
    opts: &SnapshotOptions,
    seed: u8,
    reserve: Option<u64>,
) -> Result<std::time::Duration, Failed> {
    let stack = SnapshotStack::new(opts.clone());
    let backend = SnapshotBackend::new(spec.clone(), opts.clone(), records.clone())?;
    let mnt = spec.mount_point.clone();
    mount(&stack, spec, true)?;
    let files = seed_files(&mnt, seed)?;
    let reserved = match reserve {
        Some(bytes) => Some(reserve_before_update(spec, records, bytes)?),
        None => None,
    };
    let free_before_prepare = fs_free(spec)?;
    ensure(backend.prepare()? == Action::Changed, "prepare arms")?;
    if let Some(reserved) = &reserved {
        let free_after = fs_free(spec)?;
        let cow = record(records, spec)?.ok_or("no record after prepare")?;
        let res = Reservations::new(records.clone());
        ensure(res.status(spec)?.is_none(), "the reservation was handed over")?;
        ensure(res.record(spec)?.is_none(), "its record is cleared")?;
        let names: Vec<_> = fs::read_dir(mnt.join(".checkpointd"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        println!(
            "hand-over: reservation extents {:?}, COW extents {:?}, free {free_before_prepare} \
             -> {free_after}, files {names:?}",
            reserved.extents, cow.extents
        );
        ensure(cow.extents == reserved.extents, "the COW file's extents are the reservation's")?;
        ensure(names == ["cow"], "no second file beside the COW file")?;
        ensure(free_after == free_before_prepare, "free space unchanged by the hand-over")?;
    }
    ensure(backend.prepare()? == Action::Identity, "a second prepare is Identity")?;
    ensure(backend.status()?.state == BackendState::Armed, "status says armed")?;
    let rec = record(records, spec)?.ok_or("no record after prepare")?;
    ensure(rec.state == CowState::Armed, format!("record state {:?}", rec.state))?;
    ensure(backend.cow_path().exists(), "the COW file exists")?;
    // The checkpoint image: what the snapshot device shows.
    let snap = object_name(Role::Snapshot, &spec.instance)?;
    let at_start = block_hashes(&dm.node_path(&snap.name))?;
    let before = backend.space()?;
    change_files(&mnt, &files, seed ^ 0xff)?;
    let after = backend.space()?;
    println!("[{:?}] space after prepare {before:?}, after changes {after:?}", opts.rollback);
    ensure(
        after.used_bytes > before.used_bytes && after.total_bytes == Some(rec.cow_bytes()),
        "changes use COW space, total = the COW file",
    )?;

    // ---- the next boot: unmount, the stack is gone, restore before mount ----
    umount(spec)?;
    ensure(stack.teardown_stack(spec)? == Action::Changed, "stack torn down")?;
    ensure(our_devices(dm)?.is_empty(), "no device after teardown")?;
    let started = Instant::now();
    let report = backend.restore(
        spec.raw.to_str().ok_or("path")?,
        &RestoreRequest::default(),
        &|_, _| {},
    )?;
    let took = started.elapsed();
    ensure(report.result.is_ok(), format!("restore result {:?}", report.result))?;
    ensure(
        matches!(report.outcome, RestoreOutcome::Restored { entries } if entries > 0),
        format!("restore outcome {:?}", report.outcome),
    )?;
    let merged = record(records, spec)?.ok_or("record gone after restore")?;
    ensure(merged.state == CowState::Merged, format!("record {:?} after restore", merged.state))?;
    // A second restore finds nothing to do.
    let again = backend.restore(
        spec.raw.to_str().ok_or("path")?,
        &RestoreRequest::default(),
        &|_, _| {},
    )?;
    ensure(again.outcome == RestoreOutcome::NothingToRestore, "a second restore is a no-op")?;
    // Bit-exact outside the COW file: read the raw device (uncached), or the base device if the
    // kernel merge left one.
    let base = object_name(Role::Base, &spec.instance)?;
    let dev = if our_devices(dm)?.contains(&base.name.to_string()) {
        dm.node_path(&base.name)
    } else {
        spec.raw.clone()
    };
    let now = block_hashes(&dev)?;
    let differ = differing_outside(&at_start, &now, &merged);
    ensure(differ == 0, format!("{differ} blocks outside the COW file differ after rollback"))?;
    guest::sh(&format!("e2fsck -fn {}", dev.display()))?;
    // Mounted again (not checkpointing): the files are back; teardown drops the COW file.
    mount(&stack, spec, false)?;
    files_are_back(&mnt, &files)?;
    ensure(backend.teardown()? == Action::Changed, "teardown drops the COW file")?;
    ensure(!backend.cow_path().exists(), "COW file removed")?;
    ensure(record(records, spec)?.is_none(), "record cleared")?;
    ensure(backend.teardown()? == Action::Identity, "a second teardown is Identity")?;
    umount(spec)?;
    let _ = stack.teardown_stack(spec)?;
    println!("[{:?}] rollback bit-exact, fsck clean, restore took {took:?}", opts.rollback);
    Ok(took)
}

/// On Android fs_mgr creates the dm-bow device itself, named `bow`: the bow backend drives it
/// when it sits on the backend's raw device, and never one on another device. This kernel has
/// no dm-bow, so a dm-linear device stands in for fs_mgr's and a directory stands in for its
/// sysfs `bow/` (state 0): the backend's status reads that state only if it found the device.
fn fs_mgr_bow_device_is_adopted(
    dm: &DeviceMapper,
    spec: &DeviceSpec,
    records: &Records,
) -> Result<(), Failed> {
    use backends::bow::restore::RestoreOptions;
    use backends::bow::{BowBackend, BowOptions};
    let (_other_img, other) = loop_file("other.img", 8 * MIB)?;
    let sysfs = Path::new("/dev/shm/fake-sysfs");
    let status_over = |raw: &Path| -> Result<BackendState, Failed> {
        guest::sh(&format!(
            "dmsetup create bow --table \"0 $(blockdev --getsz {0}) linear {0} 0\"",
            raw.display()
        ))?;
        let dev = dm.info(DevRef::Name(&blockdev::dm::DmName::new("bow")?))?.dev;
        let dir = sysfs.join("dev/block").join(dev.to_string());
        fs::create_dir_all(dir.join("bow"))?;
        fs::create_dir_all(dir.join("dm"))?;
        fs::write(dir.join("dm/name"), "bow\n")?;
        fs::write(dir.join("bow/state"), "0\n")?;
        let opts = BowOptions { sysfs_root: sysfs.to_owned(), ..BowOptions::default() };
        let backend =
            BowBackend::new(spec.clone(), opts, RestoreOptions::default(), records.clone())?;
        let state = backend.status().map(|s| s.state);
        guest::sh("dmsetup remove bow")?;
        fs::remove_dir_all(sysfs)?;
        Ok(state?)
    };
    let adopted = status_over(&spec.raw)?;
    println!("fs_mgr's `bow` over the raw device: {adopted:?}");
    ensure(adopted == BackendState::Idle, format!("fs_mgr's bow device not adopted: {adopted:?}"))?;
    let foreign = status_over(other.path());
    other.detach()?;
    let foreign = foreign?;
    println!("fs_mgr's `bow` over another device: {foreign:?}");
    ensure(
        foreign == BackendState::Unknown,
        format!("a foreign bow device was adopted: {foreign:?}"),
    )
}

fn guest_snapshot_ext4(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    let meta = Path::new("/dev/shm/meta");
    fs::create_dir_all(meta)?;
    let records = Records::open(meta)?;
    let (_img, raw) = loop_file("ext4.img", 160 * MIB)?;
    guest::sh(&format!(
        "mkfs.ext4 -q -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 {}",
        raw.path().display()
    ))?;
    let spec = spec(raw.path(), "/dev/shm/mnt-ext4", "ext4")?;

    fs_mgr_bow_device_is_adopted(&dm, &spec, &records)?;

    // ---- auto: no dm-bow on this kernel ----
    let (chosen, why) = select::choose(&AutoOptions::default());
    println!("auto: {why}");
    ensure(matches!(chosen, Chosen::Snapshot(_)), format!("auto chose {}", chosen.name()))?;
    ensure(why.contains("no dm-bow"), format!("reason {why:?}"))?;

    let opts = SnapshotOptions { cow_bytes: Some(16 * MIB), ..SnapshotOptions::default() };
    let user = snapshot_rollback(&dm, &spec, &records, &opts, 0x10, None)?;
    let kopts = SnapshotOptions { rollback: RollbackMethod::KernelMerge, ..opts.clone() };
    let kernel = snapshot_rollback(&dm, &spec, &records, &kopts, 0x20, None)?;
    println!("restore time: userspace merge {user:?}, kernel merge {kernel:?}");

    // ---- grow while mounted, then commit ----
    let stack = SnapshotStack::new(opts.clone());
    let backend = SnapshotBackend::new(spec.clone(), opts.clone(), records.clone())?;
    let mnt = spec.mount_point.clone();
    mount(&stack, &spec, true)?;
    let files = seed_files(&mnt, 0x30)?;
    ensure(backend.prepare()? == Action::Changed, "prepare")?;
    let small = backend.space()?;
    ensure(backend.grow()? == Action::Changed, "grow")?;
    let grown = backend.space()?;
    println!("space before grow {small:?}, after {grown:?}");
    ensure(
        grown.total_bytes == Some(24 * MIB) && grown.free_bytes > small.free_bytes,
        "the store grew by half while mounted",
    )?;
    let rec = record(&records, &spec)?.ok_or("record")?;
    ensure(rec.cow_bytes() == 24 * MIB, "the record has the longer map")?;
    // Write more than the old size (every first write to a chunk is saved, even into free
    // space): the kernel uses the grown store.
    for i in 0..3 {
        write_file(&mnt.join(format!("big{i}")), &pattern(i, 4 * MIB_USIZE))?;
    }
    write_file(&files[3].0, &pattern(0x77, files[3].1.len()))?;
    guest::sh("sync")?;
    let used = backend.space()?;
    println!("space after writing past the old size: {used:?}");
    ensure(used.used_bytes > Some(16 * MIB), "exceptions beyond the old store size")?;
    // ---- commit ----
    ensure(backend.commit()? == Action::Changed, "commit")?;
    ensure(backend.commit()? == Action::Identity, "a second commit is Identity")?;
    ensure(backend.status()?.state == BackendState::Committed, "status committed")?;
    let devs = our_devices(&dm)?;
    let base = object_name(Role::Base, &spec.instance)?;
    ensure(devs == [base.name.to_string()], format!("only base left after commit: {devs:?}"))?;
    let t = dm.table(DevRef::Name(&base.name), TableSlot::Active)?;
    ensure(t[0].target_type == "linear", "base is linear again")?;
    ensure(!backend.cow_path().exists(), "COW file deleted")?;
    ensure(record(&records, &spec)?.is_none(), "record cleared")?;
    umount(&spec)?;
    guest::sh(&format!("e2fsck -fn {}", dm.node_path(&base.name).display()))?;
    mount(&stack, &spec, false)?;
    ensure(fs::read(&files[3].0)? == pattern(0x77, files[3].1.len()), "commit kept new data")?;
    ensure(fs::read(mnt.join("big2"))? == pattern(2, 4 * MIB_USIZE), "and the new files")?;
    ensure(fs::read(&files[0].0)? == files[0].1, "untouched file intact")?;
    // A restore after the commit does nothing.
    umount(&spec)?;
    ensure(stack.teardown_stack(&spec)? == Action::Changed, "stack torn down")?;
    let r = backend.restore(
        spec.raw.to_str().ok_or("path")?,
        &RestoreRequest::default(),
        &|_, _| {},
    )?;
    ensure(r.outcome == RestoreOutcome::NothingToRestore, "nothing to restore after commit")?;
    println!("commit ok: new data kept, no snapshot/COW device, file or record");

    // ---- a reservation adopted as the COW store, then a rollback ----
    let reserved = snapshot_rollback(&dm, &spec, &records, &opts, 0x40, Some(16 * MIB))?;
    println!("reservation adopted as the COW store; rollback exact (restore took {reserved:?})");
    raw.detach()?;
    snapshot_grow_over_freed_blocks(&dm)?;
    nothing_left(&dm)
}

/// The monitor's growth can take blocks the file system wrote and freed during the
/// checkpoint: free space when the snapshot was armed, with saved chunks in the store, which
/// now lies on them (docs/snapcow.md, step 4). The rollback must still be exact. (Before the
/// merge knew the armed length it refused such a store, and /data could not be mounted: seen
/// in vm_rollback, where the default monitor grows the store when a failed boot writes
/// enough.) On its own small file system without reserved blocks, so that the deleted
/// download's blocks are nearly all the free space the growth can take.
fn snapshot_grow_over_freed_blocks(dm: &DeviceMapper) -> Result<(), Failed> {
    use std::os::unix::fs::FileExt;
    let meta = Path::new("/dev/shm/meta-grow");
    fs::create_dir_all(meta)?;
    let records = Records::open(meta)?;
    let (_img, raw) = loop_file("grow.img", 64 * MIB)?;
    guest::sh(&format!(
        "mkfs.ext4 -q -b 4096 -m 0 -E lazy_itable_init=0,lazy_journal_init=0 {}",
        raw.path().display()
    ))?;
    let spec = spec(raw.path(), "/dev/shm/mnt-grow", "ext4")?;
    let opts = SnapshotOptions { cow_bytes: Some(16 * MIB), ..SnapshotOptions::default() };
    let stack = SnapshotStack::new(opts.clone());
    let backend = SnapshotBackend::new(spec.clone(), opts.clone(), records.clone())?;
    let mnt = spec.mount_point.clone();
    mount(&stack, &spec, true)?;
    let files = seed_files(&mnt, 0x50)?;
    ensure(backend.prepare()? == Action::Changed, "prepare")?;
    let armed = record(&records, &spec)?.ok_or("no record after prepare")?;
    ensure(armed.armed_bytes == Some(16 * MIB), format!("armed length {:?}", armed.armed_bytes))?;
    let snap = object_name(Role::Snapshot, &spec.instance)?;
    let at_start = block_hashes(&dm.node_path(&snap.name))?;

    // A download into free space (each first write saved), the rest of the free space taken
    // but 1 MiB, the download deleted: its blocks are now most of the free space.
    let download = mnt.join("download");
    write_file(&download, &pattern(0x51, 8 * MIB_USIZE))?;
    let freed: Vec<(u64, u64)> = blockdev::fs::mappable_extents(&fs::File::open(&download)?)?
        .iter()
        .map(|e| (e.physical.get(), e.length.get()))
        .collect();
    let avail = blockdev::fs::statvfs(&mnt)?.available.get();
    let filler = mnt.join("filler");
    guest::sh(&format!("fallocate -l {} {}", avail.saturating_sub(MIB), filler.display()))?;
    fs::remove_file(&download)?;
    guest::sh("sync")?;
    ensure(backend.grow()? == Action::Changed, "grow")?;
    let grown = record(&records, &spec)?.ok_or("no record after grow")?;
    let overlap: u64 = grown
        .extents
        .iter()
        .filter(|e| e.logical + e.length > 16 * MIB)
        .map(|e| {
            let start = e.physical + (16 * MIB).saturating_sub(e.logical);
            let end = e.physical + e.length;
            freed.iter().map(|&(p, n)| end.min(p + n).saturating_sub(start.max(p))).sum::<u64>()
        })
        .sum();
    println!("growth: {} bytes, {overlap} of them the deleted download's", grown.cow_bytes());
    ensure(
        grown.cow_bytes() == 24 * MIB && grown.armed_bytes == Some(16 * MIB),
        "the store grew by half and the armed length is kept",
    )?;
    ensure(overlap >= 4 * MIB, "the growth took the deleted download's blocks")?;

    // The store used past its armed size: the kernel's chunks lie on the download's blocks.
    let f = fs::OpenOptions::new().write(true).open(&filler)?;
    f.write_all_at(&pattern(0x52, 10 * MIB_USIZE), 0)?;
    f.sync_all()?;
    drop(f); // or the unmount below is busy
    write_file(&files[2].0, &pattern(0x53, files[2].1.len()))?;
    guest::sh("sync")?;
    let used = backend.space()?;
    println!("space after writing past the armed size: {used:?}");
    ensure(used.used_bytes > Some(16 * MIB), "the store reaches into its growth")?;

    // ---- a power cut: the next boot restores before mount ----
    umount(&spec)?;
    ensure(stack.teardown_stack(&spec)? == Action::Changed, "stack torn down")?;
    let report = backend.restore(
        spec.raw.to_str().ok_or("path")?,
        &RestoreRequest::default(),
        &|_, _| {},
    )?;
    ensure(report.result.is_ok(), format!("restore result {:?}", report.result))?;
    ensure(
        matches!(report.outcome, RestoreOutcome::Restored { entries } if entries > 0),
        format!("restore outcome {:?}", report.outcome),
    )?;
    let merged = record(&records, &spec)?.ok_or("record gone after restore")?;
    let now = block_hashes(&spec.raw)?;
    let differ = differing_outside(&at_start, &now, &merged);
    ensure(differ == 0, format!("{differ} blocks outside the COW file differ after rollback"))?;
    guest::sh(&format!("e2fsck -fn {}", spec.raw.display()))?;
    mount(&stack, &spec, false)?;
    files_are_back(&mnt, &files)?;
    ensure(!filler.exists() && !download.exists(), "the filler and the download are gone")?;
    ensure(backend.teardown()? == Action::Changed, "teardown drops the COW file")?;
    umount(&spec)?;
    let _ = stack.teardown_stack(&spec)?;
    raw.detach()?;
    println!("grown over freed blocks: rollback bit-exact outside the COW file, fsck clean");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// f2fs

const F2FS_MNT: &str = "/dev/shm/mnt-f2fs";

/// The f2fs hand-over of a reservation made on a normal mount: released before the
/// checkpoint=disable mount (the boot flow's step), so the checkpointed mount has the space;
/// then the fallback, released by prepare after that mount, where f2fs gives the blocks back
/// only at commit.
fn f2fs_reservation(disk: &Path) -> Result<(), Failed> {
    const BYTES: u64 = 32 * MIB;
    guest::sh(&format!("mkfs.f2fs -q -f {}", disk.display()))?;
    let meta = Path::new("/dev/shm/meta-f2fs");
    fs::create_dir_all(meta)?;
    let res = Reservations::new(Records::open(meta)?);
    let spec_f = spec(disk, F2FS_MNT, "f2fs")?;
    let stack = F2fsStack::new(F2fsOptions::default());
    let backend =
        F2fsBackend::new(spec_f.clone(), F2fsOptions::default())?.with_reservations(res.clone());
    let avail = || -> Result<u64, Failed> {
        Ok(blockdev::fs::statvfs(&spec_f.mount_point)?.available.get())
    };
    // The download: reserved on the normal mount.
    mount(&stack, &spec_f, false)?;
    let before = avail()?;
    let info = res.reserve(&spec_f, BYTES)?;
    let flags = guest::sh(&format!("lsattr {} 2>&1 || true", info.path.display()))?;
    let reserved = avail()?;
    println!("f2fs reservation: available {before} -> {reserved}; lsattr: {}", flags.trim());
    ensure(before - reserved >= BYTES, "the reservation takes its bytes")?;
    umount(&spec_f)?;
    // The update's boot: the boot flow's stack (as `checkpointctl boot mount` builds it, with
    // the metadata dir's records) releases it before the checkpoint=disable mount.
    let boot_flow_stack = F2fsStack::new(F2fsOptions::default()).with_reservations(res.clone());
    let plan = boot_flow_stack.setup(&spec_f, true)?;
    ensure(plan.action == Action::Changed, "released before the checkpoint=disable mount")?;
    ensure(
        release_reservation_before_mount(&plan, &spec_f, &res)? == Action::Identity,
        "a second release finds nothing",
    )?;
    let used = backends::mount(&plan, &spec_f.mount_point)?;
    ensure(used.contains("checkpoint=disable"), format!("mounted with {used:?}"))?;
    let freed = avail()?;
    println!("released before the checkpoint=disable mount: available {freed}");
    ensure(res.status(&spec_f)?.is_none(), "file and record gone")?;
    ensure(freed + 4 * MIB >= before, "the checkpointed mount has the reservation's space")?;
    ensure(backend.prepare()? == Action::Identity, "nothing left for prepare")?;
    ensure(backend.commit()? == Action::Changed, "commit")?;
    umount(&spec_f)?;
    // The fallback: the boot flow did not release it, prepare does.
    mount(&stack, &spec_f, false)?;
    let _ = res.reserve(&spec_f, BYTES)?;
    umount(&spec_f)?;
    let plan = stack.setup(&spec_f, true)?;
    let used = backends::mount(&plan, &spec_f.mount_point)?;
    ensure(used.contains("checkpoint=disable"), format!("mounted with {used:?}"))?;
    let held = avail()?;
    ensure(backend.prepare()? == Action::Changed, "prepare releases the reservation")?;
    ensure(res.status(&spec_f)?.is_none(), "released by prepare")?;
    let after_prepare = avail()?;
    ensure(backend.commit()? == Action::Changed, "commit")?;
    let after_commit = avail()?;
    println!(
        "released by prepare under checkpoint=disable: available {held} held, {after_prepare} \
         after the release, {after_commit} after commit"
    );
    ensure(after_prepare < held + BYTES / 2, "released blocks stay unusable until commit")?;
    ensure(after_commit + 4 * MIB >= held + BYTES, "and usable after commit")?;
    umount(&spec_f)
}

fn guest_f2fs_first(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    ensure(our_devices(&dm)?.is_empty(), "a clean start")?;
    let disk = guest::disk(0);
    f2fs_reservation(&disk)?;
    // ---- the f2fs backend on the virtio disk ----
    guest::sh(&format!("mkfs.f2fs -q -f {}", disk.display()))?;
    let spec_f = spec(&disk, F2FS_MNT, "f2fs")?;
    let stack = F2fsStack::new(F2fsOptions::default());
    let backend = F2fsBackend::new(spec_f.clone(), F2fsOptions::default())?;
    let plan = stack.setup(&spec_f, true)?;
    let used = backends::mount(&plan, &spec_f.mount_point)?;
    println!("f2fs mounted with {used:?}");
    ensure(used.contains("checkpoint=disable"), "mounted with checkpoint=disable")?;
    ensure(backend.prepare()? == Action::Identity, "prepare: active from mount")?;
    ensure(backend.status()?.state == BackendState::Armed, "status armed")?;
    let space = backend.space()?;
    ensure(space.free_bytes.is_some_and(|f| f > 0), format!("space {space:?}"))?;
    let kept = pattern(0x42, 3 * MIB_USIZE);
    write_file(&Path::new(F2FS_MNT).join("committed"), &kept)?;
    ensure(backend.commit()? == Action::Changed, "commit remounts checkpoint=enable")?;
    ensure(backend.commit()? == Action::Identity, "a second commit is Identity")?;
    ensure(backend.status()?.state == BackendState::Committed, "status committed")?;
    umount(&spec_f)?;
    // A checkpointed session ended by a power cut: its changes must not survive.
    let plan = stack.setup(&spec_f, true)?;
    let used = backends::mount(&plan, &spec_f.mount_point)?;
    ensure(used.contains("checkpoint=disable"), "second session checkpointed")?;
    let mnt = Path::new(F2FS_MNT);
    fs::write(mnt.join("uncommitted"), pattern(0x43, 2 * MIB_USIZE))?;
    fs::write(mnt.join("committed"), pattern(0x44, 3 * MIB_USIZE))?;
    guest::sh("sync")?;
    ensure(mnt.join("uncommitted").exists(), "the session's file exists before the cut")?;
    // Keep the disk open so nothing is written back at close; cut the power.
    let _hold = fs::File::open(&disk)?;
    println!("power cut during an uncommitted f2fs checkpoint");
    guest::power_cut()
}

fn snapshot_rollback_f2fs(
    dm: &DeviceMapper,
    spec: &DeviceSpec,
    records: &Records,
    opts: &SnapshotOptions,
) -> Result<(), Failed> {
    let stack = SnapshotStack::new(opts.clone());
    let backend = SnapshotBackend::new(spec.clone(), opts.clone(), records.clone())?;
    let mnt = spec.mount_point.clone();
    mount(&stack, spec, true)?;
    let files = seed_files(&mnt, 0x50)?;
    ensure(backend.prepare()? == Action::Changed, "prepare on f2fs")?;
    let flags = guest::sh(&format!("lsattr {} 2>&1 || true", backend.cow_path().display()))?;
    println!("COW file on f2fs: {}", flags.trim());
    let rec = record(records, spec)?.ok_or("record")?;
    ensure(rec.extents.iter().all(|e| e.physical > 0), "pinned: real physical addresses")?;
    let snap = object_name(Role::Snapshot, &spec.instance)?;
    let at_start = block_hashes(&dm.node_path(&snap.name))?;
    change_files(&mnt, &files, 0x5f)?;
    // The checkpoint image does not move while the filesystem changes.
    let during = block_hashes(&dm.node_path(&snap.name))?;
    let moved = differing_outside(&at_start, &during, &rec);
    ensure(
        moved == 0,
        format!("{moved} blocks of the snapshot's view moved during the checkpoint"),
    )?;
    umount(spec)?;
    let _ = stack.teardown_stack(spec)?;
    let r = backend.restore(
        spec.raw.to_str().ok_or("path")?,
        &RestoreRequest::default(),
        &|_, _| {},
    )?;
    ensure(matches!(r.outcome, RestoreOutcome::Restored { .. }), format!("{:?}", r.outcome))?;
    let merged = record(records, spec)?.ok_or("record")?;
    let now = block_hashes(&spec.raw)?;
    let differ = differing_outside(&at_start, &now, &merged);
    ensure(differ == 0, format!("{differ} blocks outside the COW file differ after rollback"))?;
    // The kernel merge leaves base (linear), which holds the raw device exclusively.
    let base = object_name(Role::Base, &spec.instance)?;
    let dev = if our_devices(dm)?.contains(&base.name.to_string()) {
        dm.node_path(&base.name)
    } else {
        spec.raw.clone()
    };
    Fs::F2fs.fsck(&dev)?;
    mount(&stack, spec, false)?;
    files_are_back(&mnt, &files)?;
    ensure(backend.teardown()? == Action::Changed, "teardown")?;
    umount(spec)?;
    let _ = stack.teardown_stack(spec)?;
    println!("[{:?}] snapshot on f2fs: rollback bit-exact, fsck clean", opts.rollback);
    Ok(())
}

fn guest_f2fs_second(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    let disk = guest::disk(0);
    let spec_f = spec(&disk, F2FS_MNT, "f2fs")?;
    let backend = F2fsBackend::new(spec_f.clone(), F2fsOptions::default())?;
    let r =
        backend.restore(disk.to_str().ok_or("path")?, &RestoreRequest::default(), &|_, _| {})?;
    ensure(r.outcome == RestoreOutcome::NothingToRestore && r.result.is_ok(), "f2fs restore")?;
    let plan = F2fsStack::new(F2fsOptions::default()).setup(&spec_f, false)?;
    let used = backends::mount(&plan, &spec_f.mount_point)?;
    ensure(!used.contains("checkpoint"), "not checkpointing: plain mount")?;
    let mnt = Path::new(F2FS_MNT);
    ensure(!mnt.join("uncommitted").exists(), "the uncommitted file was rolled back")?;
    ensure(
        fs::read(mnt.join("committed"))? == pattern(0x42, 3 * MIB_USIZE),
        "the committed file has its committed contents",
    )?;
    ensure(backend.status()?.state == BackendState::Committed, "mounted without disable")?;
    umount(&spec_f)?;
    Fs::F2fs.fsck(&disk)?;
    println!("f2fs rollback by the kernel after a power cut: ok");
    nothing_left(&dm)?;

    // ---- snapshot on f2fs: the COW file is pinned ----
    let meta = Path::new("/dev/shm/meta");
    fs::create_dir_all(meta)?;
    let records = Records::open(meta)?;
    let (_img, raw) = loop_file("f2fs.img", 200 * MIB)?;
    guest::sh(&format!("mkfs.f2fs -q {}", raw.path().display()))?;
    let spec_s = spec(raw.path(), "/dev/shm/mnt-snapf2fs", "f2fs")?;
    let opts = SnapshotOptions { cow_bytes: Some(16 * MIB), ..SnapshotOptions::default() };
    let kopts = SnapshotOptions { rollback: RollbackMethod::KernelMerge, ..opts.clone() };
    let result = snapshot_rollback_f2fs(&dm, &spec_s, &records, &opts)
        .and_then(|()| snapshot_rollback_f2fs(&dm, &spec_s, &records, &kopts));
    if result.is_err() {
        let _ = blockdev::mount::umount(&spec_s.mount_point, Default::default());
        let _ = SnapshotStack::new(opts).teardown_stack(&spec_s);
    }
    raw.detach()?;
    result?;
    nothing_left(&dm)
}
