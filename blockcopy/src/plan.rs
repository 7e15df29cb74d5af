//! The copy plan: "the final contents of target block X come from source block Y", as sorted,
//! coalesced extents with disjoint targets, plus the ranges that must stay unchanged until the
//! commit point.
//!
//! **The hazard check.** A plan is applied out of order, several I/Os in flight, and a crash
//! may keep any subset of the unflushed writes. That is harmless only when a new run can make
//! the same copies again, i.e. when nothing the plan (or the caller's own validation) reads is
//! written before the commit point. [`CopyPlan::hazards`] counts the blocks that break this:
//! targets that are also sources (when source and destination are the same device) and targets
//! inside the caller's protected ranges (where the saved copies or the metadata describing them
//! live). The engine refuses a plan with any hazard; callers with hazardous plans need another
//! algorithm (dm-bow falls back to vold's resumable replay).

use crate::BlockRange;

/// Copy `blocks` blocks from source block `source` to target block `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct BlockCopy {
    pub target: u64,
    pub source: u64,
    pub blocks: u64,
}

/// Whether a plan's source and destination are one device (then a block both read and
/// written is a hazard) or two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Source and destination are the same device (the conservative default).
    #[default]
    SameDevice,
    /// Distinct devices: reads never see the plan's writes.
    SeparateDevices,
}

/// Why a plan was rejected by [`CopyPlan::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The block size is zero, not a power of two, or above 1 GiB.
    #[error("block size {0} is not a power of two from 1 byte to 1 GiB")]
    BlockSize(u64),
    /// A copy of zero blocks.
    #[error("copy {index} copies no blocks")]
    Empty { index: usize },
    /// A copy whose byte range does not fit in 64 bits.
    #[error("copy {index} (target {target}, source {from}, {blocks} blocks) overflows 64-bit byte offsets")]
    Overflow { index: usize, target: u64, from: u64, blocks: u64 },
    /// Two copies write the same target block.
    #[error("two copies write target block {block}")]
    OverlappingTargets { block: u64 },
    /// A protected range whose byte range does not fit in 64 bits.
    #[error("protected range at block {start} of {blocks} blocks overflows 64-bit byte offsets")]
    ProtectedOverflow { start: u64, blocks: u64 },
}

/// The largest block size a plan accepts (dm-snapshot's largest chunk is 1 GiB).
pub const MAX_BLOCK_SIZE: u64 = 1 << 30;

/// What a plan would break if applied out of order (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Hazards {
    /// Target blocks that are also source blocks (counted only for [`Layout::SameDevice`]).
    pub read_and_written: u64,
    /// Target blocks inside protected ranges.
    pub protected_written: u64,
    /// Target blocks that are either (the union of the two).
    pub blocks: u64,
}

impl Hazards {
    /// Whether the plan is safe to apply out of order.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }
}

/// A validated plan: block size, copies sorted by target, coalesced, targets disjoint, and the
/// protected ranges (sorted, merged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyPlan {
    block_size: u64,
    copies: Vec<BlockCopy>,
    protected: Vec<(u64, u64)>,
}

impl CopyPlan {
    /// Validates and normalises `copies`: sorts them by target, checks that no two write the
    /// same block and that every byte offset fits in 64 bits, and coalesces copies that
    /// continue each other on both sides.
    pub fn new(block_size: u64, mut copies: Vec<BlockCopy>) -> Result<CopyPlan, PlanError> {
        if !block_size.is_power_of_two() || block_size > MAX_BLOCK_SIZE {
            return Err(PlanError::BlockSize(block_size));
        }
        for (index, c) in copies.iter().enumerate() {
            if c.blocks == 0 {
                return Err(PlanError::Empty { index });
            }
            let fits = |first: u64| {
                first.checked_add(c.blocks).and_then(|end| end.checked_mul(block_size)).is_some()
            };
            if !fits(c.target) || !fits(c.source) {
                let (target, from, blocks) = (c.target, c.source, c.blocks);
                return Err(PlanError::Overflow { index, target, from, blocks });
            }
        }
        copies.sort_unstable_by_key(|c| c.target);
        let mut out: Vec<BlockCopy> = Vec::with_capacity(copies.len());
        for c in copies {
            if let Some(last) = out.last_mut() {
                let end = last.target + last.blocks;
                if c.target < end {
                    return Err(PlanError::OverlappingTargets { block: c.target });
                }
                if c.target == end && c.source == last.source + last.blocks {
                    last.blocks += c.blocks;
                    continue;
                }
            }
            out.push(c);
        }
        Ok(CopyPlan { block_size, copies: out, protected: Vec::new() })
    }

