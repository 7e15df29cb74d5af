//! The bow backend on the host, against the engine model (`bow::model`, which reproduces the
//! kernel target byte for byte, its `bow/free` over-report and its stale dm-bufio block 0)
//! behind a fake sysfs tree read and written through `blockdev::bowctl::Sysfs::at`.

use std::fs;
use std::os::unix::fs::symlink;
use std::sync::{Arc, Mutex, MutexGuard};

use ::bow::device::MemDevice;
use ::bow::model::{BowEngine, BowModel, BowState as ModelState, BufioModel, ModelConfig};
use ::bow::units::{BlockSize, Sectors as BowSectors};
use blockdev::DevId;

use super::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 4096; // a 16 MiB device
const USED: u64 = 1024; // blocks 0..1024 hold data; the rest is free

type Model = Arc<Mutex<BowModel<MemDevice>>>;

fn lock(m: &Model) -> MutexGuard<'_, BowModel<MemDevice>> {
    m.lock().unwrap()
}

fn sector(block: u64) -> BowSectors {
    BowSectors(block * BS / 512)
}

fn block_data(seed: u64) -> Vec<u8> {
    (0..BS).map(|i| u8::try_from((i * 7 + seed * 13) % 251).unwrap()).collect()
}

/// A fake `/sys` with one dm device 254:0 that has a `bow/` directory.
fn sysfs_tree() -> (tempfile::TempDir, BowControl) {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let d = r.join("devices/virtual/block/dm-0");
    fs::create_dir_all(d.join("slaves")).unwrap();
    fs::create_dir_all(d.join("dm")).unwrap();
    fs::create_dir_all(d.join("bow")).unwrap();
    fs::write(d.join("dm/name"), "cpd-data-bow\n").unwrap();
    fs::write(d.join("bow/state"), "0\n").unwrap();
    fs::write(d.join("bow/free"), "0\n").unwrap();
    fs::create_dir_all(r.join("block")).unwrap();
    fs::create_dir_all(r.join("dev/block")).unwrap();
    symlink("../devices/virtual/block/dm-0", r.join("block/dm-0")).unwrap();
    symlink("../../devices/virtual/block/dm-0", r.join("dev/block/254:0")).unwrap();
    let dev: DevId = "254:0".parse().unwrap();
    let ctl = Sysfs::at(r).find_bow(dev).unwrap().expect("bow/ found through the fake sysfs");
    (t, ctl)
}

/// The model served through the sysfs files: a state write is applied to the model first and
/// written to the file only if the model (the kernel) accepts it; `free` is refreshed from the
/// model before it is read.
#[derive(Debug)]
struct ModelBow {
    ctl: BowControl,
    model: Model,
}

fn to_model(s: BowState) -> ModelState {
    match s {
        BowState::Trim => ModelState::Trim,
        BowState::Checkpoint => ModelState::Checkpoint,
        BowState::Committed => ModelState::Committed,
    }
}

impl BowTarget for ModelBow {
    fn state(&self) -> Result<BowState, BackendError> {
        self.ctl.state().map_err(|e| bowctl_err("read bow/state", e))
    }
    fn set_state(&self, to: BowState) -> Result<(), BackendError> {
        lock(&self.model).set_state(to_model(to)).map_err(|e| BackendError::InvalidState {
            backend: NAME.into(),
            state: e.to_string(),
            operation: "change the dm-bow state",
        })?;
        self.ctl.set_state(to).map_err(|e| bowctl_err("write bow/state", e))
    }
    fn free(&self) -> Result<u64, BackendError> {
        let free = lock(&self.model).free_bytes();
        fs::write(self.ctl.dir().join("free"), format!("{free}\n")).unwrap();
        self.ctl.free().map(|b| b.get()).map_err(|e| bowctl_err("read bow/free", e))
    }
    fn block_size(&self) -> u64 {
        BS
    }
    fn read_head(&self, buf: &mut [u8]) -> Result<(), BackendError> {
        lock(&self.model).read(BowSectors(0), buf).map(|_| ()).map_err(engine_err)
    }
    fn write_head(&self, data: &[u8]) -> Result<(), BackendError> {
        let mut m = lock(&self.model);
        m.write(BowSectors(0), data).map_err(engine_err)?;
        m.flush().map_err(engine_err)
    }
}

fn engine_err(e: ::bow::model::EngineError) -> BackendError {
    errors::io("model I/O", std::io::Error::other(e.to_string()))
}

