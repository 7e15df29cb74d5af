//! The dm-bow ("backup on write") log: on-disk format, engine model and restore.
//!
//! This crate is pure: no ioctls, no `unsafe`, and no file-system access beyond the
//! [`device::BlockDevice`] trait. See `../shared/reference/dm-bow-format.md` (the kernel side)
//! and `vold-checkpoint.md` §5 (the restore side).
#![forbid(unsafe_code)]
