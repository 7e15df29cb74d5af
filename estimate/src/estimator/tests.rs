use super::*;
use crate::error::ErrorKind;
use crate::trace::Record;

const MIB: u64 = 1 << 20;
const BLK: u64 = 4096;
/// Sectors per 4 KiB block.
const SPB: u64 = BLK / SECTOR_SIZE;

fn input<'a>(backend: Backend, device_size: u64, free: &'a FreeSpace) -> EstimateInput<'a> {
    EstimateInput {
        backend,
        device_size,
        block_size: 4096,
        free,
        history: &[],
        trace: None,
        declared_bytes: &[],
    }
}

fn map(extents: &[(u64, u64)]) -> FreeSpace {
    FreeSpace::Map(extents.iter().map(|&(offset, len)| FreeExtent { offset, len }).collect())
}

/// A trace of single-block writes at these block numbers.
fn block_writes(device_size: u64, blocks: &[u64]) -> Trace {
    Trace::from_records(device_size, 4096, blocks.iter().map(|&b| Record::write(b * SPB, SPB)))
        .unwrap()
}

fn xorshift(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}

fn no_margin() -> EstimateConfig {
    EstimateConfig { margin: Margin { percent: 0, floor_bytes: 0 }, ..EstimateConfig::default() }
}

/// On random traces, the bow estimate is exactly what bow's dry run reports.
#[test]
fn bow_trace_estimate_equals_the_dry_run() {
    let dev = 64 * MIB;
    let blocks = dev / BLK;
    for seed in 1..=6u64 {
        let mut next = xorshift(seed * 0x9e37_79b9);
        let free: Vec<(u64, u64)> = (0..8)
            .map(|i| (i * 8 * MIB + MIB + next(64) * BLK, (512 + next(1024)) * BLK))
            .collect();
        let records: Vec<Record> = (0..300)
            .map(|_| match next(10) {
                0 => Record::Flush,
                1 => Record::discard((1 + next(blocks - 40)) * SPB, (1 + next(8)) * SPB),
                _ => Record::write(next(blocks - 40) * SPB, (1 + next(16)) * SPB),
            })
            .collect();
        let trace = Trace::from_records(dev, 4096, records.clone()).unwrap();
        let fs = map(&free);
        let est = estimate(
            &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
            &no_margin(),
        )
        .unwrap();

        let ops: Vec<TraceOp> = records
            .iter()
            .filter_map(|r| match *r {
                Record::Write { start, len, .. } => {
                    Some(TraceOp::Write { offset: start.0 * 512, len: len.0 * 512 })
                }
                Record::Discard { start, len } => {
                    Some(TraceOp::Discard { offset: start.0 * 512, len: len.0 * 512 })
                }
                Record::Flush => None,
            })
            .collect();
        let mut extents: Vec<FreeExtent> =
            free.iter().map(|&(offset, len)| FreeExtent { offset, len }).collect();
        extents.sort_by_key(|e| e.offset);
        let r = dryrun::dry_run(&DryRunConfig::new(dev), &extents, &ops).unwrap();
        assert_eq!(r.enospc, None, "seed {seed}");
        assert_eq!(est.basis, Basis::Trace);
        assert_eq!(est.breakdown.data_bytes, r.backup_bytes, "seed {seed}");
        assert_eq!(est.breakdown.overhead_bytes, r.consumed_by_bow - r.backup_bytes, "seed {seed}");
        assert_eq!(est.predicted_bytes, r.consumed_by_bow);
        assert_eq!(est.free_bytes, r.free_at_start);
        assert_eq!(est.new_data_bytes, Some(r.claimed_by_writes));
        let detail = est.bow.unwrap();
        assert_eq!(detail.backup_entries, r.backup_entries);
        assert_eq!(detail.relocation_bytes, r.relocation_bytes);
        assert_eq!(detail.log_sectors, r.log_sectors);
        assert!(r.backup_bytes > 0 && r.claimed_by_writes > 0, "the trace should do both");
    }
}