/// A filesystem on the model: free extents (byte ranges), a super block in block 0 that it
/// rewrites on thaw if `rewrites_on_thaw` (ext4 does), and its own free-space count.
#[derive(Debug)]
struct FakeFs {
    model: Model,
    free_extents: Vec<(u64, u64)>,
    rewrites_on_thaw: bool,
    superblock: Mutex<Vec<u8>>,
    free_blocks: Mutex<u64>,
    frozen: Mutex<bool>,
    trims: Mutex<Vec<(u64, u64)>>,
    /// A reservation file's blocks `(offset, length)`, used while the file (the path) exists:
    /// free (trimmed, counted) once it is gone. Whether it still existed at each FITRIM.
    reservation: Option<(PathBuf, (u64, u64))>,
    reservation_seen_at_trim: Mutex<Vec<bool>>,
}

impl FakeFs {
    fn new(model: Model, rewrites_on_thaw: bool) -> FakeFs {
        // Pretend block 0 were free too: the backend must still never trim from sector 0.
        let free_extents = vec![(0, BS), (USED * BS, (BLOCKS - USED) * BS)];
        let sb = block_data(1000);
        lock(&model).write(BowSectors(0), &sb).unwrap();
        FakeFs {
            model,
            free_extents,
            rewrites_on_thaw,
            superblock: Mutex::new(sb),
            free_blocks: Mutex::new(BLOCKS - USED),
            frozen: Mutex::new(false),
            trims: Mutex::new(Vec::new()),
            reservation: None,
            reservation_seen_at_trim: Mutex::new(Vec::new()),
        }
    }

    /// The same filesystem with `blocks` blocks from the start of its free space held by the
    /// reservation file at `path`.
    fn with_reservation(mut self, path: PathBuf, blocks: u64) -> FakeFs {
        self.free_extents = vec![(0, BS), ((USED + blocks) * BS, (BLOCKS - USED - blocks) * BS)];
        *self.free_blocks.lock().unwrap() -= blocks;
        self.reservation = Some((path, (USED * BS, blocks * BS)));
        self
    }

    /// The free extents now: the reservation's blocks count once its file is gone.
    fn free_now(&self) -> Vec<(u64, u64)> {
        let mut free = self.free_extents.clone();
        if let Some((path, range)) = &self.reservation {
            if !path.exists() {
                free.push(*range);
            }
        }
        free
    }

    /// The filesystem updates its super block (block 0).
    fn write_superblock(&self, seed: u64) {
        assert!(!*self.frozen.lock().unwrap(), "no writes while frozen");
        let sb = block_data(seed);
        lock(&self.model).write(BowSectors(0), &sb).unwrap();
        *self.superblock.lock().unwrap() = sb;
    }

    /// The filesystem writes a block, allocating it first if it was free.
    fn write_block(&self, block: u64, seed: u64, allocate: bool) {
        lock(&self.model).write(sector(block), &block_data(seed)).unwrap();
        if allocate {
            *self.free_blocks.lock().unwrap() -= 1;
        }
    }
}

impl MountedFs for FakeFs {
    fn fitrim_from(&self, start: u64) -> Result<u64, BackendError> {
        if let Some((path, _)) = &self.reservation {
            self.reservation_seen_at_trim.lock().unwrap().push(path.exists());
        }
        let mut total = 0;
        for (s, len) in self.free_now() {
            let s2 = s.max(start);
            if s2 >= s + len {
                continue;
            }
            let n = s + len - s2;
            lock(&self.model).discard(BowSectors(s2 / 512), n).map_err(engine_err)?;
            self.trims.lock().unwrap().push((s2, n));
            total += n;
        }
        Ok(total)
    }
    fn freeze(&self) -> Result<(), BackendError> {
        *self.frozen.lock().unwrap() = true;
        Ok(())
    }
    fn thaw(&self) -> Result<(), BackendError> {
        *self.frozen.lock().unwrap() = false;
        if self.rewrites_on_thaw {
            // ext4_unfreeze commits the super block (with a new write time).
            let mut sb = self.superblock.lock().unwrap();
            sb[100] = sb[100].wrapping_add(1);
            lock(&self.model).write(BowSectors(0), &sb).unwrap();
        }
        Ok(())
    }
    fn free_bytes(&self) -> Result<u64, BackendError> {
        let released = match &self.reservation {
            Some((path, (_, len))) if !path.exists() => *len,
            _ => 0,
        };
        Ok(*self.free_blocks.lock().unwrap() * BS + released)
    }
}

struct Bench {
    _sys: tempfile::TempDir,
    _meta: tempfile::TempDir,
    model: Model,
    fs: Arc<FakeFs>,
    backend: BowBackend,
    records: Records,
}

