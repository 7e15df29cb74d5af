//! The range map exactly as dm-bow keeps it (dm-bow-format.md §2).
//!
//! The kernel keeps a sorted set of `bow_range` nodes (an rb-tree keyed by start sector); a node
//! covers `[sector, next.sector)` and the last node is always `TOP` at the device length. TRIMMED
//! nodes are also linked on `trimmed_list`, whose head is where backups are carved from. This
//! module reproduces the node-level behaviour, not just the set of ranges, because which node
//! survives a split decides the order of the trimmed list and so where every later backup lands:
//!
//! * `RangeMap::split` is `split_range`: a leading part becomes a new node copied from the
//!   original (pushed on the list head if TRIMMED); a trailing part keeps the original node (and
//!   its list position) while a new, INVALID, unlisted node becomes the carved piece.
//! * `RangeMap::set_type` is `set_type`: leaving TRIMMED subtracts the node's size from
//!   `trims_total` and unlinks it, entering TRIMMED adds and pushes it on the head; then it merges
//!   with the next node and with the previous node if they have the same type.
//! * `RangeMap::set_kind_raw` is the kernel's direct `br->type = ...` assignments, which neither
//!   merge nor touch the list or the counter.
//!
//! Nodes live in a slab and the trimmed list is an intrusive doubly linked list over it, so every
//! operation is O(log n) in the number of ranges and the dry run can drive devices of any size.
//! Each node is also linked to its neighbours in sector order (the kernel's `rb_prev` and
//! `rb_next`), so a range's end and its neighbours cost no search of the index: a write into
//! free space asks for them several times (a quarter of the engine's planning time went into
//! those searches, measured with callgrind).

use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

use crate::units::SECTOR_SIZE;

/// The type of a range (`bow_range.type`). The order is the kernel's enum order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RangeType {
    /// A node created by a split whose type was not set (yet).
    Invalid,
    /// Block 0: holds the log during the checkpoint.
    Sector0,
    /// The free block that serves logical block 0 during the checkpoint.
    Sector0Current,
    /// Original data not yet overwritten.
    Unchanged,
    /// Free at checkpoint start and not used since (the kernel prints "Free").
    Trimmed,
    /// Safe to overwrite: backed up, or was free.
    Changed,
    /// A free block now holding a saved copy.
    Backup,
    /// The end marker at the device length.
    Top,
}

impl RangeType {
    /// The name the kernel's table status prints (`readable_type[]`).
    pub fn kernel_name(self) -> &'static str {
        match self {
            RangeType::Invalid => "Invalid",
            RangeType::Sector0 => "Sector0",
            RangeType::Sector0Current => "Sector0_current",
            RangeType::Unchanged => "Unchanged",
            RangeType::Trimmed => "Free",
            RangeType::Changed => "Changed",
            RangeType::Backup => "Backup",
            RangeType::Top => "Top",
        }
    }
}

impl fmt::Display for RangeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// One range as seen from outside: `[start, end)` in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub kind: RangeType,
}

impl Range {
    /// Length in sectors.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range (never produced by the map).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Index of a node in the slab. Only valid while the node lives.
pub type NodeId = usize;

#[derive(Debug, Clone)]
struct Node {
    sector: u64,
    kind: RangeType,
    /// On the trimmed list, between `prev` and `next`.
    listed: bool,
    prev: Option<NodeId>,
    next: Option<NodeId>,
    /// The neighbours in sector order (every live node is in that order; TOP has no `upper`).
    lower: Option<NodeId>,
    upper: Option<NodeId>,
}

/// The range tree, the trimmed list and `trims_total`.
#[derive(Debug, Clone)]
pub struct RangeMap {
    slab: Vec<Option<Node>>,
    spare: Vec<NodeId>,
    index: BTreeMap<u64, NodeId>,
    head: Option<NodeId>,
    tail: Option<NodeId>,
    listed: usize,
    trims_total: u64,
    len: u64,
    missing_prev: u64,
    unsubtracted: u64,
    /// The node [`RangeMap::find`] found last: a drain's writes come in device order, so the
    /// next one usually falls in the same node (the tail its predecessor's split left), which
    /// is checked first. Any live node may be tried: it is used only if it covers the sector.
    finger: Cell<NodeId>,
}

impl RangeMap {
    /// The constructor's tree: `[UNCHANGED @0, TOP @len]`, empty list, `trims_total` 0.
    pub fn new(len_sectors: u64) -> RangeMap {
        let mut map = RangeMap {
            slab: Vec::new(),
            spare: Vec::new(),
            index: BTreeMap::new(),
            head: None,
            tail: None,
            listed: 0,
            trims_total: 0,
            len: len_sectors,
            missing_prev: 0,
            unsubtracted: 0,
            finger: Cell::new(0),
        };
        let top = map.alloc(len_sectors, RangeType::Top);
        map.index.insert(len_sectors, top);
        if len_sectors > 0 {
            let first = map.alloc(0, RangeType::Unchanged);
            map.index.insert(0, first);
            map.link_below(first, top);
        }
        map
    }

