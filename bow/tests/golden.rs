//! Golden tests: the model must leave the kernel's bytes on disk, in the kernel's order.
//!
//! The first test is dm-bow-format.md §9 step by step. The others are derived by hand from the
//! kernel's algorithm (§2–§5); each derivation is written next to its expectations.

use bow::crashdev::{CrashDevice, IoEvent};
use bow::crc::bow_crc;
use bow::device::{BlockDevice, MemDevice};
use bow::format::{LogEntry, LogHeader, LogSector};
use bow::model::{
    BlkStatus, BowEngine, BowModel, BowState, DiscardAction, EngineError, EngineErrorKind,
    ModelConfig, PieceAction, ReadAction, StateChange, WriteAction,
};
use bow::units::{BlockSize, Sectors};

const KIB4: usize = 4096;

/// Pattern for "original" block `b` when nothing more specific is needed.
fn pattern(b: usize) -> u8 {
    u8::try_from(b % 251).unwrap() ^ 0x80
}

fn image(blocks: usize, bs: usize) -> Vec<u8> {
    let mut img = vec![0u8; blocks * bs];
    for b in 0..blocks {
        img[b * bs..(b + 1) * bs].fill(pattern(b));
    }
    img
}

fn block(dev: &impl BlockDevice, b: u64, bs: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bs];
    dev.read_at(&mut buf, b * bs as u64).unwrap();
    buf
}

fn model(img: Vec<u8>, bs: BlockSize) -> BowModel<CrashDevice> {
    let unit = bs.as_usize();
    BowModel::new(CrashDevice::new(img, unit), ModelConfig::new(bs))
}

/// Writes and flushes since event `from`, as (W block | F), reads dropped.
fn trace(dev: &CrashDevice, from: usize, bs: u64) -> (Vec<String>, usize) {
    let ev = dev.events_without_reads();
    let out = ev[from..]
        .iter()
        .map(|e| match e {
            IoEvent::Write { offset, len } => {
                format!("W{}x{}", offset / bs, *len as u64 / bs)
            }
            IoEvent::Flush => "F".to_string(),
            IoEvent::Read { .. } => unreachable!(),
        })
        .collect();
    (out, ev.len())
}

fn status(m: &BowModel<CrashDevice>) -> String {
    m.table_status()
}

// ---------------------------------------------------------------------------------------------
// dm-bow-format.md §9
// ---------------------------------------------------------------------------------------------

const WORKED_BLOCK0_HEAD: [u8; 0x4C] = [
    0x42, 0x4f, 0x57, 0x00, 0x00, 0x01, 0x1c, 0x00, 0x00, 0x10, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x58, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,
    0x2d, 0xb8, 0xa0, 0x92, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x60, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x66, 0x4e, 0xce, 0x8c,
];

