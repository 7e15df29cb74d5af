//! Device-mapper over the raw ioctl interface of `/dev/mapper/control`.
//!
//! [`DeviceMapper`] wraps one open control node. Devices are addressed by [`DevRef`] (name,
//! uuid or device number); tables are [`Table`]s of typed [`Target`]s and always name their
//! underlying devices by `major:minor`. No udev is involved: `event_nr` is always 0 (no cookie)
//! and the `/dev/mapper/NAME` node (`/dev/block/mapper/NAME` on Android) is made and removed here.
//!
//! Kernel facts this module relies on (`include/uapi/linux/dm-ioctl.h`, `drivers/md/dm-ioctl.c`):
//! * every command passes a `struct dm_ioctl` header at the start of one buffer whose total size
//!   is `data_size`; replies start at `data_start`; when a reply does not fit the kernel sets
//!   `DM_BUFFER_FULL_FLAG` and the request is repeated with a bigger buffer;
//! * records in replies and requests are 8-byte aligned;
//! * `next` has three meanings: in a `DM_TABLE_LOAD` request a `dm_target_spec.next` is the
//!   offset from *this* spec to the next; in a `DM_TABLE_STATUS` reply it is the offset from the
//!   *first* spec (`data_start`); in `dm_name_list` and `dm_target_versions` it is the offset
//!   from this record, 0 ending the list;
//! * device numbers are in the kernel's `huge_encode_dev` encoding ([`DevId::to_kernel`]);
//! * a missing device is `ENXIO`; a table line the target rejects is `EINVAL` and the target's
//!   reason is only in the kernel log (read back as a hint, see [`DmError`]).

mod abi;
pub mod target;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag};

use crate::error::ErrorKind;
use crate::kmsg::KmsgCursor;
use crate::units::{DevId, Sectors};
use abi::{off, DmCmd, IoctlBuf};
pub use target::{Table, TableError, Target, TargetLine};

/// Path of the control node: Android's ueventd names it `/dev/device-mapper` (the node AOSP's
/// libdm opens); udev and devtmpfs elsewhere name it `/dev/mapper/control`.
#[cfg(target_os = "android")]
pub const CONTROL_PATH: &str = "/dev/device-mapper";
/// Path of the control node: Android's ueventd names it `/dev/device-mapper` (the node AOSP's
/// libdm opens); udev and devtmpfs elsewhere name it `/dev/mapper/control`.
#[cfg(not(target_os = "android"))]
pub const CONTROL_PATH: &str = "/dev/mapper/control";

/// Where named device nodes live on this platform.
#[cfg(target_os = "android")]
pub const NODE_DIR: &str = "/dev/block/mapper";
/// Where named device nodes live on this platform.
#[cfg(not(target_os = "android"))]
pub const NODE_DIR: &str = "/dev/mapper";

/// First reply buffer size for commands whose reply grows (list, status, deps, messages).
const INITIAL_REPLY: usize = 16 * 1024;
/// Largest reply buffer we will grow to.
const MAX_REPLY: usize = 16 * 1024 * 1024;
/// Attempts for `DM_DEV_REMOVE` on `EBUSY`.
const REMOVE_ATTEMPTS: u32 = 20;
/// Pause between removal attempts.
const REMOVE_PAUSE: Duration = Duration::from_millis(50);

/// A device-mapper command, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmOp {
    /// `DM_VERSION`.
    Version,
    /// `DM_DEV_CREATE`.
    Create,
    /// `DM_DEV_REMOVE`.
    Remove,
    /// `DM_DEV_SUSPEND` with the suspend flag.
    Suspend,
    /// `DM_DEV_SUSPEND` without it.
    Resume,
    /// `DM_DEV_STATUS`.
    Info,
    /// `DM_TABLE_LOAD`.
    LoadTable,
    /// `DM_TABLE_CLEAR`.
    ClearTable,
    /// `DM_TABLE_STATUS` with `DM_STATUS_TABLE_FLAG`.
    Table,
    /// `DM_TABLE_STATUS`.
    Status,
    /// `DM_TABLE_DEPS`.
    Deps,
    /// `DM_LIST_DEVICES`.
    ListDevices,
    /// `DM_LIST_VERSIONS`.
    ListVersions,
    /// `DM_GET_TARGET_VERSION`.
    TargetVersion,
    /// `DM_TARGET_MSG`.
    Message,
}

impl fmt::Display for DmOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Version => "DM_VERSION",
            Self::Create => "DM_DEV_CREATE",
            Self::Remove => "DM_DEV_REMOVE",
            Self::Suspend => "DM_DEV_SUSPEND(suspend)",
            Self::Resume => "DM_DEV_SUSPEND(resume)",
            Self::Info => "DM_DEV_STATUS",
            Self::LoadTable => "DM_TABLE_LOAD",
            Self::ClearTable => "DM_TABLE_CLEAR",
            Self::Table => "DM_TABLE_STATUS(table)",
            Self::Status => "DM_TABLE_STATUS",
            Self::Deps => "DM_TABLE_DEPS",
            Self::ListDevices => "DM_LIST_DEVICES",
            Self::ListVersions => "DM_LIST_VERSIONS",
            Self::TargetVersion => "DM_GET_TARGET_VERSION",
            Self::Message => "DM_TARGET_MSG",
        };
        f.write_str(s)
    }
}

fn hint(h: &Option<String>) -> String {
    match h {
        Some(h) => format!(" (kernel: {h})"),
        None => String::new(),
    }
}

