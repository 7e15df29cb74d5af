//! Decoding a whole dm-bow log for people: header, every log sector of the chain with its
//! entries and their CRC status, which backups were themselves moved, and what a restore
//! would write. Read-only; serialisable to JSON and rendered as text.

use std::collections::HashMap;
use std::fmt::Write;

use crate::device::BlockDevice;
use crate::format::{LogHeader, Magic};
use crate::restore::{self, ApplyMode, CorruptLog, CrcStatus, RestoreError};
use crate::units::Sectors;

/// What an entry saved, as far as the log shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum EntryKind {
    /// Entry 0 of sequence 0: the original block 0.
    OriginalBlock0,
    /// Entry 0 of a later sequence: the previous log sector.
    PreviousLogSector,
    /// Checksum 0 away from block 0: a move of the live block 0 (SECTOR0_CURRENT).
    Sector0Relocation,
    /// A block that held an older entry's saved copy, saved again before the file system
    /// reused it.
    MovedBackup,
    /// A block overwritten for the first time.
    Backup,
}

/// One entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryReport {
    pub index: u32,
    pub source: Sectors,
    pub dest: Sectors,
    pub size: u32,
    pub checksum: u32,
    pub kind: EntryKind,
    /// `None`: the walk stopped before this entry.
    pub crc: Option<CrcStatus>,
}

/// One log sector of the chain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SectorReport {
    pub sequence: u32,
    /// The physical block it was read from (0 for the newest).
    pub block: u64,
    pub magic: Magic,
    pub count: u32,
    pub sector0: Sectors,
    pub entries: Vec<EntryReport>,
}

/// What a restore would write.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanSummary {
    pub blocks: u64,
    pub extents: usize,
    pub block0_source: u64,
    pub mode: ApplyMode,
    pub hazard_blocks: u64,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogReport {
    pub device_bytes: u64,
    /// `None`: no log on the device.
    pub header: Option<LogHeader>,
    /// The head has the WOB magic: a restore was interrupted.
    pub resumed: bool,
    /// Log sectors reached, newest first.
    pub sectors: Vec<SectorReport>,
    /// Entries whose CRC matched, were unchecked, or did not match.
    pub crc_ok: u64,
    pub crc_unchecked: u64,
    pub crc_mismatch: u64,
    /// The first problem; `None` means the log validates.
    pub problem: Option<CorruptLog>,
    /// Present when the log validates.
    pub plan: Option<PlanSummary>,
}

