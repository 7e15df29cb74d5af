//! The OS boundary of checkpointd: the one crate with `unsafe` and ioctls.
//!
//! * [`dm`]: device-mapper over the raw `/dev/mapper/control` ioctls, with typed targets
//!   ([`dm::target`]) for `linear`, `snapshot-origin`, `snapshot`, `snapshot-merge`, `bow`,
//!   `log-writes` and `flakey`;
//! * [`names`]: the names and uuids of every device we create, and [`names::cleanup_stale`];
//! * [`bowctl`]: dm-bow's sysfs control (`bow/state`, `bow/free`);
//! * [`loopdev`]: loop devices; [`blk`]: block-device ioctls; [`fs`]: FITRIM, FIEMAP,
//!   GETFSMAP, f2fs pinning, statvfs; [`mount`]: mount/umount/remount;
//! * [`logwrites`]: a reader (and replayer) for dm-log-writes logs;
//! * [`process`]: `PR_SET_IO_FLUSHER`, for the process that serves a block device;
//! * [`units`]: `Sectors`, `Bytes`, `DevId`; [`ErrorKind`]: the classification every error
//!   enum's `kind()` returns.
//!
//! Why not the `devicemapper` crate: it builds on libdevmapper's headers through bindgen, so
//! every build machine needs libdevmapper and libclang (hundreds of MB), and there is no such
//! build for Android. What checkpointd needs of it is the raw ioctl layer, which is small: a
//! header struct, a few record layouts and thirteen commands, all here in [`dm`].
//!
//! Every `unsafe` block is an ioctl call (declared once with a `nix` macro), the byte view of
//! an aligned ioctl buffer, or the one `prctl` of [`process`], each with a `// SAFETY:` note.
//! Public functions take `&File`, `impl AsFd` or paths, never raw descriptors.

pub mod blk;
pub mod bowctl;
pub mod dm;
mod error;
pub mod fs;
mod kmsg;
pub mod logwrites;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod names;
pub mod process;
pub mod units;

pub use error::ErrorKind;
pub use units::{Bytes, DevId, Sectors};