#[test]
fn bow_writes_into_free_space_cost_nothing_but_the_log_start() {
    let dev = 16 * MIB;
    let fs = map(&[(MIB, 8 * MIB)]);
    let blocks: Vec<u64> = (300..400).collect();
    let trace = block_writes(dev, &blocks);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 0);
    // prepare_log's two blocks: SECTOR0_CURRENT and the copy of block 0.
    assert_eq!(est.breakdown.overhead_bytes, 2 * BLK);
    assert_eq!(est.new_data_bytes, Some(100 * BLK));
    assert_eq!(est.free_bytes, 8 * MIB);
    assert_eq!(est.shortfall_bytes, 0);
}

#[test]
fn bow_in_use_blocks_cost_one_backup_each_and_the_log_is_counted() {
    let dev = 64 * MIB;
    let fs = map(&[(32 * MIB, 16 * MIB)]);
    // 400 distinct in-use blocks, every other one written twice: 400 backups, not 600.
    let mut blocks: Vec<u64> = (0..400).map(|i| 1000 + 2 * i).collect();
    blocks.extend((0..200).map(|i| 1000 + 4 * i));
    let trace = block_writes(dev, &blocks);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 400 * BLK);
    let detail = est.bow.unwrap();
    assert_eq!(detail.backup_entries, 400);
    // 168 backups per 4 KiB log sector (169 entries, entry 0 the previous sector or block 0):
    // 3 sectors, 2 rollovers each keeping a block, plus prepare_log's two.
    assert_eq!(detail.log_sectors, 3);
    assert_eq!(est.breakdown.overhead_bytes, 4 * BLK);
    assert_eq!(est.new_data_bytes, Some(0));
    assert_eq!(detail.relocation_bytes, 0);
}

/// A write into the free block that holds a backup moves the backup: one more copy.
#[test]
fn bow_counts_relocations_of_backups_the_filesystem_reuses() {
    let dev = 16 * MIB;
    let free_start = 8 * MIB;
    let fs = map(&[(free_start, 64 * BLK)]);
    // Block 100 (in use) is backed up at the head of the free range; prepare_log took the first
    // two free blocks, so the backup lands in the third; then the filesystem writes there.
    let backup_block = free_start / BLK + 2;
    let trace = block_writes(dev, &[100, backup_block]);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    let detail = est.bow.unwrap();
    assert_eq!(detail.backup_entries, 2, "{est:?}");
    assert_eq!(detail.relocation_bytes, BLK);
    assert_eq!(est.breakdown.data_bytes, 2 * BLK);
}

#[test]
fn bow_running_out_is_located_and_the_whole_trace_still_estimated() {
    let dev = 16 * MIB;
    let fs = map(&[(15 * MIB, 64 * BLK)]);
    // 200 in-use blocks: 62 fit after prepare_log's two, and the log needs a block per 168.
    let blocks: Vec<u64> = (0..200).map(|i| 10 + i * 3).collect();
    let trace = block_writes(dev, &blocks);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    let detail = est.bow.unwrap();
    assert_eq!(detail.enospc_at_record, Some(62));
    assert!(!detail.enospc_at_start);
    assert_eq!(est.breakdown.data_bytes, 200 * BLK);
    assert_eq!(est.breakdown.overhead_bytes, 3 * BLK, "two for prepare_log, one rollover");
    assert_eq!(est.free_bytes, 64 * BLK);
    assert_eq!(est.shortfall_bytes, 203 * BLK - 64 * BLK);

    let none = map(&[]);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &none) },
        &no_margin(),
    )
    .unwrap();
    assert!(est.bow.unwrap().enospc_at_start);
    assert_eq!(est.predicted_bytes, 203 * BLK);
}

#[test]
fn bow_without_a_free_map_counts_every_block_touched_as_in_use() {
    let dev = 64 * MIB;
    let fs = FreeSpace::Bytes(32 * MIB);
    let mut records: Vec<Record> = (0..400).map(|i| Record::write((1000 + i) * SPB, SPB)).collect();
    records.push(Record::write(1000 * SPB, 4 * SPB)); // already counted
    records.push(Record::discard(5000 * SPB, 10 * SPB)); // discards are writes to dm-bow
    records.push(Record::Flush);
    let trace = Trace::from_records(dev, 4096, records).unwrap();
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 410 * BLK);
    // 410 entries at most: 3 log sectors → 2 rollovers + prepare_log's 2 blocks.
    assert_eq!(est.breakdown.overhead_bytes, 4 * BLK);
    assert_eq!(est.new_data_bytes, None);
    assert_eq!(est.bow, None);
    assert_eq!(est.free_bytes, 32 * MIB);
}

