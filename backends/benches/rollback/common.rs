//! Guest-side helpers of the rollback benchmark: data patterns, aligned direct I/O, timing, and
//! the snapshot stack (COW device, `snapshot`, `snapshot-origin`) with its merge handover.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockcopy::device::IoBuf;
use blockdev::dm::target::{
    LinearParams, Persistence, SnapshotOriginParams, SnapshotParams, SnapshotStatus,
};
use blockdev::dm::{DevRef, DeviceMapper, DmName, SuspendMode, Table, TableSlot, Target};
use blockdev::{DevId, Sectors};
use testbench::Failed;

pub const BLOCK: u64 = 4096;
pub const MIB: u64 = 1 << 20;
/// Chunk of every snapshot here: 4 KiB, the file system's block.
pub const CHUNK: Sectors = Sectors::new(8);
/// Pattern seeds: the data at checkpoint start, and the data written during the checkpoint.
pub const ORIGINAL: u64 = 0x0A11_CE00;
pub const CHANGED: u64 = 0xC4A9_6ED0;

/// `(byte offset, byte length)` ranges.
pub type Ranges = Vec<(u64, u64)>;

/// xorshift64: deterministic offsets, same in every run.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// `count` distinct slots of `0..slots`, in random order.
    pub fn distinct(&mut self, slots: u64, count: u64) -> Vec<u64> {
        assert!(count <= slots, "{count} distinct values from {slots}");
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        while (out.len() as u64) < count {
            let s = self.below(slots);
            if seen.insert(s) {
                out.push(s);
            }
        }
        out
    }
}

/// Fills `buf` with the bytes generation `seed` holds at device offset `offset`.
pub fn fill(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let pos = offset + 8 * i as u64;
        w.copy_from_slice(&((pos ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
}

pub fn open_direct(path: &Path) -> Result<File, Failed> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {} O_DIRECT: {e}", path.display()).into())
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("sizes fit in memory")
}

/// `ranges` split into pieces of at most 1 MiB.
fn pieces(ranges: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MIB);
            out.push((off + at, n));
            at += n;
        }
    }
    out
}

/// Writes generation `seed` over `ranges` with O_DIRECT on 4 threads, then flushes.
pub fn write_pattern(path: &Path, ranges: &[(u64, u64)], seed: u64) -> Result<(), Failed> {
    write_ranges(path, &pieces(ranges), Some(seed), 4).map(|_| ())
}

/// Writes `ops` (`(offset, length)`, O_DIRECT) on `threads` threads, then `fdatasync`; returns
/// the elapsed time. With `seed`, each write carries generation `seed`'s bytes for its offset
/// (filled just before it); without, every write sends the same prefilled buffer, so only I/O
/// is timed.
pub fn write_ranges(
    path: &Path,
    ops: &[(u64, u64)],
    seed: Option<u64>,
    threads: usize,
) -> Result<Duration, Failed> {
    let f = open_direct(path)?;
    let max = ops.iter().map(|o| o.1).max().unwrap_or(BLOCK);
    let mut shared = IoBuf::new(to_usize(max));
    fill(shared.as_mut_slice(), 0, CHANGED);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut own = IoBuf::default();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(off, len)) = ops.get(i) else { break };
                    let data = match seed {
                        Some(seed) => {
                            own.set_len(to_usize(len));
                            fill(own.as_mut_slice(), off, seed);
                            own.as_slice()
                        }
                        None => &shared.as_slice()[..to_usize(len)],
                    };
                    if let Err(e) = f.write_all_at(data, off) {
                        *failed.lock().unwrap() = Some(format!("write at {off}: {e}"));
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e.into());
    }
    f.sync_data()?;
    Ok(start.elapsed())
}

/// Checks with O_DIRECT reads that `ranges` hold generation `seed`.
pub fn check_pattern(
    path: &Path,
    ranges: &[(u64, u64)],
    seed: u64,
    who: &str,
) -> Result<(), Failed> {
    let f = open_direct(path)?;
    let mut buf = IoBuf::new(to_usize(MIB));
    let mut want = vec![0u8; to_usize(MIB)];
    for &(off, len) in ranges {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MIB);
            buf.set_len(to_usize(n));
            f.read_exact_at(buf.as_mut_slice(), off + at)?;
            fill(&mut want[..to_usize(n)], off + at, seed);
            if buf.as_slice() != &want[..to_usize(n)] {
                return Err(
                    format!("{who}: bytes at {} are not the expected data", off + at).into()
                );
            }
            at += n;
        }
    }
    Ok(())
}

/// Saved bytes of a device, to put back before each timed run.
#[derive(Debug, Default)]
pub struct Saved(Vec<(u64, IoBuf)>);

