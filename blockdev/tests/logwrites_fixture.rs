//! The log reader on a log captured from a real kernel (Debian 6.1, dm-log-writes 1.1.0) by
//! `vm_dm`'s raw workload: four 4 KiB O_DIRECT writes, fsync, mark `raw-1`, two writes, fsync,
//! mark `raw-2`, then device removal (the kernel adds `dm-log-writes-end`).

use std::io::Cursor;

use blockdev::logwrites::{self, flags, LogReader, LogSuper, ReplayUntil};

const SAMPLE: &[u8] = include_bytes!("fixtures/logwrites-raw.bin");

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096).map(|i| seed ^ u8::try_from(i % 251).unwrap()).collect()
}

#[test]
fn captured_log_decodes_to_the_workload() {
    let mut r = LogReader::new(Cursor::new(SAMPLE)).unwrap();
    assert_eq!(r.super_block(), LogSuper { nr_entries: 11, sector_size: 512 });
    let entries = r.entries().unwrap();
    let writes: Vec<_> = entries.iter().filter(|e| e.is_data_write()).collect();
    assert_eq!(writes.len(), 6);
    for (i, w) in writes.iter().enumerate() {
        let i = u8::try_from(i).unwrap();
        assert_eq!(w.sector, u64::from(i) * 128, "written at i * 64 KiB");
        assert_eq!(w.nr_sectors, 8);
        assert_eq!(r.read_data(w).unwrap(), pattern(i));
    }
    let flushes: Vec<u64> = entries.iter().filter(|e| e.is_flush()).map(|e| e.index).collect();
    assert_eq!(flushes, vec![4, 8]);
    assert!(entries.iter().filter(|e| e.is_flush()).all(|e| e.nr_sectors == 0));
    let marks: Vec<(u64, &str)> =
        entries.iter().filter_map(|e| e.mark.as_deref().map(|m| (e.index, m))).collect();
    assert_eq!(marks, vec![(5, "raw-1"), (9, "raw-2"), (10, "dm-log-writes-end")]);
    assert!(entries.iter().all(|e| e.flags & (flags::DISCARD | flags::FUA) == 0));
    // The last header ends the used part of the log.
    assert_eq!(entries.last().unwrap().data_offset, u64::try_from(SAMPLE.len()).unwrap());
}

#[test]
fn captured_log_replays_up_to_a_mark() {
    let mut r = LogReader::new(Cursor::new(SAMPLE)).unwrap();
    let mut dev = Cursor::new(vec![0u8; 1 << 20]);
    let st = logwrites::replay(&mut r, &mut dev, ReplayUntil::Mark("raw-1")).unwrap();
    assert_eq!((st.applied, st.entries), (4, 6));
    let d = dev.into_inner();
    assert_eq!(&d[3 * 65536..3 * 65536 + 4096], &pattern(3)[..]);
    assert!(d[4 * 65536..4 * 65536 + 4096].iter().all(|&b| b == 0), "after the mark");
}
