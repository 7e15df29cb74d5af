//! The converter from dm-log-writes captures to the compact trace.
//!
//! Parsing the log itself is the job of blockdev's `logwrites::LogReader` (it reads a log device or
//! file through `Read + Seek`, and lives in the OS crate); this crate stays free of it and of
//! OS calls by taking the parsed entries as [`LogWritesEntry`] values, which carry exactly the
//! fields of the kernel's `struct log_write_entry` that matter here. A caller maps each
//! `logwrites::LogEntry` of blockdev field by field (`estimate/tests/logwrites_fixture.rs` does
//! it for the captured fixture).
//!
//! Mapping (flags as in the kernel's `drivers/md/dm-log-writes.c`):
//!
//! | entry | record |
//! |---|---|
//! | `LOG_MARK_FLAG` | none; a mark can delimit the part converted |
//! | `LOG_DISCARD_FLAG` | `Discard` |
//! | data (`nr_sectors` > 0) | `Write`, with `fua` from `LOG_FUA_FLAG` and `preflush` from `LOG_FLUSH_FLAG` |
//! | empty with `LOG_FLUSH_FLAG` | `Flush` |
//!
//! `LOG_METADATA_FLAG` is dropped (it does not change what the block device does). An empty
//! entry that is neither a flush nor a mark, a flag bit the kernel does not define, and an
//! extent past the device's end are refused.

use bow::units::{Sectors, SECTOR_SIZE};

use crate::error::EstimateError;
use crate::trace::{Record, Trace};

/// The kernel's `LOG_*_FLAG` bits (same values as blockdev's `logwrites::flags`).
pub mod flags {
    /// `LOG_FLUSH_FLAG`: a cache flush (`REQ_PREFLUSH`).
    pub const FLUSH: u64 = 1 << 0;
    /// `LOG_FUA_FLAG`: a forced-unit-access write.
    pub const FUA: u64 = 1 << 1;
    /// `LOG_DISCARD_FLAG`: a discard.
    pub const DISCARD: u64 = 1 << 2;
    /// `LOG_MARK_FLAG`: a userspace mark.
    pub const MARK: u64 = 1 << 3;
    /// `LOG_METADATA_FLAG`: a metadata write (`REQ_META`).
    pub const METADATA: u64 = 1 << 4;
    /// Every bit the kernel defines.
    pub const ALL: u64 = FLUSH | FUA | DISCARD | MARK | METADATA;
}

/// One parsed dm-log-writes entry (`struct log_write_entry` plus its position and label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWritesEntry {
    /// Position in the log (0-based), for error messages.
    pub index: u64,
    /// First sector, in units of the log's sector size.
    pub sector: u64,
    /// Sectors written or discarded, in the same unit.
    pub nr_sectors: u64,
    /// `LOG_*_FLAG` bits.
    pub flags: u64,
    /// A mark's label.
    pub mark: Option<String>,
}

/// What to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Size of the traced device in bytes (dm-log-writes does not record it).
    pub device_size: u64,
    /// Convert only the entries after this mark (e.g. the start of the update's part).
    pub start_after_mark: Option<String>,
    /// Stop before this mark (e.g. the end of the update's part).
    pub stop_at_mark: Option<String>,
}

impl ConvertOptions {
    /// The whole log of a device of `device_size` bytes.
    pub fn whole_log(device_size: u64) -> ConvertOptions {
        ConvertOptions { device_size, start_after_mark: None, stop_at_mark: None }
    }
}

