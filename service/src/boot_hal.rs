//! The boot control HAL, connected in the background so the daemon can serve before it exists.
//!
//! On Android the default boot HAL is `class early_hal`, which init starts at `late-fs`, while
//! checkpointd starts at `early-fs` and init blocks on `checkpointctl checkpoint
//! markBootAttempt` at `post-fs`: a daemon that waited for the HAL before registering its own
//! service would stall that `exec` until its timeout. So the daemon registers first and
//! [`LazyHal`] keeps looking the HAL up on a thread of its own.
//!
//! Two views of it:
//! * [`LazyBootControl`], the [`policy::BootControl`] the policy holds: it never waits. Before
//!   the HAL is found every call fails at once with [`BootControlError::Hal`], which the
//!   policy's best-effort paths already treat as "no slot known" (the slot of a history row,
//!   `getStatus`'s current slot).
//! * [`BootHalGate`], which the service asks before a method whose answer depends on the HAL
//!   (`needsCheckpoint` latches its first answer; `commitChanges` marks the slot): it waits up
//!   to `boot_control.wait_secs` for the HAL, else the call fails with
//!   [`HalNotReady`] (`EAGAIN`) and nothing was evaluated or changed, so a later call still
//!   gives the right answer.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bootctl_hal::{HalBootControl, HalError};
use policy::{BootControl, BootControlError};

/// Pause after a failed RPC attempt (a socket that does not exist yet fails at once).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A method that needs the boot control HAL was called before the HAL could be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "{method} needs the boot control HAL ({uri}), which is not available yet (waited {waited:?}; \
     last lookup: {last_error}); nothing was changed, try again"
)]
pub struct HalNotReady {
    /// The AIDL method that needed it.
    pub method: &'static str,
    /// The HAL's URI.
    pub uri: String,
    /// How long this call waited.
    pub waited: Duration,
    /// Why the last lookup failed.
    pub last_error: String,
}

#[derive(Debug)]
enum Lookup {
    /// Still looking; the last attempt's error, if one was made.
    Waiting(Option<String>),
    Found(Arc<HalBootControl>),
    /// The name is registered with another interface: looking again cannot help.
    Failed(String),
}

/// The HAL, looked up on a background thread until found.
pub struct LazyHal {
    uri: rsbinder::Uri,
    reconnect_wait: Duration,
    state: Mutex<Lookup>,
    changed: Condvar,
}

impl fmt::Debug for LazyHal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyHal")
            .field("uri", &self.uri.to_string())
            .field("state", &*self.lock())
            .finish()
    }
}

impl LazyHal {
    /// The HAL at `uri`, not looked up yet. `reconnect_wait` bounds each lookup, the HAL's
    /// replies and the lookup after the HAL died (see [`HalBootControl::connect_uri`]).
    pub fn new(uri: rsbinder::Uri, reconnect_wait: Duration) -> Arc<LazyHal> {
        Arc::new(LazyHal {
            uri,
            reconnect_wait,
            state: Mutex::new(Lookup::Waiting(None)),
            changed: Condvar::new(),
        })
    }

