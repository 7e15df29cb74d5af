//! The ublk front end of the userspace backup-on-write engine (issue 16, docs/userspace-bow.md):
//! serves a [`bow_engine::Engine`], or for comparison a plain pass-through, over the raw device
//! as `/dev/ublkbN`.
//!
//! * [`target`]: what one ublk request does to the device (read, write, flush, discard), for
//!   either backing, and which errno the kernel gets back. Pure, tested on the host.
//! * [`control`]: the line protocol on the server's abstract unix socket (checkpoint, commit,
//!   status, stop).
//! * [`writeback`]: first-touch writes held (completed at once, stored in [`held`]'s file) and
//!   given to the engine together at the next flush, so they share its ordering points.
//! * `direct` (Linux, `serve --direct-writes`): a batch's user writes straight to the device,
//!   `O_DIRECT` through one io_uring, instead of through the page cache.
//! * [`journal`]: the engine's op journal file on a tmpfs, from which a restarted server
//!   rebuilds the engine of a server that died (`bow_engine::Engine::recover`).
//! * `server` (feature `ublk`): the libublk server itself, its own mount namespace, and
//!   `UBLK_F_USER_RECOVERY` re-attachment after a crash.
//!
//! The server needs libclang at build time (libublk's bindgen), so it sits behind the `ublk`
//! feature; without it this crate builds with no C toolchain beyond Rust's.

pub mod control;
#[cfg(target_os = "linux")]
pub mod direct;
pub mod held;
pub mod journal;
pub mod mounts;
#[cfg(feature = "ublk")]
pub mod server;
pub mod target;
pub mod writeback;

pub use target::{Backing, Request, Target};
pub use writeback::Served;
