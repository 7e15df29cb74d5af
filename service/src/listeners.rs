//! Registered ICheckpointListener callbacks and the delivery of events to them.
//!
//! Each listener has a bounded queue of its own, drained by a sender thread of its own that
//! makes the (oneway) calls outside every lock, so a listener that stops reading delays nobody:
//! not the state change that produced the event, not a restore reporting progress, not the
//! other listeners. Over RPC a oneway call blocks once the peer's socket buffer is full (a
//! stopped `checkpointctl watch` fills it in a few hundred events); the sender then waits
//! until the socket's write deadline (`socket.write_timeout_ms`) fails the call, while its
//! queue fills and the listener is dropped.
//!
//! A sender thread exists only while its queue has events, so idle listeners cost no thread.
//! A listener is removed when its queue overflows, when a call to it fails, or when its death
//! notification arrives (kernel binder: the process died; RPC: its session ended), and each
//! of those is logged once. The same binder registered again counts once, and the number of
//! listeners is capped overall and per UID (`[listeners]`).

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex, PoisonError, Weak};

use checkpoint_aidl::android::system::checkpoint::CheckpointState::CheckpointState;
use checkpoint_aidl::android::system::checkpoint::ICheckpointListener::ICheckpointListener;
use policy::{PolicyEvent, State};
use rsbinder::{DeathRecipient, SIBinder, Strong, WIBinder};

use crate::config::ListenersConfig;

/// The AIDL state for a policy state.
pub fn aidl_state(state: State) -> CheckpointState {
    match state {
        State::Idle => CheckpointState::NONE,
        State::Pending => CheckpointState::PENDING,
        State::Checkpointing => CheckpointState::CHECKPOINTING,
        State::RollbackPending => CheckpointState::ROLLBACK_NEEDED,
    }
}

/// One event for the listeners: one ICheckpointListener call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerEvent {
    /// onStateChanged.
    StateChanged(CheckpointState),
    /// onRestoreProgress(done, total).
    RestoreProgress {
        /// Blocks restored.
        done: i64,
        /// Blocks to restore.
        total: i64,
    },
    /// onLowSpace(freeBytes).
    LowSpace(i64),
}

impl ListenerEvent {
    fn method(self) -> &'static str {
        match self {
            ListenerEvent::StateChanged(_) => "onStateChanged",
            ListenerEvent::RestoreProgress { .. } => "onRestoreProgress",
            ListenerEvent::LowSpace(_) => "onLowSpace",
        }
    }

    fn deliver(self, listener: &dyn ICheckpointListener) -> rsbinder::BinderResult<()> {
        match self {
            ListenerEvent::StateChanged(state) => listener.onStateChanged(state),
            ListenerEvent::RestoreProgress { done, total } => {
                listener.onRestoreProgress(done, total)
            }
            ListenerEvent::LowSpace(free) => listener.onLowSpace(free),
        }
    }
}

/// A registration that was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenerError {
    /// `listeners.max` are registered.
    #[error("too many listeners: {max} are registered (listeners.max)")]
    TooMany {
        /// The cap.
        max: usize,
    },
    /// The caller's UID has `listeners.max_per_uid` registered.
    #[error("UID {uid} has {max} listeners registered (listeners.max_per_uid)")]
    TooManyForUid {
        /// The caller.
        uid: u32,
        /// The cap.
        max: usize,
    },
}

/// What a registration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// A new listener.
    Added,
    /// This binder was already registered: it still counts once and gets each event once.
    AlreadyRegistered,
}

/// Why a listener was removed (logged once per listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// Its queue overflowed.
    FellBehind,
    /// A call to it failed.
    CallFailed,
    /// Its death notification arrived.
    Died,
}

/// The queue of one listener.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<ListenerEvent>,
    /// A sender thread is draining `events`.
    sending: bool,
    /// Removed: nothing more is queued or sent.
    closed: bool,
}

struct Entry {
    id: u64,
    uid: u32,
    binder: SIBinder,
    listener: Strong<dyn ICheckpointListener>,
    queue: Mutex<Queue>,
    /// Kept alive here: the binder holds only a weak reference to its death recipient.
    _death: Option<Arc<DeathWatch>>,
}

