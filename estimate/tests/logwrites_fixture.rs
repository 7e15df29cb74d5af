//! The converter on the dm-log-writes log captured from a real kernel (blockdev's fixture,
//! `blockdev/tests/logwrites_fixture.rs`: four 4 KiB O_DIRECT writes at i × 64 KiB, fsync, mark
//! `raw-1`, two writes, fsync, mark `raw-2`, device removal), parsed by blockdev's reader.

use std::io::Cursor;

use blockdev::logwrites::LogReader;
use checkpoint_estimate::logwrites::{from_log_writes, ConvertOptions, LogWritesEntry};
use checkpoint_estimate::{
    estimate, Backend, Basis, EstimateConfig, EstimateInput, FreeExtent, FreeSpace, Margin, Record,
    Trace,
};

const SAMPLE: &[u8] = include_bytes!("../../blockdev/tests/fixtures/logwrites-raw.bin");
/// The captured device: the workload writes its first 384 KiB; 1 MiB is what the fixture's
/// replay test uses.
const DEVICE: u64 = 1 << 20;

fn entries() -> (u32, Vec<LogWritesEntry>) {
    let mut r = LogReader::new(Cursor::new(SAMPLE)).unwrap();
    let sector_size = r.super_block().sector_size;
    let entries = r
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| LogWritesEntry {
            index: e.index,
            sector: e.sector,
            nr_sectors: e.nr_sectors,
            flags: e.flags,
            mark: e.mark,
        })
        .collect();
    (sector_size, entries)
}

#[test]
fn captured_log_converts_to_the_workload() {
    let (sector_size, entries) = entries();
    let trace = from_log_writes(sector_size, entries, &ConvertOptions::whole_log(DEVICE)).unwrap();
    assert_eq!(trace.block_size(), 512);
    let mut want: Vec<Record> = (0..4).map(|i| Record::write(i * 128, 8)).collect();
    want.push(Record::Flush);
    want.extend((4..6).map(|i| Record::write(i * 128, 8)));
    want.push(Record::Flush);
    assert_eq!(trace.records(), &want[..]);
    assert_eq!(trace.written_bytes(), 6 * 4096);

    // The compact trace is a fraction of the capture and reads back the same.
    let bytes = trace.to_bytes();
    assert!(bytes.len() < 100, "{} bytes", bytes.len());
    assert!(SAMPLE.len() > 6 * 4096);
    assert_eq!(Trace::read_from(&bytes[..]).unwrap(), trace);
}

#[test]
fn captured_log_between_marks() {
    let (sector_size, entries) = entries();
    let opts = ConvertOptions {
        device_size: DEVICE,
        start_after_mark: Some("raw-1".into()),
        stop_at_mark: Some("raw-2".into()),
    };
    let trace = from_log_writes(sector_size, entries, &opts).unwrap();
    assert_eq!(
        trace.records(),
        &[Record::write(4 * 128, 8), Record::write(5 * 128, 8), Record::Flush]
    );
}

#[test]
fn captured_log_for_a_smaller_device_is_refused() {
    let (sector_size, entries) = entries();
    // The last write ends at 5 × 64 KiB + 4 KiB.
    let e =
        from_log_writes(sector_size, entries, &ConvertOptions::whole_log(320 * 1024)).unwrap_err();
    assert!(e.to_string().contains("past the end of the device"), "{e}");
}

/// End to end: capture → trace bytes → estimate. The six writes land on in-use blocks for
/// dm-bow (free space elsewhere) and on six distinct 4 KiB chunks for dm-snapshot. dm-bow backs
/// up five: the write to block 0 goes to SECTOR0_CURRENT, whose original `prepare_log` saved.
#[test]
fn captured_log_estimates() {
    let (sector_size, entries) = entries();
    let trace = from_log_writes(sector_size, entries, &ConvertOptions::whole_log(DEVICE)).unwrap();
    let trace = Trace::read_from(&trace.to_bytes()[..]).unwrap();
    let free = FreeSpace::Map(vec![FreeExtent { offset: 512 * 1024, len: 512 * 1024 }]);
    let config =
        EstimateConfig { margin: Margin { percent: 0, floor_bytes: 0 }, ..Default::default() };
    let input = EstimateInput {
        backend: Backend::Bow,
        device_size: DEVICE,
        block_size: 4096,
        free: &free,
        history: &[],
        trace: Some(&trace),
        declared_bytes: &[],
    };
    let bow = estimate(&input, &config).unwrap();
    assert_eq!(bow.basis, Basis::Trace);
    assert_eq!(bow.breakdown.data_bytes, 5 * 4096);
    assert_eq!(bow.bow.unwrap().backup_entries, 5);
    assert_eq!(bow.breakdown.overhead_bytes, 2 * 4096);
    let snap = estimate(&EstimateInput { backend: Backend::Snapshot, ..input }, &config).unwrap();
    assert_eq!(snap.breakdown.data_bytes, 6 * 4096);
    assert_eq!(snap.breakdown.overhead_bytes, 2 * 4096, "header and area 0");
}
