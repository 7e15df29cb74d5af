//! The ublk server (feature `ublk`): libublk, one queue, the [`Target`] behind a mutex shared
//! with the control thread.
//!
//! * It runs in its own mount namespace (`unshare(CLONE_NEWNS)`, `/` made private first): a
//!   server that shares the namespace of its device's users can deadlock on exit (it would hold
//!   a reference to a mount that needs its own I/O to go away).
//! * `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the server dies the kernel keeps
//!   /dev/ublkbN, queues new requests and requeues those the dead server had taken; `recover`
//!   re-attaches and they are all issued again. A write is never failed back to the file system
//!   because the server crashed. (Without REISSUE the kernel fails the requests the dead server
//!   had taken.) Writes may be issued twice; both backings tolerate that (same data, same place).

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use blockcopy::device::{BlockDevice, FileDevice};
use bow::format::LogHeader;
use bow::model::{BowEngine, BowState};
use bow::units::BlockSize;
use bow_engine::{Allocator, Engine, EngineConfig};
use clap::{Parser, Subcommand};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags};

use crate::control::{self, Command};
use crate::held::{self, HeldFile, HeldLog};
use crate::journal;
use crate::target::{BatchTimes, RangeSyncWrites, Request, Target};
use crate::writeback::{Served, WriteBackStats, HOLD_LIMIT_BYTES};

/// The default `--state-dir`: a tmpfs on every system with systemd (and Android's /dev is one).
pub const DEFAULT_STATE_DIR: &str = "/run/bow-ublk";

/// Bytes one request may carry.
const IO_BUF_BYTES: u32 = 512 << 10;
/// The engine's block, and the device's logical block (so every request is whole blocks).
const BLOCK_SHIFT: u8 = 12;

