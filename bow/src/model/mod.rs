//! The dm-bow engine: a pure, deterministic model of the kernel target (dm-bow-format.md §1–§6).
//!
//! [`BowEngine`] is the interface every engine offers (STYLE rule 2): the model here, and later
//! the real kernel driver (a dm `bow` device plus its sysfs `state`/`free` files) in the OS
//! crate. [`BowModel`] runs the kernel's algorithm over any [`BlockDevice`](crate::device::BlockDevice)
//! and leaves the same bytes on it, in the same order of writes and flushes, as the kernel does
//! on its underlying device. See `docs/engine-model.md` for the quirks it reproduces on purpose.
//!
//! The algorithm itself is [`Worker`] (the state, the range map, the log and the CHECKPOINT
//! worker), written once: [`BowModel`] and `bow-engine`'s userspace engine both run it, each
//! with its own [`WorkerIo`] (who does the I/O and when, and where copies go).

mod engine;
mod io;
pub mod ranges;
pub mod worker;

pub use engine::{
    BlkStatus, BowModel, BowState, DiscardAction, EngineError, EngineErrorKind, KernelWarning,
    LoggedEntry, ModelConfig, Piece, PieceAction, Progress, ReadAction, StateChange, WriteAction,
};
pub use io::{BufioModel, DataMode, IoStats, SizeOnlyDevice};
pub use ranges::{Range, RangeMap, RangeType};
pub use worker::{Worker, WorkerIo};

use crate::units::Sectors;

/// What every dm-bow engine offers: the kernel driver (later) and the model.
///
/// Positions are 512-byte sectors on the dm device; lengths are bytes. Every I/O must be
/// block-aligned (the kernel's `io_hints` make the dm device's logical block size the bow block
/// size, so the block layer never sends anything else).
pub trait BowEngine {
    /// The current state (`/sys/.../bow/state`).
    fn state(&self) -> BowState;
    /// Writes the next state (`1` in TRIM, `2` in CHECKPOINT); anything else is `EINVAL`.
    fn set_state(&mut self, to: BowState) -> Result<StateChange, EngineError>;
    /// `/sys/.../bow/free`: the kernel's `trims_total`, in bytes.
    fn free_bytes(&self) -> u64;
    /// A write bio.
    fn write(&mut self, sector: Sectors, data: &[u8]) -> Result<WriteAction, EngineError>;
    /// A discard bio of `len` bytes.
    fn discard(&mut self, sector: Sectors, len: u64) -> Result<DiscardAction, EngineError>;
    /// A read bio.
    fn read(&mut self, sector: Sectors, buf: &mut [u8]) -> Result<ReadAction, EngineError>;
    /// An empty flush bio (passed straight to the underlying device in every state).
    fn flush(&mut self) -> Result<(), EngineError>;
}
