//! The userspace engine's crash states (`vm_crash_ublk.rs`, docs/crash-consistency.md, "The
//! ublk engine"): the log holds what the real `bow-ublk` server wrote to its raw device (the
//! copies, block 0's log, the file system's writes and the flushes between them), captured by
//! dm-log-writes **beneath the server**, so no model stands between the engine and the check.
//!
//! For every crash state of the window (from the mark just before `bow-ublk checkpoint` to the
//! workload's end: every flush and FUA prefix and seeded subsets of the writes after a flush,
//! [`enumerate`]), `bow::restore` runs on the crashed image and every block the file system
//! had allocated at the mark must be bit-identical to the image at the mark. For every
//! `recovery_every`-th state also `e2fsck -fn` on the restored image, and the restore itself is
//! recorded and crashed at each of its flush epochs, then restored again ([`recovery_states`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use blockcopy::device::BlockDevice;

use super::{
    apply_op, apply_recovery_state, enumerate, fsck_clean, recovery_states, save_failure, tool,
    CaseSpec, CrashPoint, Failed, OpLog, Recorder, Region, Tally, UndoImage, BLOCK, BLOCK_USIZE,
};

/// The counts of one run of a ublk case.
#[derive(Debug, Default)]
pub struct UblkTally {
    pub tally: Tally,
    /// Log entries in the window, and its flushes (the engine's and the file system's).
    pub window_entries: usize,
    pub window_flushes: usize,
    /// ext4's allocated blocks at the mark (the blocks checked) and its free blocks.
    pub in_use_blocks: usize,
    pub free_blocks: usize,
    /// States whose restore found a log and replayed it (the others crashed before the
    /// checkpoint's first log write reached the disk).
    pub restored: usize,
    /// Crash states that failed (a restore error, a block that differs, fsck, or a crash
    /// during their restore).
    pub failed_states: usize,
}

