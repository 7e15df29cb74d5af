//! The one error type of the crate, and its classification.

use std::io;

/// What kind of failure happened, for callers that branch (the daemon maps these to binder
/// status codes, the CLI to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The trace (or dm-log-writes log) is damaged or not in the expected format.
    Corrupt,
    /// The input is valid on its own but does not belong to this device (another size).
    WrongDevice,
    /// An argument is out of range or inconsistent (sizes, extents, options, history rows).
    Invalid,
    /// Reading the trace failed for a reason other than its contents.
    Io,
}

/// Why a trace could not be read, written or converted, or an estimate not made.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// Reading the trace failed (not an end-of-file inside it: that is [`Self::TraceTruncated`]).
    #[error("reading the trace: {0}")]
    Io(#[source] io::Error),
    /// Writing the trace failed.
    #[error("writing the trace: {0}")]
    Write(#[source] io::Error),
    /// The first bytes are not a trace's magic.
    #[error("not a checkpointd write trace (magic {found:02x?})")]
    NotATrace {
        /// The bytes found where the magic should be.
        found: [u8; 8],
    },
    /// A trace format version this code does not read.
    #[error("unsupported trace version {0} (this code reads version 1)")]
    TraceVersion(u32),
    /// The trace ends before its trailer.
    #[error("the trace is truncated at byte {offset}")]
    TraceTruncated {
        /// Bytes read before the end.
        offset: u64,
    },
    /// A field of the trace is malformed.
    #[error("the trace is corrupt at byte {offset}: {what}")]
    TraceCorrupt {
        /// Byte offset of the field.
        offset: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A checksum does not match the bytes it covers.
    #[error("the trace's {part} checksum does not match (stored {stored:#010x}, computed {computed:#010x})")]
    TraceChecksum {
        /// `"header"` or `"trace"`.
        part: &'static str,
        /// The stored CRC-32.
        stored: u32,
        /// The CRC-32 of the bytes read.
        computed: u32,
    },
    /// A record (its index in the trace) is not valid for the trace's device.
    #[error("trace record {index}: {what}")]
    BadRecord {
        /// Index of the record.
        index: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The trace was captured on a device of another size.
    #[error("the trace is for a device of {trace} bytes, this device has {device} bytes")]
    TraceDeviceSize {
        /// Device size in the trace's header.
        trace: u64,
        /// Size of the device being estimated.
        device: u64,
    },
    /// A dm-log-writes entry cannot be converted.
    #[error("dm-log-writes entry {index}: {what}")]
    BadLogEntry {
        /// Index of the entry in the log.
        index: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A dm-log-writes mark the conversion was asked to start after or stop at is not in the log.
    #[error("dm-log-writes mark {0:?} not found")]
    MarkNotFound(String),
    /// An input or option is out of range.
    #[error("{what} = {value}: {why}")]
    Invalid {
        /// The input or option.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        why: &'static str,
    },
    /// The dm-bow dry run failed (a bug: the trace and free map were checked first).
    #[error("dm-bow dry run: {0}")]
    DryRun(#[from] bow::dryrun::DryRunError),
}

impl EstimateError {
    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io(_) | Self::Write(_) => ErrorKind::Io,
            Self::NotATrace { .. }
            | Self::TraceVersion(_)
            | Self::TraceTruncated { .. }
            | Self::TraceCorrupt { .. }
            | Self::TraceChecksum { .. }
            | Self::BadRecord { .. }
            | Self::BadLogEntry { .. } => ErrorKind::Corrupt,
            Self::TraceDeviceSize { .. } => ErrorKind::WrongDevice,
            Self::MarkNotFound(_) | Self::Invalid { .. } | Self::DryRun(_) => ErrorKind::Invalid,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: u64, why: &'static str) -> EstimateError {
        EstimateError::Invalid { what, value, why }
    }
}