    /// Starts looking the HAL up on a thread of its own, which ends when the HAL is found or
    /// when the name turns out to be another interface.
    pub fn spawn_lookup(self: &Arc<Self>) -> std::io::Result<()> {
        let worker = Arc::clone(self);
        std::thread::Builder::new()
            .name("boot-hal-lookup".into())
            .spawn(move || worker.look_up())?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Lookup> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn look_up(&self) {
        let reconnect_wait = self.reconnect_wait;
        let started = Instant::now();
        let mut reported = false;
        loop {
            let attempt = Instant::now();
            // On kernel binder one attempt polls the service manager for `reconnect_wait`; on
            // an RPC endpoint it is one connection, which fails at once while the socket is
            // missing. The timeout also bounds the HAL's replies and a lookup after its death.
            let next = match HalBootControl::connect_uri(&self.uri, reconnect_wait) {
                Ok(hal) => Lookup::Found(Arc::new(hal)),
                Err(e @ HalError::WrongInterface { .. }) => Lookup::Failed(e.to_string()),
                Err(e) => Lookup::Waiting(Some(e.to_string())),
            };
            let done = !matches!(next, Lookup::Waiting(_));
            match &next {
                Lookup::Found(_) => log::info!(
                    "boot control HAL {} found, {:?} after the lookup started",
                    self.uri,
                    started.elapsed()
                ),
                Lookup::Failed(e) => log::error!("boot control HAL {}: {e}", self.uri),
                Lookup::Waiting(Some(e)) if !reported && started.elapsed() >= reconnect_wait => {
                    reported = true;
                    log::warn!(
                        "boot control HAL {} still not available after {:?} ({e}); still \
                         looking (needsCheckpoint, commitChanges and the other slot calls fail \
                         with EAGAIN until it is)",
                        self.uri,
                        started.elapsed()
                    );
                }
                Lookup::Waiting(_) => {}
            }
            *self.lock() = next;
            self.changed.notify_all();
            if done {
                return;
            }
            if attempt.elapsed() < RETRY_PAUSE {
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }

    /// The HAL if it has been found.
    pub fn get(&self) -> Option<Arc<HalBootControl>> {
        match &*self.lock() {
            Lookup::Found(hal) => Some(Arc::clone(hal)),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the HAL; the error says why it is not there.
    pub fn wait(&self, method: &'static str, timeout: Duration) -> Result<(), HalNotReady> {
        let start = Instant::now();
        let mut state = self.lock();
        loop {
            let last_error = match &*state {
                Lookup::Found(_) => return Ok(()),
                Lookup::Failed(e) => e.clone(),
                Lookup::Waiting(e) => {
                    let left = timeout.saturating_sub(start.elapsed());
                    if !left.is_zero() {
                        state = self
                            .changed
                            .wait_timeout(state, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                    e.clone().unwrap_or_else(|| "none finished yet".to_owned())
                }
            };
            return Err(HalNotReady {
                method,
                uri: self.uri.to_string(),
                waited: start.elapsed(),
                last_error,
            });
        }
    }

    fn not_found(&self) -> BootControlError {
        let why = match &*self.lock() {
            Lookup::Waiting(Some(e)) | Lookup::Failed(e) => e.clone(),
            Lookup::Waiting(None) => "lookup in progress".to_owned(),
            Lookup::Found(_) => "found".to_owned(),
        };
        BootControlError::Hal(format!("{} is not available yet ({why})", self.uri).into())
    }
}

/// The [`BootControl`] over a [`LazyHal`]: the HAL's answers once it is found, an immediate
/// [`BootControlError::Hal`] before.
#[derive(Debug)]
pub struct LazyBootControl(Arc<LazyHal>);

impl LazyBootControl {
    /// Over `hal`.
    pub fn new(hal: Arc<LazyHal>) -> Self {
        LazyBootControl(hal)
    }

    fn hal(&self) -> Result<Arc<HalBootControl>, BootControlError> {
        self.0.get().ok_or_else(|| self.0.not_found())
    }
}

impl BootControl for LazyBootControl {
    fn slot_count(&self) -> Result<u32, BootControlError> {
        self.hal()?.slot_count()
    }
    fn current_slot(&self) -> Result<u32, BootControlError> {
        self.hal()?.current_slot()
    }
    fn slot_suffix(&self, slot: u32) -> Result<String, BootControlError> {
        self.hal()?.slot_suffix(slot)
    }
    fn is_slot_marked_successful(&self, slot: u32) -> Result<bool, BootControlError> {
        self.hal()?.is_slot_marked_successful(slot)
    }
    fn mark_boot_successful(&self) -> Result<(), BootControlError> {
        self.hal()?.mark_boot_successful()
    }
    fn set_active_boot_slot(&self, slot: u32) -> Result<(), BootControlError> {
        self.hal()?.set_active_boot_slot(slot)
    }
}

/// What the service asks before a method whose answer needs the boot control HAL. Without a
/// HAL (`boot_control.type` none or file) it never waits.
#[derive(Clone, Debug, Default)]
pub struct BootHalGate {
    hal: Option<(Arc<LazyHal>, Duration)>,
}

impl BootHalGate {
    /// A gate that waits up to `timeout` for `hal`.
    pub fn new(hal: Arc<LazyHal>, timeout: Duration) -> Self {
        BootHalGate { hal: Some((hal, timeout)) }
    }

    /// Ok once the HAL is there (at once without a HAL); else waits for it, bounded.
    pub fn ready_for(&self, method: &'static str) -> Result<(), HalNotReady> {
        match &self.hal {
            None => Ok(()),
            Some((hal, timeout)) => hal.wait(method, *timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bootctl_hal::fake::{FakeBootControl, FakeState};

    fn uri(path: &std::path::Path) -> rsbinder::Uri {
        bootctl_hal::socket_uri(path).with_service(bootctl_hal::INSTANCE)
    }

    #[test]
    fn calls_fail_at_once_until_the_hal_appears_then_use_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("bootctl.sock");
        let lazy = LazyHal::new(uri(&socket), Duration::from_secs(2));
        lazy.spawn_lookup().expect("thread");
        let boot = LazyBootControl::new(Arc::clone(&lazy));
        let gate = BootHalGate::new(Arc::clone(&lazy), Duration::from_millis(200));

        let before = Instant::now();
        let err = boot.current_slot().unwrap_err();
        assert!(before.elapsed() < Duration::from_millis(100), "the trait never waits");
        assert!(matches!(err, BootControlError::Hal(_)), "{err}");
        assert!(err.to_string().contains("not available yet"), "{err}");
        let not_ready = gate.ready_for("needsCheckpoint").unwrap_err();
        assert_eq!(not_ready.method, "needsCheckpoint");
        assert!(not_ready.waited >= Duration::from_millis(200), "{not_ready}");

        let fake = FakeBootControl::new(FakeState::after_update(2, 1));
        let _server = fake.serve_socket(&socket).expect("serve the fake");
        let wait = BootHalGate::new(Arc::clone(&lazy), Duration::from_secs(10));
        wait.ready_for("needsCheckpoint").expect("found within the wait");
        assert_eq!(boot.current_slot().expect("slot"), 1);
        assert!(!boot.is_slot_marked_successful(1).expect("successful bit"));
        boot.mark_boot_successful().expect("mark");
        assert!(fake.state().slots[1].successful);
    }

    #[test]
    fn no_hal_configured_never_waits() {
        BootHalGate::default().ready_for("commitChanges").expect("no HAL: nothing to wait for");
    }
}