/// A device-mapper request failed.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The control node could not be opened (no `dm-mod`, or no permission).
    #[error("cannot open {path}: {source}")]
    OpenControl {
        /// The path tried.
        path: PathBuf,
        /// The open error.
        source: io::Error,
    },
    /// The kernel refused a command.
    #[error("{op} on {device:?}: {errno}{}", hint(.kernel_message))]
    Kernel {
        /// The command.
        op: DmOp,
        /// The device it addressed (name, uuid or major:minor; empty for global commands).
        device: String,
        /// The kernel's errno.
        errno: Errno,
        /// The kernel log lines from device-mapper logged during the request, if readable.
        kernel_message: Option<String>,
    },
    /// A table names a target type the running kernel does not have (e.g. `bow` on a
    /// mainline kernel).
    #[error("{op} on {device:?}: target type {target_type:?} is not available{}", hint(.kernel_message))]
    TargetUnavailable {
        /// The command.
        op: DmOp,
        /// The device.
        device: String,
        /// The missing target type.
        target_type: String,
        /// The kernel log lines, if readable.
        kernel_message: Option<String>,
    },
    /// A kernel reply did not have the documented shape.
    #[error("{op}: malformed kernel reply: {what}")]
    BadReply {
        /// The command.
        op: DmOp,
        /// What was wrong.
        what: &'static str,
    },
    /// An argument was refused before it reached the kernel.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The table is malformed.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Making or removing the `/dev/mapper/NAME` node failed.
    #[error("device node {path}: {source}")]
    Node {
        /// The node path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl DmError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::OpenControl { source, .. } | Self::Node { source, .. } => {
                ErrorKind::from_io(source)
            }
            // dm_hash_insert answers a duplicate name or uuid with EBUSY.
            Self::Kernel { op: DmOp::Create, errno: Errno::EBUSY, .. } => ErrorKind::Exists,
            Self::Kernel { errno, .. } => ErrorKind::from_errno(*errno),
            Self::TargetUnavailable { .. } => ErrorKind::Unsupported,
            Self::BadReply { .. } => ErrorKind::Corrupt,
            Self::InvalidArgument { .. } | Self::Table(_) => ErrorKind::Invalid,
        }
    }

    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            Self::TargetUnavailable { .. } => Some(Errno::EINVAL),
            _ => None,
        }
    }

    /// The kernel's logged reason, when one was read.
    pub fn kernel_message(&self) -> Option<&str> {
        match self {
            Self::Kernel { kernel_message, .. }
            | Self::TargetUnavailable { kernel_message, .. } => kernel_message.as_deref(),
            _ => None,
        }
    }
}

/// A validated device-mapper device name (1..=127 bytes, no `/`, not `control`, `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmName(String);

impl DmName {
    /// Validates a name.
    pub fn new(name: impl Into<String>) -> Result<Self, DmError> {
        let name = name.into();
        let bad =
            |reason| DmError::InvalidArgument { what: "device name", value: name.clone(), reason };
        if name.is_empty() || name.len() >= abi::DM_NAME_LEN {
            return Err(bad("must be 1 to 127 bytes"));
        }
        if name.contains('/') || name.contains('\0') {
            return Err(bad("must not contain '/' or NUL"));
        }
        if name == "control" || name == "." || name == ".." {
            return Err(bad("reserved name"));
        }
        Ok(Self(name))
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated device-mapper uuid (1..=128 bytes, no NUL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmUuid(String);

impl DmUuid {
    /// Validates a uuid.
    pub fn new(uuid: impl Into<String>) -> Result<Self, DmError> {
        let uuid = uuid.into();
        if uuid.is_empty() || uuid.len() >= abi::DM_UUID_LEN || uuid.contains('\0') {
            return Err(DmError::InvalidArgument {
                what: "device uuid",
                value: uuid,
                reason: "must be 1 to 128 bytes without NUL",
            });
        }
        Ok(Self(uuid))
    }
    /// The uuid.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a command addresses a device (the kernel looks up by uuid, else name, else number).
#[derive(Debug, Clone, Copy)]
pub enum DevRef<'a> {
    /// By name.
    Name(&'a DmName),
    /// By uuid.
    Uuid(&'a DmUuid),
    /// By device number.
    Dev(DevId),
}

impl<'a> From<&'a DmName> for DevRef<'a> {
    fn from(n: &'a DmName) -> Self {
        Self::Name(n)
    }
}

impl<'a> From<&'a DmUuid> for DevRef<'a> {
    fn from(u: &'a DmUuid) -> Self {
        Self::Uuid(u)
    }
}

impl fmt::Display for DevRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "{n}"),
            Self::Uuid(u) => write!(f, "uuid {u}"),
            Self::Dev(d) => write!(f, "dev {d}"),
        }
    }
}

/// Which of a device's two table slots a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableSlot {
    /// The live table.
    Active,
    /// The table loaded but not yet resumed (`DM_QUERY_INACTIVE_TABLE_FLAG`).
    Inactive,
}

/// A three-part version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes.
    pub major: u32,
    /// Backward-compatible additions.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What `DM_DEV_STATUS` (and most commands) report about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// Device uuid, if it has one.
    pub uuid: Option<String>,
    /// Device number of the mapped device (`/dev/dm-<minor>`).
    pub dev: DevId,
    /// Number of openers.
    pub open_count: i32,
    /// Number of targets in the table the query looked at.
    pub target_count: u32,
    /// Event counter.
    pub event_nr: u32,
    /// Suspended.
    pub suspended: bool,
    /// Read-only.
    pub read_only: bool,
    /// A live table is present.
    pub active_table: bool,
    /// An inactive (loaded, not resumed) table is present.
    pub inactive_table: bool,
}

/// One device from `DM_LIST_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    /// Name.
    pub name: String,
    /// Device number.
    pub dev: DevId,
    /// Event counter (absent on kernels older than the field).
    pub event_nr: Option<u32>,
    /// The uuid, as far as the kernel reported it.
    pub uuid: ListedUuid,
}

