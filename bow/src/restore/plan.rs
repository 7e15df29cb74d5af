//! The restore plan: "the final contents of block X come from physical block Y".
//!
//! vold replays entries newest to oldest, each copying `dest → source` on the real device. The
//! validation walk simulated exactly that on the relocation map, so after the walk, virtual
//! block X resolves to the physical block Y whose *pre-restore* contents vold's replay leaves in
//! X. The plan is the list of X ≠ Y, coalesced into extents, with block 0 (which holds the log)
//! kept apart to be written last.
//!
//! **When applying the plan out of order is safe** (docs/restore.md): if no block the plan
//! writes (block 0 aside) is a block that the validation walk or the plan reads, then until
//! block 0 is rewritten every byte validation and the plan depend on is unchanged, so a crash
//! anywhere followed by a new run re-validates the same log, derives the same plan and copies
//! the same bytes; and vold, run instead, reads only those same unchanged blocks before writing
//! them itself. For logs the kernel writes this always holds: a block is a backup destination
//! at most once and only *before* it is ever a source, so each chain of relocations ends in a
//! block that is never written. A log for which it does not hold (only a hand-made or damaged
//! one) is applied with vold's own resumable replay instead ([`ApplyMode::VoldReplay`]).

use blockcopy::{BlockRange, CopyPlan, Layout};

use super::relocation::Run;
use super::validate::Walk;

/// How a plan is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ApplyMode {
    /// Sorted, coalesced extents with several I/Os in flight, block 0 last.
    Plan,
    /// vold's entry-by-entry replay with WOB progress records, because some block is both
    /// read and written by the plan.
    VoldReplay,
}

/// Copy `blocks` blocks from physical block `source` to block `target` (the copy engine's
/// type).
pub use blockcopy::BlockCopy;

/// What restoring a validated log writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestorePlan {
    /// Bytes per block.
    pub block_size: u32,
    /// Copies other than block 0, sorted by target, coalesced, targets disjoint.
    pub copies: Vec<BlockCopy>,
    /// The physical block holding the final contents of block 0 (the original block 0).
    pub block0_source: u64,
    pub mode: ApplyMode,
    /// Blocks the plan would both read and write (0 for every log the kernel writes).
    pub hazard_blocks: u64,
    /// The copies as the engine applies them, with validation's reads and block 0's source
    /// protected; `None` if the engine rejected them (never for a walk's runs, which are
    /// sorted, disjoint and inside the device), which makes the mode vold's replay.
    #[serde(skip)]
    pub(crate) engine: Option<CopyPlan>,
}

impl RestorePlan {
    /// Blocks the plan writes, block 0 included.
    pub fn blocks(&self) -> u64 {
        self.copies.iter().map(|c| c.blocks).sum::<u64>() + u64::from(self.block0_source != 0)
    }

    /// One line per extent, for dry runs.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan: {} blocks of {} bytes in {} extents, mode {:?}, hazard blocks {}",
            self.blocks(),
            self.block_size,
            self.copies.len() + 1,
            self.mode,
            self.hazard_blocks
        );
        for c in &self.copies {
            let _ = writeln!(
                out,
                "  blocks {}..{} <- physical {}..{}",
                c.target,
                c.target + c.blocks,
                c.source,
                c.source + c.blocks
            );
        }
        let _ = writeln!(out, "  block 0 <- physical {} (last)", self.block0_source);
        out
    }
}

/// Builds the plan from a completed walk.
pub(crate) fn build(walk: &Walk) -> RestorePlan {
    let mut copies = Vec::new();
    let mut block0_source = 0;
    for run in walk.map.moved_runs() {
        let mut run = run;
        if run.virt == 0 {
            block0_source = run.phys;
            run = Run { virt: 1, phys: run.phys + 1, len: run.len - 1 };
            if run.len == 0 {
                continue;
            }
        }
        copies.push(BlockCopy { target: run.virt, source: run.phys, blocks: run.len });
    }
    // Everything validation reads (log sectors, checked copies) and block 0's source must stay
    // unchanged until block 0 is rewritten; the engine adds the copies' own sources.
    let protected = walk
        .reads
        .iter()
        .map(|r| BlockRange { start: r.phys, blocks: r.len })
        .chain([BlockRange { start: block0_source, blocks: 1 }]);
    let block_size = walk.block_size.bytes();
    let engine = CopyPlan::new(u64::from(block_size), copies.clone())
        .and_then(|plan| plan.protect(protected))
        .ok();
    let hazard_blocks = match &engine {
        Some(plan) => plan.hazards(Layout::SameDevice).blocks,
        None => copies.iter().map(|c| c.blocks).sum(),
    };
    let mode = if engine.is_some() && hazard_blocks == 0 {
        ApplyMode::Plan
    } else {
        ApplyMode::VoldReplay
    };
    RestorePlan {
        block_size,
        copies: engine.as_ref().map_or(copies, |plan| plan.copies().to_vec()),
        block0_source,
        mode,
        hazard_blocks,
        engine,
    }
}
