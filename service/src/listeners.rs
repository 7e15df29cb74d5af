//! Registered ICheckpointListener callbacks and the forwarding of policy events to them.

use std::sync::{mpsc, Mutex, PoisonError};

use checkpoint_aidl::android::system::checkpoint::CheckpointState::CheckpointState;
use checkpoint_aidl::android::system::checkpoint::ICheckpointListener::ICheckpointListener;
use policy::{PolicyEvent, State};
use rsbinder::Strong;

/// The listeners registered through registerListener. A listener whose call fails (its process
/// died) is dropped.
#[derive(Default)]
pub struct Listeners {
    list: Mutex<Vec<Strong<dyn ICheckpointListener>>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").field("count", &self.len()).finish()
    }
}

/// The AIDL state for a policy state.
pub fn aidl_state(state: State) -> CheckpointState {
    match state {
        State::Idle => CheckpointState::NONE,
        State::Pending => CheckpointState::PENDING,
        State::Checkpointing => CheckpointState::CHECKPOINTING,
        State::RollbackPending => CheckpointState::ROLLBACK_NEEDED,
    }
}

impl Listeners {
    /// Adds a listener.
    pub fn add(&self, listener: Strong<dyn ICheckpointListener>) {
        self.list.lock().unwrap_or_else(PoisonError::into_inner).push(listener);
    }

    /// How many listeners are registered.
    pub fn len(&self) -> usize {
        self.list.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every listener (oneway calls: they do not block on the listener), dropping
    /// those whose call fails.
    pub fn notify(
        &self,
        what: &str,
        f: impl Fn(&dyn ICheckpointListener) -> rsbinder::BinderResult<()>,
    ) {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|listener| match f(&**listener) {
            Ok(()) => true,
            Err(e) => {
                log::info!("dropping a listener: {what} failed: {e}");
                false
            }
        });
    }

    /// Forwards one policy event.
    pub fn forward(&self, event: &PolicyEvent) {
        match event {
            PolicyEvent::StateChanged { state } => {
                let state = aidl_state(*state);
                self.notify("onStateChanged", |l| l.onStateChanged(state));
            }
            PolicyEvent::LowSpace(low) => {
                let free = i64::try_from(low.free_bytes).unwrap_or(i64::MAX);
                self.notify("onLowSpace", |l| l.onLowSpace(free));
            }
            // Committed and CheckpointingComplete come with a StateChanged; reboots and
            // restores are reported by the code that performs them.
            _ => {}
        }
    }

    /// Forwards events from `events` until the sender is gone. Runs on a blocking thread.
    pub fn forward_all(&self, events: mpsc::Receiver<PolicyEvent>) {
        for event in events {
            log::debug!("policy event: {event:?}");
            self.forward(&event);
        }
    }
}
