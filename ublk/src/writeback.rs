//! Write-back: first-touch writes share the engine's ordering points.
//!
//! The device declares a volatile write cache (`UBLK_ATTR_VOLATILE_CACHE`, no FUA: the block
//! layer turns a FUA write into a write and a flush), so a write may complete before it is
//! durable as long as a later flush makes every write completed before it durable. In
//! CHECKPOINT the engine pays two ordering points (backups, then block 0) for every batch that
//! backs something up; at queue depth 1 each write was a batch of its own. Here a write in
//! CHECKPOINT is instead *held*: stored in the held-writes file ([`crate::held`]) and
//! completed at once. The server holds a write straight from its request's buffer when no
//! round is waiting ([`Served::hold`]), and the engine later writes it to the device from the
//! file (a shared view, not a second copy): a held write is copied as often as a
//! pass-through's, and needs no round. The held writes go to the engine as one batch, in the
//! order they completed, with the round that *drains* them:
//!
//! * a flush (after the batch: it covers them, as the flush contract asks);
//! * a discard, and any request that is not a plain write of whole blocks inside the device;
//! * a read of a held block (before the read, so it sees them);
//! * a write that would take the held bytes past the hold budget: [`HOLD_LIMIT_BYTES`], and in
//!   CHECKPOINT never more than half the engine's free backup space less four blocks, so the
//!   batch cannot run out of backup space (a written block takes at most one copy, and the log
//!   sectors and block 0's copies fit in the four): a write the engine cannot take still fails
//!   with ENOSPC itself, never after it was completed;
//! * every control command (checkpoint, commit, status, trace, stop), before it acts;
//! * the server running out of requests ([`Served::drain_early`]), once at least
//!   [`EARLY_DRAIN_WRITES`] writes are held none of which needed a backup when it was held
//!   (rewrites, writes into free space): they have no ordering points to share, so waiting for
//!   the flush gains nothing, and the flush would wait for all of them at once. The server
//!   hands the kernel its completions first, so these writes run while the writers go on (the
//!   server's thread runs on a CPU of the queue's, beside them), as a pass-through's do. A
//!   batch holding a backup waits for the flush, as before.
//!
//! Disjoint held writes go to the engine in device order (any order of unflushed disjoint
//! writes is one the cache allows; the range map then splits ranges from their start instead
//! of fragmenting them); overlapping ones keep the order they came in.
//!
//! The engine's order on the device is unchanged (backups, block 0, then the user's data), and
//! so are its journal and its recovery: held writes are not the engine's until they are
//! drained. What changes is where a completed write lives until then: the held-writes file
//! outlives a killed server, and a restarted one drains it before it serves anything (the
//! kernel reissues only the requests that were not completed). Writing a drained write a
//! second time (killed after the batch, before the file was cleared) writes the same data to
//! the same place. Outside CHECKPOINT nothing is held: in TRIM and COMMITTED the engine adds no
//! ordering points, and the commit's table switch must find nothing left in the server.
//!
//! A held write that fails when it is drained (a device error) was already completed: the
//! error is reported by the next flush, as a disk reports a failed write-back.

use blockcopy::device::BlockDevice;
use bow::model::{BowEngine, BowState};
use bow::units::Sectors;
use bytes::Bytes;

use crate::held::{HeldLog, HeldWrite};
use crate::target::{nanos, BatchTimes, Request, Target};

/// The most bytes held at once.
pub const HOLD_LIMIT_BYTES: usize = 4 << 20;
/// Held writes that need no backup are drained once this many are held, without waiting for
/// a flush, when the server runs out of requests ([`Served::drain_early`]). Few: the server's
/// queue thread finds several requests per wake-up at depth 16, and each drain runs while the
/// writers go on. Measured against 1 and 32: docs/benchmarks.md, "Runs of 2026-12-07, 23:20 –
/// 2026-12-08, 01:15".
pub const EARLY_DRAIN_WRITES: usize = 4;
/// The engine's block.
const BLOCK: u64 = 4096;

/// The held writes and where they are stored.
#[derive(Debug)]
struct WriteBack {
    log: Box<dyn HeldLog>,
    held: Vec<HeldWrite>,
    held_bytes: u64,
    /// Held sectors span `[lo, hi)`: most reads fall outside and skip the search.
    lo: u64,
    hi: u64,
    /// What may be held until the next drain, worked out at the first hold after a drain.
    budget: Option<u64>,
    /// A lower bound of the engine's free backup space, so that the budget needs no walk
    /// over the range map (thousands of ranges after random writes) at every drain. A
    /// written block takes at most one block of free space (its copy, or itself when it was
    /// free) and a batch at most a few more (a saved log sector, block 0's copies), so each
    /// batch given to the engine lowers it by twice its written bytes and four blocks.
    /// `None`: walk the map at the next hold (at start, and after a control command, which
    /// may change the engine in any way).
    free_floor: Option<u64>,
    /// Held writes whose drain failed since the last flush (that flush fails with EIO).
    failed: u64,
    /// A held write needed a backup when it was held: the batch waits for a flush, so that
    /// its backups share the engine's two ordering points with as many others as possible.
    backups_held: bool,
    stats: WriteBackStats,
}

