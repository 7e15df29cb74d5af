//! The dm-bow ("backup on write") log: on-disk format, engine model and restore.
//!
//! This crate is pure: no ioctls, no `unsafe`, and no file-system access beyond the
//! [`device::BlockDevice`] trait (whose file-backed implementation uses positioned reads and
//! writes through `std`, and takes only the `O_DIRECT` open flag from `libc`). The device
//! abstraction, the crash-injecting device and the copy engine the restore applies its plan
//! with live in the `blockcopy` crate; [`device`] and [`crashdev`] re-export them so paths like
//! `bow::device::FileDevice` keep working. See `dm-bow-format.md` (the kernel side) and `vold-checkpoint.md` §5
//! (the restore side) in the project's shared reference.
#![forbid(unsafe_code)]

pub use blockcopy::crashdev;
pub mod crc;
pub use blockcopy::device;
pub mod dryrun;
pub mod format;
pub mod inspect;
pub mod model;
pub mod restore;
pub mod units;