    /// Device length in sectors (the TOP node's sector).
    pub fn len_sectors(&self) -> u64 {
        self.len
    }

    /// The kernel's `trims_total` in bytes (what `/sys/.../bow/free` prints).
    pub fn trims_total(&self) -> u64 {
        self.trims_total
    }

    /// Bytes actually in TRIMMED ranges (`trims_total` is only an upper bound, §2.2).
    pub fn trimmed_bytes(&self) -> u64 {
        self.ranges()
            .iter()
            .filter(|r| r.kind == RangeType::Trimmed)
            .map(|r| r.len() * SECTOR_SIZE)
            .sum()
    }

    /// How often `set_type` ran on the first node, where the kernel would dereference a NULL
    /// `prev` (only a discard or write of block 0 in TRIM state after block 0 was discarded).
    pub fn missing_prev_hits(&self) -> u64 {
        self.missing_prev
    }

    /// Bytes that left TRIMMED ranges without being subtracted from `trims_total`: pieces carved
    /// out of a TRIMMED range as fresh (INVALID) nodes and not used as backup chunks (those are
    /// subtracted explicitly). The kernel's counter is exactly
    /// `trimmed_bytes() + unsubtracted_bytes()` (dm-bow-format.md §2.2).
    pub fn unsubtracted_bytes(&self) -> u64 {
        self.unsubtracted
    }

    pub fn settle_unsubtracted(&mut self, bytes: u64) {
        self.unsubtracted = self.unsubtracted.wrapping_sub(bytes);
    }

    /// Every range in order, without TOP.
    pub fn ranges(&self) -> Vec<Range> {
        let mut out = Vec::with_capacity(self.index.len());
        let mut iter = self.index.iter().peekable();
        while let Some((&start, &id)) = iter.next() {
            let kind = self.kind(id);
            if kind == RangeType::Top {
                break;
            }
            let end = iter.peek().map_or(self.len, |(&s, _)| s);
            out.push(Range { start, end, kind });
        }
        out
    }

    /// The ranges in the trimmed list order, head first.
    pub fn trimmed_list(&self) -> Vec<Range> {
        let mut out = Vec::with_capacity(self.listed);
        let mut cur = self.head;
        let mut guard = 0usize;
        while let Some(id) = cur {
            let start = self.sector(id);
            out.push(Range { start, end: self.top(id), kind: self.kind(id) });
            cur = self.node(id).next;
            guard += 1;
            if guard > self.slab.len() {
                break;
            }
        }
        out
    }

    /// The kernel's table status (`STATUSTYPE_TABLE`): `"<Name>: <sector>\n"` per node, TOP
    /// included, no self-check errors (the map keeps its own invariants; see the tests).
    pub fn table_status(&self) -> String {
        let mut s = String::new();
        for (&sector, &id) in &self.index {
            s.push_str(self.kind(id).kernel_name());
            s.push_str(": ");
            s.push_str(&sector.to_string());
            s.push('\n');
        }
        s
    }

    /// The range holding `sector`, if it is inside the device.
    pub fn range_at(&self, sector: u64) -> Option<Range> {
        let id = self.find(sector)?;
        Some(Range { start: self.sector(id), end: self.top(id), kind: self.kind(id) })
    }

    // ---- node-level operations used by the engine ----

    fn alloc(&mut self, sector: u64, kind: RangeType) -> NodeId {
        let node =
            Node { sector, kind, listed: false, prev: None, next: None, lower: None, upper: None };
        if let Some(id) = self.spare.pop() {
            self.slab[id] = Some(node);
            id
        } else {
            self.slab.push(Some(node));
            self.slab.len() - 1
        }
    }

