//! Applying a hazard-free plan with the copy engine (`blockcopy::apply`): sorted, coalesced
//! copies with several I/Os in flight, a flush, then block 0 as the commit point, and a flush.
//!
//! Why the order of the copies does not matter and a crash is harmless (see plan.rs and
//! docs/restore.md): no copy writes a block that validation or any copy reads (the engine
//! checks it again), and the log in block 0 is rewritten only after every other copy is
//! durable. Until then a new run sees the same log and the same sources and makes the same
//! copies again; afterwards there is no log and nothing to do.
//!
//! Copies whose saved data validation kept in memory are written from there (kept.rs, handed
//! to the engine as preloaded data); the engine reads the others grouped by source.

use blockcopy::{ApplyError, ApplyOptions, CopyPlan, Layout};

use super::kept::KeptCopies;
use super::plan::RestorePlan;
use super::{Phase, Progress, RestoreError, RestoreOptions};
use crate::device::BlockDevice;

/// Applies `plan` (whose engine form is `copies`); returns the blocks written (block 0
/// included).
pub(super) fn apply(
    dev: &impl BlockDevice,
    plan: &RestorePlan,
    copies: &CopyPlan,
    opts: &RestoreOptions,
    kept: &KeptCopies,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, RestoreError> {
    let bs = u64::from(plan.block_size);
    let total = plan.blocks();
    let options = ApplyOptions {
        queue_depth: opts.queue_depth,
        max_io_bytes: opts.max_io_bytes,
        layout: Layout::SameDevice,
        preloaded: Some(kept),
    };
    // The commit point: block 0 <- its final contents, which removes the log.
    let commit = || {
        let mut block0 = vec![0u8; usize::try_from(bs).unwrap_or(usize::MAX)];
        dev.read_at(&mut block0, plan.block0_source * bs)?;
        dev.write_at(&block0, 0)
    };
    let mut report = |done, _| progress(Progress { phase: Phase::Apply, done, total });
    blockcopy::apply(dev, dev, copies, &options, commit, &mut report).map_err(|e| match e {
        ApplyError::Device(e) => RestoreError::Device(e),
        refused => RestoreError::Engine(refused),
    })?;
    progress(Progress { phase: Phase::Apply, done: total, total });
    Ok(total)
}