/// The store dm-snapshot would write for these chunks, by snapcow's kernel-layout writer.
fn kernel_store_bytes(chunks: &[u64], chunk_bytes: u64) -> u64 {
    use bow::device::MemDevice;
    let cow_chunks = usize::try_from(chunks.len() as u64 * 2 + 16).unwrap();
    let c = usize::try_from(chunk_bytes).unwrap();
    let cow = MemDevice::new(cow_chunks * c);
    let sectors = u32::try_from(chunk_bytes / 512).unwrap();
    let mut store = snapcow::writer::KernelStore::create(&cow, sectors).unwrap();
    for &old in chunks {
        store.add_exception(&cow, old, &vec![0u8; c]).unwrap();
    }
    store.next_free() * chunk_bytes
}

#[test]
fn snapshot_estimate_is_distinct_chunks_plus_the_kernels_metadata() {
    let dev = 64 * MIB;
    let fs = FreeSpace::Bytes(16 * MIB);
    // 4 KiB chunks: 256 records per area. 0, 1, 255, 256, 257 and 600 distinct chunks cross
    // zero, one and two area boundaries (256 exactly makes the kernel zero area 1).
    for n in [0u64, 1, 255, 256, 257, 600] {
        let mut blocks: Vec<u64> = (0..n).map(|i| 7 * i).collect();
        blocks.extend((0..n / 2).map(|i| 14 * i)); // rewrites: no new chunk
        let trace = block_writes(dev, &blocks);
        let est = estimate(
            &EstimateInput { trace: Some(&trace), ..input(Backend::Snapshot, dev, &fs) },
            &no_margin(),
        )
        .unwrap();
        let chunks: Vec<u64> = (0..n).map(|i| 7 * i).collect();
        assert_eq!(est.breakdown.data_bytes, n * BLK, "n = {n}");
        assert_eq!(est.predicted_bytes, kernel_store_bytes(&chunks, BLK), "n = {n}");
        assert_eq!(est.breakdown.overhead_bytes, (2 + n / 256) * BLK, "n = {n}");
    }
}

#[test]
fn snapshot_chunks_round_writes_outward_and_ignore_discards() {
    let dev = 64 * MIB;
    let fs = map(&[(32 * MIB, 16 * MIB)]);
    let chunk = 64 * 1024;
    let config = EstimateConfig { snapshot_chunk_bytes: chunk, ..no_margin() };
    let records = [
        Record::write(0, 8),         // chunk 0
        Record::write(120, 16),      // straddles chunks 0 and 1
        Record::discard(1024, 2048), // ignored: snapshot-origin takes no discards
        Record::Flush,
        Record::write(32 * MIB / 512, 64), // chunk 512, in free space (32 KiB)
    ];
    let trace = Trace::from_records(dev, 4096, records).unwrap();
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::Snapshot, dev, &fs) },
        &config,
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 3 * chunk);
    assert_eq!(est.predicted_bytes, kernel_store_bytes(&[0, 1, 512], chunk));
    assert_eq!(est.new_data_bytes, Some(32 * 1024), "only the last write lands in free space");
    assert_eq!(est.free_bytes, 16 * MIB);
}

#[test]
fn f2fs_counts_each_block_written_once() {
    let dev = 64 * MIB;
    let records = [
        Record::write(0, 16),              // blocks 0, 1 (metadata area: in use)
        Record::write(8, 16),              // blocks 1, 2
        Record::discard(4096, 4096),       // frees nothing while checkpoints are disabled
        Record::write(16 * MIB / 512, 80), // 10 blocks in the free map
    ];
    let trace = Trace::from_records(dev, 4096, records).unwrap();
    let bytes = FreeSpace::Bytes(20 * MIB);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::F2fs, dev, &bytes) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 13 * BLK, "without a map every block counts");
    assert_eq!(est.breakdown.overhead_bytes, 0);
    assert_eq!(est.new_data_bytes, None);
    let with_map = map(&[(16 * MIB, 4 * MIB)]);
    let est = estimate(
        &EstimateInput { trace: Some(&trace), ..input(Backend::F2fs, dev, &with_map) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 10 * BLK, "with a map, only blocks free at start");
}

