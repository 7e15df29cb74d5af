//! The userspace backup-on-write engine: dm-bow's semantics and on-disk log over a
//! [`BlockDevice`](blockcopy::device::BlockDevice) (the raw /data device), for the ublk backend
//! of issue 16 (docs/userspace-bow.md).
//!
//! * The same log as the kernel target, byte for byte (header, entries, chained log sectors,
//!   SECTOR0 / SECTOR0_CURRENT), so `bow::restore` and vold restore it unchanged. The decisions
//!   are `bow`'s [`Worker`](bow::model::Worker), the code `BowModel` runs; this crate owns the
//!   I/O, the ordering, the allocator choice, the accounting and the trace.
//! * **Batched, crash-safe backups** ([`Engine::submit`] → [`Batch::commit`]): many user I/Os,
//!   their backups copied, then one ordered commit: backup data → flush → block 0 (the log) →
//!   flush → user writes. The order is enforced by proof tokens in [`order`].
//! * **Allocators**: [`Allocator::DmBow`] (the head of the trimmed list, the kernel's) and
//!   [`Allocator::FarEnd`] (the far end of the largest free range, where a filesystem that
//!   allocates from the start of free space rarely writes during a checkpoint).
//! * **Exact accounting** ([`SpaceReport`]) from the range map, and the checkpoint's **write
//!   trace** in the estimator's format ([`checkpoint_estimate::Trace`]).
//! * **Resuming after the server's death** ([`Engine::with_journal`], [`Engine::recover`]): every
//!   step is appended to an op [`journal`] before it touches the device; a restarted server
//!   replays it with no I/O and takes block 0 (the batch's commit point) as the judge of the
//!   last, possibly half-done, batch.
//!
//! It implements [`bow::model::BowEngine`], each call a batch of one, so the model-level
//! harnesses can drive it.

#![forbid(unsafe_code)]

mod engine;
pub mod journal;
pub mod order;

pub use bow::model::EngineError;
pub use engine::{
    Allocator, Batch, BatchReport, Engine, EngineConfig, EngineStats, IoOutcome, RecoverError,
    Recovered, SpaceReport, UserIo,
};

#[cfg(test)]
mod tests;