/// A listed device's uuid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedUuid {
    /// The device has this uuid.
    Uuid(String),
    /// The device has no uuid.
    None,
    /// The kernel predates uuids in `DM_LIST_DEVICES` (before interface 4.45).
    NotReported,
}

impl ListedUuid {
    /// The uuid if there is one.
    pub fn as_deref(&self) -> Option<&str> {
        match self {
            Self::Uuid(u) => Some(u),
            _ => None,
        }
    }
}

/// One loaded target type from `DM_LIST_VERSIONS` / `DM_GET_TARGET_VERSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetVersion {
    /// Target type name.
    pub name: String,
    /// Its version.
    pub version: Version,
}

/// One line of a `DM_TABLE_STATUS` reply: the target's extent, type and text (its table
/// parameters or its status, depending on the query). Parse the text with the typed targets:
/// `line.text.parse::<target::SnapshotStatus>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReply {
    /// First sector.
    pub start: Sectors,
    /// Length.
    pub length: Sectors,
    /// Target type.
    pub target_type: String,
    /// Parameters or status text.
    pub text: String,
}

/// Suspend options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SuspendMode {
    /// Flush queued I/O and freeze a mounted filesystem first (the default).
    #[default]
    Flush,
    /// `DM_NOFLUSH_FLAG`: do not flush queued I/O (needed to suspend a device whose targets
    /// cannot complete I/O).
    NoFlush,
}

/// An open device-mapper control node ([`CONTROL_PATH`]).
#[derive(Debug)]
pub struct DeviceMapper {
    control: File,
    node_dir: PathBuf,
}

impl DeviceMapper {
    /// Opens the control node at [`CONTROL_PATH`]; named nodes go to [`NODE_DIR`].
    pub fn open() -> Result<Self, DmError> {
        Self::open_at(Path::new(CONTROL_PATH), Path::new(NODE_DIR))
    }