/// Counters since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBackStats {
    /// Writes held (completed before the engine had them).
    pub held: u64,
    /// Drains that gave the engine held writes.
    pub drains: u64,
    /// Of them, drains of writes that needed no backup, before a flush asked
    /// ([`EARLY_DRAIN_WRITES`]).
    pub early_drains: u64,
    /// Held writes that failed when drained.
    pub failed: u64,
    /// Nanoseconds spent in drains (the engine planning and writing the held writes with the
    /// round that drained them): where a flush after held writes waits.
    pub drain_ns: u64,
    /// Of `drain_ns`, the engine's planning, writing and flushing.
    pub drain_times: BatchTimes,
}

/// The served device: a [`Target`], and in front of the engine the held writes.
#[derive(Debug)]
pub struct Served<D: BlockDevice> {
    target: Target<D>,
    write_back: Option<WriteBack>,
    /// Where the time of the rounds that drained nothing went (all of a pass-through's: its
    /// writes and flushes, for comparison with the engine's).
    rounds: BatchTimes,
}

impl<D: BlockDevice> Served<D> {
    /// Every request straight to `target` (the pass-through, or the engine write-through).
    pub fn write_through(target: Target<D>) -> Served<D> {
        Served { target, write_back: None, rounds: BatchTimes::default() }
    }

    /// The engine with write-back, its held writes stored through `log`. `held` are the writes
    /// a dead server held (read back from its file, which `log` goes on after): they are
    /// drained now, before anything is served, and an error (EIO) if the engine failed any of
    /// them (the server then refuses to serve). A pass-through gets no write-back.
    pub fn write_back(
        target: Target<D>,
        log: Box<dyn HeldLog>,
        held: Vec<HeldWrite>,
    ) -> Result<Served<D>, i32> {
        if matches!(target, Target::Passthrough(_)) {
            return Ok(Served::write_through(target));
        }
        let mut served = Served {
            rounds: BatchTimes::default(),
            target,
            write_back: Some(WriteBack {
                log,
                held: Vec::new(),
                held_bytes: 0,
                lo: u64::MAX,
                hi: 0,
                budget: None,
                free_floor: None,
                failed: 0,
                backups_held: false,
                stats: WriteBackStats::default(),
            }),
        };
        if !held.is_empty() {
            if let Some(wb) = served.write_back.as_mut() {
                for w in held {
                    wb.keep(w);
                }
            }
            served.drain()?;
        }
        Ok(served)
    }

    /// The target, without the held writes (a server restarted `--write-through` drained
    /// them first).
    pub fn into_target(self) -> Target<D> {
        self.target
    }

    /// The target (what the control commands look at, once [`Served::drain`] ran).
    pub fn target(&self) -> &Target<D> {
        &self.target
    }

    /// The target, mutably: drained first, so it has every completed write.
    pub fn drained_target(&mut self) -> Result<&mut Target<D>, i32> {
        self.drain()?;
        if let Some(wb) = self.write_back.as_mut() {
            wb.free_floor = None;
            wb.budget = None;
        }
        Ok(&mut self.target)
    }

    /// Size in bytes the ublk device shows.
    pub fn size(&self) -> u64 {
        self.target.size()
    }

    /// Writes held now, and their bytes.
    pub fn pending(&self) -> (usize, u64) {
        self.write_back.as_ref().map_or((0, 0), |wb| (wb.held.len(), wb.held_bytes))
    }

    /// Where the time of the rounds that drained nothing went: every round without
    /// write-back; with it, the rounds that found nothing held (the drains' time is
    /// [`WriteBackStats::drain_times`]).
    pub fn round_times(&self) -> BatchTimes {
        self.rounds
    }

    /// The write-back counters (`None`: write-through).
    pub fn write_back_stats(&self) -> Option<WriteBackStats> {
        self.write_back.as_ref().map(|wb| wb.stats)
    }

    /// Gives the engine every held write, as one batch; the held-writes file is cleared once
    /// the batch was issued. EIO when the engine failed one of them (a device error, after
    /// which the engine fails everything); the next flush fails too, as for a held write
    /// drained by a round.
    pub fn drain(&mut self) -> Result<(), i32> {
        let failed_before = self.write_back_stats().map_or(0, |s| s.failed);
        self.drain_with(Vec::new());
        match self.write_back_stats() {
            Some(s) if s.failed > failed_before => Err(libc::EIO),
            _ => Ok(()),
        }
    }