    /// Declares ranges that must stay unchanged until the commit point (added to those already
    /// declared): the plan may read them, never write them.
    pub fn protect(
        mut self,
        ranges: impl IntoIterator<Item = BlockRange>,
    ) -> Result<CopyPlan, PlanError> {
        for r in ranges {
            let end = r.start.checked_add(r.blocks);
            if end.and_then(|e| e.checked_mul(self.block_size)).is_none() {
                return Err(PlanError::ProtectedOverflow { start: r.start, blocks: r.blocks });
            }
            if let Some(end) = end.filter(|&e| e > r.start) {
                self.protected.push((r.start, end));
            }
        }
        self.protected = merge(std::mem::take(&mut self.protected));
        Ok(self)
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The copies, sorted by target, coalesced, targets disjoint.
    pub fn copies(&self) -> &[BlockCopy] {
        &self.copies
    }

    /// The protected ranges, sorted and merged.
    pub fn protected(&self) -> impl Iterator<Item = BlockRange> + '_ {
        self.protected.iter().map(|&(s, e)| BlockRange { start: s, blocks: e - s })
    }

    /// Blocks written.
    pub fn blocks(&self) -> u64 {
        self.copies.iter().map(|c| c.blocks).sum()
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.blocks().saturating_mul(self.block_size)
    }

    /// One past the highest target block (0 for an empty plan).
    pub fn target_end(&self) -> u64 {
        self.copies.last().map_or(0, |c| c.target + c.blocks)
    }

    /// One past the highest source block (0 for an empty plan).
    pub fn source_end(&self) -> u64 {
        self.copies.iter().map(|c| c.source + c.blocks).max().unwrap_or(0)
    }

    /// The hazard check (see the module documentation).
    pub fn hazards(&self, layout: Layout) -> Hazards {
        let targets: Vec<(u64, u64)> =
            self.copies.iter().map(|c| (c.target, c.target + c.blocks)).collect();
        let sources = match layout {
            Layout::SameDevice => {
                merge(self.copies.iter().map(|c| (c.source, c.source + c.blocks)).collect())
            }
            Layout::SeparateDevices => Vec::new(),
        };
        let mut either = sources.clone();
        either.extend_from_slice(&self.protected);
        Hazards {
            read_and_written: overlap(&sources, &targets),
            protected_written: overlap(&self.protected, &targets),
            blocks: overlap(&merge(either), &targets),
        }
    }
}