fn bench(bufio: BufioModel, rewrites_on_thaw: bool) -> Bench {
    bench_with(bufio, rewrites_on_thaw, |fs| fs, "/data".as_ref())
}

/// A bench whose filesystem `make_fs` adjusts, mounted (for the backend) at `mount_point`.
fn bench_with(
    bufio: BufioModel,
    rewrites_on_thaw: bool,
    make_fs: impl FnOnce(FakeFs) -> FakeFs,
    mount_point: &std::path::Path,
) -> Bench {
    let mut cfg = ModelConfig::new(BlockSize::B4096);
    cfg.bufio = bufio;
    let model: Model = Arc::new(Mutex::new(BowModel::new(
        MemDevice::new(usize::try_from(BLOCKS * BS).unwrap()),
        cfg,
    )));
    for b in 1..USED {
        lock(&model).write(sector(b), &block_data(b)).unwrap();
    }
    let (sys, ctl) = sysfs_tree();
    let fs = Arc::new(make_fs(FakeFs::new(model.clone(), rewrites_on_thaw)));
    let meta = tempfile::tempdir().unwrap();
    let records = Records::open(meta.path()).unwrap();
    let spec = DeviceSpec {
        raw: "/dev/vdb".into(),
        mount_point: mount_point.to_owned(),
        fs_type: Some("ext4".into()),
        mount_options: String::new(),
        instance: "data".into(),
    };
    let opts = BowOptions { block_size_4096: true, sysfs_root: sys.path().to_owned() };
    let backend = BowBackend::new(spec, opts, RestoreOptions::default(), records.clone())
        .unwrap()
        .with_parts(Arc::new(ModelBow { ctl, model: model.clone() }), fs.clone());
    Bench { _sys: sys, _meta: meta, model, fs, backend, records }
}

fn device_block(model: &Model, block: u64) -> Vec<u8> {
    let snap = lock(model).device().snapshot();
    let at = usize::try_from(block * BS).unwrap();
    snap[at..at + usize::try_from(BS).unwrap()].to_vec()
}

#[test]
fn prepare_never_trims_sector_0_and_arms_once() {
    let b = bench(BufioModel::Uncached, true);
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    let trims = b.fs.trims.lock().unwrap().clone();
    assert!(!trims.is_empty() && trims.iter().all(|&(s, _)| s >= BS), "trims {trims:?}");
    assert!(lock(&b.model).warnings().is_empty(), "{:?}", lock(&b.model).warnings());
    assert_eq!(lock(&b.model).state(), ModelState::Checkpoint);
    assert_eq!(b.backend.prepare().unwrap(), Action::Identity, "a second prepare");
    let rec: BowRecord = b.records.load(NAME, "data").unwrap().expect("record of the start");
    assert_eq!(rec.fs_free_at_start, (BLOCKS - USED) * BS);
}

const RESERVED_BLOCKS: u64 = 512; // 2 MiB

/// A bench with a reservation of `RESERVED_BLOCKS` made on a folder standing for the mount
/// point, whose blocks the fake filesystem holds while the file exists; `raw` is the device
/// the reservation is recorded for.
fn bench_with_reservation(raw: &str) -> (Bench, tempfile::TempDir, Reservations, DeviceSpec) {
    let mnt = tempfile::tempdir().unwrap();
    let spec = DeviceSpec {
        raw: raw.into(),
        mount_point: mnt.path().to_owned(),
        fs_type: Some("ext4".into()),
        mount_options: String::new(),
        instance: "data".into(),
    };
    let path = Reservations::path(&spec);
    let b = bench_with(
        BufioModel::Uncached,
        true,
        |fs| fs.with_reservation(path, RESERVED_BLOCKS),
        mnt.path(),
    );
    let res = Reservations::new(b.records.clone());
    let info = res.reserve(&spec, RESERVED_BLOCKS * BS).unwrap();
    assert_eq!(info.condition, crate::reservation::Condition::Held);
    (b, mnt, res, spec)
}