/// ext4's block bitmap in `image` (unmounted, clean): `true` for every allocated block. Read
/// with `dumpe2fs` (its per-group `Free blocks:` ranges).
pub fn ext4_blocks_in_use(image: &Path, blocks: usize) -> Result<Vec<bool>, Failed> {
    let out = Command::new(tool("dumpe2fs")).arg(image).output()?;
    if !out.status.success() {
        return Err(format!(
            "dumpe2fs {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let mut in_use = vec![true; blocks];
    let text = String::from_utf8_lossy(&out.stdout);
    let mut groups = 0usize;
    // Group lines are indented; the superblock's `Free blocks:` (a count) is not.
    for line in text.lines().filter_map(|l| l.strip_prefix("  Free blocks: ")) {
        groups += 1;
        for range in line.split(", ").map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
            if b >= blocks || a > b {
                return Err(format!("dumpe2fs: free range {range} outside {blocks} blocks").into());
            }
            in_use[a..=b].iter_mut().for_each(|u| *u = false);
        }
    }
    if groups == 0 {
        return Err(format!("dumpe2fs {}: no block group listed", image.display()).into());
    }
    Ok(in_use)
}

/// The first block in use at the mark, among `candidates`, that differs from `pre`.
fn first_bad(
    dev: &dyn BlockDevice,
    pre: &[u8],
    in_use: &[bool],
    candidates: &BTreeSet<u64>,
) -> Result<Option<u64>, Failed> {
    let mut buf = vec![0u8; BLOCK_USIZE];
    for &b in candidates {
        let i = usize::try_from(b)?;
        if !in_use.get(i).copied().unwrap_or(false) {
            continue;
        }
        dev.read_at(&mut buf, b * BLOCK)?;
        if buf[..] != pre[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE] {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Restores `dev` with `bow::restore` (vold's policy: a corrupt log rolls forward). `Ok(true)`:
/// the log was replayed; `Ok(false)`: there was no log. Any other outcome is an error: a log
/// that rolls forward (a backup whose CRC does not match, a broken chain) keeps the new data,
/// which is no rollback.
fn restore(dev: &impl BlockDevice, serial: bool) -> Result<bool, String> {
    use bow::restore::RestoreOutcome;
    let opts = if serial {
        bow::restore::RestoreOptions { queue_depth: 1, memory_budget: 0, ..Default::default() }
    } else {
        bow::restore::RestoreOptions::default()
    };
    match bow::restore::restore(dev, &opts, &mut |_| {}).map_err(|e| e.to_string())?.outcome {
        RestoreOutcome::NoLog => Ok(false),
        RestoreOutcome::Restored { .. } => Ok(true),
        other => Err(format!("the restore did not roll back: {other:?}")),
    }
}

/// Checks the crash states of a ublk case (or only `spec.only`). `stop_at_first`: return at
/// the first failing state (the broken engines' runs count every failure instead when false).
pub fn run_ublk(
    dir: &Path,
    spec: &CaseSpec,
    failures_dir: Option<&Path>,
    stop_at_first: bool,
) -> Result<UblkTally, Failed> {
    let log = OpLog::load(&dir.join(&spec.log))?;
    let (first, last, _) = spec.windows.first().ok_or("a ublk case needs a window")?;
    let (from, to) = (log.mark(first)?, log.mark(last)?);
    let scratch = tempfile::tempdir()?;
    let image = UndoImage::create(&scratch.path().join("ublk.img"), spec.device_bytes)?;
    let region = Region { offset: 0, len: spec.device_bytes };
    let parts = [(&region, &image)];
    // Everything before the mark was flushed (the capture's last step before it is a flush of
    // the log-writes device): the image at the mark is what the checkpoint must give back.
    for op in &log.ops[..=from] {
        apply_op(&log, op, &parts)?;
    }
    image.forget_undo();
    image.forget_touched();
    let blocks = usize::try_from(spec.device_bytes / BLOCK)?;
    let pre = image.read_vec(0, usize::try_from(spec.device_bytes)?)?;
    let in_use = ext4_blocks_in_use(&image.path, blocks)?;
    let mut out = UblkTally {
        window_entries: to - from,
        window_flushes: log.ops[from..=to].iter().filter(|o| o.is_flush()).count(),
        in_use_blocks: in_use.iter().filter(|u| **u).count(),
        ..UblkTally::default()
    };
    out.free_blocks = blocks - out.in_use_blocks;
    let mut states = enumerate(&log, from, to, spec.subsets, spec.seed ^ u64::try_from(from)?);
    if let Some(only) = &spec.only {
        states.retain(|s| s == only);
    }
    println!(
        "ublk window {first}..{last}: {} entries, {} flushes, {} crash states; {} blocks in use \
         at the mark, {} free",
        out.window_entries,
        out.window_flushes,
        states.len(),
        out.in_use_blocks,
        out.free_blocks
    );
    let tally = &mut out.tally;
    let mut applied = from + 1;
    for (n_state, st) in states.iter().enumerate() {
        while applied <= st.point {
            apply_op(&log, &log.ops[applied], &parts)?;
            applied += 1;
        }
        image.forget_undo();
        let crashed = image.mark();
        for &i in &st.extra {
            apply_op(&log, &log.ops[i], &parts)?;
        }
        let at_crash = image.mark();
        let what = format!(
            "{} state {n_state} (entry {} + {} later writes)",
            dir.display(),
            st.point,
            st.extra.len()
        );
        let sample = spec.recovery_every > 0 && n_state % spec.recovery_every == 0;
        let mut ok = true;
        // The restore's own writes are recorded only when its crashes are checked.
        let recorder = Recorder::new(&image);
        let restored = if sample { restore(&recorder, true) } else { restore(&image, false) };
        let recorded = recorder.take();
        match restored {
            Err(e) => {
                tally.fail(format!("{what}: restore failed: {e}"));
                ok = false;
            }
            Ok(found) => {
                out.restored += usize::from(found);
                if let Some(b) = first_bad(&image, &pre, &in_use, &image.touched())? {
                    tally.fail(format!(
                        "{what}: block {b}, in use at checkpoint start, differs after the restore"
                    ));
                    ok = false;
                } else if sample {
                    tally.fsck_runs += 1;
                    if let Err(e) = fsck_clean(&image.path) {
                        tally.fail(format!("{what}: after the restore: {e}"));
                        ok = false;
                    }
                }
            }
        }
        image.undo_to(at_crash)?;
        tally.states += 1;
        // Crashes during the restore: each crash state of it, then the next boot's restore.
        if ok && sample {
            for (k, (start, mask)) in
                recovery_states(&recorded, 1, spec.seed ^ 0xA5).iter().enumerate()
            {
                apply_recovery_state(&recorded, *start, mask, &image)?;
                tally.recovery_states += 1;
                let rwhat = format!(
                    "{what}, restore crash state {k} (epoch from write {start}, {} of {} kept)",
                    mask.iter().filter(|k| **k).count(),
                    mask.len()
                );
                match restore(&image, false) {
                    Err(e) => {
                        tally.fail(format!("{rwhat}: restore again failed: {e}"));
                        ok = false;
                    }
                    Ok(_) => {
                        if let Some(b) = first_bad(&image, &pre, &in_use, &image.touched())? {
                            tally.fail(format!("{rwhat}: block {b} differs after restoring again"));
                            ok = false;
                        }
                    }
                }
                image.undo_to(at_crash)?;
                if !ok {
                    break;
                }
            }
        }
        image.undo_to(crashed)?;
        if !ok {
            out.failed_states += 1;
            if let Some(root) = failures_dir {
                let id = CrashPoint { point: st.point, extra: st.extra.clone() };
                let saved = save_failure(root, dir, spec, &id, n_state)?;
                tally.fail(format!("saved as {}", saved.display()));
            }
            if stop_at_first {
                break;
            }
        }
    }
    Ok(out)
}