    /// Drains the held writes and carries out `reqs` in the same batch, after them.
    fn drain_with(&mut self, reqs: Vec<(Request, Bytes)>) -> Vec<Result<u32, i32>> {
        let Some(wb) = self.write_back.as_mut() else {
            return self.target.handle_batch_timed(reqs, &mut self.rounds);
        };
        let written: u64 = wb.held_bytes
            + reqs
                .iter()
                .map(|(r, _)| match r {
                    Request::Write { sectors, .. } => u64::from(*sectors) * 512,
                    _ => 0,
                })
                .sum::<u64>();
        if written > 0 {
            wb.free_floor = wb.free_floor.map(|f| f.saturating_sub(2 * written + 4 * BLOCK));
        }
        if wb.held.is_empty() {
            // A round with nothing held (a flush after early drains, say): timed apart.
            return self.target.handle_batch_timed(reqs, &mut self.rounds);
        }
        let held = in_device_order(std::mem::take(&mut wb.held));
        let n = held.len();
        let mut batch: Vec<(Request, Bytes)> = held
            .into_iter()
            .map(|w| {
                let sectors = u32::try_from(w.data.len() / 512).unwrap_or(u32::MAX);
                (Request::Write { sector: w.sector, sectors }, w.data)
            })
            .collect();
        batch.extend(reqs);
        let started = std::time::Instant::now();
        let mut results = self.target.handle_batch_timed(batch, &mut wb.stats.drain_times);
        wb.stats.drain_ns = wb.stats.drain_ns.saturating_add(nanos(started.elapsed()));
        let rest = results.split_off(n);
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        if failed > 0 {
            eprintln!(
                "bow-ublk: {failed} of {n} held writes failed when drained ({:?}); the next \
                 flush reports it",
                results.iter().find(|r| r.is_err())
            );
        }
        wb.failed += failed;
        wb.stats.failed += failed;
        wb.stats.drains += 1;
        wb.held_bytes = 0;
        wb.lo = u64::MAX;
        wb.hi = 0;
        wb.budget = None;
        wb.backups_held = false;
        wb.log.clear();
        rest
    }

    /// Whether a round of `reqs` will pay the engine's two ordering flushes, which more
    /// requests gathered into it would share (the server's round gathering). Never while
    /// writes are held instead: in CHECKPOINT with write-back, a round of writes pays nothing,
    /// and a flush round drains what was held before it, which is all the flush covers.
    pub fn needs_ordering_flushes<'r>(&self, reqs: impl IntoIterator<Item = &'r Request>) -> bool {
        if let (Some(_), Target::Engine(e)) = (&self.write_back, &self.target) {
            if e.state() == BowState::Checkpoint {
                return false;
            }
        }
        self.target.needs_ordering_flushes(reqs)
    }

    /// A read (or a request no round carries): a read of a held block drains first.
    pub fn handle(&mut self, req: Request, buf: &mut [u8]) -> Result<u32, i32> {
        if let (Request::Read { sector, sectors }, Some(wb)) = (req, self.write_back.as_ref()) {
            if wb.overlaps(sector, u64::from(sectors)) {
                self.drain()?;
            }
        }
        self.target.handle(req, buf)
    }

    /// The writes, discards and flushes of one queue round. Writes are held while they may
    /// be (see the module's documentation); the first request that may not drains the held
    /// writes with the rest of the round as one batch. One result per request, in order.
    pub fn handle_round(&mut self, reqs: Vec<(Request, Vec<u8>)>) -> Vec<Result<u32, i32>> {
        let mut results = Vec::with_capacity(reqs.len());
        let mut reqs = reqs.into_iter();
        let mut rest: Vec<(Request, Bytes)> = Vec::new();
        for (req, data) in reqs.by_ref() {
            match self.hold(req, &data) {
                Some(done) => results.push(Ok(done)),
                None => {
                    rest.push((req, data.into()));
                    break;
                }
            }
        }
        rest.extend(reqs.map(|(req, data)| (req, Bytes::from(data))));
        if rest.is_empty() {
            return results;
        }
        let flushes: Vec<usize> = rest
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| *r == Request::Flush)
            .map(|(i, _)| i)
            .collect();
        let mut done = self.drain_with(rest);
        // A flush after held writes that failed reports them (once).
        if let (Some(wb), Some(&first)) = (self.write_back.as_mut(), flushes.first()) {
            if wb.failed > 0 {
                done[first] = Err(libc::EIO);
                wb.failed = 0;
            }
        }
        results.extend(done);
        results
    }

    /// Holds the write `req` if it may be held: its data (`data`, the request's buffer) is
    /// stored, and the write is done (`Some`: the bytes to complete it with). `None`: not
    /// held, nothing done; the request goes to a round ([`Served::handle_round`]). The server
    /// calls this straight from the request's buffer when no round is waiting, so a held
    /// write is copied once, into the held-writes file, and needs no round.
    pub fn hold(&mut self, req: Request, data: &[u8]) -> Option<u32> {
        let Request::Write { sector, sectors } = req else { return None };
        let (Some(wb), Target::Engine(engine)) = (self.write_back.as_mut(), &self.target) else {
            return None;
        };
        let len = u64::from(sectors) * 512;
        let whole = sector % (BLOCK / 512) == 0 && len > 0 && len % BLOCK == 0;
        let inside = sector.checked_mul(512).and_then(|s| s.checked_add(len));
        if engine.state() != BowState::Checkpoint
            || !whole
            || inside.is_none_or(|end| end > self.target.size())
            || usize::try_from(len).map_or(true, |l| l > data.len())
        {
            return None;
        }
        let limit = HOLD_LIMIT_BYTES as u64;
        let budget = *wb.budget.get_or_insert_with(|| {
            // The bound while it allows the whole limit; else the map's exact free space.
            let free = match wb.free_floor {
                Some(f) if f >= 2 * limit + 4 * BLOCK => f,
                _ => {
                    let f = engine.space().free_bytes;
                    wb.free_floor = Some(f);
                    f
                }
            };
            (free.saturating_sub(4 * BLOCK) / 2).min(limit)
        });
        if wb.held_bytes + len > budget {
            return None;
        }
        // Everything that can refuse goes before the append: `None` means nothing was done.
        let done = u32::try_from(len).ok()?;
        let data = data.get(..usize::try_from(len).ok()?)?;
        let stored = wb.log.append(sector, data).ok()?;
        wb.stats.held += 1;
        // One look-up per held write until a backup is held; none after.
        wb.backups_held = wb.backups_held || engine.needs_backup(Sectors(sector), len);
        wb.keep(HeldWrite { sector, data: stored });
        Some(done)
    }

    /// Whether [`Served::drain_early`] would drain now.
    pub fn early_drain_due(&self) -> bool {
        self.write_back
            .as_ref()
            .is_some_and(|wb| !wb.backups_held && wb.held.len() >= EARLY_DRAIN_WRITES)
    }

    /// Drains the held writes early, with no flush, when at least [`EARLY_DRAIN_WRITES`] are
    /// held and none of them needed a backup when it was held; true if it did. The server
    /// calls this when it has nothing else to do, after it handed the kernel the completions
    /// of what it served: writes that need no backup gain nothing by waiting for the flush
    /// (no ordering points to share), and drained here they are written while the writers go
    /// on (the server's thread runs on a CPU of the queue's, beside them), not all at the
    /// flush, which would wait for them. A failure is the next flush's, as for any drained
    /// write.
    pub fn drain_early(&mut self) -> bool {
        if !self.early_drain_due() {
            return false;
        }
        self.drain_with(Vec::new());
        if let Some(wb) = self.write_back.as_mut() {
            wb.stats.early_drains += 1;
        }
        true
    }
}

