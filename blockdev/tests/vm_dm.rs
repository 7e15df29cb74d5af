//! Device-mapper on a real kernel: linear over loop (create, load, query, reload, suspend,
//! resume, list, node, remove), messages, target versions, bad input, flakey, cleanup of stale
//! devices; and dm-log-writes captured and decoded by our reader.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use blockdev::dm::target::{
    BowParams, FlakeyFeature, FlakeyParams, LinearParams, LogWritesParams, LogWritesStatus,
};
use blockdev::dm::{
    DevRef, DeviceMapper, DmError, DmName, ListedUuid, Table, TableSlot, Target, TargetLine,
};
use blockdev::logwrites::{self, LogReader, ReplayUntil};
use blockdev::loopdev::LoopOptions;
use blockdev::names::{self, object_name, Role};
use blockdev::{blk, DevId, ErrorKind, Sectors};
use common::{ensure, loop_file, pattern, read_direct, write_direct, MODULES};
use nix::errno::Errno;
use testbench::vm::Vm;
use testbench::{guest, vm_trial, Failed};

const MIB: u64 = 1 << 20;

fn main() -> std::process::ExitCode {
    testbench::main(
        vec![
            vm_trial("dm_linear_messages_versions_bad_input_flakey_cleanup", host_dm_basics),
            vm_trial("dm_log_writes_capture_decode_and_replay", host_log_writes),
        ],
        &[("dm_basics", guest_dm_basics), ("log_writes", guest_log_writes)],
    )
}