    /// Opens a control node at `control`, making named nodes under `node_dir`.
    pub fn open_at(control: &Path, node_dir: &Path) -> Result<Self, DmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(control)
            .map_err(|source| DmError::OpenControl { path: control.to_owned(), source })?;
        Ok(Self { control: file, node_dir: node_dir.to_owned() })
    }

    /// The path of the node for device `name` (made by [`create_device`](Self::create_device)).
    pub fn node_path(&self, name: &DmName) -> PathBuf {
        self.node_dir.join(name.as_str())
    }

    fn run(&self, op: DmOp, cmd: DmCmd, buf: &mut IoctlBuf, device: &str) -> Result<(), DmError> {
        buf.ioctl(self.control.as_fd(), cmd).map_err(|errno| DmError::Kernel {
            op,
            device: device.to_owned(),
            errno,
            kernel_message: None,
        })
    }

    /// Runs a command whose reply may not fit, doubling the buffer while the kernel says
    /// `DM_BUFFER_FULL_FLAG`. `fill` writes the request into a fresh buffer.
    fn run_growing(
        &self,
        op: DmOp,
        cmd: DmCmd,
        device: &str,
        initial: usize,
        fill: &dyn Fn(&mut IoctlBuf) -> Result<(), DmError>,
    ) -> Result<IoctlBuf, DmError> {
        let mut size = initial;
        loop {
            let mut buf = IoctlBuf::new(size);
            fill(&mut buf)?;
            self.run(op, cmd, &mut buf, device)?;
            if buf.flags() & abi::DM_BUFFER_FULL_FLAG == 0 {
                return Ok(buf);
            }
            size = size
                .checked_mul(2)
                .filter(|s| *s <= MAX_REPLY)
                .ok_or(DmError::BadReply { op, what: "reply larger than 16 MiB" })?;
        }
    }

    /// `DM_VERSION`: the kernel's ioctl interface version.
    pub fn version(&self) -> Result<Version, DmError> {
        let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
        self.run(DmOp::Version, DmCmd::Version, &mut buf, "")?;
        Ok(read_version(&buf, off::VERSION))
    }

    /// `DM_DEV_CREATE`: a new device with no table (suspended).
    pub fn create(&self, name: &DmName, uuid: Option<&DmUuid>) -> Result<DeviceInfo, DmError> {
        let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
        buf.put_cstr(off::NAME, name.as_str());
        if let Some(u) = uuid {
            buf.put_cstr(off::UUID, u.as_str());
        }
        self.run(DmOp::Create, DmCmd::DevCreate, &mut buf, name.as_str())?;
        parse_info(&buf, DmOp::Create)
    }

    /// `DM_TABLE_LOAD`: loads `table` into the inactive slot. A target type the kernel does not
    /// have comes back as [`DmError::TargetUnavailable`]; other refusals carry the kernel's
    /// logged reason.
    pub fn load_table(&self, dev: DevRef<'_>, table: &Table) -> Result<DeviceInfo, DmError> {
        let label = dev.to_string();
        let mut buf = encode_table(table)?;
        put_ref(&mut buf, dev);
        if table.read_only() {
            buf.set_flags(abi::DM_READONLY_FLAG);
        }
        let cursor = KmsgCursor::at_end();
        match self.run(DmOp::LoadTable, DmCmd::TableLoad, &mut buf, &label) {
            Ok(()) => parse_info(&buf, DmOp::LoadTable),
            Err(DmError::Kernel { errno, .. }) => {
                let kernel_message = cursor.messages_since("device-mapper");
                if errno == Errno::EINVAL {
                    for ty in table.target_types() {
                        if let Ok(None) = self.target_version(ty) {
                            return Err(DmError::TargetUnavailable {
                                op: DmOp::LoadTable,
                                device: label,
                                target_type: ty.to_owned(),
                                kernel_message,
                            });
                        }
                    }
                }
                Err(DmError::Kernel { op: DmOp::LoadTable, device: label, errno, kernel_message })
            }
            Err(e) => Err(e),
        }
    }

    /// `DM_TABLE_CLEAR`: drops the inactive table.
    pub fn clear_table(&self, dev: DevRef<'_>) -> Result<DeviceInfo, DmError> {
        let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
        put_ref(&mut buf, dev);
        self.run(DmOp::ClearTable, DmCmd::TableClear, &mut buf, &dev.to_string())?;
        parse_info(&buf, DmOp::ClearTable)
    }

    /// Suspends the device (waits for in-flight I/O; queues new I/O until resume).
    pub fn suspend(&self, dev: DevRef<'_>, mode: SuspendMode) -> Result<DeviceInfo, DmError> {
        let mut flags = abi::DM_SUSPEND_FLAG;
        if mode == SuspendMode::NoFlush {
            flags |= abi::DM_NOFLUSH_FLAG;
        }
        self.suspend_cmd(DmOp::Suspend, dev, flags)
    }

    /// Resumes the device, first swapping in the inactive table if one is loaded.
    pub fn resume(&self, dev: DevRef<'_>) -> Result<DeviceInfo, DmError> {
        self.suspend_cmd(DmOp::Resume, dev, 0)
    }

    fn suspend_cmd(&self, op: DmOp, dev: DevRef<'_>, flags: u32) -> Result<DeviceInfo, DmError> {
        let label = dev.to_string();
        let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
        put_ref(&mut buf, dev);
        buf.set_flags(flags);
        let cursor = KmsgCursor::at_end();
        match self.run(op, DmCmd::DevSuspend, &mut buf, &label) {
            Ok(()) => parse_info(&buf, op),
            Err(DmError::Kernel { errno, .. }) => Err(DmError::Kernel {
                op,
                device: label,
                errno,
                kernel_message: cursor.messages_since("device-mapper"),
            }),
            Err(e) => Err(e),
        }
    }

    /// `DM_DEV_REMOVE`, retried on `EBUSY` (so a device that really is in use reports `EBUSY`
    /// after about a second).
    ///
    /// Race: the last opener of a dm device may still be releasing it when we ask (an unmounted
    /// filesystem's final block-device put, a `blkid`/udev probe started by the change event,
    /// another process closing its descriptor), so the kernel briefly reports `EBUSY` for a
    /// device nobody uses any more. We retry a bounded number of times (20
    /// × 50 ms) and then report the `EBUSY`.
    pub fn remove(&self, dev: DevRef<'_>) -> Result<(), DmError> {
        let label = dev.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
            put_ref(&mut buf, dev);
            match self.run(DmOp::Remove, DmCmd::DevRemove, &mut buf, &label) {
                Err(DmError::Kernel { errno: Errno::EBUSY, .. }) if attempt < REMOVE_ATTEMPTS => {
                    std::thread::sleep(REMOVE_PAUSE);
                }
                other => return other,
            }
        }
    }

    /// `DM_DEV_STATUS`: the device's state (reads the active slot).
    pub fn info(&self, dev: DevRef<'_>) -> Result<DeviceInfo, DmError> {
        let mut buf = IoctlBuf::new(abi::HEADER_SIZE);
        put_ref(&mut buf, dev);
        self.run(DmOp::Info, DmCmd::DevStatus, &mut buf, &dev.to_string())?;
        parse_info(&buf, DmOp::Info)
    }

    /// The table of a slot, as the kernel prints it (`dmsetup table`). Empty when the slot is
    /// empty.
    pub fn table(&self, dev: DevRef<'_>, slot: TableSlot) -> Result<Vec<TargetReply>, DmError> {
        self.table_status(DmOp::Table, dev, slot, abi::DM_STATUS_TABLE_FLAG)
    }

    /// The status lines of a slot (`dmsetup status`). Empty when the slot is empty.
    pub fn status(&self, dev: DevRef<'_>, slot: TableSlot) -> Result<Vec<TargetReply>, DmError> {
        self.table_status(DmOp::Status, dev, slot, 0)
    }

    fn table_status(
        &self,
        op: DmOp,
        dev: DevRef<'_>,
        slot: TableSlot,
        flag: u32,
    ) -> Result<Vec<TargetReply>, DmError> {
        let mut flags = flag;
        if slot == TableSlot::Inactive {
            flags |= abi::DM_QUERY_INACTIVE_TABLE_FLAG;
        }
        let buf =
            self.run_growing(op, DmCmd::TableStatus, &dev.to_string(), INITIAL_REPLY, &|b| {
                put_ref(b, dev);
                b.set_flags(flags);
                Ok(())
            })?;
        let present = match slot {
            TableSlot::Active => abi::DM_ACTIVE_PRESENT_FLAG,
            TableSlot::Inactive => abi::DM_INACTIVE_PRESENT_FLAG,
        };
        if buf.flags() & present == 0 {
            return Ok(Vec::new());
        }
        parse_specs(&buf, op)
    }

    /// `DM_TABLE_DEPS`: the devices a slot's table uses.
    pub fn deps(&self, dev: DevRef<'_>, slot: TableSlot) -> Result<Vec<DevId>, DmError> {
        let flags = if slot == TableSlot::Inactive { abi::DM_QUERY_INACTIVE_TABLE_FLAG } else { 0 };
        let op = DmOp::Deps;
        let buf =
            self.run_growing(op, DmCmd::TableDeps, &dev.to_string(), INITIAL_REPLY, &|b| {
                put_ref(b, dev);
                b.set_flags(flags);
                Ok(())
            })?;
        let present = match slot {
            TableSlot::Active => abi::DM_ACTIVE_PRESENT_FLAG,
            TableSlot::Inactive => abi::DM_INACTIVE_PRESENT_FLAG,
        };
        let start = buf.data_start();
        if buf.flags() & present == 0 || buf.data_size() <= start {
            return Ok(Vec::new()); // no table in that slot
        }
        let bad = |what| DmError::BadReply { op, what };
        let count = buf.u32_at(start).ok_or(bad("deps count"))?;
        (0..usize::try_from(count).map_err(|_| bad("deps count"))?)
            .map(|i| {
                let at = start + std::mem::size_of::<abi::DmTargetDeps>() + i * 8;
                let raw = buf.u64_at(at).filter(|_| at + 8 <= buf.data_size());
                let raw = raw.ok_or(bad("deps array"))?;
                DevId::from_kernel(raw).map_err(|_| bad("device number"))
            })
            .collect()
    }

    /// `DM_LIST_DEVICES` with uuids (`DM_UUID_FLAG`).
    pub fn list_devices(&self) -> Result<Vec<ListedDevice>, DmError> {
        let op = DmOp::ListDevices;
        let buf = self.run_growing(op, DmCmd::ListDevices, "", INITIAL_REPLY, &|b| {
            b.set_flags(abi::DM_UUID_FLAG);
            Ok(())
        })?;
        parse_name_list(&buf)
    }

    /// `DM_LIST_VERSIONS`: the target types currently *loaded* (modules that autoload on first
    /// use are missing until then; use [`target_version`](Self::target_version) to probe).
    pub fn list_versions(&self) -> Result<Vec<TargetVersion>, DmError> {
        let op = DmOp::ListVersions;
        let buf = self.run_growing(op, DmCmd::ListVersions, "", INITIAL_REPLY, &|_| Ok(()))?;
        parse_versions(&buf, op)
    }

    /// `DM_GET_TARGET_VERSION` (interface 4.41+): the version of one target type, loading its
    /// module if needed. `Ok(None)` when the kernel has no such target (e.g. `bow` on mainline).
    /// Kernels without the command fall back to [`list_versions`](Self::list_versions).
    pub fn target_version(&self, target_type: &str) -> Result<Option<Version>, DmError> {
        if target_type.is_empty() || target_type.len() >= abi::DM_MAX_TYPE_NAME {
            return Err(DmError::InvalidArgument {
                what: "target type",
                value: target_type.to_owned(),
                reason: "must be 1 to 15 bytes",
            });
        }
        let op = DmOp::TargetVersion;
        let res = self.run_growing(op, DmCmd::GetTargetVersion, target_type, 4096, &|b| {
            b.put_cstr(off::NAME, target_type);
            Ok(())
        });
        match res {
            Ok(buf) => Ok(parse_versions(&buf, op)?
                .into_iter()
                .find(|t| t.name == target_type)
                .map(|t| t.version)),
            Err(DmError::Kernel { errno: Errno::EINVAL, .. }) => Ok(None),
            Err(DmError::Kernel { errno: Errno::ENOTTY, .. }) => Ok(self
                .list_versions()?
                .into_iter()
                .find(|t| t.name == target_type)
                .map(|t| t.version)),
            Err(e) => Err(e),
        }
    }

    /// `DM_TARGET_MSG`: sends `message` to the target covering `sector` and returns its reply,
    /// if it gave one (`DM_DATA_OUT_FLAG`). Messages starting with `@` go to the dm core
    /// (statistics). If the reply does not fit, the message is sent again with a bigger buffer,
    /// as libdevmapper does; the first buffer (64 KiB) is large enough for every reply of the
    /// targets we use.
    pub fn message(
        &self,
        dev: DevRef<'_>,
        sector: Sectors,
        message: &str,
    ) -> Result<Option<String>, DmError> {
        if message.is_empty() || message.contains('\0') {
            return Err(DmError::InvalidArgument {
                what: "target message",
                value: message.to_owned(),
                reason: "must be non-empty without NUL",
            });
        }
        let label = dev.to_string();
        let op = DmOp::Message;
        let need = abi::HEADER_SIZE + std::mem::size_of::<abi::DmTargetMsg>() + message.len() + 1;
        let cursor = KmsgCursor::at_end();
        let res = self.run_growing(op, DmCmd::TargetMsg, &label, need.max(64 * 1024), &|b| {
            put_ref(b, dev);
            b.put_u64(abi::HEADER_SIZE, sector.get());
            b.put_cstr(abi::HEADER_SIZE + std::mem::size_of::<abi::DmTargetMsg>(), message);
            Ok(())
        });
        let buf = match res {
            Ok(buf) => buf,
            Err(DmError::Kernel { errno, .. }) => {
                return Err(DmError::Kernel {
                    op,
                    device: label,
                    errno,
                    kernel_message: cursor.messages_since("device-mapper"),
                })
            }
            Err(e) => return Err(e),
        };
        if buf.flags() & abi::DM_DATA_OUT_FLAG == 0 {
            return Ok(None);
        }
        let text = buf
            .cstr_at(buf.data_start(), buf.data_size())
            .ok_or(DmError::BadReply { op, what: "unterminated message reply" })?;
        Ok(Some(text))
    }

    /// Creates device `name` with `table`, makes it live, and makes its named node.
    ///
    /// Create, load, resume, node: if any later step fails the half-made device is removed
    /// again before the error is returned, so a refused table leaves nothing behind.
    pub fn create_device(
        &self,
        name: &DmName,
        uuid: Option<&DmUuid>,
        table: &Table,
    ) -> Result<DeviceInfo, DmError> {
        self.create(name, uuid)?;
        let res = self.load_table(name.into(), table).and_then(|_| self.resume(name.into()));
        let info = match res {
            Ok(info) => info,
            Err(e) => {
                if let Err(undo) = self.remove(name.into()) {
                    log::warn!("removing half-made dm device {name} failed: {undo}");
                }
                return Err(e);
            }
        };
        if let Err(e) = self.make_node(name, info.dev) {
            if let Err(undo) = self.remove(name.into()) {
                log::warn!("removing dm device {name} without a node failed: {undo}");
            }
            return Err(e);
        }
        Ok(info)
    }

    /// Replaces the live table of `dev`: load into the inactive slot, then resume (which
    /// suspends, swaps and resumes). On a failed load the live table is untouched.
    pub fn reload(&self, dev: DevRef<'_>, table: &Table) -> Result<DeviceInfo, DmError> {
        self.load_table(dev, table)?;
        self.resume(dev)
    }

    /// Removes the named node (if present) and then the device.
    pub fn remove_device(&self, name: &DmName) -> Result<(), DmError> {
        self.remove_node(name)?;
        self.remove(name.into())
    }

    /// Makes the block node `node_dir/NAME` for `dev` (replacing a stale one).
    pub fn make_node(&self, name: &DmName, dev: DevId) -> Result<PathBuf, DmError> {
        let path = self.node_path(name);
        let node_err = |source| DmError::Node { path: path.clone(), source };
        std::fs::create_dir_all(&self.node_dir).map_err(node_err)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_block_device() && m.rdev() == dev.to_dev_t() => {
                return Ok(path)
            }
            Ok(_) => std::fs::remove_file(&path).map_err(node_err)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(node_err(e)),
        }
        nix::sys::stat::mknod(
            &path,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            dev.to_dev_t(),
        )
        .map_err(|e| node_err(io::Error::from(e)))?;
        Ok(path)
    }

    /// Removes the named node if it exists.
    pub fn remove_node(&self, name: &DmName) -> Result<(), DmError> {
        let path = self.node_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DmError::Node { path, source }),
        }
    }
}

