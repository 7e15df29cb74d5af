//! checkpointd's state store, boot-attempt policy and boot control.
//!
//! Pure of binder, tokio and OS-specific code so the policy is testable alone. The semantics
//! are vold's (see `docs/state-machine.md`), with vold's known bugs fixed on purpose.
#![forbid(unsafe_code)]

mod backend;
mod bootctl;
mod checkpointer;
mod error;
mod store;

#[cfg(test)]
mod tests;

pub use backend::{
    Action, Backend, BackendError, BackendKind, BackendState, BackendStatus, BackupSpace,
    RestoreReport, RestoreRequest,
};
pub use bootctl::{
    BootControl, BootControlError, BootRecord, FileBootControl, NoBootControl, SlotRecord,
    MAX_PRIORITY, MAX_SLOTS, MAX_TRIES,
};
pub use checkpointer::{
    AbortOutcome, BackendInfo, Budget, Checkpointer, CommitOutcome, LowSpace, MarkOutcome,
    PolicyEvent, PolicyOptions, RestoreFallback, RestoreOutcome, RestoreRecord, RestoreResult,
    RestoreRun, RollbackAction, StartOutcome, State, Status,
};
pub use error::{errno, ErrorKind, PolicyError};
pub use store::{
    HistoryEvent, HistoryKind, Store, StoreError, HISTORY_LIMIT, MIGRATIONS, SCHEMA_VERSION,
};
