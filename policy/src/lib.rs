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
    decode_env, decode_grubenv, encode_env, encode_grubenv, kernel_cmdline_value, newer_copy,
    BootControl, BootControlError, BootRecord, CrcByteOrder, DecodedEnv, EnvFormatError,
    EnvLocation, EnvVars, FileBootControl, GrubAbScheme, GrubAbState, GrubEnvBootControl,
    GrubSlotState, LoadedEnv, NoBootControl, SchemeSetting, SlotRecord, UBootAbScheme,
    UBootAbState, UBootEnvBootControl, UBootEnvLayout, FW_ENV_LOCK_FILE, GRUBENV_SIGNATURE,
    GRUBENV_SIZE, MAX_PRIORITY, MAX_SLOTS, MAX_TRIES, PROC_CMDLINE,
};
pub use checkpointer::{
    AbortOutcome, BackendInfo, Budget, Checkpointer, CommitOutcome, LowSpace, MarkOutcome,
    PolicyEvent, PolicyOptions, RestoreFallback, RestoreOutcome, RestoreRecord, RestoreResult,
    RestoreRun, RollbackAction, StartOutcome, State, Status, MAX_BUDGET,
};
pub use error::{errno, ErrorKind, PolicyError};
pub use store::{
    bounded, Consumption, Ending, EstimateRecord, Finished, HistoryEvent, HistoryKind, Store,
    StoreError, Tracking, CONSUMPTION_LIMIT, HISTORY_LIMIT, MAX_STORED_PATH_BYTES,
    MAX_STORED_TEXT_BYTES, MAX_STORED_WORD_BYTES, MIGRATIONS, SCHEMA_VERSION,
};