fn put_ref(buf: &mut IoctlBuf, dev: DevRef<'_>) {
    match dev {
        DevRef::Name(n) => buf.put_cstr(off::NAME, n.as_str()),
        DevRef::Uuid(u) => buf.put_cstr(off::UUID, u.as_str()),
        DevRef::Dev(d) => buf.put_u64(off::DEV, d.to_kernel()),
    }
}

fn read_version(buf: &IoctlBuf, at: usize) -> Version {
    Version {
        major: buf.u32_at(at).unwrap_or(0),
        minor: buf.u32_at(at + 4).unwrap_or(0),
        patch: buf.u32_at(at + 8).unwrap_or(0),
    }
}

fn parse_info(buf: &IoctlBuf, op: DmOp) -> Result<DeviceInfo, DmError> {
    let flags = buf.flags();
    let name = buf
        .cstr_at(off::NAME, off::NAME + abi::DM_NAME_LEN)
        .ok_or(DmError::BadReply { op, what: "name" })?;
    let uuid = buf
        .cstr_at(off::UUID, off::UUID + abi::DM_UUID_LEN)
        .ok_or(DmError::BadReply { op, what: "uuid" })?;
    let raw_dev = buf.u64_at(off::DEV).ok_or(DmError::BadReply { op, what: "dev" })?;
    Ok(DeviceInfo {
        name,
        uuid: if uuid.is_empty() { None } else { Some(uuid) },
        dev: DevId::from_kernel(raw_dev).map_err(|_| DmError::BadReply { op, what: "dev" })?,
        open_count: i32::from_ne_bytes(buf.header_u32(off::OPEN_COUNT).to_ne_bytes()),
        target_count: buf.header_u32(off::TARGET_COUNT),
        event_nr: buf.header_u32(off::EVENT_NR),
        suspended: flags & abi::DM_SUSPEND_FLAG != 0,
        read_only: flags & abi::DM_READONLY_FLAG != 0,
        active_table: flags & abi::DM_ACTIVE_PRESENT_FLAG != 0,
        inactive_table: flags & abi::DM_INACTIVE_PRESENT_FLAG != 0,
    })
}