/// Sorts and merges half-open intervals.
pub(crate) fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
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

    fn c(target: u64, source: u64, blocks: u64) -> BlockCopy {
        BlockCopy { target, source, blocks }
    }

    #[test]
    fn interval_merge_and_overlap() {
        let a = merge(vec![(5, 10), (0, 2), (9, 12)]);
        assert_eq!(a, vec![(0, 2), (5, 12)]);
        assert_eq!(overlap(&a, &[(1, 6), (11, 20)]), 3);
        assert_eq!(overlap(&a, &[(2, 5), (12, 13)]), 0);
    }

    #[test]
    fn new_sorts_and_coalesces_continuing_copies_only() {
        let plan =
            CopyPlan::new(4096, vec![c(12, 52, 2), c(10, 50, 2), c(14, 60, 1), c(20, 70, 3)])
                .unwrap();
        // 10..12 and 12..14 continue each other on both sides; 14 does not (source jumps).
        assert_eq!(plan.copies(), &[c(10, 50, 4), c(14, 60, 1), c(20, 70, 3)]);
        assert_eq!(plan.blocks(), 8);
        assert_eq!(plan.bytes(), 8 * 4096);
        assert_eq!(plan.target_end(), 23);
        assert_eq!(plan.source_end(), 73);
        assert_eq!(CopyPlan::new(512, Vec::new()).unwrap().blocks(), 0);
    }

    #[test]
    fn new_rejects_bad_plans_with_a_reason() {
        assert_eq!(CopyPlan::new(3000, vec![]), Err(PlanError::BlockSize(3000)));
        assert_eq!(CopyPlan::new(0, vec![]), Err(PlanError::BlockSize(0)));
        assert_eq!(CopyPlan::new(2 << 30, vec![]), Err(PlanError::BlockSize(2 << 30)));
        assert_eq!(
            CopyPlan::new(512, vec![c(1, 2, 1), c(5, 9, 0)]),
            Err(PlanError::Empty { index: 1 })
        );
        assert_eq!(
            CopyPlan::new(512, vec![c(10, 0, 4), c(12, 40, 1)]),
            Err(PlanError::OverlappingTargets { block: 12 })
        );
        assert!(matches!(
            CopyPlan::new(512, vec![c(u64::MAX / 512, 0, 1)]),
            Err(PlanError::Overflow { index: 0, .. })
        ));
        assert!(matches!(
            CopyPlan::new(1, vec![c(0, u64::MAX, 1)]),
            Err(PlanError::Overflow { index: 0, .. })
        ));
        let err = CopyPlan::new(4096, vec![])
            .unwrap()
            .protect([BlockRange { start: u64::MAX - 1, blocks: 1 }]);
        assert!(matches!(err, Err(PlanError::ProtectedOverflow { .. })));
        assert!(PlanError::OverlappingTargets { block: 7 }.to_string().contains("block 7"));
    }

    #[test]
    fn hazards_count_read_written_and_protected_blocks() {
        // Copies 10..14 <- 20..24 and 30..32 <- 11..13: blocks 11, 12 are read and written.
        let plan = CopyPlan::new(512, vec![c(10, 20, 4), c(30, 11, 2)]).unwrap();
        let h = plan.hazards(Layout::SameDevice);
        assert_eq!(h, Hazards { read_and_written: 2, protected_written: 0, blocks: 2 });
        assert!(!h.is_empty());
        assert!(plan.hazards(Layout::SeparateDevices).is_empty());

        // Protecting 12..16 and 31..40 adds 13 and 31 (12 is already counted).
        let plan = plan
            .protect([BlockRange { start: 12, blocks: 4 }, BlockRange { start: 31, blocks: 9 }])
            .unwrap();
        assert_eq!(
            plan.protected().collect::<Vec<_>>(),
            vec![BlockRange { start: 12, blocks: 4 }, BlockRange { start: 31, blocks: 9 }]
        );
        let h = plan.hazards(Layout::SameDevice);
        assert_eq!(h, Hazards { read_and_written: 2, protected_written: 3, blocks: 4 });
        let h = plan.hazards(Layout::SeparateDevices);
        assert_eq!(h, Hazards { read_and_written: 0, protected_written: 3, blocks: 3 });

        // A plan that only reads protected ranges is fine.
        let safe = CopyPlan::new(512, vec![c(0, 100, 8)])
            .unwrap()
            .protect([BlockRange { start: 100, blocks: 8 }, BlockRange { start: 50, blocks: 0 }])
            .unwrap();
        assert!(safe.hazards(Layout::SameDevice).is_empty());
        assert_eq!(safe.protected().count(), 1, "empty ranges are dropped");
    }
}