impl Saved {
    /// Reads `ranges` of `path` with O_DIRECT.
    pub fn read(path: &Path, ranges: &[(u64, u64)]) -> Result<Saved, Failed> {
        let f = open_direct(path)?;
        let mut out = Vec::new();
        for &(off, len) in ranges {
            let mut buf = IoBuf::new(to_usize(len));
            f.read_exact_at(buf.as_mut_slice(), off)?;
            out.push((off, buf));
        }
        Ok(Saved(out))
    }
    /// Copies `ranges` of an in-memory image.
    pub fn from_image(image: &[u8], ranges: &[(u64, u64)]) -> Saved {
        let mut out = Vec::new();
        for &(off, len) in ranges {
            let mut buf = IoBuf::new(to_usize(len));
            buf.as_mut_slice().copy_from_slice(&image[to_usize(off)..to_usize(off + len)]);
            out.push((off, buf));
        }
        Saved(out)
    }
    /// Writes the saved bytes back (O_DIRECT), flushes.
    pub fn write_back(&self, path: &Path) -> Result<(), Failed> {
        let f = open_direct(path)?;
        for (off, buf) in &self.0 {
            f.write_all_at(buf.as_slice(), *off)?;
        }
        f.sync_data()?;
        Ok(())
    }
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// Drops the page cache so every timed run starts cold.
pub fn drop_caches() -> Result<(), Failed> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop_caches: {e}").into())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

pub fn mib_s(bytes: u64, d: Duration) -> f64 {
    mib(bytes) / d.as_secs_f64()
}

pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}

pub fn sectors(bytes: u64) -> Sectors {
    assert!(bytes % 512 == 0, "{bytes} bytes is not whole sectors");
    Sectors::new(bytes / 512)
}

pub fn dm_name(name: &str) -> Result<DmName, Failed> {
    Ok(DmName::new(name)?)
}

/// A dm-linear device over `len` bytes of `dev` from byte `offset`.
pub fn linear(
    dm: &DeviceMapper,
    name: &DmName,
    dev: DevId,
    offset: u64,
    len: u64,
) -> Result<(DevId, PathBuf), Failed> {
    let table = linear_table(dev, offset, len)?;
    let info = dm.create_device(name, None, &table)?;
    Ok((info.dev, dm.node_path(name)))
}

pub fn linear_table(dev: DevId, offset: u64, len: u64) -> Result<Table, Failed> {
    let target = Target::Linear(LinearParams { device: dev, offset: sectors(offset) });
    Ok(Table::single(sectors(len), target)?)
}

pub fn snapshot_status(dm: &DeviceMapper, name: &DmName) -> Result<SnapshotStatus, Failed> {
    let s = dm.status(DevRef::Name(name), TableSlot::Active)?;
    Ok(s.first().ok_or("no status line")?.text.parse()?)
}

/// `snapshot-origin` over all of `raw` with a persistent `snapshot` (4 KiB chunks) whose COW
/// device is a dm-linear over `cow_len` bytes of `cow_dev` from `cow_offset`.
#[derive(Debug)]
pub struct SnapStack {
    cow: DmName,
    snap: DmName,
    origin: DmName,
    params: SnapshotParams,
    size: Sectors,
    pub origin_dev: DevId,
    pub origin_node: PathBuf,
}

impl SnapStack {
    /// `fresh`: zero the COW's first chunk first (a new store); otherwise the kernel loads the
    /// store it finds.
    pub fn create(
        dm: &DeviceMapper,
        prefix: &str,
        raw: (DevId, u64),
        cow_at: (DevId, u64, u64),
        fresh: bool,
    ) -> Result<SnapStack, Failed> {
        let cow = dm_name(&format!("{prefix}-cow"))?;
        let snap = dm_name(&format!("{prefix}-snap"))?;
        let origin = dm_name(&format!("{prefix}-origin"))?;
        let (cow_dev, cow_node) = linear(dm, &cow, cow_at.0, cow_at.1, cow_at.2)?;
        if fresh {
            write_pattern_zero(&cow_node)?;
        }
        let params = SnapshotParams {
            origin: raw.0,
            cow: cow_dev,
            persistence: Persistence::Persistent,
            chunk: CHUNK,
            features: vec![],
        };
        let size = sectors(raw.1);
        dm.create_device(&snap, None, &Table::single(size, Target::Snapshot(params.clone()))?)?;
        let target = Target::SnapshotOrigin(SnapshotOriginParams { origin: raw.0 });
        let info = dm.create_device(&origin, None, &Table::single(size, target)?)?;
        Ok(SnapStack {
            origin_node: dm.node_path(&origin),
            origin_dev: info.dev,
            cow,
            snap,
            origin,
            params,
            size,
        })
    }