/// Lays out a `DM_TABLE_LOAD` request: header, then per target a `dm_target_spec`, its
/// parameter string with NUL, padded to 8; `next` = offset from this spec to the next.
fn encode_table(table: &Table) -> Result<IoctlBuf, DmError> {
    let lines: Vec<(&TargetLine, String)> =
        table.lines().iter().map(|l| (l, l.target.params())).collect();
    let mut total = abi::HEADER_SIZE;
    for (line, params) in &lines {
        let ty = line.target.target_type();
        if ty.is_empty() || ty.len() >= abi::DM_MAX_TYPE_NAME {
            return Err(DmError::InvalidArgument {
                what: "target type",
                value: ty.to_owned(),
                reason: "must be 1 to 15 bytes",
            });
        }
        if params.contains('\0') {
            return Err(DmError::InvalidArgument {
                what: "target parameters",
                value: params.clone(),
                reason: "contain NUL",
            });
        }
        total += abi::SPEC_SIZE + abi::align8(params.len() + 1);
    }
    let too_big =
        || DmError::InvalidArgument { what: "table", value: String::new(), reason: "too large" };
    if total > MAX_REPLY {
        return Err(too_big());
    }
    let mut buf = IoctlBuf::new(total);
    let count = u32::try_from(lines.len()).map_err(|_| too_big())?;
    buf.put_u32(off::TARGET_COUNT, count);
    let mut at = abi::HEADER_SIZE;
    for (line, params) in &lines {
        let next = abi::SPEC_SIZE + abi::align8(params.len() + 1);
        buf.put_u64(at, line.start.get());
        buf.put_u64(at + 8, line.length.get());
        buf.put_u32(at + 16, 0);
        buf.put_u32(at + 20, u32::try_from(next).map_err(|_| too_big())?);
        buf.put_cstr(at + 24, line.target.target_type());
        buf.put_cstr(at + abi::SPEC_SIZE, params);
        at += next;
    }
    Ok(buf)
}

