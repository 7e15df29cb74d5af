//! vold's "virtual relocation" map, at block granularity (vold-checkpoint.md §5.4).
//!
//! Validation must read every older log sector and every older backup *as if* the newer entries
//! had already been restored, without writing anything. The map answers "where does virtual
//! block `v` physically live now": an ordered set of boundaries, each mapping a virtual start to
//! a physical start; block `v` resolves to `phys(k) + (v - k)` for the greatest boundary `k ≤ v`.
//! It starts as the identity (`{0 → 0}`). Applying an entry ("virtual `source..source+n` now
//! reads like virtual `dest..dest+n`") rebases `dest`'s current runs onto `source`.
//!
//! After the whole log has been applied, the map *is* the restore: the final contents of every
//! block `v` are the pre-restore contents of physical block `resolve(v)` (replaying newest to
//! oldest composes exactly these rebasings).

use std::collections::BTreeMap;

/// One contiguous piece of a mapping: virtual `[virt, virt + len)` lives at physical
/// `[phys, phys + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub virt: u64,
    pub phys: u64,
    pub len: u64,
}

/// The relocation map. Keys are virtual block starts, values physical block starts.
#[derive(Debug, Clone)]
pub struct RelocationMap {
    keys: BTreeMap<u64, u64>,
}

impl Default for RelocationMap {
    fn default() -> Self {
        RelocationMap::new()
    }
}

impl RelocationMap {
    /// The identity map.
    pub fn new() -> RelocationMap {
        RelocationMap { keys: BTreeMap::from([(0, 0)]) }
    }

    /// Number of boundaries (a measure of the memory the map uses).
    pub fn boundaries(&self) -> usize {
        self.keys.len()
    }

    fn floor(&self, v: u64) -> (u64, u64) {
        // Key 0 is always present (see `relocate`), so a floor always exists.
        self.keys.range(..=v).next_back().map_or((0, 0), |(&k, &p)| (k, p))
    }

    /// The physical block that virtual block `v` reads from now.
    pub fn resolve(&self, v: u64) -> u64 {
        let (k, p) = self.floor(v);
        // Physical starts come from resolving in-device blocks, so this cannot overflow for the
        // device-bounded inputs validation allows; saturate rather than wrap if it ever did.
        p.saturating_add(v - k)
    }

    /// The physical runs that virtual `[v, v + n)` reads from, in virtual order.
    pub fn runs(&self, v: u64, n: u64) -> Vec<Run> {
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let end = v.saturating_add(n);
        let mut at = v;
        let mut phys = self.resolve(v);
        for (&k, &p) in self.keys.range(v.saturating_add(1)..end) {
            out.push(Run { virt: at, phys, len: k - at });
            at = k;
            phys = p;
        }
        out.push(Run { virt: at, phys, len: end - at });
        out
    }

    /// Applies one log entry: virtual `[source, source + n)` now resolves the way virtual
    /// `[dest, dest + n)` resolves before this call.
    pub fn relocate(&mut self, source: u64, dest: u64, n: u64) {
        let slice = self.runs(dest, n);
        self.relocate_runs(source, dest, n, &slice);
    }

    /// [`RelocationMap::relocate`] with `slice = self.runs(dest, n)` already at hand (the
    /// validator needs those runs anyway, to read the saved copy).
    pub fn relocate_runs(&mut self, source: u64, dest: u64, n: u64, slice: &[Run]) {
        if n == 0 {
            return;
        }
        debug_assert_eq!(slice, self.runs(dest, n).as_slice());
        let end = source.saturating_add(n);
        // Pin what follows the range to its current resolution before erasing inside it.
        let after = self.resolve(end);
        if n == 1 {
            // The common case (scattered 4 KiB writes): at most one key inside.
            self.keys.remove(&source);
        } else {
            let inside: Vec<u64> = self.keys.range(source..end).map(|(&k, _)| k).collect();
            for k in inside {
                self.keys.remove(&k);
            }
        }
        for run in slice {
            self.keys.insert(source + (run.virt - dest), run.phys);
        }
        self.keys.insert(end, after);
        self.normalize_at(end);
        self.normalize_at(source);
    }

    /// Removes the boundary at `k` if it only continues the previous run (keeps the map small).
    fn normalize_at(&mut self, k: u64) {
        if k == 0 {
            return;
        }
        let Some(&p) = self.keys.get(&k) else { return };
        let Some((&pk, &pp)) = self.keys.range(..k).next_back() else { return };
        if pp.checked_add(k - pk) == Some(p) {
            self.keys.remove(&k);
        }
    }

    /// Every run whose virtual and physical starts differ, in virtual order, with adjacent runs
    /// that continue each other merged. These are the blocks a restore must write.
    pub fn moved_runs(&self) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        let mut iter = self.keys.iter().peekable();
        while let Some((&k, &p)) = iter.next() {
            let Some((&next, _)) = iter.peek() else {
                // The last run is the identity: every relocation pins its end to the previous
                // resolution, and the map starts as the identity.
                debug_assert_eq!(k, p);
                break;
            };
            if k == p {
                continue;
            }
            let run = Run { virt: k, phys: p, len: next - k };
            match out.last_mut() {
                Some(last)
                    if last.virt + last.len == run.virt
                        && last.phys.checked_add(last.len) == Some(run.phys) =>
                {
                    last.len += run.len;
                }
                _ => out.push(run),
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Small test indices.
mod tests {
    use super::*;

    /// A block-by-block reference: a plain vector of physical locations.
    fn reference(size: u64, ops: &[(u64, u64, u64)]) -> Vec<u64> {
        let mut map: Vec<u64> = (0..size).collect();
        for &(s, d, n) in ops {
            let snapshot: Vec<u64> = (0..n).map(|i| map[(d + i) as usize]).collect();
            for i in 0..n {
                map[(s + i) as usize] = snapshot[i as usize];
            }
        }
        map
    }

    #[test]
    fn relocations_compose_like_block_by_block_copies() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..300 {
            let size = 64;
            let ops: Vec<(u64, u64, u64)> = (0..next(12) + 1)
                .map(|_| {
                    let n = next(6) + 1;
                    (next(size - n), next(size - n), n)
                })
                .collect();
            let mut map = RelocationMap::new();
            for &(s, d, n) in &ops {
                map.relocate(s, d, n);
            }
            let want = reference(size + 8, &ops);
            for v in 0..size + 8 {
                assert_eq!(map.resolve(v), want[v as usize], "ops {ops:?} block {v}");
            }
            let mut moved = vec![false; (size + 8) as usize];
            for run in map.moved_runs() {
                for i in 0..run.len {
                    assert_eq!(want[(run.virt + i) as usize], run.phys + i);
                    moved[(run.virt + i) as usize] = true;
                }
            }
            for v in 0..size + 8 {
                assert_eq!(moved[v as usize], want[v as usize] != v, "ops {ops:?} block {v}");
            }
        }
    }

    #[test]
    fn worked_example_map() {
        // dm-bow-format.md §9: entry 1 (3 <- 12), then entry 0 (0 <- 11).
        let mut map = RelocationMap::new();
        map.relocate(3, 12, 1);
        map.relocate(0, 11, 1);
        assert_eq!(
            map.moved_runs(),
            vec![Run { virt: 0, phys: 11, len: 1 }, Run { virt: 3, phys: 12, len: 1 }]
        );
    }
}