    fn node(&self, id: NodeId) -> &Node {
        // Ids handed out by this map stay valid until `erase`; the engine never keeps one
        // across an operation that may erase it (the kernel's `*br = NULL` rule).
        self.slab.get(id).and_then(Option::as_ref).unwrap_or(&DEAD)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.slab.get_mut(id).and_then(Option::as_mut)
    }

    /// Whether `id` names a live node.
    pub fn alive(&self, id: NodeId) -> bool {
        self.slab.get(id).is_some_and(Option::is_some)
    }

    pub fn sector(&self, id: NodeId) -> u64 {
        self.node(id).sector
    }

    pub fn kind(&self, id: NodeId) -> RangeType {
        self.node(id).kind
    }

    /// `range_top`: the next node's sector.
    pub fn top(&self, id: NodeId) -> u64 {
        self.node(id).upper.map_or(self.len, |n| self.sector(n))
    }

    /// Size in sectors.
    pub fn size(&self, id: NodeId) -> u64 {
        self.top(id) - self.sector(id)
    }

    /// The node containing `sector` (`find_first_overlapping_range` without the clipping).
    pub fn find(&self, sector: u64) -> Option<NodeId> {
        if sector >= self.len {
            return None;
        }
        let finger = self.finger.get();
        if self.alive(finger) && self.sector(finger) <= sector && sector < self.top(finger) {
            return Some(finger);
        }
        let found = self.index.range(..=sector).next_back().map(|(_, &id)| id);
        if let Some(id) = found {
            self.finger.set(id);
        }
        found
    }

    /// `rb_first`.
    pub fn first(&self) -> Option<NodeId> {
        self.index.values().next().copied()
    }

    fn prev_of(&self, id: NodeId) -> Option<NodeId> {
        self.node(id).lower
    }

    fn next_of(&self, id: NodeId) -> Option<NodeId> {
        self.node(id).upper
    }

    /// Puts the new node `id` just below `upper` in sector order.
    fn link_below(&mut self, id: NodeId, upper: NodeId) {
        let lower = self.node(upper).lower;
        if let Some(n) = self.node_mut(id) {
            n.lower = lower;
            n.upper = Some(upper);
        }
        if let Some(n) = self.node_mut(upper) {
            n.lower = Some(id);
        }
        if let Some(l) = lower {
            if let Some(n) = self.node_mut(l) {
                n.upper = Some(id);
            }
        }
    }

    /// Takes `id` out of the sector order.
    fn unlink(&mut self, id: NodeId) {
        let (lower, upper) = {
            let n = self.node(id);
            (n.lower, n.upper)
        };
        if let Some(l) = lower {
            if let Some(n) = self.node_mut(l) {
                n.upper = upper;
            }
        }
        if let Some(u) = upper {
            if let Some(n) = self.node_mut(u) {
                n.lower = lower;
            }
        }
    }

    /// `find_free_range`: the head of the trimmed list.
    pub fn free_head(&self) -> Option<NodeId> {
        self.head
    }

    /// `list_add(node, &trimmed_list)`: push on the head.
    fn list_add(&mut self, id: NodeId) {
        if self.node(id).listed {
            self.list_del(id);
        }
        let old = self.head;
        if let Some(n) = self.node_mut(id) {
            n.listed = true;
            n.prev = None;
            n.next = old;
        }
        match old {
            Some(o) => {
                if let Some(n) = self.node_mut(o) {
                    n.prev = Some(id);
                }
            }
            None => self.tail = Some(id),
        }
        self.head = Some(id);
        self.listed += 1;
    }

    /// `list_del`. Unlinking a node that is not on the list is a no-op (the kernel never does
    /// it; TRIMMED ⇔ listed is an invariant the tests check).
    pub fn list_del(&mut self, id: NodeId) {
        let (listed, prev, next) = {
            let n = self.node(id);
            (n.listed, n.prev, n.next)
        };
        if !listed {
            return;
        }
        match prev {
            Some(p) => {
                if let Some(n) = self.node_mut(p) {
                    n.next = next;
                }
            }
            None => self.head = next,
        }
        match next {
            Some(x) => {
                if let Some(n) = self.node_mut(x) {
                    n.prev = prev;
                }
            }
            None => self.tail = prev,
        }
        if let Some(n) = self.node_mut(id) {
            n.listed = false;
            n.prev = None;
            n.next = None;
        }
        self.listed -= 1;
    }