#[test]
fn worked_example_section_9_step_by_step() {
    let bs = BlockSize::B4096;
    let mut img = image(256, KIB4);
    img[..KIB4].fill(0xAA);
    img[3 * KIB4..4 * KIB4].fill(0x33);
    let orig = img.clone();
    let mut m = model(img, bs);

    // Step 1: trim blocks 10–99 in state 0 (sector 80, 368 640 bytes).
    assert_eq!(m.discard(Sectors(80), 368_640).unwrap(), DiscardAction::RecordedAsFree);
    assert_eq!(status(&m), "Unchanged: 0\nFree: 80\nUnchanged: 800\nTop: 2048\n");
    assert_eq!(m.free_bytes(), 368_640);
    assert_eq!(m.device().current(), orig, "a discard in TRIM is not sent down");
    let (_, mark) = trace(m.device(), 0, 4096);
    assert_eq!(mark, 0);

    // Step 2: state 1 (prepare_log).
    let change = m.set_state(BowState::Checkpoint).unwrap();
    assert_eq!(
        change,
        StateChange::CheckpointStarted { sector0: Sectors(80), backup: Sectors(88) }
    );
    let (t, mark) = trace(m.device(), mark, 4096);
    // 1. blk 0 -> blk 10, FLUSH; 2. blk 0 -> blk 11, FLUSH; 3. log -> blk 0, FLUSH.
    assert_eq!(t, ["W10x1", "F", "W11x1", "F", "W0x1", "F"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 8\nSector0_current: 80\nBackup: 88\nFree: 96\nUnchanged: 800\n\
         Top: 2048\n"
    );
    assert_eq!(m.free_bytes(), 368_640, "accounting quirk: carved blocks are not subtracted");
    let log = LogSector::parse(&block(m.device(), 0, KIB4)).unwrap();
    assert_eq!(log.header, LogHeader { count: 1, ..LogHeader::new(bs, 0, Sectors(80)) });
    assert_eq!(
        log.entries,
        [LogEntry { source: Sectors(0), dest: Sectors(88), size: 4096, checksum: 0x92A0_B82D }]
    );

    // Step 3: write block 3 (UNCHANGED).
    let new3 = vec![0x5C; KIB4];
    let w = m.write(Sectors(24), &new3).unwrap();
    let WriteAction::Checkpointed { pieces, sector0_to: None } = w else { panic!("{w:?}") };
    assert_eq!(pieces.len(), 1);
    assert_eq!(
        pieces[0].action,
        PieceAction::BackedUp {
            was: bow::model::RangeType::Unchanged,
            entry: LogEntry {
                source: Sectors(24),
                dest: Sectors(96),
                size: 4096,
                checksum: 0x8CCE_4E66
            },
            rolled_over: false,
        }
    );
    let (t, mark) = trace(m.device(), mark, 4096);
    // 4. blk 3 -> blk 12, FLUSH; 5. log -> blk 0, FLUSH; 6. the user's write (no flush).
    assert_eq!(t, ["W12x1", "F", "W0x1", "F", "W3x1"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 8\nChanged: 24\nUnchanged: 32\nSector0_current: 80\n\
         Backup: 88\nFree: 104\nUnchanged: 800\nTop: 2048\n"
    );
    assert_eq!(m.free_bytes(), 364_544);

    // Step 4: write block 50 (TRIMMED): no copy, no log entry.
    let new50 = vec![0x50; KIB4];
    let w = m.write(Sectors(400), &new50).unwrap();
    let WriteAction::Checkpointed { pieces, .. } = w else { panic!("{w:?}") };
    assert_eq!(pieces[0].action, PieceAction::FreeClaimed);
    let (t, _) = trace(m.device(), mark, 4096);
    assert_eq!(t, ["W50x1"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 8\nChanged: 24\nUnchanged: 32\nSector0_current: 80\n\
         Backup: 88\nFree: 104\nChanged: 400\nFree: 408\nUnchanged: 800\nTop: 2048\n"
    );
    assert_eq!(m.free_bytes(), 364_544, "quirk: a piece carved from the middle is not subtracted");
    assert_eq!(m.true_free_bytes(), 352_256);
    // The leading part (blocks 13–49) was pushed on the head of the trimmed list.
    let list: Vec<u64> = m.trimmed_list().iter().map(|r| r.start).collect();
    assert_eq!(list, [104, 408]);

    // Final on-disk state.
    let dev = m.device();
    let b0 = block(dev, 0, KIB4);
    assert_eq!(&b0[..0x4C], &WORKED_BLOCK0_HEAD);
    assert!(b0[0x4C..].iter().all(|&x| x == 0));
    assert_eq!(block(dev, 10, KIB4), vec![0xAA; KIB4], "SECTOR0_CURRENT");
    assert_eq!(block(dev, 11, KIB4), vec![0xAA; KIB4], "original block 0");
    assert_eq!(block(dev, 12, KIB4), vec![0x33; KIB4], "original block 3");
    assert_eq!(block(dev, 3, KIB4), new3);
    assert_eq!(block(dev, 50, KIB4), new50);
    for b in (1..3).chain(4..10).chain(13..50).chain(51..256) {
        assert_eq!(block(dev, b, KIB4), orig[b as usize * KIB4..][..KIB4], "block {b}");
    }

    // Reads through dm-bow: logical block 0 -> physical 10.
    let mut buf = vec![0u8; KIB4];
    assert_eq!(
        m.read(Sectors(0), &mut buf).unwrap(),
        ReadAction::Sector0Redirected { from: Sectors(80) }
    );
    assert_eq!(buf, vec![0xAA; KIB4]);

    // Commit: read blk 10 -> write blk 0, FLUSH.
    let mark = m.device().events_without_reads().len();
    assert_eq!(
        m.set_state(BowState::Committed).unwrap(),
        StateChange::Committed { from: Sectors(80) }
    );
    let (t, _) = trace(m.device(), mark, 4096);
    assert_eq!(t, ["W0x1", "F"]);
    assert_eq!(block(m.device(), 0, KIB4), vec![0xAA; KIB4], "commit bytes: live block 0");
    assert!(LogSector::parse(&block(m.device(), 0, KIB4)).is_err());
}