/// Why the server did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("entering a private mount namespace: {0}")]
    Namespace(nix::Error),
    #[error("reading /proc/self/mountinfo (to drop the namespace's ublk mounts): {0}")]
    MountInfo(std::io::Error),
    #[error("device id {0} is out of range (at most {max})", max = i32::MAX)]
    BadId(u32),
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: blockcopy::device::DeviceError },
    #[error("ublk: {what}: {source:?} (is ublk_drv loaded and /dev/ublk-control there?)")]
    Ublk { what: &'static str, source: UblkError },
    #[error(
        "device {dev_id}: {path} holds a running checkpoint's log, and there is no journal \
         {journal} to rebuild the engine from (another --state-dir?); refusing to recover"
    )]
    CheckpointLost { dev_id: u32, path: PathBuf, journal: PathBuf },
    #[error(
        "device {dev_id}: cannot resume the engine from {journal}: {source}; refusing to recover \
         (the device stays quiesced, nothing was written)"
    )]
    Resume { dev_id: u32, journal: PathBuf, source: bow_engine::RecoverError },
    #[error(
        "device {dev_id}: the writes the dead server held (completed, not yet the engine's) \
         could not be given to the engine (errno {errno}); refusing to recover"
    )]
    HeldWrites { dev_id: u32, errno: i32 },
    #[error("the journal {path}: {source}")]
    Journal { path: PathBuf, source: std::io::Error },
    #[error("opening {path} for the engine's ordering writes: {source}")]
    OrderingWrites { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    JournalFile(#[from] journal::JournalFileError),
    #[error("reading block 0 of {path}: {source}")]
    ReadBlock0 { path: PathBuf, source: blockcopy::device::DeviceError },
    #[error("the control socket {name}: {source}")]
    Control { name: String, source: std::io::Error },
    #[error(transparent)]
    Command(#[from] control::ControlError),
    #[error("writing {0}: {1}")]
    Output(PathBuf, std::io::Error),
}

fn ublk(what: &'static str) -> impl FnOnce(UblkError) -> ServeError {
    move |source| ServeError::Ublk { what, source }
}

#[derive(Debug, Parser)]
#[command(
    name = "bow-ublk",
    about = "Serve a device through the backup-on-write engine as /dev/ublkbN"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Where backup blocks come from (`EngineConfig::allocator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AllocatorArg {
    /// The far end of the largest free range (the default; few re-backups).
    FarEnd,
    /// dm-bow's own: the head of the trimmed list.
    DmBow,
}

impl From<AllocatorArg> for Allocator {
    fn from(a: AllocatorArg) -> Allocator {
        match a {
            AllocatorArg::FarEnd => Allocator::FarEnd,
            AllocatorArg::DmBow => Allocator::DmBow,
        }
    }
}

/// A deliberately broken write order (feature `fault`, for the VM crash suite only).
#[cfg(feature = "fault")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FaultArg {
    /// User writes issued before the flush that makes their backups durable.
    UserWriteBeforeFlush,
    /// Block 0 (the log) written before the backup data it points at.
    LogBeforeData,
    /// Held writes kept in memory only, not in the held-writes file: a kill loses them.
    HeldNotStored,
}

#[cfg(feature = "fault")]
impl FaultArg {
    /// The engine's part of the fault, if it is one of the engine's.
    fn engine(self) -> Option<bow_engine::order::Fault> {
        match self {
            FaultArg::UserWriteBeforeFlush => Some(bow_engine::order::Fault::UserWriteBeforeFlush),
            FaultArg::LogBeforeData => Some(bow_engine::order::Fault::LogBeforeData),
            FaultArg::HeldNotStored => None,
        }
    }
}

/// What `serve` and `recover` share.
#[derive(Debug, clap::Args)]
struct EngineArgs {
    /// A plain pass-through instead of the engine (the baseline).
    #[arg(long)]
    passthrough: bool,
    #[arg(long, default_value_t = 64)]
    queue_depth: u16,
    /// Where backups go.
    #[arg(long, value_enum, default_value_t = AllocatorArg::FarEnd)]
    allocator: AllocatorArg,
    /// Where the engine's op journal lives (`<id>.journal`; a tmpfs: it must outlive the
    /// server, not the machine).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Give the engine every write as it comes (no write-back: each first touch in CHECKPOINT
    /// pays its own ordering points; the behaviour before write-back, for comparison).
    #[arg(long)]
    write_through: bool,
    /// Write the batches' user writes to the raw device with `O_DIRECT` through one io_uring
    /// (no second cached copy of /data's blocks) instead of through its page cache. Not the
    /// default: at queue depth 16 it measured slower (docs/userspace-bow.md, "Direct writes").
    #[arg(long)]
    direct_writes: bool,
    /// Break the engine's write order on purpose (crash-suite builds only).
    #[cfg(feature = "fault")]
    #[arg(long, value_enum, hide = true)]
    fault: Option<FaultArg>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Add a ublk device over DEVICE and serve it until `stop` (prints "serving /dev/ublkbN").
    Serve {
        #[arg(long)]
        device: PathBuf,
        /// The ublk device id to ask for (default: the next free one).
        #[arg(long)]
        id: Option<u32>,
        #[command(flatten)]
        opts: EngineArgs,
    },
    /// Re-attach to device ID after its server died; its queued requests are issued again.
    Recover {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        device: PathBuf,
        #[command(flatten)]
        opts: EngineArgs,
    },
    /// Ask the server of device ID to start the checkpoint (after FITRIM).
    Checkpoint {
        #[arg(long)]
        id: u32,
    },
    /// Ask the server of device ID to commit the checkpoint.
    Commit {
        #[arg(long)]
        id: u32,
    },
    /// Print the state and space of device ID's server (held writes given to the engine first).
    Status {
        #[arg(long)]
        id: u32,
    },
    /// Print the writes device ID's server holds now, without giving them to the engine.
    Pending {
        #[arg(long)]
        id: u32,
    },
    /// Stop the server of device ID and delete the device.
    Stop {
        #[arg(long)]
        id: u32,
    },
    /// Write the checkpoint's write trace (the estimator's format) of device ID's server to OUT.
    Trace {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The `bow-ublk` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { device, id, opts } => serve(&device, id, &opts, false),
        Cmd::Recover { id, device, opts } => serve(&device, Some(id), &opts, true),
        Cmd::Checkpoint { id } => ask(id, Command::Checkpoint),
        Cmd::Commit { id } => ask(id, Command::Commit),
        Cmd::Status { id } => ask(id, Command::Status),
        Cmd::Pending { id } => ask(id, Command::Pending),
        Cmd::Stop { id } => ask(id, Command::Stop),
        Cmd::Trace { id, out } => control::fetch_trace(id)
            .map_err(ServeError::from)
            .and_then(|bytes| std::fs::write(&out, &bytes).map_err(|e| ServeError::Output(out, e))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bow-ublk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ask(id: u32, command: Command) -> Result<(), ServeError> {
    println!("{}", control::send(id, command)?);
    Ok(())
}

/// A mount namespace of our own, with nothing propagating back to the one we came from.
fn enter_own_mount_namespace() -> Result<(), ServeError> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(ServeError::Namespace)?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(ServeError::Namespace)?;
    // Our copies of file systems on ublk devices would keep those devices open (crate::mounts).
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(ServeError::MountInfo)?;
    for point in crate::mounts::ublk_mount_points(&info, Path::new("/sys/class/block")) {
        nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH)
            .map_err(ServeError::Namespace)?;
    }
    Ok(())
}

fn open_device(path: &Path) -> Result<FileDevice, ServeError> {
    FileDevice::open(path).map_err(|source| ServeError::Open { path: path.to_owned(), source })
}

fn engine_config(opts: &EngineArgs) -> EngineConfig {
    EngineConfig { block_size: BlockSize::B4096, allocator: opts.allocator.into() }
}

/// The engine's ordering points write back only their own blocks ([`RangeSyncWrites`]), and
/// its user writes through the page cache, or directly with `--direct-writes`.
fn set_ordering_writes(
    engine: &mut Engine<FileDevice>,
    path: &Path,
    opts: &EngineArgs,
) -> Result<(), ServeError> {
    let open =
        if opts.direct_writes { RangeSyncWrites::open_direct } else { RangeSyncWrites::open };
    let writes = open(path)
        .map_err(|source| ServeError::OrderingWrites { path: path.to_owned(), source })?;
    engine.set_durable_writes(Box::new(writes));
    Ok(())
}

#[cfg_attr(not(feature = "fault"), allow(clippy::needless_pass_by_ref_mut))]
fn apply_fault(engine: &mut Engine<FileDevice>, opts: &EngineArgs) {
    #[cfg(feature = "fault")]
    engine.set_fault(opts.fault.and_then(FaultArg::engine));
    let _ = (engine, opts);
}

/// The data bytes of the held-writes file.
fn held_capacity() -> usize {
    held::capacity(HOLD_LIMIT_BYTES, IO_BUF_BYTES as usize)
}

/// Where held writes are stored: the file, or (the `held-not-stored` fault) memory only.
#[cfg_attr(not(feature = "fault"), allow(unused_variables))]
fn held_log(file: HeldFile, opts: &EngineArgs) -> Box<dyn HeldLog> {
    #[cfg(feature = "fault")]
    if opts.fault == Some(FaultArg::HeldNotStored) {
        return Box::new(held::MemHeld::default());
    }
    Box::new(file)
}

/// A new server's target: the pass-through, or a fresh engine (TRIM) journaling to a fresh
/// `<dev_id>.journal` in the state directory.
fn new_target(
    path: &Path,
    opts: &EngineArgs,
    dev_id: u32,
) -> Result<Served<FileDevice>, ServeError> {
    let dev = open_device(path)?;
    if opts.passthrough {
        return Ok(Served::write_through(Target::Passthrough(dev)));
    }
    let journal = journal::MappedJournal::create(&opts.state_dir, dev_id)?;
    let journal_path = journal.path().to_owned();
    let mut engine = Engine::with_journal(dev, engine_config(opts), Box::new(journal))
        .map_err(|source| ServeError::Journal { path: journal_path, source })?;
    set_ordering_writes(&mut engine, path, opts)?;
    apply_fault(&mut engine, opts);
    let target = Target::Engine(Box::new(engine));
    if opts.write_through {
        return Ok(Served::write_through(target));
    }
    let file = HeldFile::create(&opts.state_dir, dev_id, held_capacity())?;
    Served::write_back(target, held_log(file, opts), Vec::new())
        .map_err(|errno| ServeError::HeldWrites { dev_id, errno })
}

/// A restarted server's target, before the device is touched: the engine rebuilt from its
/// journal and checked against block 0 ([`Engine::recover`]); refused with nothing written
/// when they do not agree. Without a journal: a fresh engine if block 0 holds no log (TRIM:
/// only the FITRIM record is lost, and the backend runs FITRIM again), else refused.
fn recovered_target(
    path: &Path,
    opts: &EngineArgs,
    dev_id: u32,
) -> Result<Served<FileDevice>, ServeError> {
    let dev = open_device(path)?;
    if opts.passthrough {
        return Ok(Served::write_through(Target::Passthrough(dev)));
    }
    let Some(old) = journal::read(&opts.state_dir, dev_id)? else {
        let mut block0 = vec![0; 1 << BLOCK_SHIFT];
        dev.read_at(&mut block0, 0)
            .map_err(|source| ServeError::ReadBlock0 { path: path.to_owned(), source })?;
        if LogHeader::decode(&block0).is_ok() {
            return Err(ServeError::CheckpointLost {
                dev_id,
                path: path.to_owned(),
                journal: journal::path(&opts.state_dir, dev_id),
            });
        }
        // A fresh engine, in TRIM: nothing was held (only CHECKPOINT holds writes).
        return new_target(path, opts, dev_id);
    };
    let recovered = Engine::recover(dev, engine_config(opts), &old.bytes)
        .map_err(|source| ServeError::Resume { dev_id, journal: old.path.clone(), source })?;
    eprintln!(
        "bow-ublk: device {dev_id}: engine rebuilt from {} ({} steps{}{}), state {}",
        old.path.display(),
        recovered.steps,
        if recovered.dropped_last {
            "; the last batch stopped before its log and is left to the kernel's reissue"
        } else {
            ""
        },
        // A mapped journal's zero rest is dropped every time; other bytes are an append cut short.
        if old.bytes.get(recovered.journal_len..).is_some_and(|rest| rest.iter().any(|&b| b != 0)) {
            "; an append cut short dropped"
        } else {
            ""
        },
        recovered.engine.state().value(),
    );
    let file = journal::cut(&old, recovered.journal_len)?;
    let journal = journal::MappedJournal::new(old.path.clone(), file, recovered.journal_len)?;
    let mut engine = recovered.engine;
    engine.resume_journal(Box::new(journal));
    set_ordering_writes(&mut engine, path, opts)?;
    apply_fault(&mut engine, opts);
    with_held_writes(Target::Engine(Box::new(engine)), opts, dev_id)
}

/// The recovered engine with the writes the dead server held (completed, never reissued by
/// the kernel) given to it before anything is served, then write-back (or write-through) as
/// asked. A server restarted with `--write-through` still drains the file it finds.
fn with_held_writes(
    target: Target<FileDevice>,
    opts: &EngineArgs,
    dev_id: u32,
) -> Result<Served<FileDevice>, ServeError> {
    let (file, held) = HeldFile::reopen(&opts.state_dir, dev_id, held_capacity())?;
    if !held.is_empty() {
        let bytes: usize = held.iter().map(|w| w.data.len()).sum();
        eprintln!(
            "bow-ublk: device {dev_id}: {} held writes ({bytes} bytes) of the dead server \
             given to the engine",
            held.len()
        );
    }
    let served = Served::write_back(target, held_log(file, opts), held)
        .map_err(|errno| ServeError::HeldWrites { dev_id, errno })?;
    if opts.write_through {
        return Ok(Served::write_through(served.into_target()));
    }
    Ok(served)
}

fn serve(path: &Path, id: Option<u32>, opts: &EngineArgs, recover: bool) -> Result<(), ServeError> {
    let queue_depth = opts.queue_depth;
    // libublk takes an i32 (-1: the next free id); refused before anything is touched.
    let ublk_id = match id {
        None => -1,
        Some(i) => i32::try_from(i).map_err(|_| ServeError::BadId(i))?,
    };
    // Before any thread starts: the queue threads inherit the mark (blockdev::process).
    if let Err(e) = blockdev::process::set_io_flusher() {
        eprintln!(
            "bow-ublk: PR_SET_IO_FLUSHER refused ({e}): under memory pressure this server could \
             wait for the write-back of its own device; run it with CAP_SYS_RESOURCE"
        );
    }
    enter_own_mount_namespace()?;
    // A restarted server rebuilds its engine before it touches the device: a refusal leaves
    // the device quiesced, its requests held, nothing written.
    let recovered = match id {
        Some(dev_id) if recover => Some(recovered_target(path, opts, dev_id)?),
        _ => None,
    };
    // The size the device is added with (a recovered device keeps its own).
    let size = match &recovered {
        Some(t) => t.size(),
        None => {
            let bytes = open_device(path)?.size();
            if opts.passthrough {
                bytes
            } else {
                bytes / 4096 * 4096
            }
        }
    };
    let id = ublk_id;
    if recover {
        let old = UblkCtrl::new_simple(id).map_err(ublk("opening the device to recover"))?;
        old.start_user_recover().map_err(ublk("START_USER_RECOVERY"))?;
    }
    let flags = libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE;
    let ctrl = Arc::new(
        UblkCtrlBuilder::default()
            .name("bow-ublk")
            .id(id)
            .nr_queues(1)
            .depth(queue_depth)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags(u64::from(flags))
            .dev_flags(if recover {
                UblkFlags::UBLK_DEV_F_RECOVER_DEV
            } else {
                UblkFlags::UBLK_DEV_F_ADD_DEV
            })
            .build()
            .map_err(ublk(if recover { "re-attaching the device" } else { "adding the device" }))?,
    );
    let dev_id = ctrl.dev_info().dev_id;
    let target = match recovered {
        Some(t) => t,
        None => match new_target(path, opts, dev_id) {
            Ok(t) => t,
            Err(e) => {
                let _ = ctrl.del_dev();
                return Err(e);
            }
        },
    };
    let target = Arc::new(Mutex::new(target));
    let name = control::socket_name(dev_id);
    let addr = SocketAddr::from_abstract_name(&name)
        .map_err(|source| ServeError::Control { name: name.clone(), source })?;
    let listener = UnixListener::bind_addr(&addr)
        .map_err(|source| ServeError::Control { name: name.clone(), source })?;
    {
        let target = target.clone();
        let id = i32::try_from(dev_id).unwrap_or(i32::MAX);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &target, id) {
                    eprintln!("bow-ublk: control connection: {e}");
                }
            }
        });
    }
    let queue_target = target.clone();
    ctrl.run_target(
        |dev: &mut UblkDev| {
            set_params(dev, size);
            Ok(())
        },
        move |qid, dev| serve_queue(qid, dev, &queue_target),
        move |ctrl: &UblkCtrl| {
            println!("bow-ublk: serving /dev/ublkb{} ({} bytes)", ctrl.dev_info().dev_id, size);
            let _ = std::io::stdout().flush();
        },
    )
    .map_err(ublk("serving"))?;
    // Only a `stop` ends run_target (a dead server never gets here): delete the device, and
    // its journal with it (nothing is left to resume).
    let _ = ctrl.del_dev();
    if !opts.passthrough {
        let _ = std::fs::remove_file(journal::path(&opts.state_dir, dev_id));
        let _ = std::fs::remove_file(held::path(&opts.state_dir, dev_id));
    }
    Ok(())
}

/// 4 KiB logical blocks (the engine's block), a volatile cache (so flushes reach us), discard.
fn set_params(dev: &mut UblkDev, size: u64) {
    dev.set_default_params(size);
    let params = &mut dev.tgt.params;
    params.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
    params.basic.logical_bs_shift = BLOCK_SHIFT;
    params.basic.physical_bs_shift = BLOCK_SHIFT;
    params.discard.discard_granularity = 1 << BLOCK_SHIFT;
    params.discard.max_discard_sectors = 1 << 22; // 2 GiB: the engine records it in one step
    params.discard.max_discard_segments = 1;
}

/// A write, discard or flush waiting for its queue round, and where its result goes.
struct Pending {
    req: Request,
    data: Vec<u8>,
    reply: smol::channel::Sender<i32>,
}

type Round = Rc<RefCell<Vec<Pending>>>;

fn serve_queue(qid: u16, dev: &UblkDev, target: &Arc<Mutex<Served<FileDevice>>>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            eprintln!("bow-ublk: queue {qid}: {e:?}");
            return;
        }
    };
    let round: Round = Rc::new(RefCell::new(Vec::new()));
    let exe_rc = Rc::new(smol::LocalExecutor::new());
    let exe = exe_rc.clone();
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let (q, t, r) = (queue.clone(), target.clone(), round.clone());
        tasks.push(exe.spawn(async move { io_task(&q, tag, &t, &r).await }));
    }
    let target = target.clone();
    let depth = usize::from(dev.dev_info.queue_depth);
    smol::block_on(exe_rc.run(async move {
        // Every request the kernel has handed over runs until it reads or waits for its
        // round; then the round is one engine batch, and its results wake the waiting tasks.
        let run_ops = || loop {
            while exe.try_tick() {}
            gather_round(&queue, &exe, &round, &target, depth);
            let pending: Vec<Pending> = round.borrow_mut().drain(..).collect();
            if pending.is_empty() {
                drain_early(qid, &target);
                break;
            }
            let (reqs, replies): (Vec<_>, Vec<_>) =
                pending.into_iter().map(|p| ((p.req, p.data), p.reply)).unzip();
            let results = match target.lock() {
                Ok(mut t) => t.handle_round(reqs),
                Err(_) => vec![Err(libc::EIO); replies.len()],
            };
            for (reply, result) in replies.into_iter().zip(results) {
                let res = match result {
                    Ok(done) => i32::try_from(done).unwrap_or(-libc::EIO),
                    Err(errno) => -errno,
                };
                let _ = reply.try_send(res);
            }
        };
        let done = || tasks.iter().all(|task| task.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            eprintln!("bow-ublk: queue {qid}: {e:?}");
        }
    }));
}

/// The queue has nothing more for now: held writes that need no backup are drained if enough
/// are held ([`Served::drain_early`]), after the completions of what was served went to the
/// kernel, so that the writers run on while the drain writes.
fn drain_early(qid: u16, target: &Mutex<Served<FileDevice>>) {
    let Ok(mut t) = target.lock() else { return };
    if !t.early_drain_due() {
        return;
    }
    // The queue's thread's ring (libublk keeps it per thread).
    if let Err(e) = libublk::io::with_task_io_ring_mut(|r| r.submit()) {
        eprintln!("bow-ublk: queue {qid}: submitting completions: {e}");
    }
    t.drain_early();
}

/// How long a round that will pay ordering flushes waits for more requests, per try.
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(150);
/// Tries, each only after the previous one brought a request.
const GATHER_TRIES: usize = 4;

/// Lets more requests join a round that will pay the engine's two ordering flushes, so more
/// backups share them. Only when the round already has two requests or more (the writers
/// keep several in flight: the previous round's completions, handed to the kernel just before
/// this round was reaped, bring new ones while this waits; a lone request at queue depth 1
/// would only wait for nothing) and needs a backup (other rounds flush nothing). Each try
/// sleeps [`GATHER_WAIT`] (the writers run meanwhile), then reaps what the kernel delivered and
/// runs those tasks; it stops when a try brings nothing or the round is as deep as the queue.
fn gather_round(
    queue: &UblkQueue<'_>,
    exe: &smol::LocalExecutor<'_>,
    round: &Round,
    target: &Mutex<Served<FileDevice>>,
    depth: usize,
) {
    let worth_waiting = {
        let r = round.borrow();
        r.len() >= 2
            && r.len() < depth
            && target.lock().is_ok_and(|t| t.needs_ordering_flushes(r.iter().map(|p| &p.req)))
    };
    if !worth_waiting {
        return;
    }
    for _ in 0..GATHER_TRIES {
        let had = round.borrow().len();
        std::thread::sleep(GATHER_WAIT);
        // The sleep's return ran the ring's task work (COOP_TASKRUN), so the requests the
        // kernel delivered meanwhile are in the completion queue.
        let reaped = libublk::uring_async::ublk_reap_io_events_with_update_queue(
            queue,
            false,
            None,
            |cqe| libublk::uring_async::ublk_wake_task(cqe.user_data(), cqe),
        );
        while exe.try_tick() {}
        let now = round.borrow().len();
        if !matches!(reaped, Ok(false)) || now == had || now >= depth {
            break;
        }
    }
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    target: &Mutex<Served<FileDevice>>,
    round: &Round,
) -> Result<(), UblkError> {
    let len = usize::try_from(q.dev.dev_info.max_io_buf_bytes).unwrap_or(IO_BUF_BYTES as usize);
    let mut buf = IoBuf::<u8>::new(len);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf)).await?;
    loop {
        let iod = q.get_iod(tag);
        let req = request(iod.op_flags & 0xff, iod.start_sector, iod.nr_sectors);
        let res = match req {
            // Reads are served at once: a write still waiting for its round has not completed,
            // so a read may see the old data.
            Request::Read { .. } | Request::Unsupported { .. } => match target.lock() {
                Ok(mut t) => match t.handle(req, buf.as_mut_slice()) {
                    Ok(done) => i32::try_from(done).unwrap_or(-libc::EIO),
                    Err(errno) => -errno,
                },
                Err(_) => -libc::EIO,
            },
            Request::Write { sectors, .. } => {
                let bytes = usize::try_from(u64::from(sectors) * 512).unwrap_or(usize::MAX);
                let data = buf.as_slice().get(..bytes).unwrap_or_default();
                // Held straight from the buffer when no round is waiting (one waiting came
                // first: this write joins it, so the round's requests keep their order).
                let held = if round.borrow().is_empty() {
                    target.lock().ok().and_then(|mut t| t.hold(req, data))
                } else {
                    None
                };
                match held {
                    Some(done) => i32::try_from(done).unwrap_or(-libc::EIO),
                    None => wait_for_round(round, req, data.to_vec()).await,
                }
            }
            Request::Discard { .. } | Request::Flush => {
                wait_for_round(round, req, Vec::new()).await
            }
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res).await?;
    }
}

async fn wait_for_round(round: &Round, req: Request, data: Vec<u8>) -> i32 {
    let (reply, result) = smol::channel::bounded(1);
    round.borrow_mut().push(Pending { req, data, reply });
    result.recv().await.unwrap_or(-libc::EIO)
}

fn request(op: u32, sector: u64, sectors: u32) -> Request {
    match op {
        libublk::sys::UBLK_IO_OP_READ => Request::Read { sector, sectors },
        libublk::sys::UBLK_IO_OP_WRITE => Request::Write { sector, sectors },
        libublk::sys::UBLK_IO_OP_FLUSH => Request::Flush,
        libublk::sys::UBLK_IO_OP_DISCARD => Request::Discard { sector, sectors },
        op => Request::Unsupported { op },
    }
}

fn answer(
    stream: UnixStream,
    target: &Mutex<Served<FileDevice>>,
    dev_id: i32,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = match Command::parse(&line) {
        None => Err(format!("unknown command {:?}", line.trim())),
        // libublk's control ring is per thread: this thread opens its own handle.
        // Held writes go to the engine first: nothing may be left in the server once its
        // device is gone.
        Some(Command::Stop) => match drained(target) {
            Err(e) => Err(e),
            Ok(()) => match UblkCtrl::new_simple(dev_id).and_then(|c| c.kill_dev()) {
                Ok(_) => Ok("stopping".to_owned()),
                Err(e) => Err(format!("{e:?}")),
            },
        },
        // What is held now, without draining it (the tests look at it before a kill).
        Some(Command::Pending) => match target.lock() {
            Ok(t) => {
                let (writes, bytes) = t.pending();
                Ok(format!("pending_writes={writes} pending_bytes={bytes}"))
            }
            Err(_) => Err("the target's lock is poisoned".to_owned()),
        },
        Some(Command::Trace) => {
            let bytes = match target.lock() {
                Ok(mut t) => match t.drain() {
                    Ok(()) => trace_bytes(t.target()),
                    Err(errno) => Err(format!("giving the engine the held writes: errno {errno}")),
                },
                Err(_) => Err("the target's lock is poisoned".to_owned()),
            };
            let mut stream = stream;
            return match bytes {
                Ok(bytes) => {
                    writeln!(stream, "ok trace {}", bytes.len())?;
                    stream.write_all(&bytes)
                }
                Err(text) => writeln!(stream, "error {text}"),
            };
        }
        Some(command) => match target.lock() {
            Ok(mut t) => run(&mut t, command),
            Err(_) => Err("the target's lock is poisoned".to_owned()),
        },
    };
    let mut stream = stream;
    match reply {
        Ok(text) => writeln!(stream, "ok {text}"),
        Err(text) => writeln!(stream, "error {text}"),
    }
}

/// The engine's trace, whole: a trace cut at the format's record limit would make the
/// estimator under-count, so it is refused rather than returned short.
fn trace_bytes(target: &Target<FileDevice>) -> Result<Vec<u8>, String> {
    let Target::Engine(engine) = target else {
        return Err("`trace` needs the engine; this server is a pass-through".to_owned());
    };
    if engine.trace_overflowed() {
        return Err("the trace reached the format's record limit and stopped".to_owned());
    }
    engine.trace().map(|t| t.to_bytes()).ok_or_else(|| "the engine keeps no trace".to_owned())
}

/// Gives the engine the held writes.
fn drained(target: &Mutex<Served<FileDevice>>) -> Result<(), String> {
    match target.lock() {
        Ok(mut t) => {
            t.drain().map_err(|errno| format!("giving the engine the held writes: errno {errno}"))
        }
        Err(_) => Err("the target's lock is poisoned".to_owned()),
    }
}

/// A control command on the engine, once it has every completed write.
fn run(served: &mut Served<FileDevice>, command: Command) -> Result<String, String> {
    let drain_error = |errno| format!("giving the engine the held writes: errno {errno}");
    served.drain().map_err(drain_error)?;
    // Read after the drain, so `status` counts it.
    let write_back = served.write_back_stats();
    let to = match command {
        Command::Checkpoint => Some(BowState::Checkpoint),
        Command::Commit => Some(BowState::Committed),
        // `stop`, `pending` and `trace` are answered by `answer` itself.
        Command::Status | Command::Stop | Command::Pending | Command::Trace => None,
    };
    if let Some(to) = to {
        // A state change: the write-back forgets what it knew of the engine's free space.
        let Target::Engine(engine) = served.drained_target().map_err(drain_error)? else {
            return Err(format!("`{command}` needs the engine; this server is a pass-through"));
        };
        engine.set_state(to).map_err(|e| e.to_string())?;
        return Ok(status(engine, write_back, BatchTimes::default()));
    }
    // `status` (the monitor polls it) changes nothing: the write-back keeps its free-space
    // bound, so the next hold needs no walk of the range map.
    match served.target() {
        Target::Engine(engine) => Ok(status(engine, write_back, served.round_times())),
        Target::Passthrough(_) => {
            let t = served.round_times();
            Ok(format!("passthrough write_us={} flush_us={}", t.write_ns / 1000, t.flush_ns / 1000))
        }
    }
}

/// `held_writes`, `drains` and `early_drains` (drains no flush asked for) count the
/// write-back's work (all 0 with `--write-through`),
/// `drain_us` the time the drains took (with the round each drained with), and of it
/// `drain_plan_us`, `drain_write_us` and `drain_flush_us` the engine's planning (range map,
/// log, reads), its ordered writes and the flushes of the rounds; the
/// space is the engine's after the drain, so it counts every completed write.
/// `round_write_us` and `round_flush_us`: the engine's writes (their planning included) and
/// flushes in rounds that drained nothing (a flush after early drains, say, or any write
/// outside CHECKPOINT; 0 after a state change, which this answer does not read). `direct` is
/// the bytes of user writes written to the device with `O_DIRECT` so far (`--direct-writes`,
/// `crate::direct`: the writes over blocks their batch did not copy), `off` without the
/// option, once the device refused them, or where there is no io_uring.
fn status(
    engine: &Engine<FileDevice>,
    write_back: Option<WriteBackStats>,
    rounds: BatchTimes,
) -> String {
    let (space, stats) = (engine.space(), engine.stats());
    let wb = write_back.unwrap_or_default();
    format!(
        "state={} free={} used={} held={} backups={} rebackups={} batches={} flushes={} \
         held_writes={} drains={} early_drains={} drain_us={} drain_plan_us={} \
         drain_write_us={} drain_flush_us={} round_write_us={} round_flush_us={} direct={}",
        engine.state().value(),
        space.free_bytes,
        space.used_bytes,
        space.held_bytes,
        stats.backups,
        stats.rebackups,
        stats.batches,
        stats.flushes,
        wb.held,
        wb.drains,
        wb.early_drains,
        wb.drain_ns / 1000,
        wb.drain_times.plan_ns / 1000,
        wb.drain_times.write_ns / 1000,
        wb.drain_times.flush_ns / 1000,
        (rounds.write_ns + rounds.plan_ns) / 1000,
        rounds.flush_ns / 1000,
        engine.direct_writes().map_or_else(|| "off".to_owned(), |b| b.to_string()),
    )
}