/// The held writes sorted by position when no two of them overlap (else as they came: then
/// their order decides what the overlapped blocks hold). None of them was flushed, so any
/// order of disjoint writes is one the volatile cache allows; in device order the engine's
/// range map splits one free or in-use range from its start instead of fragmenting it (each
/// write joins the CHANGED range its predecessor left), its backups' sources are read in
/// order, and the user writes go out in order.
fn in_device_order(held: Vec<HeldWrite>) -> Vec<HeldWrite> {
    let mut order: Vec<(u64, u64, usize)> = held
        .iter()
        .enumerate()
        .map(|(i, w)| (w.sector, w.sector + w.data.len() as u64 / 512, i))
        .collect();
    order.sort_unstable();
    if !order.windows(2).all(|p| p[0].1 <= p[1].0) {
        return held;
    }
    let mut slots: Vec<Option<HeldWrite>> = held.into_iter().map(Some).collect();
    order.iter().filter_map(|&(_, _, i)| slots.get_mut(i).and_then(Option::take)).collect()
}

impl WriteBack {
    fn keep(&mut self, w: HeldWrite) {
        let sectors = w.data.len() as u64 / 512;
        self.lo = self.lo.min(w.sector);
        self.hi = self.hi.max(w.sector + sectors);
        self.held_bytes += w.data.len() as u64;
        self.held.push(w);
    }

    fn overlaps(&self, sector: u64, sectors: u64) -> bool {
        let end = sector.saturating_add(sectors);
        if end <= self.lo || sector >= self.hi {
            return false;
        }
        self.held.iter().any(|w| sector < w.sector + w.data.len() as u64 / 512 && w.sector < end)
    }
}

#[cfg(test)]
mod tests {
    use blockcopy::device::MemDevice;
    use bow::units::BlockSize;
    use bow_engine::{Engine, EngineConfig};

    use super::*;
    use crate::held::MemHeld;
    use crate::target::tests::restores_used_half;