/// Reads a `DM_TABLE_STATUS` reply: `target_count` specs; each `next` is relative to
/// `data_start`.
fn parse_specs(buf: &IoctlBuf, op: DmOp) -> Result<Vec<TargetReply>, DmError> {
    let bad = |what| DmError::BadReply { op, what };
    let start = buf.data_start();
    let end = buf.data_size();
    let count = buf.header_u32(off::TARGET_COUNT);
    let mut at = start;
    let mut out = Vec::new();
    for _ in 0..count {
        if at + abi::SPEC_SIZE > end {
            return Err(bad("target spec beyond data_size"));
        }
        let begin = buf.u64_at(at).ok_or(bad("sector_start"))?;
        let length = buf.u64_at(at + 8).ok_or(bad("length"))?;
        let next = buf.u32_at(at + 20).ok_or(bad("next"))?;
        let target_type = buf.cstr_at(at + 24, at + abi::SPEC_SIZE).ok_or(bad("target type"))?;
        let text = buf.cstr_at(at + abi::SPEC_SIZE, end).ok_or(bad("unterminated text"))?;
        out.push(TargetReply {
            start: Sectors::new(begin),
            length: Sectors::new(length),
            target_type,
            text,
        });
        let next = usize::try_from(next).map_err(|_| bad("next"))?;
        let new_at = start.checked_add(next).ok_or(bad("next"))?;
        if new_at <= at {
            return Err(bad("next does not advance"));
        }
        at = new_at;
    }
    Ok(out)
}

/// Reads a `DM_LIST_DEVICES` reply: `dm_name_list` records, `next` relative to the record,
/// 0 = last; a first record with `dev == 0` means no devices. After each name (aligned to 8):
/// `u32 event_nr`, `u32 flags`, then (aligned) the uuid if `DM_NAME_LIST_FLAG_HAS_UUID`.
fn parse_name_list(buf: &IoctlBuf) -> Result<Vec<ListedDevice>, DmError> {
    let bad = |what| DmError::BadReply { op: DmOp::ListDevices, what };
    let end = buf.data_size();
    let mut at = buf.data_start();
    let mut out = Vec::new();
    if at + abi::NAME_LIST_NAME > end || buf.u64_at(at) == Some(0) {
        return Ok(out);
    }
    loop {
        let raw_dev = buf.u64_at(at).ok_or(bad("dev"))?;
        let next =
            usize::try_from(buf.u32_at(at + 8).ok_or(bad("next"))?).map_err(|_| bad("next"))?;
        let name_at = at + abi::NAME_LIST_NAME;
        let name = buf.cstr_at(name_at, end).ok_or(bad("unterminated name"))?;
        let record_end = if next == 0 { end } else { at + next };
        let extra = abi::align8(name_at + name.len() + 1);
        let (event_nr, uuid) = if extra + 8 <= record_end {
            let event_nr = buf.u32_at(extra).ok_or(bad("event_nr"))?;
            let flags = buf.u32_at(extra + 4).ok_or(bad("flags"))?;
            let uuid = if flags & abi::DM_NAME_LIST_FLAG_HAS_UUID != 0 {
                ListedUuid::Uuid(buf.cstr_at(extra + 8, record_end).ok_or(bad("uuid"))?)
            } else if flags & 2 != 0 {
                ListedUuid::None
            } else {
                ListedUuid::NotReported
            };
            (Some(event_nr), uuid)
        } else {
            (None, ListedUuid::NotReported)
        };
        out.push(ListedDevice {
            name,
            dev: DevId::from_kernel(raw_dev).map_err(|_| bad("dev"))?,
            event_nr,
            uuid,
        });
        if next == 0 {
            return Ok(out);
        }
        at = at.checked_add(next).ok_or(bad("next"))?;
        if at + abi::NAME_LIST_NAME > end {
            return Err(bad("record beyond data_size"));
        }
    }
}