impl Entry {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Registry {
    entries: Vec<Arc<Entry>>,
    next_id: u64,
}

struct Shared {
    limits: ListenersConfig,
    registry: Mutex<Registry>,
}

impl Shared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes listener `id` (if still registered) and logs why, once.
    fn remove(&self, id: u64, why: Removal, detail: &str) {
        let removed = {
            let mut registry = self.registry();
            let position = registry.entries.iter().position(|e| e.id == id);
            position.map(|i| registry.entries.swap_remove(i))
        };
        // Dropped outside the registry lock: the last reference may release a binder proxy.
        let Some(entry) = removed else { return };
        {
            let mut queue = entry.queue();
            queue.closed = true;
            queue.events.clear();
        }
        let uid = entry.uid;
        match why {
            Removal::FellBehind => log::warn!(
                "dropping a listener of UID {uid}: it fell {} events behind",
                self.limits.queue
            ),
            Removal::CallFailed => log::info!("dropping a listener of UID {uid}: {detail}"),
            Removal::Died => log::info!("dropping a listener of UID {uid}: its process is gone"),
        }
    }
}

/// Removes its listener when the binder dies.
struct DeathWatch {
    shared: Weak<Shared>,
    id: u64,
}

impl DeathRecipient for DeathWatch {
    fn binder_died(&self, _who: &WIBinder) {
        if let Some(shared) = self.shared.upgrade() {
            shared.remove(self.id, Removal::Died, "");
        }
    }
}

/// The listeners registered through registerListener.
pub struct Listeners {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").field("count", &self.len()).finish()
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners::new(ListenersConfig::default())
    }
}

impl Listeners {
    /// No listeners yet, with the limits of `[listeners]`.
    pub fn new(limits: ListenersConfig) -> Self {
        Listeners { shared: Arc::new(Shared { limits, registry: Mutex::new(Registry::default()) }) }
    }

    /// Registers `listener` for the caller `uid`, within the caps. The binder's death (when the
    /// transport reports it) removes it.
    pub fn add(
        &self,
        uid: u32,
        listener: Strong<dyn ICheckpointListener>,
    ) -> Result<Registered, ListenerError> {
        let binder = listener.as_binder();
        let limits = &self.shared.limits;
        let entry = {
            let mut registry = self.shared.registry();
            if registry.entries.iter().any(|e| e.binder == binder) {
                return Ok(Registered::AlreadyRegistered);
            }
            if registry.entries.len() >= limits.max {
                return Err(ListenerError::TooMany { max: limits.max });
            }
            if registry.entries.iter().filter(|e| e.uid == uid).count() >= limits.max_per_uid {
                return Err(ListenerError::TooManyForUid { uid, max: limits.max_per_uid });
            }
            let id = registry.next_id;
            registry.next_id += 1;
            let death = Arc::new(DeathWatch { shared: Arc::downgrade(&self.shared), id });
            // Linked under the registry lock, so a death reported at once finds the entry.
            // The recipient runs on another thread and takes the lock after us. A local
            // binder (same process) cannot die apart from us and has no notification.
            let link = if binder.is_remote() {
                binder.link_to_death_arc(&death)
            } else {
                Err(rsbinder::StatusCode::InvalidOperation)
            };
            let death = match link {
                Ok(()) => Some(death),
                Err(rsbinder::StatusCode::DeadObject) => {
                    log::info!("registerListener from UID {uid}: the listener is already dead");
                    return Ok(Registered::Added);
                }
                // A local binder, or an RPC session that cannot tell its loss: the next failed
                // call removes the listener instead.
                Err(e) => {
                    log::debug!("no death notification for a listener of UID {uid}: {e:?}");
                    None
                }
            };
            let entry = Arc::new(Entry {
                id,
                uid,
                binder,
                listener,
                queue: Mutex::new(Queue::default()),
                _death: death,
            });
            registry.entries.push(Arc::clone(&entry));
            entry
        };
        log::debug!("listener {} of UID {} registered", entry.id, entry.uid);
        Ok(Registered::Added)
    }