#[test]
fn prepare_releases_the_reservation_before_fitrim_so_dm_bow_can_use_its_blocks() {
    let (b, _mnt, res, spec) = bench_with_reservation("/dev/vdb");
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    assert_eq!(*b.fs.reservation_seen_at_trim.lock().unwrap(), [false], "released before FITRIM");
    assert_eq!(res.status(&spec).unwrap(), None, "file and record gone");
    assert!(!Reservations::path(&spec).exists());
    let trims = b.fs.trims.lock().unwrap().clone();
    assert!(trims.contains(&(USED * BS, RESERVED_BLOCKS * BS)), "its blocks trimmed: {trims:?}");
    // dm-bow counts all of the free space, the reservation's included.
    let kernel = lock(&b.model).free_bytes();
    assert_eq!(kernel, (BLOCKS - USED) * BS, "bow/free covers the released blocks");
    let rec: BowRecord = b.records.load(NAME, "data").unwrap().expect("record of the start");
    assert_eq!(rec.fs_free_at_start, (BLOCKS - USED) * BS);
    // New data in the middle of the released blocks during the checkpoint: counted as the
    // model counts it (as for any free space, free_space_is_corrected_for_what_bow_free_misses).
    for blk in USED + 100..USED + 200 {
        b.fs.write_block(blk, blk, true);
    }
    let space = b.backend.space().unwrap();
    assert_eq!(space.free_bytes, Some(lock(&b.model).true_free_bytes()), "{space:?}");
    assert_eq!(b.backend.prepare().unwrap(), Action::Identity, "a second prepare");
}

#[test]
fn prepare_leaves_another_devices_reservation_alone_and_abort_releases_ours() {
    let (b, _mnt, res, spec) = bench_with_reservation("/dev/vdc");
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    assert_eq!(*b.fs.reservation_seen_at_trim.lock().unwrap(), [true], "not released");
    assert!(res.status(&spec).unwrap().is_some(), "the other device's reservation stays");
    let kernel = lock(&b.model).free_bytes();
    assert_eq!(kernel, (BLOCKS - USED - RESERVED_BLOCKS) * BS, "its blocks are not free");
    assert_eq!(b.backend.abort().unwrap(), Action::Identity, "not ours to release");
    assert!(Reservations::path(&spec).exists());

    // Abort of an update whose reservation was never handed over releases it.
    let (b, _mnt, res, spec) = bench_with_reservation("/dev/vdb");
    assert_eq!(b.backend.teardown().unwrap(), Action::Identity, "teardown keeps a held one");
    assert!(res.status(&spec).unwrap().is_some());
    assert_eq!(b.backend.abort().unwrap(), Action::Changed);
    assert_eq!(res.status(&spec).unwrap(), None);
    assert_eq!(b.backend.abort().unwrap(), Action::Identity);
}

#[test]
fn the_model_does_flag_a_discard_of_sector_0_in_trim() {
    // The check above can fail: the model records the kernel's NULL dereference (hazard (c)).
    let b = bench(BufioModel::Uncached, true);
    lock(&b.model).discard(BowSectors(0), 2 * BS).unwrap();
    assert!(!lock(&b.model).warnings().is_empty(), "the model flags a discard at sector 0");
}

#[test]
fn state_sequence_and_idempotent_steps() {
    let b = bench(BufioModel::Uncached, true);
    assert_eq!(b.backend.status().unwrap().state, BackendState::Idle);
    assert_eq!(b.backend.commit().unwrap(), Action::Identity, "never armed: nothing to commit");
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    assert_eq!(b.backend.status().unwrap().state, BackendState::Armed);
    b.fs.write_block(10, 1, false);
    assert_eq!(b.backend.commit().unwrap(), Action::Changed);
    assert_eq!(b.backend.status().unwrap().state, BackendState::Committed);
    assert_eq!(b.backend.commit().unwrap(), Action::Identity, "a retried commit succeeds");
    assert!(b.records.load::<BowRecord>(NAME, "data").unwrap().is_none(), "record cleared");
    let e = b.backend.prepare().unwrap_err();
    assert!(matches!(e, BackendError::InvalidState { .. }), "{e}");
    assert_eq!(b.backend.space().unwrap(), BackupSpace::default(), "no backups once committed");
}

/// The workload of the stale-block-0 tests: the super block changes during the checkpoint.
fn checkpoint_with_superblock_changes(b: &Bench) {
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    for i in 0..3 {
        b.fs.write_superblock(2000 + i);
        b.fs.write_block(20 + i, 3000 + i, false);
    }
}

#[test]
fn a_plain_state_2_commits_a_stale_block_0_in_the_model() {
    // The hazard is real in the model: without the backend's check, block 0 reverts.
    let b = bench(BufioModel::NeverEvict, false);
    checkpoint_with_superblock_changes(&b);
    let live = b.fs.superblock.lock().unwrap().clone();
    lock(&b.model).set_state(ModelState::Committed).unwrap();
    assert_ne!(device_block(&b.model, 0), live, "the model reproduces §10.1");
}