    fn erase(&mut self, id: NodeId) {
        self.list_del(id);
        // One search of the index, not a look-up and a removal.
        if let Entry::Occupied(e) = self.index.entry(self.sector(id)) {
            if *e.get() == id {
                e.remove();
            }
        }
        self.unlink(id);
        if let Some(slot) = self.slab.get_mut(id) {
            *slot = None;
            self.spare.push(id);
        }
    }

    /// `split_range(br, [start, start + len))`. Returns the node that now covers the carved
    /// piece and the piece's length, truncated to the range end. `None` when `start` is before
    /// the node (the kernel's WARN + `BLK_STS_IOERR`).
    pub fn split(&mut self, id: NodeId, start: u64, len: u64) -> Option<(NodeId, u64)> {
        let node_start = self.sector(id);
        if start < node_start {
            return None;
        }
        // The range's end, which no step below moves (the nodes it makes lie inside it).
        let top = self.top(id);
        if start > node_start {
            // The leading part is a copy of the original, at the original's key; the original
            // moves forward.
            let kind = self.kind(id);
            let leading = self.alloc(node_start, kind);
            if let Some(slot) = self.index.get_mut(&node_start) {
                *slot = leading;
            }
            if let Some(n) = self.node_mut(id) {
                n.sector = start;
            }
            self.link_below(leading, id);
            if kind == RangeType::Trimmed {
                self.list_add(leading);
            }
        }
        let end = start.saturating_add(len);
        if end >= top {
            if start > node_start {
                self.index.insert(start, id);
            }
            return Some((id, top - start));
        }
        // New zeroed node becomes the piece; the original becomes the trailing part.
        if self.kind(id) == RangeType::Trimmed {
            self.unsubtracted = self.unsubtracted.wrapping_add(len * SECTOR_SIZE);
        }
        let piece = self.alloc(start, RangeType::Invalid);
        if let Some(n) = self.node_mut(id) {
            n.sector = end;
        }
        self.index.insert(start, piece);
        self.index.insert(end, id);
        self.link_below(piece, id);
        Some((piece, len))
    }

    /// The kernel's direct `br->type = kind` (no merge, no list, no counter).
    pub fn set_kind_raw(&mut self, id: NodeId, kind: RangeType) {
        if let Some(n) = self.node_mut(id) {
            n.kind = kind;
        }
    }

    /// Subtracts from `trims_total` as the kernel's u64 arithmetic does.
    pub fn sub_trims(&mut self, bytes: u64) {
        self.trims_total = self.trims_total.wrapping_sub(bytes);
    }

    /// `set_type(br, kind)`. The node may be erased (merged into its predecessor); callers must
    /// not use `id` afterwards, as the kernel sets `*br = NULL`.
    pub fn set_type(&mut self, id: NodeId, kind: RangeType) {
        let prev = self.prev_of(id);
        let next = self.next_of(id);
        if self.kind(id) == RangeType::Trimmed {
            let bytes = self.size(id) * SECTOR_SIZE;
            self.sub_trims(bytes);
            self.list_del(id);
        }
        if kind == RangeType::Trimmed {
            let bytes = self.size(id) * SECTOR_SIZE;
            self.trims_total = self.trims_total.wrapping_add(bytes);
            self.list_add(id);
        }
        self.set_kind_raw(id, kind);
        if let Some(n) = next {
            if self.kind(n) == kind {
                self.erase(n);
            }
        }
        match prev {
            Some(p) => {
                if self.kind(p) == kind {
                    self.erase(id);
                }
            }
            // The kernel computes `prev` with container_of(rb_prev()) and dereferences it; on
            // the first node that is NULL. The model treats it as "no merge" and counts it.
            None => self.missing_prev += 1,
        }
    }

