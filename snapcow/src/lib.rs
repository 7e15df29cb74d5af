//! dm-snapshot's persistent exception store (the COW device of a `snapshot` target with `P`):
//! its on-disk format, a strict parser, and the offline merge that copies every saved chunk
//! back onto the origin before it is mounted.
//!
//! * [`format`]: the header and exception records (layout from the kernel's
//!   `drivers/md/dm-snap-persistent.c`), [`read_store`];
//! * [`merge`](mod@merge): the offline merge through the COW file's extents on the raw device,
//!   applied with `blockcopy`'s engine, crash-safe;
//! * [`writer`]: stores written as the kernel writes them, for tests.
//!
//! [`Extent`] is `blockcopy::Extent`, re-exported. See docs/snapcow.md.
#![forbid(unsafe_code)]

pub mod format;
pub mod merge;
pub mod writer;

pub use blockcopy::Extent;
pub use format::{read_store, ChunkSize, CowError, CowStore, Exception};
pub use merge::{merge, MergeError, MergeOptions, MergeReport};
