//! Shared helpers of the model's integration tests: a deliberately naive reference restore
//! (the oracle, independent of `bow::restore`) and the range-map invariant checks.
#![allow(dead_code)]

use bow::crc::bow_crc;
use bow::device::BlockDevice;
use bow::format::{LogHeader, LogSector, Magic};
use bow::model::{BowEngine, BowModel, KernelWarning, RangeType};
use bow::units::SECTOR_SIZE;

/// vold's algorithm at its simplest, on an image in memory: newest log sector first, entries
/// from last to first, copy `dest` back to `source` after checking the CRC. Returns the number
/// of entries replayed, or why the log is unusable. No magic: `Ok(0)`, image untouched.
pub fn reference_restore(img: &mut [u8]) -> Result<usize, String> {
    let Ok(first) = LogHeader::decode(img) else { return Ok(0) };
    if first.magic != Magic::Bow {
        return Err("WOB not expected from the model".into());
    }
    let bs = first.block_size as usize;
    let mut expect_seq = first.sequence;
    let mut replayed = 0;
    loop {
        let sector = LogSector::parse(&img[..bs]).map_err(|e| format!("log: {e}"))?;
        if sector.header.sequence != expect_seq {
            return Err(format!("sequence {} != {expect_seq}", sector.header.sequence));
        }
        for (i, e) in sector.entries.iter().enumerate().rev() {
            let size = e.size as usize;
            let src = usize::try_from(e.source.0 * SECTOR_SIZE).unwrap();
            let dst = usize::try_from(e.dest.0 * SECTOR_SIZE).unwrap();
            if src + size > img.len() || dst + size > img.len() {
                return Err(format!("entry {i} out of range"));
            }
            let data = img[dst..dst + size].to_vec();
            if e.checksum != 0 {
                let seed =
                    u32::try_from(e.source.0 / (bs as u64 / SECTOR_SIZE) % (1 << 32)).unwrap();
                let crc = bow_crc(seed, &data);
                if crc != e.checksum {
                    return Err(format!(
                        "seq {expect_seq} entry {i}: crc {crc:#x} != {:#x}",
                        e.checksum
                    ));
                }
            }
            img[src..src + size].copy_from_slice(&data);
            replayed += 1;
        }
        if expect_seq == 0 {
            return Ok(replayed);
        }
        expect_seq -= 1;
    }
}

/// Checks every range-map invariant the model must keep; `Err` names the first violation.
pub fn check_invariants<D: BlockDevice>(m: &BowModel<D>) -> Result<(), String> {
    let map = m.range_map();
    map.check_structure()?;
    let ranges = m.ranges();
    // Tiling: contiguous from 0 to the device end, no empty range.
    let mut at = 0;
    for r in &ranges {
        if r.start != at || r.end <= r.start {
            return Err(format!("gap/overlap at {at}: {r:?}"));
        }
        at = r.end;
    }
    if at != m.len_sectors() {
        return Err(format!("ranges end at {at}, device at {}", m.len_sectors()));
    }
    // Neighbours differ, unless a failed log write left the kernel's raw type restore behind.
    let orphaned = m.warnings().iter().any(|w| matches!(w, KernelWarning::OrphanBackup { .. }));
    if !orphaned {
        for w in ranges.windows(2) {
            if w[0].kind == w[1].kind {
                return Err(format!("unmerged neighbours {:?} {:?}", w[0], w[1]));
            }
        }
        if ranges.iter().any(|r| r.kind == RangeType::Invalid) {
            return Err("INVALID range without a failed log write".into());
        }
    }
    // The trimmed list holds exactly the TRIMMED ranges.
    let mut listed: Vec<u64> = m.trimmed_list().iter().map(|r| r.start).collect();
    listed.sort_unstable();
    let trimmed: Vec<u64> =
        ranges.iter().filter(|r| r.kind == RangeType::Trimmed).map(|r| r.start).collect();
    if listed != trimmed {
        return Err(format!("trimmed list {listed:?} != TRIMMED ranges {trimmed:?}"));
    }
    // free = bytes in TRIMMED ranges + bytes carved out of them as fresh nodes and never
    // subtracted (the kernel's accounting, §2.2).
    let expect_free = m.true_free_bytes() + map.unsubtracted_bytes();
    if m.free_bytes() != expect_free {
        return Err(format!("free {} != {}", m.free_bytes(), expect_free));
    }
    // Every BACKUP block is the destination of exactly one logged entry (or an orphan).
    let bss = m.block_size().sectors();
    let mut dests = std::collections::HashMap::<u64, usize>::new();
    for le in m.log_history() {
        let blocks = u64::from(le.entry.size) / SECTOR_SIZE / bss;
        for b in 0..blocks {
            *dests.entry(le.entry.dest.0 / bss + b).or_default() += 1;
        }
    }
    for w in m.warnings() {
        if let KernelWarning::OrphanBackup { dest, sectors } = *w {
            for b in 0..sectors / bss {
                *dests.entry(dest / bss + b).or_default() += 1;
            }
        }
    }
    for r in ranges.iter().filter(|r| r.kind == RangeType::Backup) {
        for b in r.start / bss..r.end / bss {
            if dests.get(&b) != Some(&1) {
                return Err(format!("BACKUP block {b} referenced {:?} times", dests.get(&b)));
            }
        }
    }
    Ok(())
}