    /// How many listeners are registered.
    pub fn len(&self) -> usize {
        self.shared.registry().entries.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many listeners `uid` has registered.
    pub fn count_for_uid(&self, uid: u32) -> usize {
        self.shared.registry().entries.iter().filter(|e| e.uid == uid).count()
    }

    /// Queues `event` for every listener and returns at once: the calls are made by each
    /// listener's sender thread. A listener whose queue is full is dropped.
    pub fn notify(&self, event: ListenerEvent) {
        let entries = self.shared.registry().entries.clone();
        let mut fell_behind = Vec::new();
        for entry in entries {
            let start_sender = {
                let mut queue = entry.queue();
                if queue.closed {
                    continue;
                }
                if queue.events.len() >= self.shared.limits.queue {
                    queue.closed = true;
                    fell_behind.push(entry.id);
                    continue;
                }
                queue.events.push_back(event);
                !std::mem::replace(&mut queue.sending, true)
            };
            if start_sender {
                self.spawn_sender(entry);
            }
        }
        for id in fell_behind {
            self.shared.remove(id, Removal::FellBehind, "");
        }
    }

    /// Starts the thread that drains `entry`'s queue; it ends when the queue is empty.
    fn spawn_sender(&self, entry: Arc<Entry>) {
        let shared = Arc::clone(&self.shared);
        let id = entry.id;
        let spawned = std::thread::Builder::new()
            .name("listener-send".to_owned())
            .stack_size(256 * 1024)
            .spawn(move || send_queued(&shared, &entry));
        if let Err(e) = spawned {
            self.shared.remove(id, Removal::CallFailed, &format!("no sender thread: {e}"));
        }
    }

    /// Forwards one policy event.
    pub fn forward(&self, event: &PolicyEvent) {
        match event {
            PolicyEvent::StateChanged { state } => {
                self.notify(ListenerEvent::StateChanged(aidl_state(*state)));
            }
            PolicyEvent::LowSpace(low) => {
                let free = i64::try_from(low.free_bytes).unwrap_or(i64::MAX);
                self.notify(ListenerEvent::LowSpace(free));
            }
            // Committed and CheckpointingComplete come with a StateChanged; reboots and
            // restores are reported by the code that performs them.
            _ => {}
        }
    }

    /// Forwards events from `events` until the sender is gone. Runs on a blocking thread;
    /// it only queues, so it never waits for a listener.
    pub fn forward_all(&self, events: mpsc::Receiver<PolicyEvent>) {
        for event in events {
            log::debug!("policy event: {event:?}");
            self.forward(&event);
        }
    }
}

/// The sender thread of one listener: calls it with each queued event, outside every lock.
fn send_queued(shared: &Shared, entry: &Entry) {
    loop {
        let event = {
            let mut queue = entry.queue();
            match queue.events.pop_front() {
                Some(event) if !queue.closed => event,
                _ => {
                    queue.sending = false;
                    return;
                }
            }
        };
        if let Err(e) = event.deliver(&*entry.listener) {
            let detail = format!("{} failed: {e}", event.method());
            entry.queue().sending = false;
            shared.remove(entry.id, Removal::CallFailed, &detail);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint_aidl::android::system::checkpoint::ICheckpointListener::BnCheckpointListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// A local listener that records events; `blocked` makes its calls wait, as a stopped
    /// process does.
    struct Recorder {
        events: Arc<Mutex<Vec<ListenerEvent>>>,
        blocked: Arc<AtomicBool>,
        fail: bool,
    }

    impl rsbinder::Interface for Recorder {}

    #[allow(non_snake_case, reason = "AIDL names")]
    impl ICheckpointListener for Recorder {
        fn onStateChanged(&self, state: CheckpointState) -> rsbinder::BinderResult<()> {
            self.record(ListenerEvent::StateChanged(state))
        }
        fn onRestoreProgress(&self, done: i64, total: i64) -> rsbinder::BinderResult<()> {
            self.record(ListenerEvent::RestoreProgress { done, total })
        }
        fn onLowSpace(&self, free: i64) -> rsbinder::BinderResult<()> {
            self.record(ListenerEvent::LowSpace(free))
        }
    }

    impl Recorder {
        fn record(&self, event: ListenerEvent) -> rsbinder::BinderResult<()> {
            while self.blocked.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.fail {
                return Err(rsbinder::StatusCode::DeadObject.into());
            }
            self.events.lock().expect("events").push(event);
            Ok(())
        }
    }

    struct Probe {
        events: Arc<Mutex<Vec<ListenerEvent>>>,
        blocked: Arc<AtomicBool>,
        binder: Strong<dyn ICheckpointListener>,
    }

    fn probe(fail: bool) -> Probe {
        let events = Arc::new(Mutex::new(Vec::new()));
        let blocked = Arc::new(AtomicBool::new(false));
        let binder = BnCheckpointListener::new_binder(Recorder {
            events: Arc::clone(&events),
            blocked: Arc::clone(&blocked),
            fail,
        });
        Probe { events, blocked, binder }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn state(n: i32) -> ListenerEvent {
        ListenerEvent::StateChanged(CheckpointState(n))
    }

    fn limits(max: usize, max_per_uid: usize, queue: usize) -> ListenersConfig {
        ListenersConfig { max, max_per_uid, queue }
    }

    #[test]
    fn a_blocked_listener_neither_delays_notify_nor_the_others_and_is_dropped_when_behind() {
        let listeners = Listeners::new(limits(8, 8, 4));
        let stuck = probe(false);
        let live = probe(false);
        stuck.blocked.store(true, Ordering::SeqCst);
        listeners.add(1, stuck.binder.clone()).expect("add");
        listeners.add(2, live.binder.clone()).expect("add");
        for i in 0..20 {
            let started = Instant::now();
            listeners.notify(state(i));
            assert!(started.elapsed() < Duration::from_millis(500), "notify waited");
            // Paced so that the live listener keeps up with its small queue.
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_for("the live listener's 20 events", || live.events.lock().expect("e").len() == 20);
        let got = live.events.lock().expect("e").clone();
        assert_eq!(got, (0..20).map(state).collect::<Vec<_>>(), "in order, none lost");
        assert_eq!(listeners.len(), 1, "the stuck listener fell behind and was dropped");
        assert_eq!(listeners.count_for_uid(1), 0);
        stuck.blocked.store(false, Ordering::SeqCst);
        // Its sender finishes the call it was in and sends nothing more.
        std::thread::sleep(Duration::from_millis(50));
        assert!(stuck.events.lock().expect("e").len() <= 1);
    }

    #[test]
    fn a_listener_whose_call_fails_is_removed() {
        let listeners = Listeners::new(limits(8, 8, 8));
        let broken = probe(true);
        listeners.add(1, broken.binder.clone()).expect("add");
        listeners.notify(state(1));
        wait_for("the failed listener's removal", || listeners.is_empty());
    }

    #[test]
    fn the_same_binder_registered_twice_counts_once_and_hears_each_event_once() {
        let listeners = Listeners::new(limits(8, 2, 8));
        let one = probe(false);
        assert_eq!(listeners.add(1, one.binder.clone()), Ok(Registered::Added));
        for _ in 0..100 {
            assert_eq!(listeners.add(1, one.binder.clone()), Ok(Registered::AlreadyRegistered));
        }
        assert_eq!(listeners.len(), 1);
        listeners.notify(state(2));
        wait_for("one event", || one.events.lock().expect("e").len() == 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(one.events.lock().expect("e").len(), 1);
    }

    #[test]
    fn listeners_are_capped_overall_and_per_uid() {
        let listeners = Listeners::new(limits(3, 2, 8));
        let probes: Vec<Probe> = (0..4).map(|_| probe(false)).collect();
        listeners.add(7, probes[0].binder.clone()).expect("first");
        listeners.add(7, probes[1].binder.clone()).expect("second");
        assert_eq!(
            listeners.add(7, probes[2].binder.clone()),
            Err(ListenerError::TooManyForUid { uid: 7, max: 2 })
        );
        listeners.add(8, probes[2].binder.clone()).expect("another UID");
        assert_eq!(
            listeners.add(9, probes[3].binder.clone()),
            Err(ListenerError::TooMany { max: 3 })
        );
    }

    #[test]
    fn idle_listeners_have_no_sender_thread() {
        let listeners = Listeners::new(limits(8, 8, 8));
        let one = probe(false);
        listeners.add(1, one.binder.clone()).expect("add");
        listeners.notify(state(1));
        wait_for("the event", || one.events.lock().expect("e").len() == 1);
        let registry = listeners.shared.registry();
        wait_for("the sender to end", || !registry.entries[0].queue().sending);
    }
}
