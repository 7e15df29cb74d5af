//! The health monitor (vold's `cp_healthDaemon`, vold-checkpoint.md §4.8), out of daemon
//! startup and without its flood: while the boot is checkpointing, poll every backend's
//! corrected free backup space; below the backend's own growth threshold (the snapshot
//! backend's `grow_at_percent`) ask it to grow, once per size of its backup area; below the
//! warning threshold record one warning; below the action threshold first ask the backend to
//! grow its backup area, and if it cannot (or it is still low at the next poll) run the
//! configured action once: commit (vold's `commit_on_full`) or abort and reboot. A failed
//! action is retried after an exponential backoff, so a commit that keeps failing writes a
//! handful of history rows, not two a second.
//!
//! Every decision goes to the history (`low_space` rows) and to the listeners (`onLowSpace`).
//!
//! Sizing: between two polls the device may write `interval × max write rate` bytes into the
//! backup area; the action threshold must exceed that, or the backup layer fills before the
//! monitor sees it (a full dm-snapshot store is invalidated by the kernel and then fails every
//! I/O; a full dm-bow fails writes with ENOSPC). `Config::validate` refuses a configuration
//! that breaks the inequality (docs/configuration.md, `[monitor]`).
//!
//! The decision logic ([`Monitor::poll`]) is pure over a [`Target`] and a time argument, so it
//! is tested with a fake backend and a fake clock; [`spawn`] drives it on a thread.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{Action, BackendError, BackupSpace, LowSpace};

use crate::config::{LowSpaceActionConfig, MonitorConfig};
use crate::service::Daemon;

/// The reboot reason of the abort action (vold's).
pub const LOW_SPACE_REASON: &str = "checkpoint,low_space";

/// What the monitor acts on: the policy and the daemon, or a fake in tests.
pub trait Target {
    /// Whether this boot is checkpointing (the monitor does nothing otherwise).
    fn is_checkpointing(&self) -> bool;
    /// Every backend's backup space, by name.
    fn space(&self) -> Vec<(String, Result<BackupSpace, BackendError>)>;
    /// Asks `backend` to grow its backup area.
    fn grow(&self, backend: &str) -> Result<Action, String>;
    /// Runs the low-space action.
    fn act(&self, action: LowSpaceActionConfig) -> Result<(), String>;
    /// Records one monitor event (history and listeners).
    fn record(&self, low: &LowSpace, outcome: &str, message: &str);
}

/// Per backend: what was done in the current low-space episode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Watch {
    /// Below the warning threshold and warned (reset above it).
    warned: bool,
    /// Below the action threshold and asked to grow (reset above it).
    grow_tried: bool,
    /// Its space could not be read (logged once until it can again).
    unreadable: bool,
    /// The size of the backup area when it was last asked to grow at its own threshold: asked
    /// once per size (a grown area has a new size and a new threshold; one that could not
    /// grow is not asked again every poll). Kept when the space recovers.
    grown_at_total: Option<u64>,
}

/// The low-space action's attempts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Attempts {
    /// Failed attempts in a row.
    failures: u32,
    /// No attempt before this time.
    not_before: Option<Duration>,
    /// The action succeeded; nothing more until the boot stops checkpointing.
    done: bool,
}

/// The monitor's decision state.
#[derive(Debug)]
pub struct Monitor {
    config: MonitorConfig,
    watches: BTreeMap<String, Watch>,
    attempts: Attempts,
}

impl Monitor {
    /// A monitor with these thresholds and backoff.
    pub fn new(config: MonitorConfig) -> Self {
        Monitor { config, watches: BTreeMap::new(), attempts: Attempts::default() }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let initial = Duration::from_millis(self.config.backoff_initial_ms);
        let max = Duration::from_millis(self.config.backoff_max_ms);
        let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
        initial.saturating_mul(factor).min(max)
    }

