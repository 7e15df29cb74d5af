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

/// Copy `blocks` blocks from physical block `source` to block `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockCopy {
    pub target: u64,
    pub source: u64,
    pub blocks: u64,
}

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
    // Everything validation or the plan reads; block 0 is excluded because it is written last.
    let mut reads: Vec<(u64, u64)> = walk.reads.iter().map(|r| (r.phys, r.phys + r.len)).collect();
    reads.extend(copies.iter().map(|c| (c.source, c.source + c.blocks)));
    reads.push((block0_source, block0_source + 1));
    let reads = merge(reads);
    let targets: Vec<(u64, u64)> = copies.iter().map(|c| (c.target, c.target + c.blocks)).collect();
    let hazard_blocks = overlap(&reads, &targets);
    RestorePlan {
        block_size: walk.block_size.bytes(),
        copies,
        block0_source,
        mode: if hazard_blocks == 0 { ApplyMode::Plan } else { ApplyMode::VoldReplay },
        hazard_blocks,
    }
}

/// Sorts and merges half-open intervals.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Total length of the intersection of two sorted, disjoint interval lists.
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo < hi {
            total += hi - lo;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_overlap() {
        let a = merge(vec![(5, 10), (0, 2), (9, 12)]);
        assert_eq!(a, vec![(0, 2), (5, 12)]);
        assert_eq!(overlap(&a, &[(1, 6), (11, 20)]), 3);
        assert_eq!(overlap(&a, &[(2, 5), (12, 13)]), 0);
    }
}