#[test]
fn commit_is_immune_to_the_stale_block_0() {
    for rewrites_on_thaw in [false, true] {
        let b = bench(BufioModel::NeverEvict, rewrites_on_thaw);
        checkpoint_with_superblock_changes(&b);
        assert_eq!(b.backend.commit().unwrap(), Action::Changed);
        let live = b.fs.superblock.lock().unwrap().clone();
        assert_eq!(
            device_block(&b.model, 0),
            live,
            "block 0 is the filesystem's (thaw rewrite: {rewrites_on_thaw})"
        );
        for i in 0..3 {
            assert_eq!(device_block(&b.model, 20 + i), block_data(3000 + i));
        }
        assert!(!*b.fs.frozen.lock().unwrap(), "thawed");
    }
}

#[test]
fn free_space_is_corrected_for_what_bow_free_misses() {
    let b = bench(BufioModel::Uncached, true);
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    // Overwrites of used blocks (backed up) and new data in the middle of free space.
    for blk in 100..150 {
        b.fs.write_block(blk, blk + 7, false);
    }
    for blk in 3000..3100 {
        b.fs.write_block(blk, blk, true);
    }
    let kernel = lock(&b.model).free_bytes();
    let truth = lock(&b.model).true_free_bytes();
    assert!(kernel > truth, "bow/free over-reports ({kernel} > {truth})");
    let space = b.backend.space().unwrap();
    assert_eq!(space.free_bytes, Some(truth), "corrected free = the model's true free space");
    let status = b.backend.status().unwrap();
    assert_eq!(status.free_bytes, Some(truth));
    assert!(status.backup_used_bytes.is_some_and(|u| u >= 50 * BS), "{status:?}");
}

#[test]
fn corrected_free_never_exceeds_what_the_filesystem_has() {
    let start =
        BowRecord { kernel_free_at_start: 100 * BS, fs_free_at_start: 100 * BS, block_size: BS };
    // 2 blocks of prepare_log, 60 blocks the filesystem took from free space.
    assert_eq!(corrected_free(100 * BS, BS, Some(&start), 40 * BS), 38 * BS);
    assert_eq!(corrected_free(100 * BS, BS, None, 200 * BS), 98 * BS);
    assert_eq!(corrected_free(100 * BS, BS, None, 50 * BS), 50 * BS, "capped by the fs");
    assert_eq!(corrected_free(BS, BS, Some(&start), 100 * BS), 0);
}

#[test]
fn restore_before_setup_rolls_the_log_back() {
    let b = bench(BufioModel::Uncached, true);
    let before = lock(&b.model).device().snapshot();
    assert_eq!(b.backend.prepare().unwrap(), Action::Changed);
    b.fs.write_superblock(4000);
    for blk in 200..260 {
        b.fs.write_block(blk, blk + 99, false);
    }
    b.fs.write_block(3500, 1, true);
    // The next boot: the raw device (an image here) before anything is set up on it.
    let img = tempfile::NamedTempFile::new().unwrap();
    fs::write(img.path(), lock(&b.model).device().snapshot()).unwrap();
    let path = img.path().to_str().unwrap();
    assert!(b.backend.covers("/dev/vdb") && !b.backend.covers(path));
    let report = b.backend.restore(path, &RestoreRequest::default(), &|_, _| {}).unwrap();
    assert!(
        matches!(report.outcome, RestoreOutcome::Restored { entries } if entries > 0),
        "{report:?}"
    );
    assert_eq!(report.result, Ok(()));
    let after = fs::read(img.path()).unwrap();
    let used = usize::try_from(USED * BS).unwrap();
    assert_eq!(after[..used], before[..used], "every block in use at checkpoint start is back");
    // A second restore finds no log: vold's answer.
    let again = b.backend.restore(path, &RestoreRequest::default(), &|_, _| {}).unwrap();
    assert_eq!(again.outcome, RestoreOutcome::NothingToRestore);
    assert_eq!(again.result, Err((EINVAL, "No magic".to_owned())));
}

#[test]
fn restore_log_reports_vold_codes() {
    let missing = restore_log("/nonexistent/device", &RestoreOptions::default(), &|_, _| {});
    assert!(matches!(missing.outcome, RestoreOutcome::Failed { errno: 2, .. }), "{missing:?}");
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let none = restore_log(img.path().to_str().unwrap(), &RestoreOptions::default(), &|_, _| {});
    assert_eq!(none.result, Err((EINVAL, "No magic".to_owned())));
}

#[test]
fn options_are_validated() {
    assert!(BowOptions::default().validate().is_ok());
    let o = BowOptions { sysfs_root: "sys".into(), ..BowOptions::default() };
    assert!(o.validate().unwrap_err().starts_with("sysfs_root"));
}