    pub fn status(&self, dm: &DeviceMapper) -> Result<SnapshotStatus, Failed> {
        snapshot_status(dm, &self.snap)
    }

    /// Removes the origin, the snapshot and the COW device; the store stays on disk.
    pub fn teardown(self, dm: &DeviceMapper) -> Result<(), Failed> {
        dm.remove_device(&self.origin)?;
        dm.remove_device(&self.snap)?;
        dm.remove_device(&self.cow)?;
        Ok(())
    }

    /// Rollback with the kernel: the snapshot-merge handover (vm-bench.md), then waits until
    /// only metadata is allocated. Returns the time from the start of the handover until the
    /// merge is complete; removes the devices afterwards.
    pub fn kernel_merge(self, dm: &DeviceMapper) -> Result<Duration, Failed> {
        let merge = Table::single(self.size, Target::SnapshotMerge(self.params.clone()))?;
        let start = Instant::now();
        dm.load_table(DevRef::Name(&self.origin), &merge)?;
        dm.suspend(DevRef::Name(&self.snap), SuspendMode::Flush)?;
        dm.suspend(DevRef::Name(&self.origin), SuspendMode::Flush)?;
        dm.resume(DevRef::Name(&self.origin))?;
        dm.remove_device(&self.snap)?;
        loop {
            let st = snapshot_status(dm, &self.origin)?;
            if st.merge_complete() {
                break;
            }
            if !matches!(st, SnapshotStatus::Active { .. }) {
                return Err(format!("kernel merge failed: {st:?}").into());
            }
            if start.elapsed() > Duration::from_secs(900) {
                return Err(format!("kernel merge stuck at {st:?}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = start.elapsed();
        dm.remove_device(&self.origin)?;
        dm.remove_device(&self.cow)?;
        Ok(took)
    }
}

fn write_pattern_zero(path: &Path) -> Result<(), Failed> {
    let f = open_direct(path)?;
    let buf = IoBuf::new(to_usize(BLOCK));
    f.write_all_at(buf.as_slice(), 0)?;
    f.sync_data()?;
    Ok(())
}

/// The host: CPU model, CPUs, memory (the report notes where its numbers come from).
pub fn host_machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown", |(_, v)| v.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "memory_mib": kib / 1024,
        "host_kernel": host_kernel.trim(),
    })
}

/// QEMU processes on this machine (`/proc/*/comm` starting with `qemu-system`).
pub fn qemu_processes() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .count()
}

/// A benchmark boot and whether it had the machine to itself.
pub struct AloneRun {
    /// What the guest did (`Vm::run_self`'s answer).
    pub run: Result<testbench::vm::GuestRun, testbench::vm::VmError>,
    /// QEMU processes before the boot, and the most seen during it (ours included).
    pub before: usize,
    pub max: usize,
    /// Boot and run, in seconds.
    pub seconds: f64,
}

impl AloneRun {
    /// No other guest before or during the run: its ratios are clean.
    pub fn clean(&self) -> bool {
        self.max <= 1 && self.before == 0
    }

    /// Prints the QEMU counts (and a warning when the run was not clean) and records them in
    /// the report JSON's `setup`, with the host machine.
    pub fn record(&self, json: &mut serde_json::Value) {
        let (before, max, seconds, clean) = (self.before, self.max, self.seconds, self.clean());
        println!(
            "\nQEMU processes on the host: {before} before the boot, at most {max} during the run \
             (ours included); boot + run {seconds:.0} s"
        );
        if !clean {
            println!("WARNING: another guest shared the 2 cores: the ratios above are not clean");
        }
        json["machine"] = host_machine();
        json["setup"]["qemu_processes"] =
            serde_json::json!({ "before": before, "max_during": max, "clean": clean });
        json["setup"]["boot_and_run_s"] = serde_json::json!(seconds);
    }
}

/// Runs the guest entry `bench` (with `quick` when asked) while sampling how many QEMU
/// processes the host runs; `before` was counted before the scratch disks were made.
pub fn run_alone(vm: &testbench::vm::Vm, what: &str, quick: bool, before: usize) -> AloneRun {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicUsize::new(before));
    let sampler = {
        let (stop, max_seen) = (Arc::clone(&stop), Arc::clone(&max_seen));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max_seen.fetch_max(qemu_processes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    println!(
        "{what} benchmark ({} mode): QEMU processes on the host before the boot: {before}",
        if quick { "quick" } else { "full" }
    );
    let started = Instant::now();
    let run = vm.run_self("bench", if quick { &["quick"] } else { &[] });
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    AloneRun {
        run,
        before,
        max: max_seen.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    }
}
