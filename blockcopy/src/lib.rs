//! Block devices addressed in bytes, and a generic copy plan: "copy these extents from a
//! source device to a destination device, with a hazard check and a caller-supplied commit
//! point". The dm-bow restore and the offline dm-snapshot merge both apply their plans here.
//!
//! * [`device`]: the [`BlockDevice`](device::BlockDevice) trait and its memory and file
//!   implementations (the only OS use: positioned reads and writes, and the `O_DIRECT` flag);
//! * [`crashdev`]: a device that records writes and flushes and builds every crash state;
//! * [`extent`]: a file seen through its extents on an underlying device;
//! * [`plan`]: [`CopyPlan`] (validated, sorted, coalesced copies) and its hazard check;
//! * [`apply()`]: the engine: copies with several I/Os in flight, a flush, the commit point, a
//!   flush;
//! * [`merged`]: reading many block ranges at once.
//!
//! See docs/restore.md (the dm-bow restore) and docs/snapcow.md (the dm-snapshot merge).
#![forbid(unsafe_code)]

pub mod apply;
pub mod crashdev;
pub mod device;
pub mod extent;
pub mod merged;
pub mod plan;

pub use apply::{apply, ApplyError, ApplyOptions, ApplyReport, Preloaded};
pub use extent::{Extent, ExtentDevice, ExtentError};
pub use plan::{BlockCopy, CopyPlan, Hazards, Layout, PlanError};

/// A range of `blocks` blocks starting at block `start` (of a plan's block size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct BlockRange {
    pub start: u64,
    pub blocks: u64,
}