fn host_dm_basics() -> Result<(), Failed> {
    let run = Vm::new("blockdev_dm_basics").modules(MODULES).run_self("dm_basics", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    Ok(())
}

fn host_log_writes() -> Result<(), Failed> {
    let run = Vm::new("blockdev_log_writes").modules(MODULES).run_self("log_writes", &[])?;
    run.expect_success()?;
    print!("{}", run.output);
    // The guest leaves the raw-workload log as a sample; keep a copy next to the fixture when
    // asked (used to refresh tests/fixtures/logwrites-raw.bin).
    if let Some(dest) = std::env::var_os("BLOCKDEV_SAVE_LOG_SAMPLE") {
        fs::copy(run.shared_dir.join("logwrites-raw.bin"), dest)?;
    }
    Ok(())
}

fn linear(start: u64, len: u64, dev: DevId, offset: u64) -> TargetLine {
    TargetLine::new(
        Sectors::new(start),
        Sectors::new(len),
        Target::Linear(LinearParams { device: dev, offset: Sectors::new(offset) }),
    )
}

fn expect_kind(
    res: Result<impl std::fmt::Debug, DmError>,
    kind: ErrorKind,
) -> Result<DmError, Failed> {
    match res {
        Ok(v) => Err(format!("expected a {kind:?} error, got Ok({v:?})").into()),
        Err(e) if e.kind() == kind => Ok(e),
        Err(e) => Err(format!("expected a {kind:?} error, got {:?}: {e}", e.kind()).into()),
    }
}

fn guest_dm_basics(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    let v = dm.version()?;
    println!("dm ioctl interface {v}");
    ensure(v.major == 4 && v.minor >= 41, format!("interface {v}"))?;

    let (_backing, lo) = loop_file("dm-basics.img", 32 * MIB, &LoopOptions::default())?;
    ensure(blk::size(lo.file())?.get() == 32 * MIB, "BLKGETSIZE64 of the loop device")?;
    ensure(blk::logical_block_size(lo.file())? == 512, "BLKSSZGET")?;
    let raw = lo.dev();

    // ---- create + load + resume, node without udev ----
    let on = object_name(Role::Test, "lin")?;
    let info =
        dm.create_device(&on.name, Some(&on.uuid), &Table::new(vec![linear(0, 32768, raw, 0)])?)?;
    ensure(info.active_table && !info.suspended && !info.inactive_table, format!("{info:?}"))?;
    ensure(info.uuid.as_deref() == Some(on.uuid.as_str()), "uuid reported back")?;
    let node = dm.node_path(&on.name);
    let meta = fs::metadata(&node)?;
    ensure(meta.file_type().is_block_device(), "node is a block device")?;
    ensure(DevId::from_dev_t(meta.rdev())? == info.dev, "node has the device's number")?;
    ensure(node.starts_with("/dev/mapper"), "node under /dev/mapper")?;
    let a = pattern(0xa1, 4096);
    write_direct(&node, 0, &a)?;
    ensure(
        read_direct(lo.path(), 0, 4096)? == a,
        "write through dm-linear reaches the loop device",
    )?;

    expect_kind(dm.create(&on.name, None), ErrorKind::Exists)?;

    // ---- table and status queries, active and inactive ----
    let t = dm.table(DevRef::Name(&on.name), TableSlot::Active)?;
    println!("linear table line: {:?}", t[0].text);
    ensure(t.len() == 1 && t[0].target_type == "linear", format!("{t:?}"))?;
    let parsed: LinearParams = t[0].text.parse()?;
    ensure(parsed == LinearParams { device: raw, offset: Sectors::new(0) }, "table parses back")?;
    let s = dm.status(DevRef::Name(&on.name), TableSlot::Active)?;
    println!("linear status: {:?}", s[0].text);
    ensure(s.len() == 1 && s[0].text.is_empty(), format!("linear status {s:?}"))?;
    ensure(dm.table(DevRef::Name(&on.name), TableSlot::Inactive)?.is_empty(), "no inactive table")?;

    // ---- reload with a two-target table: swap the halves ----
    let swapped = Table::new(vec![linear(0, 16384, raw, 16384), linear(16384, 16384, raw, 0)])?;
    let loaded = dm.load_table(DevRef::Name(&on.name), &swapped)?;
    ensure(loaded.inactive_table, "inactive slot filled")?;
    let inactive = dm.table(DevRef::Name(&on.name), TableSlot::Inactive)?;
    ensure(inactive.len() == 2, format!("inactive table {inactive:?}"))?;
    ensure(dm.table(DevRef::Name(&on.name), TableSlot::Active)?.len() == 1, "active untouched")?;
    let resumed = dm.resume(DevRef::Name(&on.name))?;
    ensure(!resumed.inactive_table && resumed.target_count == 2, format!("{resumed:?}"))?;
    let now: Table = dm
        .table(DevRef::Name(&on.name), TableSlot::Active)?
        .iter()
        .map(|r| format!("{} {} {} {}", r.start, r.length, r.target_type, r.text))
        .collect::<Vec<_>>()
        .join("\n")
        .parse()?;
    ensure(now == swapped, format!("active table after reload:\n{now}"))?;
    ensure(read_direct(&node, 8 * MIB, 4096)? == a, "data moved with the reload")?;

    // ---- suspend / resume ----
    ensure(dm.suspend(DevRef::Name(&on.name), Default::default())?.suspended, "suspended")?;
    ensure(dm.info(DevRef::Uuid(&on.uuid))?.suspended, "info by uuid says suspended")?;
    ensure(!dm.resume(DevRef::Name(&on.name))?.suspended, "resumed")?;

    // ---- list (with uuids), deps ----
    let list = dm.list_devices()?;
    let me = list.iter().find(|d| d.name == on.name.as_str()).ok_or("device not listed")?;
    ensure(me.uuid == ListedUuid::Uuid(on.uuid.to_string()), format!("{me:?}"))?;
    ensure(me.dev == info.dev, "listed dev")?;
    let deps = dm.deps(DevRef::Name(&on.name), TableSlot::Active)?;
    ensure(deps == vec![raw], format!("deps {deps:?}"))?;

    // ---- messages with replies (dm core statistics) ----
    let r = dm.message(DevRef::Name(&on.name), Sectors::new(0), "@stats_create - /1")?;
    println!("@stats_create reply: {r:?}");
    ensure(r.as_deref() == Some("0"), "region id 0")?;
    let r = dm.message(DevRef::Name(&on.name), Sectors::new(0), "@stats_list")?;
    println!("@stats_list reply: {r:?}");
    ensure(r.as_deref().is_some_and(|t| t.starts_with("0: 0+32768")), "region listed")?;
    dm.message(DevRef::Name(&on.name), Sectors::new(0), "@stats_delete 0")?;
    let e = expect_kind(
        dm.message(DevRef::Name(&on.name), Sectors::new(0), "nonsense"),
        ErrorKind::Invalid,
    )?;
    println!("message to linear: {e}");

    // ---- target versions; bow is absent on this kernel ----
    let lin = dm.target_version("linear")?.ok_or("linear absent")?;
    let snap = dm.target_version("snapshot")?.ok_or("snapshot absent (autoload)")?;
    println!("linear {lin}, snapshot {snap}");
    ensure(
        dm.list_versions()?.iter().any(|t| t.name == "snapshot"),
        "snapshot listed after autoload",
    )?;
    ensure(dm.target_version("bow")?.is_none(), "bow must be absent on this kernel")?;

    // ---- bad input: typed errors with the kernel's reason, nothing left behind ----
    let missing = DmName::new("cpd-no-such-device")?;
    let e = expect_kind(dm.info(DevRef::Name(&missing)), ErrorKind::NotFound)?;
    ensure(e.errno() == Some(Errno::ENXIO), format!("{e}"))?;
    expect_kind(dm.remove(DevRef::Name(&missing)), ErrorKind::NotFound)?;

    let bad = object_name(Role::Test, "bad")?;
    // No driver has major 4095 (a loop minor would be created on demand by block autoloading).
    let wrong_dev = DevId::new(4095, 4095)?;
    let e = expect_kind(
        dm.create_device(
            &bad.name,
            Some(&bad.uuid),
            &Table::new(vec![linear(0, 8, wrong_dev, 0)])?,
        ),
        ErrorKind::NotFound,
    )?;
    println!("wrong major:minor: {e}");
    ensure(e.kernel_message().is_some_and(|m| m.contains("Device lookup failed")), format!("{e}"))?;
    let too_big = Table::new(vec![linear(0, 65536 * 2, raw, 0)])?;
    let e =
        expect_kind(dm.create_device(&bad.name, Some(&bad.uuid), &too_big), ErrorKind::Invalid)?;
    println!("table beyond device end: {e}");
    ensure(e.kernel_message().is_some_and(|m| m.contains("too small")), format!("{e}"))?;
    let garbage = Table::single(
        Sectors::new(8),
        Target::Other { target_type: "linear".into(), params: format!("{raw}") },
    )?;
    let e =
        expect_kind(dm.create_device(&bad.name, Some(&bad.uuid), &garbage), ErrorKind::Invalid)?;
    println!("malformed line: {e}");
    ensure(
        e.kernel_message().is_some_and(|m| m.contains("Invalid argument count")),
        format!("{e}"),
    )?;
    let bow = Table::single(
        Sectors::new(32768),
        Target::Bow(BowParams { device: raw, block_size: Some(4096) }),
    )?;
    let e =
        expect_kind(dm.create_device(&bad.name, Some(&bad.uuid), &bow), ErrorKind::Unsupported)?;
    println!("bow: {e}");
    match &e {
        DmError::TargetUnavailable { target_type, .. } if target_type == "bow" => {}
        other => return Err(format!("expected TargetUnavailable(bow), got {other:?}").into()),
    }
    ensure(e.kind() == ErrorKind::Unsupported, "bow unavailable is Unsupported")?;
    ensure(
        !dm.list_devices()?.iter().any(|d| d.name == bad.name.as_str()),
        "a refused table left a device behind",
    )?;
    ensure(!dm.node_path(&bad.name).exists(), "a refused table left a node behind")?;

    // ---- replies larger than the first 16 KiB buffer (DM_BUFFER_FULL_FLAG, then regrow): 600
    // specs of 40 + 16 bytes; 120 name records of 8 + 4 + 128 (aligned) + 8 bytes ----
    let many = object_name(Role::Test, "many")?;
    let lines: Vec<TargetLine> = (0..600u64).map(|i| linear(i * 8, 8, raw, i * 8)).collect();
    dm.create_device(&many.name, Some(&many.uuid), &Table::new(lines)?)?;
    let t = dm.table(DevRef::Name(&many.name), TableSlot::Active)?;
    ensure(t.len() == 600, format!("{} of 600 targets read back", t.len()))?;
    ensure(t[599].start == Sectors::new(4792) && t[599].text == format!("{raw} 4792"), "last")?;
    ensure(dm.status(DevRef::Name(&many.name), TableSlot::Active)?.len() == 600, "status")?;
    let long: Vec<DmName> = (0..120)
        .map(|i| DmName::new(format!("cpd-grow-{i:03}-{}", "x".repeat(110))))
        .collect::<Result<_, _>>()?;
    for n in &long {
        dm.create(n, None)?;
    }
    let listed = dm.list_devices()?;
    ensure(long.iter().all(|n| listed.iter().any(|d| d.name == n.as_str())), "all listed")?;
    ensure(listed.iter().any(|d| d.uuid == ListedUuid::None), "no-uuid devices say so")?;
    println!("{} devices listed, {} targets in one table", listed.len(), t.len());
    for n in &long {
        dm.remove(DevRef::Name(n))?;
    }
    dm.remove_device(&many.name)?;

    // ---- flakey: drop_writes, error_writes ----
    flakey(&dm, raw, lo.path())?;

    // ---- snapshot statuses the kernel prints when the COW store fills ----
    snapshot_full(&dm)?;

    // ---- remove ----
    dm.remove_device(&on.name)?;
    ensure(!node.exists(), "node removed")?;
    ensure(!dm.list_devices()?.iter().any(|d| d.name == on.name.as_str()), "device removed")?;

    // ---- cleanup_stale removes a stack of ours top first, leaves others alone ----
    let lower = object_name(Role::Cow, "stale")?;
    let upper = object_name(Role::Base, "stale")?;
    let foreign = DmName::new("not-ours")?;
    let low = dm.create_device(
        &lower.name,
        Some(&lower.uuid),
        &Table::new(vec![linear(0, 2048, raw, 0)])?,
    )?;
    dm.create_device(
        &upper.name,
        Some(&upper.uuid),
        &Table::new(vec![linear(0, 2048, low.dev, 0)])?,
    )?;
    dm.create_device(&foreign, None, &Table::new(vec![linear(0, 2048, raw, 4096)])?)?;
    // As after a crash in the middle of a table swap: the lower device is suspended.
    dm.suspend(DevRef::Name(&lower.name), Default::default())?;
    let report = names::cleanup_stale(&dm)?;
    println!("cleanup_stale removed {:?}", report.removed);
    ensure(report.failed.is_empty(), format!("{:?}", report.failed))?;
    ensure(
        report.removed == vec![upper.name.to_string(), lower.name.to_string()],
        format!("{:?}", report.removed),
    )?;
    let left: Vec<String> = dm.list_devices()?.into_iter().map(|d| d.name).collect();
    ensure(left == vec!["not-ours".to_owned()], format!("left: {left:?}"))?;
    dm.remove_device(&foreign)?;
    lo.detach()?;
    println!("dm basics ok");
    Ok(())
}

fn flakey(dm: &DeviceMapper, raw: DevId, raw_path: &Path) -> Result<(), Failed> {
    let on = object_name(Role::Test, "flakey")?;
    // Always down (up 0 s, down 3600 s), dropping writes. The target starts 8 MiB into the
    // loop device.
    let mk = |features: Vec<FlakeyFeature>, up, down| {
        Table::single(
            Sectors::new(16384),
            Target::Flakey(FlakeyParams {
                device: raw,
                offset: Sectors::new(16384),
                up_interval: up,
                down_interval: down,
                features,
            }),
        )
    };
    dm.create_device(&on.name, Some(&on.uuid), &mk(vec![FlakeyFeature::DropWrites], 0, 3600)?)?;
    let t = dm.table(DevRef::Name(&on.name), TableSlot::Active)?;
    println!("flakey table line: {:?}", t[0].text);
    let parsed: FlakeyParams = t[0].text.parse()?;
    ensure(parsed.features == vec![FlakeyFeature::DropWrites], format!("{parsed:?}"))?;
    let node = dm.node_path(&on.name);
    let before = read_direct(raw_path, 8 * MIB + 4096, 4096)?;
    let b = pattern(0xb2, 4096);
    write_direct(&node, 4096, &b)?; // succeeds, but is dropped
    ensure(
        read_direct(raw_path, 8 * MIB + 4096, 4096)? == before,
        "drop_writes dropped the write",
    )?;
    ensure(read_direct(&node, 4096, 4096)? == before, "reads pass through while down")?;

    dm.reload(DevRef::Name(&on.name), &mk(vec![FlakeyFeature::ErrorWrites], 0, 3600)?)?;
    let err = common::try_write_direct(&node, 4096, &b).expect_err("error_writes must fail");
    println!("error_writes write: {err}");
    ensure(err.raw_os_error() == Some(libc::EIO), "EIO")?;
    ensure(read_direct(&node, 4096, 4096)? == before, "reads work under error_writes")?;

    dm.reload(DevRef::Name(&on.name), &mk(vec![], 3600, 0)?)?;
    write_direct(&node, 4096, &b)?;
    ensure(read_direct(raw_path, 8 * MIB + 4096, 4096)? == b, "up: writes reach the device")?;
    dm.remove_device(&on.name)?;
    println!("flakey ok");
    Ok(())
}

/// A transient snapshot whose store overflows through origin writes is "Invalid"; a `PO`
/// snapshot overflowed by writes to itself is "Overflow".
fn snapshot_full(dm: &DeviceMapper) -> Result<(), Failed> {
    use blockdev::dm::target::{Persistence, SnapshotOriginParams, SnapshotParams, SnapshotStatus};
    let (_o, origin_lo) = loop_file("full-origin.img", 8 * MIB, &LoopOptions::default())?;
    let (_c, cow_lo) = loop_file("full-cow.img", 256 * 1024, &LoopOptions::default())?;
    let size = Sectors::new(8 * MIB / 512);
    let snap = object_name(Role::Snapshot, "full")?;
    let origin = object_name(Role::Origin, "full")?;
    let params = |persistence| SnapshotParams {
        origin: origin_lo.dev(),
        cow: cow_lo.dev(),
        persistence,
        chunk: Sectors::new(8),
        features: vec![],
    };
    let status = |name: &DmName| -> Result<String, Failed> {
        Ok(dm.status(DevRef::Name(name), TableSlot::Active)?[0].text.clone())
    };

    dm.create_device(
        &snap.name,
        Some(&snap.uuid),
        &Table::single(size, Target::Snapshot(params(Persistence::Transient)))?,
    )?;
    let origin_table = Table::single(
        size,
        Target::SnapshotOrigin(SnapshotOriginParams { origin: origin_lo.dev() }),
    )?;
    dm.create_device(&origin.name, Some(&origin.uuid), &origin_table)?;
    println!("transient snapshot status: {:?}", status(&snap.name)?);
    write_direct(&dm.node_path(&origin.name), 0, &pattern(0x31, 1 << 20))?;
    let text = status(&snap.name)?;
    println!("transient snapshot status after 1 MiB through the origin: {text:?}");
    ensure(text.parse::<SnapshotStatus>()? == SnapshotStatus::Invalid, "Invalid")?;
    dm.remove_device(&origin.name)?;
    dm.remove_device(&snap.name)?;

    write_direct(cow_lo.path(), 0, &[0u8; 4096])?;
    dm.create_device(
        &snap.name,
        Some(&snap.uuid),
        &Table::single(size, Target::Snapshot(params(Persistence::PersistentOverflow)))?,
    )?;
    let t = dm.table(DevRef::Name(&snap.name), TableSlot::Active)?;
    println!("PO snapshot table line: {:?}", t[0].text);
    ensure(
        t[0].text.parse::<SnapshotParams>()?.persistence == Persistence::PersistentOverflow,
        "PO",
    )?;
    let res = common::try_write_direct(&dm.node_path(&snap.name), 0, &pattern(0x32, 1 << 20));
    let text = status(&snap.name)?;
    println!("PO snapshot after 1 MiB written to it: {res:?}, status {text:?}");
    ensure(text.parse::<SnapshotStatus>()? == SnapshotStatus::Overflow, "Overflow")?;
    dm.remove_device(&snap.name)?;
    origin_lo.detach()?;
    cow_lo.detach()?;
    Ok(())
}

// ---- log-writes ----

fn wait_entries(dm: &DeviceMapper, name: &DmName, want: u64) -> Result<LogWritesStatus, Failed> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = dm.status(DevRef::Name(name), TableSlot::Active)?;
        let st: LogWritesStatus = s[0].text.parse()?;
        if st.logged_entries >= want || Instant::now() > deadline {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the log device for reading. dm-log-writes writes bios straight to the log device, so
/// the device's page cache may hold an older session: drop it first (BLKFLSBUF).
fn open_log(path: &Path) -> Result<LogReader<File>, Failed> {
    let f = File::open(path)?;
    blk::flush_buffers(&f)?;
    Ok(LogReader::new(f)?)
}

fn guest_log_writes(_: &[String]) -> Result<(), Failed> {
    let dm = DeviceMapper::open()?;
    let (_d, data) = loop_file("lw-data.img", 64 * MIB, &LoopOptions::default())?;
    let (_l, log) = loop_file("lw-log.img", 128 * MIB, &LoopOptions::default())?;
    let on = object_name(Role::Test, "logwrites")?;
    let table = Table::single(
        Sectors::new(64 * MIB / 512),
        Target::LogWrites(LogWritesParams { device: data.dev(), log_device: log.dev() }),
    )?;

    // ---- session 1: raw writes with exact counts ----
    dm.create_device(&on.name, Some(&on.uuid), &table)?;
    let node = dm.node_path(&on.name);
    let dev = common::open_direct(&node, true)?;
    let mut buf = common::Aligned::new(4096);
    use std::os::unix::fs::FileExt;
    for i in 0..4u64 {
        buf.as_mut().copy_from_slice(&pattern(u8::try_from(i).unwrap_or(0), 4096));
        dev.write_all_at(buf.as_ref(), i * 65536)?;
    }
    dev.sync_all()?; // one empty flush
    dm.message(DevRef::Name(&on.name), Sectors::new(0), "mark raw-1")?;
    for i in 4..6u64 {
        buf.as_mut().copy_from_slice(&pattern(u8::try_from(i).unwrap_or(0), 4096));
        dev.write_all_at(buf.as_ref(), i * 65536)?;
    }
    dev.sync_all()?;
    dm.message(DevRef::Name(&on.name), Sectors::new(0), "mark raw-2")?;
    let st = wait_entries(&dm, &on.name, 10)?;
    println!("log-writes status after the raw workload: {st:?}");
    ensure(st.logged_entries == 10, format!("{st:?}"))?;
    drop(dev);
    dm.remove_device(&on.name)?; // adds the final mark and rewrites the super block

    let mut reader = open_log(log.path())?;
    let entries = reader.entries()?;
    let kinds: Vec<String> = entries
        .iter()
        .map(|e| match &e.mark {
            Some(m) => format!("M:{m}"),
            None if e.is_data_write() => format!("W{}+{}", e.sector, e.nr_sectors),
            None if e.is_flush() => "F".to_owned(),
            None => format!("?{:#x}", e.flags),
        })
        .collect();
    println!("raw log: {kinds:?}");
    let want = [
        "W0+8",
        "W128+8",
        "W256+8",
        "W384+8",
        "F",
        "M:raw-1",
        "W512+8",
        "W640+8",
        "F",
        "M:raw-2",
        "M:dm-log-writes-end",
    ];
    ensure(kinds == want, format!("expected {want:?}"))?;
    ensure(reader.read_data(&entries[1])? == pattern(1, 4096), "logged data")?;
    // Keep the used part of this log as a sample for the host test.
    let used = entries.last().map_or(0, |e| e.data_offset);
    let raw_log = read_direct(log.path(), 0, usize::try_from(used)?)?;
    fs::write(guest::shared_dir().join("logwrites-raw.bin"), &raw_log)?;

    // ---- session 2: a filesystem workload with marks; replay to a mark ----
    write_direct(log.path(), 0, &[0u8; 4096])?; // forget session 1
    dm.create_device(&on.name, Some(&on.uuid), &table)?;
    guest::sh(&format!("mkfs.ext4 -q -b 4096 -E nodiscard {}", node.display()))?;
    fs::create_dir_all("/dev/shm/lw-mnt")?;
    guest::sh(&format!("mount {} /dev/shm/lw-mnt", node.display()))?;
    let content = pattern(0x5c, 300_000);
    fs::write("/dev/shm/lw-mnt/hello", &content)?;
    guest::sh("sync -f /dev/shm/lw-mnt/hello")?;
    dm.message(DevRef::Name(&on.name), Sectors::new(0), "mark fs-synced")?;
    fs::write("/dev/shm/lw-mnt/later", b"written after the mark")?;
    guest::sh("umount /dev/shm/lw-mnt")?;
    dm.message(DevRef::Name(&on.name), Sectors::new(0), "mark fs-unmounted")?;
    dm.remove_device(&on.name)?;

    let mut reader = open_log(log.path())?;
    let entries = reader.entries()?;
    let sum = logwrites::summarize(&entries);
    println!(
        "fs log: {} entries, {} writes, {} flushes, {} fua, {} discards, marks {:?}",
        entries.len(),
        sum.writes,
        sum.flushes,
        sum.fua,
        sum.discards,
        sum.marks
    );
    ensure(sum.marks == ["fs-synced", "fs-unmounted", "dm-log-writes-end"], "marks in order")?;
    ensure(sum.flushes >= 2 && sum.writes > 10, "a filesystem flushes and writes")?;
    ensure(sum.discards == 0, "mkfs -E nodiscard")?;

    // Replay up to "fs-synced" onto a fresh image: mounting it (journal recovery) shows the
    // synced file and not the later one.
    let replay_path = Path::new("/dev/shm/lw-replay.img");
    let mut replay_img = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(replay_path)?;
    replay_img.set_len(64 * MIB)?;
    let mut reader = open_log(log.path())?;
    let stats = logwrites::replay(&mut reader, &mut replay_img, ReplayUntil::Mark("fs-synced"))?;
    replay_img.sync_all()?;
    println!("replayed {stats:?}");
    guest::sh("mount -o loop /dev/shm/lw-replay.img /dev/shm/lw-mnt")?;
    let got = fs::read("/dev/shm/lw-mnt/hello")?;
    let later = Path::new("/dev/shm/lw-mnt/later").exists();
    guest::sh("umount /dev/shm/lw-mnt")?;
    ensure(got == content, "replayed file content")?;
    ensure(!later, "a file written after the mark is not in the replay")?;
    // Replay everything: the filesystem is clean.
    let mut reader = open_log(log.path())?;
    logwrites::replay(&mut reader, &mut replay_img, ReplayUntil::End)?;
    replay_img.sync_all()?;
    guest::sh("e2fsck -fn /dev/shm/lw-replay.img")?;
    data.detach()?;
    log.detach()?;
    println!("log-writes ok");
    Ok(())
}