    /// Checks the structural invariants the kernel's table status self-checks, plus list
    /// consistency. Returns a description of the first violation.
    pub fn check_structure(&self) -> Result<(), String> {
        match self.index.iter().next() {
            Some((&0, _)) => {}
            Some((&s, _)) if self.len > 0 => return Err(format!("first range starts at {s}")),
            _ => {}
        }
        let (&last, &last_id) =
            self.index.iter().next_back().ok_or_else(|| "empty ranges".to_string())?;
        if last != self.len || self.kind(last_id) != RangeType::Top {
            return Err(format!("last node {last} is not TOP at {}", self.len));
        }
        let mut below: Option<NodeId> = None;
        for (&s, &id) in &self.index {
            if !self.alive(id) || self.sector(id) != s {
                return Err(format!("index entry {s} points at a stale node"));
            }
            if self.node(id).lower != below || below.is_some_and(|b| self.node(b).upper != Some(id))
            {
                return Err(format!("node at {s}: its sector-order links differ from the index"));
            }
            below = Some(id);
            if self.kind(id) == RangeType::Top && s != self.len {
                return Err(format!("TOP inside the device at {s}"));
            }
            let trimmed = self.kind(id) == RangeType::Trimmed;
            if trimmed != self.node(id).listed {
                return Err(format!("node at {s}: trimmed={trimmed} listed={}", !trimmed));
            }
        }
        if below.is_some_and(|b| self.node(b).upper.is_some()) {
            return Err("TOP has a node above it".to_string());
        }
        let list = self.trimmed_list();
        if list.len() != self.listed {
            return Err(format!("list walk {} != listed {}", list.len(), self.listed));
        }
        Ok(())
    }
}

static DEAD: Node = Node {
    sector: 0,
    kind: RangeType::Invalid,
    listed: false,
    prev: None,
    next: None,
    lower: None,
    upper: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(m: &RangeMap) -> Vec<(u64, RangeType)> {
        m.ranges().iter().map(|r| (r.start, r.kind)).collect()
    }

    #[test]
    fn split_in_middle_makes_invalid_piece_and_keeps_original_as_tail() {
        let mut m = RangeMap::new(100);
        let first = m.first().unwrap();
        let (piece, len) = m.split(first, 10, 5).unwrap();
        assert_eq!(len, 5);
        assert_eq!(m.kind(piece), RangeType::Invalid);
        assert_eq!(m.sector(piece), 10);
        // The original node is now the tail at 15.
        assert_eq!(m.sector(first), 15);
        assert_eq!(
            kinds(&m),
            vec![(0, RangeType::Unchanged), (10, RangeType::Invalid), (15, RangeType::Unchanged)]
        );
    }

    #[test]
    fn set_type_merges_both_neighbours_and_counts_trims() {
        let mut m = RangeMap::new(100);
        let first = m.first().unwrap();
        let (a, _) = m.split(first, 10, 10).unwrap();
        m.set_type(a, RangeType::Trimmed);
        let id = m.find(30).unwrap();
        let (b, _) = m.split(id, 30, 10).unwrap();
        m.set_type(b, RangeType::Trimmed);
        assert_eq!(m.trims_total(), 20 * 512);
        let id = m.find(20).unwrap();
        let (c, _) = m.split(id, 20, 10).unwrap();
        m.set_type(c, RangeType::Trimmed);
        assert_eq!(
            kinds(&m),
            vec![(0, RangeType::Unchanged), (10, RangeType::Trimmed), (40, RangeType::Unchanged)]
        );
        assert_eq!(m.trims_total(), 30 * 512);
        assert_eq!(m.trimmed_list().len(), 1);
        m.check_structure().unwrap();
    }

    /// `find` answers as a search of the index would, whatever node the finger was left on:
    /// one erased by a merge, one whose slot a later split reused, one that moved.
    #[test]
    fn find_with_a_finger_agrees_with_the_ranges() {
        let mut m = RangeMap::new(4096);
        let first = m.first().unwrap();
        let (free, _) = m.split(first, 1024, 2048).unwrap();
        m.set_type(free, RangeType::Trimmed);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for step in 0..600u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = 1024 + rng % 2040;
            // Device order for a while, then anywhere: the finger hits, then mostly misses.
            let at = if step < 300 { 1024 + (step * 7) % 2040 } else { at };
            let id = m.find(at).unwrap();
            let kind = if m.kind(id) == RangeType::Trimmed {
                RangeType::Changed
            } else {
                RangeType::Trimmed
            };
            let (piece, _) = m.split(id, at, 1 + rng % 8).unwrap();
            m.set_type(piece, kind);
            m.check_structure().unwrap();
            let ranges = m.ranges();
            for probe in [at, at.saturating_sub(1), at + 1, 0, 1023, 1024, 3071, 3072, 4095] {
                let want = ranges.iter().find(|r| r.start <= probe && probe < r.end).unwrap();
                assert_eq!(m.range_at(probe), Some(*want), "step {step}, sector {probe}");
            }
        }
        assert_eq!(m.find(4096), None);
    }

    #[test]
    fn table_status_uses_kernel_names() {
        let m = RangeMap::new(2048);
        assert_eq!(m.table_status(), "Unchanged: 0\nTop: 2048\n");
    }
}
