//! Backup-space estimation before an update (issue 11, docs/estimate.md).
//!
//! * [`trace`]: the compact write trace (our own versioned, checksummed format), reader and
//!   writer;
//! * [`logwrites`]: the converter from dm-log-writes captures (entries parsed by
//!   the `logwrites` module of `blockdev`);
//! * [`estimator`]: the per-backend method (dm-bow's dry run against the real free map,
//!   dm-snapshot's chunk and metadata accounting, f2fs's out-of-place writes; history, declared
//!   sizes, a default) and the documented margin.
//!
//! Pure: no ioctls, no `unsafe`, no file-system access; the only input read is a trace from a
//! caller's `Read`. The free-space map, history and sizes come from the caller (the daemon reads
//! GETFSMAP or statvfs through `blockdev`, history from its state store).
#![forbid(unsafe_code)]

pub mod error;
pub mod estimator;
pub mod logwrites;
pub mod trace;

pub use error::{ErrorKind, EstimateError};
pub use estimator::{
    estimate, Backend, Basis, BowDetail, Breakdown, Estimate, EstimateConfig, EstimateInput,
    FreeExtent, FreeSpace, Margin, PastCheckpoint,
};
pub use trace::{Record, Trace};
