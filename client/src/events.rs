//! Listener events: an `ICheckpointListener` that forwards into a channel.

use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use checkpoint_aidl::android::system::checkpoint::{
    CheckpointState::CheckpointState,
    ICheckpointListener::{BnCheckpointListener, ICheckpointListener},
};

/// One listener callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The checkpoint state changed (start, commit, abort, budget spent, reset).
    StateChanged(CheckpointState),
    /// A restore made progress: `done` of `total` blocks.
    RestoreProgress { done: i64, total: i64 },
    /// Backup space is low (the health monitor's events).
    LowSpace { free_bytes: i64 },
}

/// The receiving end of a registered listener. The daemon keeps the registration while this
/// process's binder lives; dropping this only stops delivery here.
#[derive(Debug)]
pub struct Events {
    rx: Receiver<Event>,
}

impl Events {
    /// The next event, waiting at most `timeout`; `None` when none came (or at once when the
    /// listener is gone).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event, waiting as long as it takes; `None` when the listener is gone.
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }
}

struct Forwarder {
    tx: Sender<Event>,
}

impl rsbinder::Interface for Forwarder {}

#[allow(non_snake_case, reason = "method names are the AIDL's")]
impl ICheckpointListener for Forwarder {
    fn onStateChanged(&self, state: CheckpointState) -> rsbinder::BinderResult<()> {
        // A closed channel only means nobody listens any more.
        let _ = self.tx.send(Event::StateChanged(state));
        Ok(())
    }

    fn onRestoreProgress(&self, done: i64, total: i64) -> rsbinder::BinderResult<()> {
        let _ = self.tx.send(Event::RestoreProgress { done, total });
        Ok(())
    }

    fn onLowSpace(&self, free_bytes: i64) -> rsbinder::BinderResult<()> {
        let _ = self.tx.send(Event::LowSpace { free_bytes });
        Ok(())
    }
}

/// A receiver and the listener binder to register.
pub(crate) fn channel() -> (Events, rsbinder::Strong<dyn ICheckpointListener>) {
    let (tx, rx) = mpsc::channel();
    (Events { rx }, BnCheckpointListener::new_binder(Forwarder { tx }))
}