/// Decodes the log on `dev`. Writes nothing. Device errors are errors; problems of the log
/// are part of the report.
pub fn inspect(dev: &impl BlockDevice) -> Result<LogReport, RestoreError> {
    let mut report = LogReport {
        device_bytes: dev.size(),
        header: None,
        resumed: false,
        sectors: Vec::new(),
        crc_ok: 0,
        crc_unchecked: 0,
        crc_mismatch: 0,
        problem: None,
        plan: None,
    };
    let walk = match restore::walk(dev, true, &mut |_| {}) {
        Ok(w) => w,
        Err(RestoreError::NoLog) => return Ok(report),
        Err(RestoreError::Corrupt(c)) => {
            // The header itself is unusable (block size); show what it says.
            let mut head = [0u8; 28];
            dev.read_at(&mut head, 0)?;
            report.header = LogHeader::decode(&head).ok();
            report.problem = Some(c);
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.header = Some(walk.header);
    report.resumed = walk.header.magic == Magic::Wob;
    let bss = walk.block_size.sectors();
    // Chronological position of every block that was a saved copy, to spot moved backups.
    let mut dests: HashMap<u64, (u32, usize)> = HashMap::new();
    for s in &walk.sectors {
        for (i, e) in s.sector.entries.iter().enumerate() {
            let n = u64::from(e.size) / 512 / bss;
            for b in 0..n {
                dests.insert(e.dest.0 / bss + b, (s.sector.header.sequence, i));
            }
        }
    }
    for s in &walk.sectors {
        let h = s.sector.header;
        let mut entries = Vec::new();
        for (i, e) in s.sector.entries.iter().enumerate() {
            let here = (h.sequence, i);
            let kind = if i == 0 && h.sequence == 0 {
                EntryKind::OriginalBlock0
            } else if i == 0 {
                EntryKind::PreviousLogSector
            } else if e.checksum == 0 {
                EntryKind::Sector0Relocation
            } else if dests.get(&(e.source.0 / bss)).is_some_and(|&older| older < here) {
                EntryKind::MovedBackup
            } else {
                EntryKind::Backup
            };
            let crc = s.crc.get(i).copied().flatten();
            match crc {
                Some(CrcStatus::Ok) => report.crc_ok += 1,
                Some(CrcStatus::Unchecked) => report.crc_unchecked += 1,
                Some(CrcStatus::Mismatch { .. }) => report.crc_mismatch += 1,
                None => {}
            }
            entries.push(EntryReport {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                source: e.source,
                dest: e.dest,
                size: e.size,
                checksum: e.checksum,
                kind,
                crc,
            });
        }
        report.sectors.push(SectorReport {
            sequence: h.sequence,
            block: s.block,
            magic: h.magic,
            count: h.count,
            sector0: h.sector0,
            entries,
        });
    }
    report.problem = walk.error.clone();
    if walk.error.is_none() {
        let plan = restore::build_plan(&walk);
        report.plan = Some(PlanSummary {
            blocks: plan.blocks(),
            extents: plan.copies.len() + 1,
            block0_source: plan.block0_source,
            mode: plan.mode,
            hazard_blocks: plan.hazard_blocks,
        });
    }
    Ok(report)
}

impl LogReport {
    /// A human-readable rendering.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let Some(h) = self.header else {
            let _ = writeln!(out, "no dm-bow log (device of {} bytes)", self.device_bytes);
            return out;
        };
        let _ = writeln!(
            out,
            "dm-bow log: magic {:?}{}, version {:#06x}, header {} bytes, block size {}, \
             sequence {}, count {}, sector0 {}",
            h.magic,
            if self.resumed { " (restore interrupted, resumes)" } else { "" },
            h.header_version,
            h.header_size,
            h.block_size,
            h.sequence,
            h.count,
            h.sector0
        );
        for s in &self.sectors {
            let _ = writeln!(
                out,
                "log sector {} (block {}, {:?}, {} entries, sector0 {}):",
                s.sequence, s.block, s.magic, s.count, s.sector0
            );
            for e in &s.entries {
                let crc = match e.crc {
                    Some(CrcStatus::Ok) => "crc ok".to_string(),
                    Some(CrcStatus::Unchecked) => "unchecked".to_string(),
                    Some(CrcStatus::Mismatch { computed }) => {
                        format!("MISMATCH ({computed:#010x})")
                    }
                    None => "not reached".to_string(),
                };
                let _ = writeln!(
                    out,
                    "  [{:>3}] {:>12} <- {:>12} {:>8} bytes  crc {:#010x} {:<12} {:?}",
                    e.index,
                    e.source.to_string(),
                    e.dest.to_string(),
                    e.size,
                    e.checksum,
                    crc,
                    e.kind
                );
            }
        }
        let _ = writeln!(
            out,
            "entries: {} crc ok, {} unchecked, {} mismatched",
            self.crc_ok, self.crc_unchecked, self.crc_mismatch
        );
        match (&self.problem, &self.plan) {
            (Some(p), _) => {
                let _ = writeln!(out, "INVALID: {p}");
            }
            (None, Some(p)) => {
                let _ = writeln!(
                    out,
                    "valid; restore writes {} blocks in {} extents (block 0 from block {}), \
                     mode {:?}",
                    p.blocks, p.extents, p.block0_source, p.mode
                );
            }
            (None, None) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::restore::synth::LogWriter;
    use crate::units::BlockSize;

    fn produced() -> MemDevice {
        let dev = MemDevice::from_bytes(vec![0x11; 128 * 512]);
        let mut w =
            LogWriter::start(&dev, BlockSize::B512, &(40..120).collect::<Vec<_>>()).unwrap();
        for b in 1..30 {
            w.write(b, &[0x22; 512]).unwrap();
        }
        w.write(41, &[0x33; 512]).unwrap(); // the block-0 backup is reused: moved
        let s0 = w.sector0_block();
        w.write(s0, &[0x44; 512]).unwrap(); // SECTOR0_CURRENT reused: relocated
        dev
    }

    #[test]
    fn reports_chain_kinds_and_plan() {
        let dev = produced();
        let r = inspect(&dev).unwrap();
        assert!(r.problem.is_none(), "{:?}", r.problem);
        assert_eq!(r.sectors.len(), 2, "29 backups + 1 roll over a 20-entry sector");
        let kinds: Vec<EntryKind> =
            r.sectors.iter().flat_map(|s| s.entries.iter().map(|e| e.kind)).collect();
        for k in [
            EntryKind::OriginalBlock0,
            EntryKind::PreviousLogSector,
            EntryKind::Sector0Relocation,
            EntryKind::MovedBackup,
            EntryKind::Backup,
        ] {
            assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
        }
        assert_eq!(r.crc_mismatch, 0);
        assert!(r.plan.as_ref().unwrap().blocks >= 30);
        let text = r.render_text();
        assert!(text.contains("log sector 1 (block 0"), "{text}");
        assert!(text.contains("valid; restore writes"), "{text}");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"MovedBackup\""));
    }

    #[test]
    fn reports_mismatches_and_keeps_going() {
        let dev = produced();
        // Damage the backup of block 5 (entry 5 of sequence 0 saved it at block 46).
        dev.write_at(&[0xFF], 46 * 512).unwrap();
        let r = inspect(&dev).unwrap();
        assert_eq!(r.crc_mismatch, 1);
        assert!(matches!(r.problem, Some(CorruptLog::Checksum { .. })));
        assert!(r.plan.is_none());
        assert!(r.render_text().contains("MISMATCH"));
        assert_eq!(r.sectors.len(), 2, "the walk went on to sequence 0");
    }

    #[test]
    fn no_log() {
        let r = inspect(&MemDevice::new(4096)).unwrap();
        assert!(r.header.is_none());
        assert!(r.render_text().starts_with("no dm-bow log"));
    }
}