    const BLOCKS: usize = 256;
    const B: usize = 4096;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed ^ u8::try_from(i % 253).unwrap_or(0)).collect()
    }

    fn image() -> Vec<u8> {
        (0..BLOCKS).flat_map(|b| pattern(u8::try_from(b % 200).unwrap_or(0), B)).collect()
    }

    fn w(block: u64, seed: u8) -> (Request, Vec<u8>) {
        (Request::Write { sector: block * 8, sectors: 8 }, pattern(seed, B))
    }

    /// An engine over `before` in CHECKPOINT, the second half of the device free.
    fn armed(before: &[u8]) -> Target<MemDevice> {
        let engine = Engine::new(
            MemDevice::from_bytes(before.to_vec()),
            EngineConfig::new(BlockSize::B4096),
        );
        let mut t = Target::Engine(Box::new(engine));
        let half = u32::try_from(BLOCKS / 2 * B / 512).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        t
    }

    /// A log shared with the test, which looks at what was stored as a file would keep it.
    #[derive(Debug, Clone, Default)]
    struct SharedLog(std::sync::Arc<std::sync::Mutex<Vec<HeldWrite>>>);

    impl HeldLog for SharedLog {
        fn append(&mut self, sector: u64, data: &[u8]) -> std::io::Result<Bytes> {
            let data = Bytes::copy_from_slice(data);
            self.0.lock().unwrap().push(HeldWrite { sector, data: data.clone() });
            Ok(data)
        }
        fn clear(&mut self) {
            self.0.lock().unwrap().clear();
        }
    }

    fn read_block(s: &mut Served<MemDevice>, block: u64) -> Vec<u8> {
        let mut back = vec![0; B];
        assert_eq!(s.handle(Request::Read { sector: block * 8, sectors: 8 }, &mut back), Ok(4096));
        back
    }

    fn into_device(s: Served<MemDevice>) -> MemDevice {
        let Target::Engine(e) = s.target else { unreachable!() };
        (*e).into_device()
    }

    #[test]
    fn first_touches_are_held_until_a_flush_and_then_share_two_ordering_flushes() {
        let before = image();
        let log = SharedLog::default();
        let mut s = Served::write_back(armed(&before), Box::new(log.clone()), Vec::new()).unwrap();
        let flushes = |s: &Served<MemDevice>| match &s.target {
            Target::Engine(e) => e.stats().flushes,
            Target::Passthrough(_) => unreachable!(),
        };
        let at_start = flushes(&s);
        // Thirty-two rounds of one first touch each (queue depth 1), block 0 among them.
        for b in 0..32u64 {
            assert_eq!(s.handle_round(vec![w(b, 100 + u8::try_from(b).unwrap())]), [Ok(4096)]);
        }
        assert_eq!(s.pending(), (32, 32 * 4096));
        assert_eq!(log.0.lock().unwrap().len(), 32, "every held write is stored first");
        assert_eq!(flushes(&s), at_start, "nothing reached the engine yet");
        // The device still has the old data; a read of a held block drains first and sees it.
        assert!(into_device_peek(&s, 5) == pattern(5, B));
        assert!(read_block(&mut s, 5) == pattern(105, B));
        assert_eq!(s.pending(), (0, 0));
        assert!(log.0.lock().unwrap().is_empty(), "cleared once the engine has them");
        // Two ordering flushes for all thirty-two backups.
        assert_eq!(flushes(&s) - at_start, 2);
        // More, then a flush round: held, then drained before the flush.
        for b in 40..48u64 {
            assert_eq!(s.handle_round(vec![w(b, 1)]), [Ok(4096)]);
        }
        let r = s.handle_round(vec![w(48, 1), (Request::Flush, Vec::new()), w(49, 1)]);
        assert_eq!(r, [Ok(4096), Ok(0), Ok(4096)]);
        assert_eq!(s.pending(), (0, 0));
        assert_eq!(s.write_back_stats().unwrap().drains, 2);
        let stats = s.write_back_stats().unwrap();
        assert!(stats.drain_ns > 0, "the drains' time is counted");
        let t = stats.drain_times;
        assert!(t.plan_ns > 0 && t.write_ns > 0 && t.flush_ns > 0, "each part is timed: {t:?}");
        assert!(t.plan_ns + t.write_ns + t.flush_ns <= stats.drain_ns, "parts of it: {t:?}");
        let dev = into_device(s);
        for b in 40..50u64 {
            let mut back = vec![0; B];
            dev.read_at(&mut back, b * 4096).unwrap();
            assert!(back == pattern(1, B), "block {b}");
        }
        restores_used_half(&dev, &before);
    }

    fn into_device_peek(s: &Served<MemDevice>, block: u64) -> Vec<u8> {
        let Target::Engine(e) = &s.target else { unreachable!() };
        let mut back = vec![0; B];
        e.device().read_at(&mut back, block * 4096).unwrap();
        back
    }

    /// A write held straight from its request's buffer (the server's way, no round): the
    /// buffer may change at once (the kernel reuses it), the held data is what was written;
    /// the drain gives back the file's space (the engine keeps no view of it), so writes go
    /// on being held. Only writes are held, only by the engine, only in CHECKPOINT.
    #[test]
    fn a_write_held_from_its_buffer_is_stored_once_and_released_by_its_drain() {
        let before = image();
        let dir = tempfile::tempdir().unwrap();
        let size = crate::held::capacity(HOLD_LIMIT_BYTES, 1 << 20);
        let file = crate::held::HeldFile::create(dir.path(), 0, size).unwrap();
        let mut s = Served::write_back(armed(&before), Box::new(file), Vec::new()).unwrap();
        let write = |block: u64| Request::Write { sector: block * 8, sectors: 8 };
        for round in 0..3u8 {
            let mut buf = pattern(round, B);
            for b in [2u64, 60, 150] {
                assert_eq!(s.hold(write(b), &buf), Some(4096), "round {round}, block {b}");
                buf.fill(0xee);
            }
            assert_eq!(s.pending(), (3, 3 * 4096));
            assert!(read_block(&mut s, 2) == pattern(round, B), "round {round}");
            assert_eq!(s.pending(), (0, 0));
        }
        assert_eq!(s.write_back_stats().unwrap().drains, 3);
        assert_eq!(s.hold(Request::Read { sector: 8, sectors: 8 }, &[0; B]), None);
        assert_eq!(s.hold(Request::Flush, &[]), None);
        let Target::Engine(e) = s.drained_target().unwrap() else { unreachable!() };
        e.set_state(BowState::Committed).unwrap();
        assert_eq!(s.hold(write(9), &pattern(9, B)), None, "COMMITTED");
        let dev = into_device(s);
        let mut back = vec![0; B];
        for b in [60u64, 150] {
            dev.read_at(&mut back, b * 4096).unwrap();
            assert!(back == vec![0xee; B], "block {b}: the last round's second buffer");
        }
        let mut p = Served::write_back(
            Target::Passthrough(MemDevice::new(16 * B)),
            Box::new(MemHeld::default()),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(p.hold(write(1), &pattern(1, B)), None, "a pass-through");
    }

    /// A server killed while it held writes: a new one over the same engine state (here the
    /// same engine: nothing of the held writes reached it) drains what the file kept, and the
    /// device has every completed write; without the file's copy they are lost.
    #[test]
    fn held_writes_outlive_a_killed_server_only_through_the_held_file() {
        for stored in [true, false] {
            let before = image();
            let log = SharedLog::default();
            let held_log: Box<dyn HeldLog> =
                if stored { Box::new(log.clone()) } else { Box::new(MemHeld::default()) };
            let mut s = Served::write_back(armed(&before), held_log, Vec::new()).unwrap();
            for b in [3u64, 7, 9, 3] {
                assert_eq!(s.handle_round(vec![w(b, u8::try_from(b).unwrap() + 50)]), [Ok(4096)]);
            }
            // The kill: the held writes in memory are gone; the engine is as it was.
            let Served { target, .. } = s;
            let kept = log.0.lock().unwrap().clone();
            let s = Served::write_back(target, Box::new(log.clone()), kept).unwrap();
            assert_eq!(s.pending(), (0, 0));
            let dev = into_device(s);
            let mut back = vec![0; B];
            dev.read_at(&mut back, 3 * 4096).unwrap();
            if stored {
                assert!(back == pattern(53, B), "the later write to block 3 wins");
                dev.read_at(&mut back, 9 * 4096).unwrap();
                assert!(back == pattern(59, B));
            } else {
                assert!(back == pattern(3, B), "without the file the completed writes are lost");
            }
            restores_used_half(&dev, &before);
        }
    }

    /// A log whose clear never happens: the server killed after a drain's batch was issued
    /// and before the file was cleared.
    #[derive(Debug, Clone, Default)]
    struct NeverCleared(SharedLog);

    impl HeldLog for NeverCleared {
        fn append(&mut self, sector: u64, data: &[u8]) -> std::io::Result<Bytes> {
            self.0.append(sector, data)
        }
        fn clear(&mut self) {}
    }

    /// Killed between a drain's batch and the clear: the restarted server gives the engine
    /// the same writes again, which lands the same data in the same place and backs nothing
    /// up twice (block 0 included); the log still restores the checkpoint image.
    #[test]
    fn a_drain_given_twice_changes_nothing() {
        let before = image();
        let log = NeverCleared::default();
        let mut s = Served::write_back(armed(&before), Box::new(log.clone()), Vec::new()).unwrap();
        for b in [0u64, 3, 7, 3, 200] {
            assert_eq!(s.handle_round(vec![w(b, u8::try_from(b % 100).unwrap() + 7)]), [Ok(4096)]);
        }
        assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)]);
        let backups = |s: &Served<MemDevice>| match &s.target {
            Target::Engine(e) => (e.stats().backups, e.space()),
            Target::Passthrough(_) => unreachable!(),
        };
        let once = backups(&s);
        let kept = log.0 .0.lock().unwrap().clone();
        assert_eq!(kept.len(), 5);
        let Served { target, .. } = s;
        let mut s = Served::write_back(target, Box::new(SharedLog::default()), kept).unwrap();
        assert_eq!(backups(&s), once, "the second drain backed something up");
        // Read through the engine: block 0 on the device holds the log.
        for (b, seed) in [(0u64, 7u8), (3, 10), (7, 14), (200, 7)] {
            assert!(read_block(&mut s, b) == pattern(seed, B), "block {b}");
        }
        restores_used_half(&into_device(s), &before);
    }

    /// Rewrites and writes into free space are drained early once [`EARLY_DRAIN_WRITES`] are
    /// held; once one held write needs a backup, the batch waits for the flush.
    #[test]
    fn writes_that_need_no_backup_are_drained_early_in_batches() {
        let before = image();
        let mut s =
            Served::write_back(armed(&before), Box::new(MemHeld::default()), Vec::new()).unwrap();
        let free = u64::try_from(BLOCKS / 2).unwrap();
        let n = u64::try_from(EARLY_DRAIN_WRITES).unwrap();
        // Writes into the free half: each time the server is idle (as it calls it), drained
        // once EARLY_DRAIN_WRITES are held, with no flush.
        for i in 0..n - 1 {
            assert_eq!(s.handle_round(vec![w(free + i, 7)]), [Ok(4096)]);
            assert!(!s.drain_early());
        }
        assert_eq!(s.pending().0, EARLY_DRAIN_WRITES - 1);
        assert_eq!(s.handle_round(vec![w(free + n - 1, 7)]), [Ok(4096)]);
        assert_eq!(s.pending().0, EARLY_DRAIN_WRITES, "held: drained only when asked");
        assert!(s.drain_early());
        assert_eq!(s.pending(), (0, 0), "drained without a flush");
        let stats = s.write_back_stats().unwrap();
        assert_eq!((stats.drains, stats.early_drains), (1, 1));
        // A flush that finds nothing held drains nothing, and is timed with such rounds.
        assert_eq!(s.round_times(), BatchTimes::default());
        assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)]);
        assert_eq!(s.write_back_stats().unwrap().drains, 1);
        assert!(s.round_times().flush_ns > 0, "{:?}", s.round_times());
        // One first touch among them: held until the flush, however many follow.
        assert_eq!(s.handle_round(vec![w(5, 9)]), [Ok(4096)]);
        for i in 0..n {
            assert_eq!(s.handle_round(vec![w(free + n + i, 7)]), [Ok(4096)]);
            assert!(!s.drain_early());
        }
        assert_eq!(s.pending().0, EARLY_DRAIN_WRITES + 1);
        assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)]);
        assert_eq!(s.pending(), (0, 0));
        let stats = s.write_back_stats().unwrap();
        assert_eq!((stats.drains, stats.early_drains), (2, 1));
        let dev = into_device(s);
        let mut back = vec![0; B];
        for b in (free..free + 2 * n).chain([5]) {
            dev.read_at(&mut back, b * 4096).unwrap();
            assert!(back == pattern(if b == 5 { 9 } else { 7 }, B), "block {b}");
        }
        restores_used_half(&dev, &before);
    }

    /// A pass-through's rounds are timed too (its status compares them with the drains).
    #[test]
    fn a_pass_through_times_its_round_writes_and_flushes() {
        let mut s = Served::write_through(Target::Passthrough(MemDevice::from_bytes(image())));
        let r = s.handle_round(vec![w(3, 1), w(4, 2), (Request::Flush, Vec::new())]);
        assert_eq!(r, [Ok(4096), Ok(4096), Ok(0)]);
        let t = s.round_times();
        assert!(t.write_ns > 0 && t.flush_ns > 0 && t.plan_ns == 0, "{t:?}");
        assert_eq!(s.write_back_stats(), None);
    }

    #[test]
    fn what_may_not_be_held_is_not() {
        let before = image();
        let log = SharedLog::default();
        let mut s = Served::write_back(armed(&before), Box::new(log.clone()), Vec::new()).unwrap();
        // Half a block, past the end, a discard: not held, answered as the engine answers.
        let half = (Request::Write { sector: 0, sectors: 4 }, vec![0; 2048]);
        assert_eq!(s.handle_round(vec![half]), [Err(libc::EINVAL)]);
        let past = (Request::Write { sector: BLOCKS as u64 * 8, sectors: 8 }, vec![0; B]);
        assert_eq!(s.handle_round(vec![past]), [Err(libc::EINVAL)]);
        assert_eq!(s.pending(), (0, 0));
        // The budget: half the free backup space less four blocks.
        let Target::Engine(e) = s.target() else { unreachable!() };
        let want = usize::try_from((e.space().free_bytes - 4 * BLOCK) / 2 / BLOCK).unwrap();
        assert!(want > 50, "{want}");
        let mut held = 0;
        for b in 0..100u64 {
            s.handle_round(vec![w(b, 9)]);
            held = held.max(s.pending().0);
        }
        assert_eq!(held, want, "held at most half the free space less four blocks");
        assert!(s.write_back_stats().unwrap().drains >= 1);
        // A pass-through never holds.
        let mut p = Served::write_back(
            Target::Passthrough(MemDevice::new(16 * B)),
            Box::new(MemHeld::default()),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(p.handle_round(vec![w(1, 1)]), [Ok(4096)]);
        assert_eq!(p.pending(), (0, 0));
        // Outside CHECKPOINT nothing is held either.
        let Target::Engine(e) = s.drained_target().unwrap() else { unreachable!() };
        e.set_state(BowState::Committed).unwrap();
        assert_eq!(s.handle_round(vec![w(120, 1)]), [Ok(4096)]);
        assert_eq!(s.pending(), (0, 0));
    }

    /// First touches until the backup space runs out, on a device large enough that the
    /// budget starts from the free-space bound: no held write ever fails at its drain (the
    /// bound and the walks below it keep the held bytes within what the engine can back
    /// up); the writes that do not fit fail with ENOSPC themselves, before they complete.
    #[test]
    fn held_writes_never_run_out_of_backup_space() {
        let blocks = 8192u64;
        let engine = Engine::new(
            MemDevice::new(usize::try_from(blocks).unwrap() * B),
            EngineConfig::new(BlockSize::B4096),
        );
        let mut t = Target::Engine(Box::new(engine));
        let half = u32::try_from(blocks / 2 * 8).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        let mut s = Served::write_back(t, Box::new(MemHeld::default()), Vec::new()).unwrap();
        let (mut held_most, mut nospc) = (0, 0);
        for b in 1..blocks / 2 {
            match s.handle_round(vec![w(b, 3)])[..] {
                [Ok(4096)] => {}
                [Err(libc::ENOSPC)] => nospc += 1,
                ref other => panic!("block {b}: {other:?}"),
            }
            held_most = held_most.max(s.pending().1);
            if b % 1100 == 0 {
                assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)], "{b}");
            }
        }
        assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)]);
        let stats = s.write_back_stats().unwrap();
        assert_eq!(stats.failed, 0, "{stats:?}");
        assert_eq!(
            held_most, HOLD_LIMIT_BYTES as u64,
            "the whole limit was held while space lasted"
        );
        assert!(nospc > 0, "the backup space must run out in this test");
        let Target::Engine(e) = s.target() else { unreachable!() };
        assert!(e.space().free_bytes < 64 * BLOCK, "{:?}", e.space());
    }

    #[test]
    fn disjoint_held_writes_drain_in_device_order_overlapping_ones_as_they_came() {
        let hw = |block: u64, blocks: usize, seed: u8| HeldWrite {
            sector: block * 8,
            data: pattern(seed, blocks * B).into(),
        };
        let sectors = |v: &[HeldWrite]| v.iter().map(|w| w.sector / 8).collect::<Vec<_>>();
        let disjoint = vec![hw(9, 1, 1), hw(2, 2, 2), hw(4, 1, 3), hw(0, 1, 4)];
        assert_eq!(sectors(&in_device_order(disjoint)), [0, 2, 4, 9]);
        // Block 3 written twice (inside the second write, then alone): the order stays.
        let overlapping = vec![hw(9, 1, 1), hw(2, 2, 2), hw(3, 1, 3), hw(0, 1, 4)];
        assert_eq!(sectors(&in_device_order(overlapping)), [9, 2, 3, 0]);
        // And the data that lands is the last write's, either way.
        let before = image();
        let mut s =
            Served::write_back(armed(&before), Box::new(MemHeld::default()), Vec::new()).unwrap();
        for (block, seed) in [(9u64, 1u8), (2, 2), (3, 3), (0, 4), (3, 5), (40, 6)] {
            assert_eq!(s.handle_round(vec![w(block, seed)]), [Ok(4096)]);
        }
        assert_eq!(s.handle_round(vec![(Request::Flush, Vec::new())]), [Ok(0)]);
        for (block, seed) in [(9u64, 1u8), (2, 2), (3, 5), (0, 4), (40, 6)] {
            assert!(read_block(&mut s, block) == pattern(seed, B), "block {block}");
        }
        restores_used_half(&into_device(s), &before);
    }

    /// A device that fails every write after a point: a held write that fails when drained
    /// was already completed, so the next flush fails.
    #[test]
    fn a_held_write_that_fails_when_drained_fails_the_next_flush() {
        use blockcopy::device::DeviceError;
        #[derive(Debug)]
        struct Failing {
            inner: MemDevice,
            fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
        }
        impl BlockDevice for Failing {
            fn size(&self) -> u64 {
                self.inner.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
                self.inner.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
                if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(DeviceError::Io {
                        offset,
                        source: std::io::ErrorKind::Other.into(),
                    });
                }
                self.inner.write_at(buf, offset)
            }
            fn flush(&self) -> Result<(), DeviceError> {
                self.inner.flush()
            }
        }
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dev = Failing { inner: MemDevice::from_bytes(image()), fail: fail.clone() };
        let mut t = Target::Engine(Box::new(Engine::new(dev, EngineConfig::new(BlockSize::B4096))));
        let half = u32::try_from(BLOCKS / 2 * B / 512).unwrap();
        t.handle(Request::Discard { sector: u64::from(half), sectors: half }, &mut []).unwrap();
        let Target::Engine(e) = &mut t else { unreachable!() };
        e.set_state(BowState::Checkpoint).unwrap();
        let mut s = Served::write_back(t, Box::new(MemHeld::default()), Vec::new()).unwrap();
        assert_eq!(s.handle_round(vec![w(3, 1)]), [Ok(4096)]);
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = s.handle_round(vec![(Request::Flush, Vec::new())]);
        assert_eq!(r, [Err(libc::EIO)]);
        assert_eq!(s.write_back_stats().unwrap().failed, 1);
        // A control command's drain says so too.
        assert_eq!(s.handle_round(vec![w(4, 1)]), [Ok(4096)]);
        assert_eq!(s.drain(), Err(libc::EIO));
    }
}