#[test]
fn a_trace_of_another_device_size_is_refused() {
    let trace = block_writes(32 * MIB, &[1, 2, 3]);
    let fs = map(&[(MIB, MIB)]);
    for backend in [Backend::Bow, Backend::Snapshot, Backend::F2fs] {
        let e = estimate(
            &EstimateInput { trace: Some(&trace), ..input(backend, 64 * MIB, &fs) },
            &EstimateConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongDevice, "{backend}");
        assert!(matches!(e, EstimateError::TraceDeviceSize { trace, device }
            if trace == 32 * MIB && device == 64 * MIB));
    }
}

fn past(backend: Backend, device_size: u64, actual_mib: u64) -> PastCheckpoint {
    PastCheckpoint { backend, device_size, actual_bytes: actual_mib * MIB, estimated_bytes: None }
}

#[test]
fn history_takes_the_90th_percentile_of_the_same_backend_and_device() {
    let dev = 1 << 34;
    let fs = FreeSpace::Bytes(1 << 33);
    let mut history: Vec<PastCheckpoint> =
        (1..=10).rev().map(|m| past(Backend::Bow, dev, m * 10)).collect();
    history.push(past(Backend::Snapshot, dev, 5000)); // another backend
    history.push(past(Backend::Bow, dev / 2, 4000)); // another device size
    let est = estimate(
        &EstimateInput { history: &history, ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.basis, Basis::History);
    assert_eq!(est.history_samples, 10);
    assert_eq!(est.predicted_bytes, 90 * MIB);
    assert_eq!(est.breakdown.data_bytes, 90 * MIB);

    // Fewer than ten samples: the 90th percentile is the largest.
    let est = estimate(
        &EstimateInput { history: &history[5..], ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!((est.history_samples, est.predicted_bytes), (5, 50 * MIB));
}

#[test]
fn declared_sizes_become_rewrites_with_filesystem_overhead() {
    let dev = 1 << 34;
    let fs = FreeSpace::Bytes(1 << 33);
    let declared = [10 * MIB, 5 * MIB];
    let est = estimate(
        &EstimateInput { declared_bytes: &declared, ..input(Backend::Bow, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.basis, Basis::Declared);
    // 15 MiB + 10% = 16.5 MiB = 4224 blocks, each a backup with its own entry:
    // ⌈4224 / 168⌉ = 26 log sectors → 25 rollovers, plus prepare_log's 2.
    assert_eq!(est.breakdown.data_bytes, 4224 * BLK);
    assert_eq!(est.breakdown.overhead_bytes, 27 * BLK);

    let est = estimate(
        &EstimateInput { declared_bytes: &declared, ..input(Backend::Snapshot, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.breakdown.data_bytes, 4224 * BLK);
    assert_eq!(est.breakdown.overhead_bytes, (2 + 4224 / 256) * BLK);

    let est = estimate(
        &EstimateInput { declared_bytes: &declared, ..input(Backend::F2fs, dev, &fs) },
        &no_margin(),
    )
    .unwrap();
    assert_eq!((est.breakdown.data_bytes, est.breakdown.overhead_bytes), (4224 * BLK, 0));
}

#[test]
fn history_and_declared_take_the_larger() {
    let dev = 1 << 34;
    let fs = FreeSpace::Bytes(1 << 33);
    let history = [past(Backend::Snapshot, dev, 100)];
    let small = [MIB];
    let est = estimate(
        &EstimateInput {
            history: &history,
            declared_bytes: &small,
            ..input(Backend::Snapshot, dev, &fs)
        },
        &no_margin(),
    )
    .unwrap();
    assert_eq!((est.basis, est.predicted_bytes), (Basis::HistoryAndDeclared, 100 * MIB));
    let large = [200 * MIB];
    let est = estimate(
        &EstimateInput {
            history: &history,
            declared_bytes: &large,
            ..input(Backend::Snapshot, dev, &fs)
        },
        &no_margin(),
    )
    .unwrap();
    assert_eq!(est.basis, Basis::HistoryAndDeclared);
    assert_eq!(est.breakdown.data_bytes, 220 * MIB);
}

#[test]
fn with_nothing_known_the_default_is_a_tenth_of_the_space_in_use() {
    let dev = 1 << 30;
    let fs = map(&[(dev / 4, dev * 3 / 4)]);
    let est = estimate(&input(Backend::F2fs, dev, &fs), &no_margin()).unwrap();
    assert_eq!(est.basis, Basis::Default);
    // 256 MiB in use → 25.6 MiB of rewrites, + 10% filesystem overhead, in whole blocks.
    let rewrites = (256 * MIB).div_ceil(10);
    let with_fs = rewrites + rewrites.div_ceil(10);
    assert_eq!(est.breakdown.data_bytes, with_fs.div_ceil(BLK) * BLK);
    assert_eq!(est.free_bytes, 768 * MIB);
}

#[test]
fn the_margin_is_ten_percent_plus_eight_mib_and_headroom_is_added() {
    let dev = 1 << 34;
    let fs = FreeSpace::Bytes(500 * MIB);
    let config = EstimateConfig { headroom_bytes: 100 * MIB, ..EstimateConfig::default() };
    for actual in [0u64, 40, 400, 4000] {
        let history = [past(Backend::Bow, dev, actual)];
        let est = estimate(
            &EstimateInput { history: &history, ..input(Backend::Bow, dev, &fs) },
            &config,
        )
        .unwrap();
        let predicted = actual * MIB;
        let margin = predicted.div_ceil(10) + 8 * MIB;
        assert_eq!(est.breakdown.margin_bytes, margin, "{actual} MiB");
        assert_eq!(est.breakdown.headroom_bytes, 100 * MIB);
        assert_eq!(est.needed_bytes, predicted + margin + 100 * MIB);
        assert_eq!(est.shortfall_bytes, est.needed_bytes.saturating_sub(500 * MIB));
    }
}

/// With a trace the margin is the percentage alone: the trace already holds the per-boot
/// writes the floor stands for.
#[test]
fn with_a_trace_the_margin_has_no_floor() {
    let dev = 64 * MIB;
    let fs = map(&[(32 * MIB, 32 * MIB)]);
    // 150 in-use blocks rewritten and 150 free ones written.
    let blocks: Vec<u64> = (0..150).chain(8192..8342).collect();
    let trace = block_writes(dev, &blocks);
    for backend in [Backend::Bow, Backend::Snapshot, Backend::F2fs] {
        let inp = EstimateInput { trace: Some(&trace), ..input(backend, dev, &fs) };
        let est = estimate(&inp, &EstimateConfig::default()).unwrap();
        assert_eq!(est.basis, Basis::Trace);
        assert!(est.predicted_bytes > 0, "{backend}");
        assert_eq!(est.breakdown.margin_bytes, est.predicted_bytes.div_ceil(10), "{backend}");
        assert_eq!(est.needed_bytes, est.predicted_bytes + est.breakdown.margin_bytes);
        // The same prediction from history carries the floor.
        let history = [past(backend, dev, est.predicted_bytes / MIB)];
        let inp = EstimateInput { history: &history, ..input(backend, dev, &fs) };
        let h = estimate(&inp, &EstimateConfig::default()).unwrap();
        assert_eq!(h.breakdown.margin_bytes, h.predicted_bytes.div_ceil(10) + 8 * MIB);
    }
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    let dev = 64 * MIB;
    let fs_ok = FreeSpace::Bytes(MIB);
    let cfg = EstimateConfig::default();
    let check = |inp: EstimateInput<'_>, cfg: &EstimateConfig, want: &str| {
        let e = estimate(&inp, cfg).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains(want), "{e} lacks {want}");
    };
    let outside = map(&[(60 * MIB, 8 * MIB)]);
    check(input(Backend::Bow, dev, &outside), &cfg, "free extent");
    let overflow = map(&[(u64::MAX, 2)]);
    check(input(Backend::Snapshot, dev, &overflow), &cfg, "free extent");
    let too_free = FreeSpace::Bytes(dev + 1);
    check(input(Backend::F2fs, dev, &too_free), &cfg, "free bytes");
    let declared = [dev, 1];
    check(
        EstimateInput { declared_bytes: &declared, ..input(Backend::Bow, dev, &fs_ok) },
        &cfg,
        "declared",
    );
    let history = [PastCheckpoint { actual_bytes: dev + 1, ..past(Backend::Bow, dev, 0) }];
    check(EstimateInput { history: &history, ..input(Backend::Bow, dev, &fs_ok) }, &cfg, "history");
    check(EstimateInput { block_size: 8192, ..input(Backend::Bow, dev, &fs_ok) }, &cfg, "dm-bow");
    check(
        EstimateInput { block_size: 3000, ..input(Backend::F2fs, dev, &fs_ok) },
        &cfg,
        "block size",
    );
    check(input(Backend::F2fs, dev + 512, &fs_ok), &cfg, "device size");
    check(input(Backend::F2fs, 0, &fs_ok), &cfg, "device size");
    for (bad, want) in [
        (EstimateConfig { snapshot_chunk_bytes: 3000, ..cfg }, "snapshot_chunk_bytes"),
        (EstimateConfig { max_bio_bytes: 0, ..cfg }, "max_bio_bytes"),
        (
            EstimateConfig { margin: Margin { percent: 101, floor_bytes: 0 }, ..cfg },
            "margin.percent",
        ),
        (EstimateConfig { history_percentile: 0, ..cfg }, "history_percentile"),
        (EstimateConfig { default_used_percent: 0, ..cfg }, "default_used_percent"),
    ] {
        check(input(Backend::F2fs, dev, &fs_ok), &bad, want);
    }
}

#[test]
fn backend_names_parse_and_print() {
    for b in [Backend::Bow, Backend::Snapshot, Backend::F2fs] {
        assert_eq!(b.name().parse::<Backend>().unwrap(), b);
    }
    assert!("auto".parse::<Backend>().is_err());
}

#[test]
fn percentile_is_nearest_rank() {
    assert_eq!(percentile(&[], 90), None);
    assert_eq!(percentile(&[5], 90), Some(5));
    let v: Vec<u64> = (1..=20).collect();
    assert_eq!(percentile(&v, 90), Some(18));
    assert_eq!(percentile(&v, 100), Some(20));
    assert_eq!(percentile(&v, 50), Some(10));
    assert_eq!(percentile(&v, 1), Some(1));
}

/// The modelled extra space sits at the tail of dm-bow's free list: on traces that fit, a run
/// with it makes exactly the decisions of the run without it.
#[test]
fn bow_extra_space_is_used_only_after_the_real_free_space() {
    let dev = 64 * MIB;
    let blocks = dev / BLK;
    let mut relocated = 0;
    for seed in 1..=4u64 {
        let mut next = xorshift(seed * 0x2545_f491);
        let extents: Vec<FreeExtent> = (0..6)
            .map(|i| FreeExtent { offset: i * 10 * MIB + 2 * MIB, len: (256 + next(512)) * BLK })
            .collect();
        let ops: Vec<TraceOp> = (0..200)
            .map(|_| TraceOp::Write { offset: next(blocks - 16) * BLK, len: (1 + next(8)) * BLK })
            .collect();
        let cfg = DryRunConfig::new(dev);
        let real = dryrun::dry_run(&cfg, &extents, &ops).unwrap();
        assert_eq!(real.enospc, None, "seed {seed}");
        let extra = with_extra_space(&cfg, &extents, &ops, BLK).unwrap();
        assert_eq!(extra.backup_bytes, real.backup_bytes, "seed {seed}");
        assert_eq!(extra.backup_entries, real.backup_entries);
        assert_eq!(extra.relocation_bytes, real.relocation_bytes);
        assert_eq!(extra.log_sectors, real.log_sectors);
        assert_eq!(extra.claimed_by_writes, real.claimed_by_writes);
        assert_eq!(extra.consumed_by_bow, real.consumed_by_bow);
        relocated += real.relocation_bytes;
    }
    assert!(relocated > 0, "the traces should make dm-bow move some backups");
}