/// Converts the entries of a log whose super block gives `sector_size` (the data device's
/// logical block size, a power of two from 512 to 65536) into a trace.
pub fn from_log_writes(
    sector_size: u32,
    entries: impl IntoIterator<Item = LogWritesEntry>,
    options: &ConvertOptions,
) -> Result<Trace, EstimateError> {
    let mut trace = Trace::new(options.device_size, sector_size)?;
    let scale = u64::from(sector_size) / SECTOR_SIZE;
    let mut started = options.start_after_mark.is_none();
    let mut stopped = false;
    for e in entries {
        let bad = |what| EstimateError::BadLogEntry { index: e.index, what };
        if e.flags & !flags::ALL != 0 {
            return Err(bad("unknown flag bits"));
        }
        if e.flags & flags::MARK != 0 {
            let label = e.mark.as_deref();
            if started && label.is_some() && label == options.stop_at_mark.as_deref() {
                stopped = true;
                break;
            }
            if !started && label == options.start_after_mark.as_deref() {
                started = true;
            }
            continue;
        }
        let extent = || -> Result<(Sectors, Sectors), EstimateError> {
            let start = e.sector.checked_mul(scale).ok_or(bad("sector overflows"))?;
            let len = e.nr_sectors.checked_mul(scale).ok_or(bad("length overflows"))?;
            Ok((Sectors(start), Sectors(len)))
        };
        let record = if e.flags & flags::DISCARD != 0 {
            if e.nr_sectors == 0 {
                return Err(bad("empty discard"));
            }
            let (start, len) = extent()?;
            Record::Discard { start, len }
        } else if e.nr_sectors > 0 {
            let (start, len) = extent()?;
            Record::Write {
                start,
                len,
                fua: e.flags & flags::FUA != 0,
                preflush: e.flags & flags::FLUSH != 0,
            }
        } else if e.flags & flags::FLUSH != 0 {
            Record::Flush
        } else {
            return Err(bad("empty entry that is neither a flush nor a mark"));
        };
        if started {
            trace.push(record).map_err(|err| match err {
                EstimateError::BadRecord { what, .. } => bad(what),
                other => other,
            })?;
        }
    }
    if !started {
        return Err(EstimateError::MarkNotFound(
            options.start_after_mark.clone().unwrap_or_default(),
        ));
    }
    if let (Some(stop), false) = (&options.stop_at_mark, stopped) {
        return Err(EstimateError::MarkNotFound(stop.clone()));
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn entry(index: u64, sector: u64, nr: u64, fl: u64) -> LogWritesEntry {
        LogWritesEntry { index, sector, nr_sectors: nr, flags: fl, mark: None }
    }

    fn mark(index: u64, label: &str) -> LogWritesEntry {
        LogWritesEntry {
            index,
            sector: 0,
            nr_sectors: 0,
            flags: flags::MARK,
            mark: Some(label.into()),
        }
    }

    fn sample() -> Vec<LogWritesEntry> {
        vec![
            entry(0, 1, 2, 0),
            mark(1, "setup-done"),
            entry(2, 4, 1, flags::METADATA),
            entry(3, 0, 0, flags::FLUSH),
            entry(4, 8, 1, flags::FUA | flags::FLUSH),
            entry(5, 16, 4, flags::DISCARD),
            mark(6, "update-done"),
            entry(7, 30, 2, 0),
        ]
    }

    #[test]
    fn entries_map_to_records_in_4k_units() {
        let t = from_log_writes(4096, sample(), &ConvertOptions::whole_log(1 << 20)).unwrap();
        assert_eq!(t.block_size(), 4096);
        assert_eq!(
            t.records(),
            &[
                Record::write(8, 16),
                Record::write(32, 8),
                Record::Flush,
                Record::Write { start: Sectors(64), len: Sectors(8), fua: true, preflush: true },
                Record::discard(128, 32),
                Record::write(240, 16),
            ]
        );
    }

    #[test]
    fn marks_delimit_the_part_converted() {
        let opts = ConvertOptions {
            device_size: 1 << 20,
            start_after_mark: Some("setup-done".into()),
            stop_at_mark: Some("update-done".into()),
        };
        let t = from_log_writes(512, sample(), &opts).unwrap();
        assert_eq!(t.records().len(), 4);
        assert_eq!(t.records()[0], Record::write(4, 1));
        assert_eq!(t.records()[3], Record::discard(16, 4));

        let missing = ConvertOptions { stop_at_mark: Some("nope".into()), ..opts.clone() };
        let e = from_log_writes(512, sample(), &missing).unwrap_err();
        assert!(matches!(&e, EstimateError::MarkNotFound(m) if m == "nope"), "{e}");
        let missing = ConvertOptions { start_after_mark: Some("nope".into()), ..opts };
        assert!(matches!(
            from_log_writes(512, sample(), &missing),
            Err(EstimateError::MarkNotFound(_))
        ));
    }

    #[test]
    fn bad_entries_are_refused_with_their_index() {
        let opts = ConvertOptions::whole_log(1 << 20);
        let cases = [
            (entry(3, 0, 0, 0), "neither a flush nor a mark"),
            (entry(3, 0, 0, flags::DISCARD), "empty discard"),
            (entry(3, 0, 1, 1 << 7), "unknown flag bits"),
            (entry(3, 2047, 2, 0), "past the end of the device"),
            (entry(3, u64::MAX, 1, 0), "overflows"),
        ];
        for (e, want) in cases {
            let err = from_log_writes(512, [e], &opts).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            let text = err.to_string();
            assert!(text.contains("entry 3") && text.contains(want), "{text}");
        }
    }

    /// The flags are the kernel's ABI, written out again here so this pure crate need not depend
    /// on the OS crate's reader; this keeps the two copies equal.
    #[test]
    fn flags_are_the_same_as_blockdevs_reader() {
        use blockdev::logwrites::flags as reader;
        assert_eq!(
            [flags::FLUSH, flags::FUA, flags::DISCARD, flags::MARK, flags::METADATA],
            [reader::FLUSH, reader::FUA, reader::DISCARD, reader::MARK, reader::METADATA]
        );
    }

    #[test]
    fn a_device_size_off_the_sector_size_is_refused() {
        let e = from_log_writes(4096, sample(), &ConvertOptions::whole_log(5000)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }
}