    /// One poll at time `now` (any monotonic clock; tests pass a fake one).
    pub fn poll(&mut self, now: Duration, target: &dyn Target) {
        if !target.is_checkpointing() {
            self.watches.clear();
            self.attempts = Attempts::default();
            return;
        }
        let mut act_for: Option<LowSpace> = None;
        for (name, space) in target.space() {
            let watch = self.watches.entry(name.clone()).or_default();
            let (free, grow_below, total) = match space {
                Ok(BackupSpace {
                    free_bytes: Some(free),
                    grow_below_free_bytes,
                    total_bytes,
                    ..
                }) => {
                    watch.unreadable = false;
                    (free, grow_below_free_bytes, total_bytes)
                }
                Ok(_) => continue, // the backend cannot tell
                Err(e) => {
                    if !watch.unreadable {
                        log::warn!("health monitor: backend {name}: cannot read its space: {e}");
                        watch.unreadable = true;
                    }
                    continue;
                }
            };
            if let (Some(below), Some(total)) = (grow_below, total) {
                if free < below && watch.grown_at_total != Some(total) {
                    watch.grown_at_total = Some(total);
                    let low =
                        LowSpace { backend: name.clone(), free_bytes: free, min_free_bytes: below };
                    if grow(target, &low, "backup area grown at its threshold") {
                        continue; // the next poll sees the new space
                    }
                    // It cannot grow: the thresholds below apply.
                }
            }
            if free >= self.config.warn_free_bytes {
                watch.warned = false;
                watch.grow_tried = false;
                continue;
            }
            if !watch.warned {
                watch.warned = true;
                let low = LowSpace {
                    backend: name.clone(),
                    free_bytes: free,
                    min_free_bytes: self.config.warn_free_bytes,
                };
                log::warn!("health monitor: backend {name} has {free} bytes of backup space left");
                target.record(&low, "warning", "backup space low");
            }
            if free >= self.config.action_free_bytes {
                watch.grow_tried = false;
                continue;
            }
            let low = LowSpace {
                backend: name.clone(),
                free_bytes: free,
                min_free_bytes: self.config.action_free_bytes,
            };
            if !watch.grow_tried {
                watch.grow_tried = true;
                if grow(target, &low, "backup area grown") {
                    continue; // the next poll sees the new space
                }
                // It cannot grow: the action applies now.
            }
            act_for.get_or_insert(low);
        }
        if let Some(low) = act_for {
            self.act(now, &low, target);
        }
    }

    fn act(&mut self, now: Duration, low: &LowSpace, target: &dyn Target) {
        if self.attempts.done || self.attempts.not_before.is_some_and(|t| now < t) {
            return;
        }
        let (word, text) = match self.config.action {
            LowSpaceActionConfig::Commit => {
                ("commit", "Low space for checkpointing. Commiting changes")
            }
            LowSpaceActionConfig::AbortAndReboot => {
                ("abort", "Low space for checkpointing. Rebooting")
            }
        };
        log::warn!("{text} (backend {}: {} bytes free)", low.backend, low.free_bytes);
        target.record(low, word, text);
        match target.act(self.config.action) {
            Ok(()) => self.attempts.done = true,
            Err(e) => {
                self.attempts.failures = self.attempts.failures.saturating_add(1);
                let wait = self.backoff(self.attempts.failures);
                self.attempts.not_before = Some(now.saturating_add(wait));
                log::error!(
                    "health monitor: {word} failed ({} in a row), next attempt in {} ms: {e}",
                    self.attempts.failures,
                    wait.as_millis()
                );
                target.record(low, &format!("{word}_failed"), &e);
            }
        }
    }
}

/// Asks `low.backend` to grow; records a growth (`grown`, with `message`) or a failure
/// (`grow_failed`). Whether it grew.
fn grow(target: &dyn Target, low: &LowSpace, message: &str) -> bool {
    let name = &low.backend;
    match target.grow(name) {
        Ok(Action::Changed) => {
            log::info!(
                "health monitor: grew the backup area of {name} ({} bytes free, threshold {})",
                low.free_bytes,
                low.min_free_bytes
            );
            target.record(low, "grown", message);
            true
        }
        Ok(Action::Identity) => false,
        Err(e) => {
            log::error!("health monitor: growing {name} failed: {e}");
            target.record(low, "grow_failed", &e);
            false
        }
    }
}

/// The daemon as the monitor's target.
#[derive(Debug)]
pub struct DaemonTarget(pub Arc<Daemon>);

impl Target for DaemonTarget {
    fn is_checkpointing(&self) -> bool {
        self.0.checkpointer().is_checkpointing()
    }

    fn space(&self) -> Vec<(String, Result<BackupSpace, BackendError>)> {
        // Through the daemon: it keeps the high-water mark of the checkpoint's use (learning).
        self.0.backend_space()
    }

