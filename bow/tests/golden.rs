//! Golden tests: the model must leave the kernel's bytes on disk, in the kernel's order.
//!
//! The first test is dm-bow-format.md §9 step by step. The others are derived by hand from the
//! kernel's algorithm (§2–§5); each derivation is written next to its expectations.

// Test devices are a few hundred KiB: index casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use bow::crashdev::{CrashDevice, IoEvent};
use bow::crc::bow_crc;
use bow::device::BlockDevice;
use bow::format::{LogEntry, LogHeader, LogSector};
use bow::model::{
    BlkStatus, BowEngine, BowModel, BowState, BufioModel, DiscardAction, EngineError,
    EngineErrorKind, ModelConfig, PieceAction, ReadAction, StateChange, WriteAction,
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

/// The §9 device after steps 1–3 (trim 10–99, state 1, write block 3), with the trace mark.
fn worked_after_step3(bufio: BufioModel) -> (BowModel<CrashDevice>, Vec<u8>) {
    let mut img = image(256, KIB4);
    img[..KIB4].fill(0xAA);
    img[3 * KIB4..4 * KIB4].fill(0x33);
    let orig = img.clone();
    let cfg = ModelConfig { bufio, ..ModelConfig::new(BlockSize::B4096) };
    let mut m = BowModel::new(CrashDevice::new(img, KIB4), cfg);
    m.discard(Sectors(80), 368_640).unwrap();
    m.set_state(BowState::Checkpoint).unwrap();
    m.write(Sectors(24), &[0x5C; KIB4]).unwrap();
    (m, orig)
}

fn entries_on_disk(dev: &CrashDevice, bs: usize) -> LogSector {
    LogSector::parse(&block(dev, 0, bs)).unwrap()
}

/// Write to a BACKUP block (the filesystem reuses block 12, which holds block 3's backup).
///
/// Derivation (§3.4 "write colliding with a BACKUP block", `prepare_unchanged_range`): the piece
/// [96,104) lies in `Backup 88` (blocks 11–12). Head free range `Free 104` is carved from its
/// start: block 13 ([104,112), a fresh node; the original moves to 112). The source split makes
/// a leading copy `Backup 88` (block 11) and the original node becomes [96,104). Block 12 is
/// copied to 13 with the CRC seeded 12 (the BACKUP block's own index); entry 2 =
/// {96, 104, 4096, crc(12, 0x33…)}; `trims_total` −= 4096; [96,104) becomes CHANGED and merges
/// with neither neighbour (Backup 88, Backup 104). I/O: W13, F, W0, F, then the user write W12.
#[test]
fn write_to_backup_block_relocates_the_backup() {
    let (mut m, _) = worked_after_step3(BufioModel::Uncached);
    let mark = m.device().events_without_reads().len();
    m.write(Sectors(96), &[0x12; KIB4]).unwrap();
    let (t, _) = trace(m.device(), mark, 4096);
    assert_eq!(t, ["W13x1", "F", "W0x1", "F", "W12x1"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 8\nChanged: 24\nUnchanged: 32\nSector0_current: 80\n\
         Backup: 88\nChanged: 96\nBackup: 104\nFree: 112\nUnchanged: 800\nTop: 2048\n"
    );
    assert_eq!(m.free_bytes(), 364_544 - 4096);
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!(log.header.count, 3);
    assert_eq!(
        log.entries[2],
        LogEntry {
            source: Sectors(96),
            dest: Sectors(104),
            size: 4096,
            checksum: bow_crc(12, &[0x33; KIB4])
        }
    );
    assert_eq!(block(m.device(), 13, KIB4), vec![0x33; KIB4]);
    assert_eq!(block(m.device(), 12, KIB4), vec![0x12; KIB4]);
}

/// Write to the SECTOR0_CURRENT block (block 10) through its own address.
///
/// Derivation (§3.3 steps 4–6, §10.2): the piece [80,88) is the whole SECTOR0_CURRENT node, so
/// the node itself is the source. Block 13 is carved from `Free 104` and typed SECTOR0_CURRENT
/// (not BACKUP); the entry has checksum 0: {80, 104, 4096, 0}. The log is written while the
/// in-memory `sector0` is still 80 — only after the entry is durable does `sector0` become 104,
/// so the header on disk says 80 until the next log write (here: the write of block 4, whose
/// entry {32, 112, …} goes to block 14). Logical block 0 is then served from block 13, and the
/// commit copies block 13 onto block 0.
#[test]
fn write_to_sector0_current_relocates_it_with_checksum_zero() {
    let (mut m, _) = worked_after_step3(BufioModel::Uncached);
    let mark = m.device().events_without_reads().len();
    m.write(Sectors(80), &[0x10; KIB4]).unwrap();
    let (t, _) = trace(m.device(), mark, 4096);
    assert_eq!(t, ["W13x1", "F", "W0x1", "F", "W10x1"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 8\nChanged: 24\nUnchanged: 32\nChanged: 80\nBackup: 88\n\
         Sector0_current: 104\nFree: 112\nUnchanged: 800\nTop: 2048\n"
    );
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!(
        log.entries[2],
        LogEntry { source: Sectors(80), dest: Sectors(104), size: 4096, checksum: 0 }
    );
    assert_eq!(log.header.sector0, Sectors(80), "on-disk sector0 is stale (§10.2)");
    assert_eq!(m.header().sector0, Sectors(104), "in-memory sector0 moved");
    assert_eq!(block(m.device(), 13, KIB4), vec![0xAA; KIB4]);

    // Logical block 0 now lives in block 13.
    let mut buf = vec![0u8; KIB4];
    m.read(Sectors(0), &mut buf).unwrap();
    assert_eq!(buf, vec![0xAA; KIB4]);
    assert_eq!(
        m.write(Sectors(0), &[0x0B; KIB4]).unwrap(),
        WriteAction::Redirected { to: Sectors(104) }
    );
    assert_eq!(block(m.device(), 13, KIB4), vec![0x0B; KIB4]);

    // The next log write carries sector0 = 104 (0x68) to disk.
    m.write(Sectors(32), &[0x04; KIB4]).unwrap();
    let b0 = block(m.device(), 0, KIB4);
    assert_eq!(&b0[20..28], &[0x68, 0, 0, 0, 0, 0, 0, 0]);
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!(log.entries[3].dest, Sectors(112));

    // Commit bytes: block 13 (the live block 0) is copied onto block 0; the magic is gone.
    let mark = m.device().events_without_reads().len();
    assert_eq!(
        m.set_state(BowState::Committed).unwrap(),
        StateChange::Committed { from: Sectors(104) }
    );
    assert_eq!(trace(m.device(), mark, 4096).0, ["W0x1", "F"]);
    assert_eq!(block(m.device(), 0, KIB4), vec![0x0B; KIB4]);
}

/// §10.1 (the one deliberate choice): with bufio modelled as never evicting, a relocation of
/// SECTOR0_CURRENT copies the contents bufio cached at checkpoint start, not the block's
/// current contents; uncached (the default) copies what is on disk.
#[test]
fn sector0_current_relocation_with_stale_bufio_copies_checkpoint_start_contents() {
    for (bufio, expect) in [(BufioModel::Uncached, 0x0B), (BufioModel::NeverEvict, 0xAA)] {
        let (mut m, _) = worked_after_step3(bufio);
        m.write(Sectors(0), &[0x0B; KIB4]).unwrap(); // logical block 0 -> block 10
        assert_eq!(block(m.device(), 10, KIB4), vec![0x0B; KIB4]);
        m.write(Sectors(80), &[0x10; KIB4]).unwrap(); // relocate SECTOR0_CURRENT to block 13
        assert_eq!(block(m.device(), 13, KIB4), vec![expect; KIB4], "{bufio:?}");
    }
}

/// A write to sector 0 larger than one block (§3.4, `handle_sector0`).
///
/// Derivation: after state 1 of §9 (`Sector0 0, Unchanged 8, Sector0_current 80, Backup 88,
/// Free 96, …`), a two-block write at sector 0: the first block is chained straight to
/// SECTOR0_CURRENT (block 10) before anything else; the rest ([8,16), block 1, UNCHANGED) goes
/// through the worker: block 12 carved from `Free 96`, copy with seed 1, entry {8, 96, 4096,
/// crc(1, …)}; the new BACKUP merges into `Backup 88`; [8,16) is a fresh node (inside
/// `Unchanged 8`) and becomes CHANGED. I/O: W10 (user), W12, F, W0, F, W1 (user).
#[test]
fn write_to_sector0_larger_than_a_block_splits_off_the_first_block() {
    let mut img = image(256, KIB4);
    img[..KIB4].fill(0xAA);
    let orig = img.clone();
    let mut m = model(img, BlockSize::B4096);
    m.discard(Sectors(80), 368_640).unwrap();
    m.set_state(BowState::Checkpoint).unwrap();
    let mark = m.device().events_without_reads().len();
    let mut data = vec![0xB0; 2 * KIB4];
    data[KIB4..].fill(0xB1);
    let w = m.write(Sectors(0), &data).unwrap();
    let WriteAction::Checkpointed { pieces, sector0_to: Some(Sectors(80)) } = w else {
        panic!("{w:?}")
    };
    assert_eq!(pieces.len(), 1);
    assert_eq!(trace(m.device(), mark, 4096).0, ["W10x1", "W12x1", "F", "W0x1", "F", "W1x1"]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nChanged: 8\nUnchanged: 16\nSector0_current: 80\nBackup: 88\nFree: 104\n\
         Unchanged: 800\nTop: 2048\n"
    );
    assert_eq!(m.free_bytes(), 368_640 - 4096);
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!(
        log.entries[1],
        LogEntry {
            source: Sectors(8),
            dest: Sectors(96),
            size: 4096,
            checksum: bow_crc(1, &orig[KIB4..2 * KIB4])
        }
    );
    assert_eq!(block(m.device(), 10, KIB4), vec![0xB0; KIB4]);
    assert_eq!(block(m.device(), 1, KIB4), vec![0xB1; KIB4]);
    assert_eq!(block(m.device(), 12, KIB4), orig[KIB4..2 * KIB4]);
    let mut buf = vec![0u8; 2 * KIB4];
    m.read(Sectors(0), &mut buf).unwrap();
    assert_eq!(buf, data);
}

/// 512-byte blocks and a log rollover (§4.3: 20 entries per 512-byte log sector; §4.5).
///
/// Derivation: 64 blocks (= 64 sectors). Trim [32,64). State 1: SECTOR0_CURRENT = block 32,
/// block 0's backup = block 33 (entry 0 of sequence 0), free from 34. Writes of blocks 1..=19
/// one at a time: block k is backed up to block 33+k, entries 1..=19, count 20 = full. The
/// write of block 20: its backup goes to block 53 first; adding its entry overflows
/// (28 + 24·21 = 532 > 512), so block 0 (sequence 0, count 20) is copied to block 54 with
/// seed 0, and block 0 is rewritten as {seq 1, count 1, e0 = {0, 54, 512, crc}}, then with
/// count 2, e1 = {20, 53, 512, crc(20, …)}. Entries 2..=19 of the buffer keep sequence 0's
/// values (stale tail), the last 4 bytes (508..512) stay zero. I/O for that write: W53, F, W54,
/// F, W0, F, W0, F, W20. `free`: 16384 − 20 × 512 (backups are subtracted; block 54 was carved
/// from inside `Free 54`, so it is not) = 6144, while 9 blocks (4608 bytes) are really free.
#[test]
fn block_size_512_log_rollover() {
    let bs = BlockSize::B512;
    let orig = image(64, 512);
    let mut m = model(orig.clone(), bs);
    m.discard(Sectors(32), 32 * 512).unwrap();
    assert_eq!(m.free_bytes(), 16_384);
    m.set_state(BowState::Checkpoint).unwrap();
    assert_eq!(
        status(&m),
        "Sector0: 0\nUnchanged: 1\nSector0_current: 32\nBackup: 33\nFree: 34\nTop: 64\n"
    );
    let c0 = bow_crc(0, &orig[..512]);
    for k in 1..20u64 {
        m.write(Sectors(k), &[0xC0 | k as u8; 512]).unwrap();
    }
    let seq0 = block(m.device(), 0, 512);
    let log0 = LogSector::parse(&seq0).unwrap();
    assert_eq!((log0.header.sequence, log0.header.count), (0, 20));
    assert_eq!(
        log0.entries[0],
        LogEntry { source: Sectors(0), dest: Sectors(33), size: 512, checksum: c0 }
    );
    for k in 1..20u64 {
        let src = &orig[k as usize * 512..][..512];
        assert_eq!(
            log0.entries[k as usize],
            LogEntry {
                source: Sectors(k),
                dest: Sectors(33 + k),
                size: 512,
                checksum: bow_crc(u32::try_from(k).unwrap(), src)
            }
        );
    }
    assert_eq!(&seq0[508..], &[0, 0, 0, 0]);

    let mark = m.device().events_without_reads().len();
    let w = m.write(Sectors(20), &[0xD4; 512]).unwrap();
    let WriteAction::Checkpointed { pieces, .. } = w else { panic!("{w:?}") };
    assert!(matches!(pieces[0].action, PieceAction::BackedUp { rolled_over: true, .. }));
    assert_eq!(
        trace(m.device(), mark, 512).0,
        ["W53x1", "F", "W54x1", "F", "W0x1", "F", "W0x1", "F", "W20x1"]
    );
    // Block 54 holds sequence 0 as it was.
    assert_eq!(block(m.device(), 54, 512), seq0);
    let b0 = block(m.device(), 0, 512);
    // Header: magic, 1.0, 28, 512, count 2, sequence 1, sector0 32.
    assert_eq!(
        &b0[..28],
        &[
            0x42, 0x4f, 0x57, 0, 0, 1, 28, 0, 0, 2, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 32, 0, 0, 0, 0,
            0, 0, 0
        ]
    );
    let log1 = LogSector::parse(&b0).unwrap();
    assert_eq!(
        log1.entries,
        [
            LogEntry {
                source: Sectors(0),
                dest: Sectors(54),
                size: 512,
                checksum: bow_crc(0, &seq0)
            },
            LogEntry {
                source: Sectors(20),
                dest: Sectors(53),
                size: 512,
                checksum: bow_crc(20, &orig[20 * 512..21 * 512])
            },
        ]
    );
    // The stale tail: entries 2..=19 of sequence 0, then four zero bytes.
    assert_eq!(&b0[28 + 2 * 24..508], &seq0[28 + 2 * 24..508]);
    assert_eq!(&b0[508..], &[0, 0, 0, 0]);
    assert_eq!(
        status(&m),
        "Sector0: 0\nChanged: 1\nUnchanged: 21\nSector0_current: 32\nBackup: 33\nFree: 55\n\
         Top: 64\n"
    );
    assert_eq!(m.free_bytes(), 6144);
    assert_eq!(m.true_free_bytes(), 4608);
    assert_eq!(m.log_sectors(), 2);
}

/// ENOSPC in the middle of a write (§3.4 "No free space").
///
/// Derivation: 16 blocks of 4 KiB; trim blocks 12–15. State 1 takes 12 (SECTOR0_CURRENT) and
/// 13 (backup of block 0); `Free 112` = blocks 14–15 remains, `free` still 16384. A 3-block
/// write of blocks 1–3: the first piece [8,32) is clipped to the head free range's size (2
/// blocks): the whole free node becomes the backup (unlinked; merges into `Backup 104`), blocks
/// 1–2 are copied to 14–15 with one CRC seeded 1 carried over both, entry {8, 112, 8192, crc};
/// `free` −= 8192. The second piece (block 3) finds the trimmed list empty: BLK_STS_NOSPC. The
/// first piece stays logged; the user write is never submitted.
#[test]
fn enospc_keeps_earlier_pieces_logged_and_drops_the_write() {
    let orig = image(16, KIB4);
    let mut m = model(orig.clone(), BlockSize::B4096);
    m.discard(Sectors(96), 4 * 4096).unwrap();
    m.set_state(BowState::Checkpoint).unwrap();
    assert_eq!(m.free_bytes(), 16_384);
    let mark = m.device().events_without_reads().len();
    let err = m.write(Sectors(8), &vec![0xEE; 3 * KIB4]).unwrap_err();
    assert_eq!(err.kind(), EngineErrorKind::NoSpace);
    let EngineError::Bio { status: BlkStatus::NoSpace, progress, sector, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(sector, 24);
    assert_eq!(progress.pieces.len(), 1);
    assert!(!progress.sector0_written);
    assert_eq!(trace(m.device(), mark, 4096).0, ["W14x1", "W15x1", "F", "W0x1", "F"]);
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!(
        log.entries[1],
        LogEntry {
            source: Sectors(8),
            dest: Sectors(112),
            size: 8192,
            checksum: bow_crc(1, &orig[KIB4..3 * KIB4])
        }
    );
    assert_eq!(
        status(&m),
        "Sector0: 0\nChanged: 8\nUnchanged: 24\nSector0_current: 96\nBackup: 104\nTop: 128\n"
    );
    assert_eq!(m.free_bytes(), 8192, "over-reported: nothing is really free");
    assert_eq!(m.true_free_bytes(), 0);
    for b in 1..4u64 {
        assert_eq!(block(m.device(), b, KIB4), orig[b as usize * KIB4..][..KIB4]);
    }
    // Writes into CHANGED space still pass.
    assert!(m.write(Sectors(8), &[1; KIB4]).is_ok());
}

/// ENOSPC when entering state 1 (§4.6 needs two free blocks), and the partial state it leaves:
/// block 0 is already SECTOR0, so writing `1` again fails with BLK_STS_IOERR.
#[test]
fn prepare_log_enospc_and_retry() {
    let mut m = model(image(16, KIB4), BlockSize::B4096);
    m.discard(Sectors(120), 4096).unwrap();
    let err = m.set_state(BowState::Checkpoint).unwrap_err();
    assert!(matches!(
        err,
        EngineError::StateChangeFailed { status: BlkStatus::NoSpace, to: BowState::Checkpoint, .. }
    ));
    assert_eq!(m.state(), BowState::Trim);
    let err = m.set_state(BowState::Checkpoint).unwrap_err();
    assert!(matches!(err, EngineError::StateChangeFailed { status: BlkStatus::IoError, .. }));
    assert!(matches!(
        m.set_state(BowState::Committed).unwrap_err(),
        EngineError::InvalidStateChange { from: BowState::Trim, to: BowState::Committed }
    ));
}

/// Rollover with no free block left (§3.3 step 5 failure, reproduced on purpose).
///
/// Derivation: 64 × 512-byte blocks, trim [40,62) (22 blocks). State 1 takes 40 and 41; blocks
/// 1..=19 are backed up to 42..=60 (count 20). Block 20's backup takes block 61, the last free
/// block (the whole node: unlinked and subtracted). The rollover then finds no free block:
/// NOSPC. The kernel restores the source's type to `original_type`, read *after* the split:
/// the piece [20,21) is the front of `Unchanged 20` (blocks 1–19 merged into `Changed 1`), and
/// a piece that does not reach the range end is a fresh INVALID node (the original node moves
/// to 21 and stays UNCHANGED). So block 20 is left INVALID and block 61 BACKUP with no entry; a
/// later write to block 20 hits the INVALID range: WARN and BLK_STS_IOERR.
#[test]
fn rollover_enospc_leaves_orphan_backup_and_invalid_range() {
    let orig = image(64, 512);
    let mut m = model(orig.clone(), BlockSize::B512);
    m.discard(Sectors(40), 22 * 512).unwrap();
    m.set_state(BowState::Checkpoint).unwrap();
    for k in 1..20u64 {
        m.write(Sectors(k), &[0x77; 512]).unwrap();
    }
    let err = m.write(Sectors(20), &[0x78; 512]).unwrap_err();
    assert_eq!(err.kind(), EngineErrorKind::NoSpace);
    assert_eq!(
        status(&m),
        "Sector0: 0\nChanged: 1\nInvalid: 20\nUnchanged: 21\nSector0_current: 40\nBackup: 41\n\
         Unchanged: 62\nTop: 64\n"
    );
    assert_eq!(block(m.device(), 61, 512), orig[20 * 512..21 * 512]);
    assert_eq!(block(m.device(), 20, 512), orig[20 * 512..21 * 512]);
    assert_eq!(entries_on_disk(m.device(), 512).header.count, 20);
    assert_eq!(m.free_bytes(), 22 * 512 - 20 * 512);
    assert!(m
        .warnings()
        .contains(&bow::model::KernelWarning::OrphanBackup { dest: 61, sectors: 1 }));
    let err = m.write(Sectors(20), &[0x79; 512]).unwrap_err();
    assert_eq!(err.kind(), EngineErrorKind::Io);
}

/// BT `discardVisible` (§2.3): four single-sector discards on a 512-byte-block device.
#[test]
fn discards_in_trim_state_match_bowtest_discard_visible() {
    let mut m = model(vec![0; 4096 * 512], BlockSize::B512);
    for s in [4u64, 8, 12, 16] {
        m.discard(Sectors(s), 512).unwrap();
    }
    assert_eq!(
        status(&m),
        "Unchanged: 0\nFree: 4\nUnchanged: 5\nFree: 8\nUnchanged: 9\nFree: 12\nUnchanged: 13\n\
         Free: 16\nUnchanged: 17\nTop: 4096\n"
    );
    // Most recently trimmed first.
    let heads: Vec<u64> = m.trimmed_list().iter().map(|r| r.start).collect();
    assert_eq!(heads, [16, 12, 8, 4]);
    assert_eq!(m.free_bytes(), 4 * 512);
    // Writing into a free range in TRIM reverts it (the piece reaches the range end: the node
    // itself leaves TRIMMED and is subtracted exactly).
    assert_eq!(m.write(Sectors(8), &[1; 512]).unwrap(), WriteAction::Untrimmed { reclaimed: 1 });
    assert_eq!(m.free_bytes(), 3 * 512);
    assert!(status(&m).starts_with("Unchanged: 0\nFree: 4\nUnchanged: 5\nFree: 12\n"));
}

/// The model is generic over the device: the §9 workload on an image file leaves the same bytes
/// as on a device in memory.
#[test]
fn same_bytes_on_an_image_file() {
    use bow::device::{FileDevice, MemDevice};
    fn run<D: BlockDevice>(dev: D) -> BowModel<D> {
        let mut m = BowModel::new(dev, ModelConfig::new(BlockSize::B4096));
        m.discard(Sectors(80), 368_640).unwrap();
        m.set_state(BowState::Checkpoint).unwrap();
        m.write(Sectors(24), &[0x5C; KIB4]).unwrap();
        m.write(Sectors(400), &[0x50; KIB4]).unwrap();
        m.write(Sectors(96), &[0x12; KIB4]).unwrap();
        m.flush().unwrap();
        m
    }
    let mut img = image(256, KIB4);
    img[..KIB4].fill(0xAA);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &img).unwrap();
    let on_file = run(FileDevice::open(file.path()).unwrap());
    let in_mem = run(MemDevice::from_bytes(img));
    assert_eq!(on_file.table_status(), in_mem.table_status());
    drop(on_file);
    assert_eq!(std::fs::read(file.path()).unwrap(), in_mem.device().snapshot());
}

/// The rollover boundary for 4 KiB blocks (§4.3: 169 entries per log sector).
///
/// Derivation: 28 + 24·169 = 4084 ≤ 4096 < 28 + 24·170, so sequence 0 holds entry 0 (block 0)
/// and 168 backups; the 169th backup rolls over: sequence 1 = {saved sequence 0, that backup}.
/// Blocks 1..=169 are used, blocks 170.. free; each single-block write is its own bio and so
/// its own entry, although neighbouring backups merge into one BACKUP range.
#[test]
fn block_size_4096_rolls_over_after_169_entries() {
    let blocks = 600usize;
    let mut m = model(image(blocks, KIB4), BlockSize::B4096);
    m.discard(Sectors(170 * 8), (blocks as u64 - 170) * 4096).unwrap();
    m.set_state(BowState::Checkpoint).unwrap();
    for k in 1..=168u64 {
        m.write(Sectors(k * 8), &[1; KIB4]).unwrap();
    }
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!((log.header.sequence, log.header.count), (0, 169));
    m.write(Sectors(169 * 8), &[1; KIB4]).unwrap();
    let log = entries_on_disk(m.device(), KIB4);
    assert_eq!((log.header.sequence, log.header.count), (1, 2));
    assert_eq!(log.entries[0].source, Sectors(0));
    assert_eq!(log.entries[1].source, Sectors(169 * 8));
    assert_eq!(m.log_sectors(), 2);
}