/// Reads `dm_target_versions` records (`next` relative to the record, 0 = last).
fn parse_versions(buf: &IoctlBuf, op: DmOp) -> Result<Vec<TargetVersion>, DmError> {
    let bad = |what| DmError::BadReply { op, what };
    let end = buf.data_size();
    let mut at = buf.data_start();
    let mut out = Vec::new();
    let name_off = std::mem::size_of::<abi::DmTargetVersions>();
    if at + name_off > end {
        return Ok(out);
    }
    loop {
        let next = usize::try_from(buf.u32_at(at).ok_or(bad("next"))?).map_err(|_| bad("next"))?;
        let version = read_version(buf, at + 4);
        let name = buf.cstr_at(at + name_off, end).ok_or(bad("unterminated name"))?;
        out.push(TargetVersion { name, version });
        if next == 0 {
            return Ok(out);
        }
        at = at.checked_add(next).ok_or(bad("next"))?;
        if at + name_off > end {
            return Err(bad("record beyond data_size"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::target::LinearParams;
    use super::*;

    fn linear(start: u64, len: u64, dev: &str, off: u64) -> TargetLine {
        TargetLine::new(
            Sectors::new(start),
            Sectors::new(len),
            Target::Linear(LinearParams {
                device: dev.parse().unwrap(),
                offset: Sectors::new(off),
            }),
        )
    }

    #[test]
    fn table_load_layout_uses_relative_next_and_8_byte_alignment() {
        let table = Table::new(vec![linear(0, 8, "7:0", 0), linear(8, 16, "7:1", 2048)]).unwrap();
        let buf = encode_table(&table).unwrap();
        assert_eq!(buf.header_u32(off::TARGET_COUNT), 2);
        assert_eq!(buf.data_size(), buf.len());
        let first = abi::HEADER_SIZE;
        // "7:0 0" + NUL = 6 bytes -> 8; next = 40 + 8.
        assert_eq!(buf.u32_at(first + 20), Some(48));
        assert_eq!(buf.cstr_at(first + 24, first + 40).unwrap(), "linear");
        assert_eq!(buf.cstr_at(first + 40, buf.len()).unwrap(), "7:0 0");
        let second = first + 48;
        assert_eq!(second % 8, 0);
        assert_eq!(buf.u64_at(second), Some(8));
        assert_eq!(buf.u64_at(second + 8), Some(16));
        assert_eq!(buf.cstr_at(second + 40, buf.len()).unwrap(), "7:1 2048");
        // "7:1 2048" + NUL = 9 -> 16.
        assert_eq!(buf.len(), second + 40 + 16);
    }

    /// Builds a reply buffer the way dm-ioctl.c's retrieve_status does (next relative to the
    /// first spec) and checks we read it back.
    #[test]
    fn table_status_reply_uses_next_relative_to_data_start() {
        let mut buf = IoctlBuf::new(1024);
        buf.put_u32(off::TARGET_COUNT, 2);
        let start = abi::HEADER_SIZE;
        let texts = ["7:0 0", "0/2048 16"];
        let mut at = start;
        for (i, text) in texts.iter().enumerate() {
            buf.put_u64(at, (i as u64) * 8);
            buf.put_u64(at + 8, 8);
            buf.put_cstr(at + 24, if i == 0 { "linear" } else { "snapshot" });
            buf.put_cstr(at + 40, text);
            let after = abi::align8(at + 40 + text.len() + 1);
            buf.put_u32(at + 20, u32::try_from(after - start).unwrap());
            at = after;
        }
        buf.put_u32(off::DATA_SIZE, u32::try_from(at).unwrap());
        let specs = parse_specs(&buf, DmOp::Status).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].target_type, "snapshot");
        assert_eq!(specs[1].text, "0/2048 16");
        assert_eq!(specs[1].start, Sectors::new(8));
    }

    #[test]
    fn name_list_reply_with_uuids_and_without() {
        let mut buf = IoctlBuf::new(1024);
        let start = abi::HEADER_SIZE;
        // Record 1: name "a", uuid "CHECKPOINTD-1-x".
        let r1 = start;
        buf.put_u64(r1, DevId::new(254, 0).unwrap().to_kernel());
        buf.put_cstr(r1 + 12, "a");
        let ev = abi::align8(r1 + 12 + 2);
        buf.put_u32(ev, 5);
        buf.put_u32(ev + 4, abi::DM_NAME_LIST_FLAG_HAS_UUID);
        buf.put_cstr(ev + 8, "CHECKPOINTD-1-x");
        let r2 = abi::align8(ev + 8 + 16);
        buf.put_u32(r1 + 8, u32::try_from(r2 - r1).unwrap());
        // Record 2: name "bb", no uuid, last.
        buf.put_u64(r2, DevId::new(254, 1).unwrap().to_kernel());
        buf.put_cstr(r2 + 12, "bb");
        let ev2 = abi::align8(r2 + 12 + 3);
        buf.put_u32(ev2, 0);
        buf.put_u32(ev2 + 4, 2);
        buf.put_u32(off::DATA_SIZE, u32::try_from(ev2 + 8).unwrap());
        let list = parse_name_list(&buf).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "a");
        assert_eq!(list[0].uuid, ListedUuid::Uuid("CHECKPOINTD-1-x".into()));
        assert_eq!(list[0].event_nr, Some(5));
        assert_eq!(list[1].dev, DevId::new(254, 1).unwrap());
        assert_eq!(list[1].uuid, ListedUuid::None);
    }

    #[test]
    fn empty_name_list_is_a_zero_dev() {
        let mut buf = IoctlBuf::new(1024);
        buf.put_u32(off::DATA_SIZE, u32::try_from(abi::HEADER_SIZE + 16).unwrap());
        assert!(parse_name_list(&buf).unwrap().is_empty());
    }

    #[test]
    fn versions_reply() {
        let mut buf = IoctlBuf::new(1024);
        let a = abi::HEADER_SIZE;
        buf.put_u32(a + 4, 1);
        buf.put_u32(a + 8, 4);
        buf.put_cstr(a + 16, "linear");
        let b = abi::align8(a + 16 + 7);
        buf.put_u32(a, u32::try_from(b - a).unwrap());
        buf.put_u32(b + 4, 1);
        buf.put_u32(b + 8, 16);
        buf.put_cstr(b + 16, "snapshot");
        buf.put_u32(off::DATA_SIZE, u32::try_from(abi::align8(b + 16 + 9)).unwrap());
        let v = parse_versions(&buf, DmOp::ListVersions).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, "snapshot");
        assert_eq!(v[1].version, Version { major: 1, minor: 16, patch: 0 });
    }

    #[test]
    fn names_are_validated() {
        assert!(DmName::new("ok-name").is_ok());
        assert!(DmName::new("a/b").is_err());
        assert!(DmName::new("control").is_err());
        assert!(DmName::new("x".repeat(128)).is_err());
        assert!(DmUuid::new("u".repeat(128)).is_ok());
        assert!(DmUuid::new("u".repeat(129)).is_err());
        assert_eq!(DmName::new("").unwrap_err().kind(), ErrorKind::Invalid);
    }
}