    fn grow(&self, backend: &str) -> Result<Action, String> {
        self.0.checkpointer().grow_backend(backend).map_err(|e| e.to_string())
    }

    fn act(&self, action: LowSpaceActionConfig) -> Result<(), String> {
        match action {
            LowSpaceActionConfig::Commit => self.0.commit_changes(),
            LowSpaceActionConfig::AbortAndReboot => self.0.abort_changes(LOW_SPACE_REASON, false),
        }
        .map_err(|e| e.to_string())
    }

    fn record(&self, low: &LowSpace, outcome: &str, message: &str) {
        if let Err(e) = self.0.checkpointer().record_low_space(low, outcome, message) {
            log::error!("health monitor: cannot record `{outcome}` in the history: {e}");
        }
    }
}

/// Starts the monitor thread (`config.interval_ms` > 0); it lives as long as the process.
pub fn spawn(daemon: Arc<Daemon>, config: MonitorConfig) -> std::io::Result<()> {
    let interval = Duration::from_millis(config.interval_ms);
    let target = DaemonTarget(daemon);
    let mut monitor = Monitor::new(config);
    let start = Instant::now();
    std::thread::Builder::new().name("health-monitor".into()).spawn(move || loop {
        std::thread::sleep(interval);
        monitor.poll(start.elapsed(), &target);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A fake backend set: scripted free space, grow results and action results.
    #[derive(Default)]
    struct Fake {
        checkpointing: Cell<bool>,
        free: RefCell<BTreeMap<String, Option<u64>>>,
        unreadable: RefCell<Vec<String>>,
        /// Backends with a bounded area: its size; they ask to grow when a quarter of it is
        /// free (`grow_at_percent = 75`).
        total: RefCell<BTreeMap<String, u64>>,
        /// What grow answers (absent: Identity); a successful grow adds `grow_by` (to the free
        /// space and the size).
        grow_ok: Cell<bool>,
        grow_by: Cell<u64>,
        /// Action results, consumed in order (absent: Ok).
        act_results: RefCell<Vec<Result<(), String>>>,
        log: RefCell<Vec<String>>,
    }

    impl Fake {
        fn with(backends: &[(&str, u64)]) -> Fake {
            let fake = Fake::default();
            fake.checkpointing.set(true);
            for (name, free) in backends {
                fake.free.borrow_mut().insert((*name).into(), Some(*free));
            }
            fake
        }
        fn set_free(&self, name: &str, free: u64) {
            self.free.borrow_mut().insert(name.into(), Some(free));
        }
        fn take_log(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.borrow_mut())
        }
    }

    impl Target for Fake {
        fn is_checkpointing(&self) -> bool {
            self.checkpointing.get()
        }
        fn space(&self) -> Vec<(String, Result<BackupSpace, BackendError>)> {
            self.free
                .borrow()
                .iter()
                .map(|(name, free)| {
                    let r = if self.unreadable.borrow().contains(name) {
                        Err(BackendError::NotSetUp { backend: name.clone() })
                    } else {
                        let total = self.total.borrow().get(name).copied();
                        Ok(BackupSpace {
                            free_bytes: *free,
                            total_bytes: total,
                            grow_below_free_bytes: total.map(|t| t / 4),
                            ..BackupSpace::default()
                        })
                    };
                    (name.clone(), r)
                })
                .collect()
        }
        fn grow(&self, backend: &str) -> Result<Action, String> {
            self.log.borrow_mut().push(format!("grow {backend}"));
            if !self.grow_ok.get() {
                return Ok(Action::Identity);
            }
            let mut free = self.free.borrow_mut();
            let f = free.get_mut(backend).expect("known backend");
            *f = f.map(|v| v + self.grow_by.get());
            if let Some(t) = self.total.borrow_mut().get_mut(backend) {
                *t += self.grow_by.get();
            }
            Ok(Action::Changed)
        }
        fn act(&self, action: LowSpaceActionConfig) -> Result<(), String> {
            self.log.borrow_mut().push(format!("act {action:?}"));
            let mut results = self.act_results.borrow_mut();
            if results.is_empty() {
                Ok(())
            } else {
                results.remove(0)
            }
        }
        fn record(&self, low: &LowSpace, outcome: &str, _message: &str) {
            self.log.borrow_mut().push(format!(
                "record {} {outcome} {} < {}",
                low.backend, low.free_bytes, low.min_free_bytes
            ));
        }
    }

    fn config() -> MonitorConfig {
        MonitorConfig {
            warn_free_bytes: 200 * MIB,
            action_free_bytes: 100 * MIB,
            backoff_initial_ms: 1000,
            backoff_max_ms: 8000,
            ..MonitorConfig::default()
        }
    }

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn plenty_of_space_does_nothing_and_a_warning_is_recorded_once() {
        let fake = Fake::with(&[("snap", 500 * MIB)]);
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert!(fake.take_log().is_empty());
        fake.set_free("snap", 150 * MIB);
        for t in 1..10 {
            m.poll(at(t * 500), &fake);
        }
        assert_eq!(fake.take_log(), [format!("record snap warning {} < {}", 150 * MIB, 200 * MIB)]);
        // Back above the warning threshold, then below: a new episode, a new warning.
        fake.set_free("snap", 300 * MIB);
        m.poll(at(6000), &fake);
        fake.set_free("snap", 199 * MIB);
        m.poll(at(6500), &fake);
        assert_eq!(fake.take_log().len(), 1);
    }

    /// The snapshot backend's `grow_at_percent`: grown at its own threshold, before the
    /// monitor's, once per size of its area; one that cannot grow is asked once, and the
    /// monitor's thresholds still apply to it.
    #[test]
    fn a_backend_below_its_growth_threshold_is_grown_once_per_size_before_any_warning() {
        let fake = Fake::with(&[("snap", 600 * MIB)]);
        fake.total.borrow_mut().insert("snap".into(), 1000 * MIB);
        fake.grow_ok.set(true);
        fake.grow_by.set(400 * MIB);
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert!(fake.take_log().is_empty(), "600 of 1000 MiB free: above its threshold");
        fake.set_free("snap", 240 * MIB);
        m.poll(at(100), &fake);
        assert_eq!(
            fake.take_log(),
            ["grow snap".to_owned(), format!("record snap grown {} < {}", 240 * MIB, 250 * MIB)]
        );
        m.poll(at(200), &fake);
        assert!(fake.take_log().is_empty(), "640 of 1400 MiB free");
        fake.set_free("snap", 340 * MIB);
        m.poll(at(300), &fake);
        assert_eq!(fake.take_log()[0], "grow snap", "the new size's threshold, 350 MiB");
        // One that cannot grow: asked once at its threshold, then the monitor's thresholds.
        fake.grow_ok.set(false);
        fake.set_free("snap", 400 * MIB); // of 1800 MiB: below 450
        m.poll(at(400), &fake);
        assert_eq!(fake.take_log(), ["grow snap"]);
        m.poll(at(500), &fake);
        assert!(fake.take_log().is_empty(), "not asked again at the same size");
        fake.set_free("snap", 50 * MIB);
        m.poll(at(600), &fake);
        assert_eq!(
            fake.take_log(),
            [
                format!("record snap warning {} < {}", 50 * MIB, 200 * MIB),
                "grow snap".to_owned(),
                format!("record snap commit {} < {}", 50 * MIB, 100 * MIB),
                "act Commit".to_owned(),
            ]
        );
    }

    #[test]
    fn not_checkpointing_does_nothing() {
        let fake = Fake::with(&[("snap", 0)]);
        fake.checkpointing.set(false);
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert!(fake.take_log().is_empty());
    }

    #[test]
    fn below_the_action_threshold_a_backend_that_grows_is_grown_first() {
        let fake = Fake::with(&[("snap", 50 * MIB)]);
        fake.grow_ok.set(true);
        fake.grow_by.set(400 * MIB);
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert_eq!(
            fake.take_log(),
            [
                format!("record snap warning {} < {}", 50 * MIB, 200 * MIB),
                "grow snap".to_owned(),
                format!("record snap grown {} < {}", 50 * MIB, 100 * MIB),
            ]
        );
        m.poll(at(500), &fake); // 450 MiB free now: nothing
        assert!(fake.take_log().is_empty());
        // It fills again: a new episode grows again before any action.
        fake.set_free("snap", 10 * MIB);
        m.poll(at(1000), &fake);
        let log = fake.take_log();
        assert!(log.contains(&"grow snap".to_owned()), "{log:?}");
        assert!(!log.iter().any(|l| l.starts_with("act")), "{log:?}");
    }

    #[test]
    fn still_low_after_growing_runs_the_action_once() {
        let fake = Fake::with(&[("snap", 50 * MIB)]);
        fake.grow_ok.set(true);
        fake.grow_by.set(10 * MIB); // not enough
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert_eq!(
            fake.take_log().last().map(String::as_str),
            Some(format!("record snap grown {} < {}", 50 * MIB, 100 * MIB).as_str())
        );
        m.poll(at(500), &fake);
        assert_eq!(
            fake.take_log(),
            [format!("record snap commit {} < {}", 60 * MIB, 100 * MIB), "act Commit".to_owned()]
        );
        // The commit succeeded (the fake's boot still says checkpointing): never again.
        for t in 2..20 {
            m.poll(at(t * 500), &fake);
        }
        assert!(fake.take_log().is_empty());
    }

    #[test]
    fn a_backend_that_cannot_grow_gets_the_action_in_the_same_poll() {
        let fake = Fake::with(&[("bow", 5 * MIB)]);
        let mut m = Monitor::new(MonitorConfig {
            action: LowSpaceActionConfig::AbortAndReboot,
            ..config()
        });
        m.poll(at(0), &fake);
        assert_eq!(
            fake.take_log(),
            [
                format!("record bow warning {} < {}", 5 * MIB, 200 * MIB),
                "grow bow".to_owned(),
                format!("record bow abort {} < {}", 5 * MIB, 100 * MIB),
                "act AbortAndReboot".to_owned(),
            ]
        );
    }

    #[test]
    fn a_failing_action_backs_off_exponentially_up_to_the_maximum() {
        let fake = Fake::with(&[("snap", MIB)]);
        *fake.act_results.borrow_mut() = vec![Err("EIO".into()); 10];
        let mut m = Monitor::new(config());
        let mut attempts = Vec::new();
        // Poll every 250 ms for 40 s.
        for step in 0..160u64 {
            let now = step * 250;
            m.poll(at(now), &fake);
            if fake.take_log().iter().any(|l| l == "act Commit") {
                attempts.push(now);
            }
        }
        // 0, then +1 s, +2 s, +4 s, +8 s (the maximum), +8 s, ...
        assert_eq!(attempts, [0, 1000, 3000, 7000, 15000, 23000, 31000, 39000]);
    }

    #[test]
    fn history_rows_stay_few_while_an_action_keeps_failing() {
        let fake = Fake::with(&[("snap", MIB)]);
        *fake.act_results.borrow_mut() = vec![Err("EIO".into()); 100];
        let mut m = Monitor::new(config());
        let mut records = 0;
        for step in 0..120u64 {
            m.poll(at(step * 1000), &fake); // two minutes at vold's 1 s poll
            records += fake.take_log().iter().filter(|l| l.starts_with("record")).count();
        }
        // vold-style retries would write 2 rows a second (240); with backoff: the warning,
        // and per attempt its row and its failure; attempts at 0, 1, 3, 7, 15 s, then every
        // 8 s (the maximum) from 23 to 119 s: 5 + 13 = 18.
        assert_eq!(records, 1 + 2 * 18, "{records}");
    }

    #[test]
    fn one_action_for_several_low_backends_and_an_unreadable_one_is_skipped() {
        let fake = Fake::with(&[("a", MIB), ("b", 2 * MIB), ("c", 0)]);
        fake.unreadable.borrow_mut().push("c".into());
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        let log = fake.take_log();
        assert_eq!(log.iter().filter(|l| l.starts_with("act")).count(), 1, "{log:?}");
        assert!(!log.iter().any(|l| l.contains(" c ")), "{log:?}");
    }

    #[test]
    fn a_new_checkpointed_boot_state_resets_the_episode() {
        let fake = Fake::with(&[("snap", MIB)]);
        let mut m = Monitor::new(config());
        m.poll(at(0), &fake);
        assert!(fake.take_log().contains(&"act Commit".to_owned()));
        fake.checkpointing.set(false);
        m.poll(at(500), &fake);
        fake.checkpointing.set(true);
        m.poll(at(1000), &fake);
        assert!(fake.take_log().contains(&"act Commit".to_owned()));
    }
}
