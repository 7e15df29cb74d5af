//! The durable state store: one SQLite file in a metadata directory that is not rolled back
//! (Android: `/metadata/checkpointd`).
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL`, so each write transaction costs one
//! fsync of the WAL at commit (DELETE mode costs two or three: journal, database, header) and a
//! power cut leaves either the old or the new state. `locking_mode=EXCLUSIVE` makes the
//! daemon the only process that can open the file while it runs (and keeps the WAL index in
//! process memory, no `-shm` file). Every state change is exactly one transaction
//! ([`Store::apply`]); reads come from the in-memory copy kept by the owner.
//!
//! Schema: `PRAGMA user_version` holds the schema version; [`MIGRATIONS`] are applied in order
//! in one transaction; a file from a newer version is refused without being touched.
//!
//! Opening never loses a checkpoint quietly (docs/state-machine.md, "The state store"):
//! 1. the file is looked at before SQLite sees it: a zero-length file, or one without the SQLite
//!    header, where a store is expected (the marker [`Store::MARKER_FILE_NAME`] written once
//!    the store was first created, or a write-ahead log left beside it) is refused. (SQLite
//!    itself would treat a zero-length file as a new database and delete its WAL.)
//! 2. an existing file is inspected through a read-only connection (integrity check, schema
//!    version, tables, the current row) and only then opened for writing, so a refused file is
//!    byte-identical afterwards;
//! 3. opening writes only what it must (creation, migration, crash recovery): on a full metadata
//!    file system the store still opens and serves reads; writes fail with `NoSpace`.
//!
//! Every text column has a bound ([`MAX_STORED_PATH_BYTES`], [`MAX_STORED_TEXT_BYTES`],
//! [`MAX_STORED_WORD_BYTES`]): longer text is cut (marked) when written and when read, so a row
//! written by an older version cannot make every status reply too large. History rows the code
//! does not understand are returned as [`HistoryKind::Unrecognised`], not as an error.

use std::borrow::Cow;
use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::error::{errno, ErrorKind};

/// Ordered schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the current checkpoint (at most one row) and the history.
    "CREATE TABLE checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        requested_retry INTEGER NOT NULL CHECK (requested_retry >= -1),
        budget_left INTEGER CHECK (budget_left IS NULL OR budget_left >= 0),
        attempts_used INTEGER NOT NULL CHECK (attempts_used >= 0),
        requesting_slot INTEGER,
        requesting_suffix TEXT,
        rollback_slot_switched INTEGER NOT NULL DEFAULT 0,
        phase TEXT NOT NULL CHECK (phase IN ('active', 'committing')),
        backends TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL
    );
    CREATE TABLE history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        event TEXT NOT NULL,
        requested_retry INTEGER,
        budget_left INTEGER,
        slot INTEGER,
        device TEXT,
        outcome TEXT,
        message TEXT,
        backup_used_bytes INTEGER
    );",
    // 1 -> 2: status() looks up the last event of a kind (the last restore).
    "CREATE INDEX history_event ON history (event, id);",
    // 2 -> 3: learning (docs/state-machine.md, "Learning"): the last estimate, the checkpoint
    // being tracked (the estimate made before it, the most backup space seen while it runs),
    // and what each finished checkpoint consumed.
    "CREATE TABLE last_estimate (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at_ms INTEGER NOT NULL,
        mount_point TEXT NOT NULL,
        backend TEXT NOT NULL,
        device_size INTEGER NOT NULL CHECK (device_size > 0),
        basis TEXT NOT NULL,
        predicted_bytes INTEGER NOT NULL CHECK (predicted_bytes >= 0),
        needed_bytes INTEGER NOT NULL CHECK (needed_bytes >= 0)
    );
    CREATE TABLE tracking (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        started_at_ms INTEGER NOT NULL,
        estimate_at_ms INTEGER,
        estimated_bytes INTEGER CHECK (estimated_bytes IS NULL OR estimated_bytes >= 0),
        predicted_bytes INTEGER CHECK (predicted_bytes IS NULL OR predicted_bytes >= 0),
        high_water_bytes INTEGER CHECK (high_water_bytes IS NULL OR high_water_bytes >= 0)
    );
    CREATE TABLE consumption (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        history_id INTEGER,
        outcome TEXT NOT NULL,
        mount_point TEXT NOT NULL,
        backend TEXT NOT NULL,
        device_size INTEGER NOT NULL CHECK (device_size > 0),
        actual_bytes INTEGER NOT NULL CHECK (actual_bytes >= 0),
        estimated_bytes INTEGER,
        predicted_bytes INTEGER
    );
    CREATE INDEX consumption_history ON consumption (history_id);",
];

/// The schema version this code writes.
pub const SCHEMA_VERSION: u32 = 3;

/// Consumption rows kept (the estimator's history); older rows are pruned when one is added.
pub const CONSUMPTION_LIMIT: i64 = 1_000;

/// History rows kept; older rows are pruned at open.
pub const HISTORY_LIMIT: i64 = 10_000;

/// Longest device path stored (the `device` column): Linux's PATH_MAX (4096) counts the
/// terminating NUL, so no usable path is longer. The daemon refuses longer arguments.
pub const MAX_STORED_PATH_BYTES: usize = 4095;

/// Longest free text stored (`message`, the checkpoint's `backends` and slot suffix): 4 KiB, as
/// the longest abort reason the daemon accepts.
pub const MAX_STORED_TEXT_BYTES: usize = 4096;

/// Longest outcome word stored (`outcome`): the words are ours and short.
pub const MAX_STORED_WORD_BYTES: usize = 64;

/// What replaces the end of a text cut to its bound.
const CUT_MARK: &str = "...[cut]";

const BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// The 16 bytes every SQLite database file starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// `text` if it fits in `max` bytes, else its longest prefix (at a character boundary) that
/// fits with [`CUT_MARK`] appended.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub(CUT_MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{CUT_MARK}", &text[..end]))
}

/// An error from the store. `Display` names the file and says what to do where it can.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The metadata directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a SQLite database or fails the integrity check. Nothing was written.
    #[error(
        "state store {path} is corrupt ({detail}); it was left untouched: move it away to start \
         with an empty store"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's report.
        detail: String,
    },
    /// The store file is empty, has no SQLite header or is gone, where a store is known to
    /// have existed (the creation marker, or a write-ahead log beside it). Nothing was
    /// written: a pending checkpoint may be recorded in what is left.
    #[error(
        "state store {path} is {what}, but {evidence}: a requested checkpoint may be lost, so \
         checkpointd refuses to start (nothing was changed). Restore the file from a copy, or \
         move {path} and {marker} away to start with an empty store"
    )]
    Lost {
        /// The file.
        path: PathBuf,
        /// What is wrong with it ("empty", "missing", ...).
        what: &'static str,
        /// Why a store is expected.
        evidence: String,
        /// The creation marker.
        marker: PathBuf,
    },
    /// The file was written by a newer checkpointd. Nothing was written.
    #[error(
        "state store {path} has schema version {found}, newer than the {supported} this \
         checkpointd supports; refusing to use it (it was left untouched)"
    )]
    FutureVersion {
        /// The file.
        path: PathBuf,
        /// Its `user_version`.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// Another process holds the store.
    #[error("state store {path} is locked by another process (is another checkpointd running?)")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// A SQLite operation failed.
    #[error("state store {path}: cannot {operation}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The stored data breaks an invariant the code relies on.
    #[error("state store {path} holds an invalid value: {detail}")]
    InvalidData {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl StoreError {
    /// Classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::CreateDir { .. } => ErrorKind::Io,
            StoreError::Corrupt { .. }
            | StoreError::InvalidData { .. }
            | StoreError::Lost { .. } => ErrorKind::Corrupt,
            StoreError::FutureVersion { .. } => ErrorKind::Incompatible,
            StoreError::Locked { .. } => ErrorKind::Busy,
            StoreError::Sqlite { source, .. } => match source.sqlite_error_code() {
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => ErrorKind::Corrupt,
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ErrorKind::Busy,
                Some(ErrorCode::DiskFull) => ErrorKind::NoSpace,
                _ => ErrorKind::Io,
            },
        }
    }

    /// The OS error behind it, if known (SQLite's permission errors stand for EACCES).
    pub fn os_errno(&self) -> Option<i32> {
        match self {
            StoreError::CreateDir { source, .. } => source.raw_os_error(),
            StoreError::Sqlite { source, .. } => match source.sqlite_error_code() {
                Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => Some(errno::EACCES),
                _ => None,
            },
            _ => None,
        }
    }

    /// The vold-compatible code ([`errno::code`]).
    pub fn errno(&self) -> i32 {
        errno::code(self.kind(), self.os_errno())
    }
}

/// What kind of event a history row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HistoryKind {
    /// `startCheckpoint`.
    Start,
    /// `markBootAttempt` while a checkpoint was requested.
    BootAttempt,
    /// A successful commit.
    Commit,
    /// A commit that failed (the checkpoint stays).
    CommitFailed,
    /// `abortChanges` while checkpointing.
    Abort,
    /// A dm-bow restore run by the daemon.
    Restore,
    /// The rollback boot completed and the spent budget was cleared.
    RollbackAcknowledged,
    /// The rollback action made the previous slot active.
    RollbackSlotSwitch,
    /// Crash recovery at open changed the state.
    Recovery,
    /// The health monitor saw low backup space and what it did about it.
    LowSpace,
    /// A row this code does not understand (written by a newer version, or damaged): its
    /// stored event name is in [`HistoryEvent::unrecognised`]. Never written by this code.
    Unrecognised,
}

impl HistoryKind {
    const ALL: [HistoryKind; 10] = [
        HistoryKind::Start,
        HistoryKind::BootAttempt,
        HistoryKind::Commit,
        HistoryKind::CommitFailed,
        HistoryKind::Abort,
        HistoryKind::Restore,
        HistoryKind::RollbackAcknowledged,
        HistoryKind::RollbackSlotSwitch,
        HistoryKind::Recovery,
        HistoryKind::LowSpace,
    ];

    /// The name stored in the `event` column.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryKind::Start => "start",
            HistoryKind::BootAttempt => "boot_attempt",
            HistoryKind::Commit => "commit",
            HistoryKind::CommitFailed => "commit_failed",
            HistoryKind::Abort => "abort",
            HistoryKind::Restore => "restore",
            HistoryKind::RollbackAcknowledged => "rollback_acknowledged",
            HistoryKind::RollbackSlotSwitch => "rollback_slot_switch",
            HistoryKind::Recovery => "recovery",
            HistoryKind::LowSpace => "low_space",
            HistoryKind::Unrecognised => "unrecognised",
        }
    }

    fn parse(s: &str) -> Option<HistoryKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One history row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEvent {
    /// Row id (increasing). Ignored when inserting.
    pub id: i64,
    /// Milliseconds since the Unix epoch. Ignored when inserting (the store stamps it).
    pub at_ms: i64,
    /// What happened.
    pub kind: HistoryKind,
    /// The `retry` the current checkpoint was requested with.
    pub requested_retry: Option<i32>,
    /// Budget left after the event (`None`: unlimited or no checkpoint).
    pub budget_left: Option<i64>,
    /// The slot involved (current slot, or the target of a slot switch).
    pub slot: Option<u32>,
    /// The device (restores).
    pub device: Option<String>,
    /// A short outcome word ("ok", "rolled_forward", "failed", ...).
    pub outcome: Option<String>,
    /// Free text (abort reason, error message).
    pub message: Option<String>,
    /// Backup space consumed, as reported by the backends. On the row that ended a tracked
    /// checkpoint: what it really consumed (the most seen while it ran, [`Consumption`]).
    pub backup_used_bytes: Option<u64>,
    /// On the row that ended a tracked checkpoint: the estimate made before it (needed bytes).
    pub estimated_bytes: Option<u64>,
    /// For a row of kind [`HistoryKind::Unrecognised`]: what it holds that this code does not
    /// understand (the stored event name, or the column that has a value of the wrong type).
    pub unrecognised: Option<String>,
}

impl HistoryEvent {
    /// An event of `kind` with every optional field empty.
    pub fn new(kind: HistoryKind) -> HistoryEvent {
        HistoryEvent {
            id: 0,
            at_ms: 0,
            kind,
            requested_retry: None,
            budget_left: None,
            slot: None,
            device: None,
            outcome: None,
            message: None,
            backup_used_bytes: None,
            estimated_bytes: None,
            unrecognised: None,
        }
    }
}

/// An estimate as the learning records keep it (the last `estimateBackupSpace` answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstimateRecord {
    /// When it was made (ms since the Unix epoch). Ignored when recording (the store stamps it).
    pub at_ms: i64,
    /// The mount point estimated for.
    pub mount_point: String,
    /// The backend method (`bow`, `snapshot`, `f2fs`).
    pub backend: String,
    /// The device's size.
    pub device_size: u64,
    /// What it rested on (`trace`, `history`, ...).
    pub basis: String,
    /// The prediction before margin and headroom.
    pub predicted_bytes: u64,
    /// What to keep free.
    pub needed_bytes: u64,
}

/// The checkpoint being tracked: the estimate made before it and the most backup space seen
/// while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// `started_at_ms` of the checkpoint it belongs to.
    pub started_at_ms: i64,
    /// The last estimate made before it started: (made at, needed, predicted).
    pub estimate: Option<(i64, u64, u64)>,
    /// The most backup space seen in use so far.
    pub high_water_bytes: Option<u64>,
}

/// How a tracked checkpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Committed.
    Committed,
    /// Rolled back (the rollback boot acknowledged it).
    RolledBack,
}

impl Ending {
    /// The stored word.
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Committed => "committed",
            Ending::RolledBack => "rolled_back",
        }
    }

    /// The history row that ends a checkpoint this way.
    fn history_kind(self) -> HistoryKind {
        match self {
            Ending::Committed => HistoryKind::Commit,
            Ending::RolledBack => HistoryKind::RollbackAcknowledged,
        }
    }
}

/// What one finished checkpoint consumed, against what was estimated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumption {
    /// Row id (increasing).
    pub id: i64,
    /// When it was recorded (ms since the Unix epoch).
    pub at_ms: i64,
    /// The history row that ended it (commit or rollback acknowledged), if found.
    pub history_id: Option<i64>,
    /// `committed` or `rolled_back` (other words from a newer version are kept as they are).
    pub outcome: String,
    /// The mount point.
    pub mount_point: String,
    /// The backend method (`bow`, `snapshot`, `f2fs`).
    pub backend: String,
    /// The device's size then.
    pub device_size: u64,
    /// Backup space it really consumed: the most seen while it ran, or at its end.
    pub actual_bytes: u64,
    /// The estimate made before it started (needed bytes), if any.
    pub estimated_bytes: Option<u64>,
    /// That estimate's prediction (before margin and headroom), if any.
    pub predicted_bytes: Option<u64>,
}

/// How a finished checkpoint is recorded ([`Store::finish_tracking`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished<'a> {
    /// How it ended.
    pub ending: Ending,
    /// The mount point.
    pub mount_point: &'a str,
    /// The backend method.
    pub backend: &'a str,
    /// The device's size.
    pub device_size: u64,
    /// Backup space in use at the end (taken with the high-water mark: the larger counts).
    pub final_used_bytes: Option<u64>,
}

/// Phase of the current checkpoint row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Active,
    /// A commit is in progress (transient; rolled back at open).
    Committing,
}

/// The current checkpoint (the single row of table `checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CurrentRow {
    pub requested_retry: i32,
    /// `None`: unlimited (`retry == -1`); `Some(0)`: budget spent (vold's `"0"`).
    pub budget_left: Option<u32>,
    pub attempts_used: u32,
    pub requesting_slot: Option<u32>,
    pub requesting_suffix: Option<String>,
    pub rollback_slot_switched: bool,
    pub phase: Phase,
    pub backends: String,
    pub started_at_ms: i64,
}

/// How a transaction changes the current checkpoint row.
#[derive(Debug)]
pub(crate) enum RowChange<'a> {
    Keep,
    Set(&'a CurrentRow),
    Clear,
}

/// The state store. One owner: the [`crate::Checkpointer`] keeps it behind its mutex.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    current: Option<CurrentRow>,
    version: u32,
    writes: u64,
    /// Unrecognised history rows are logged once per handle, not on every read.
    reported_unrecognised: Cell<bool>,
}

/// What [`Store::open`] found at the store's path before SQLite opened it.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// No file: a new store is created.
    Nothing,
    /// A zero-length file and no sign that a store ever existed (a first start cut short
    /// before anything was stored): SQLite initialises it.
    EmptyNew,
    /// A file with the SQLite header: inspected read-only before use.
    Database,
}

/// Text columns are read cut to one byte more than their bound (see `query_history`).
/// (As SQL parameters: rusqlite takes no `usize`; the bounds are small, checked by the test.)
const TEXT_READ_PATH: i64 = 4096;
const TEXT_READ_WORD: i64 = 65;

/// Column `idx` as a size: a negative value is an error, not a wrap.
fn size(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

/// Column `idx` as an optional size.
fn opt_size(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    match r.get::<_, Option<i64>>(idx)? {
        None => Ok(None),
        Some(v) => {
            u64::try_from(v).map(Some).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
        }
    }
}

/// A size as SQLite's signed integer; more than `i64::MAX` bytes is refused, not wrapped.
fn stored_size(path: &Path, what: &str, bytes: u64) -> Result<i64, StoreError> {
    i64::try_from(bytes).map_err(|_| StoreError::InvalidData {
        path: path.to_path_buf(),
        detail: format!("{what} {bytes} does not fit a signed 64-bit integer"),
    })
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

impl Store {
    /// The database file's name inside the state directory.
    pub const FILE_NAME: &'static str = "checkpointd.db";

    /// The marker written (and synced) once a store has been created in the directory. While it
    /// exists, an empty, headerless or missing store file is refused ([`StoreError::Lost`])
    /// instead of being created afresh.
    pub const MARKER_FILE_NAME: &'static str = "checkpointd.db.created";

    /// Open (creating if needed) the store in `dir`: the file checks, the read-only inspection
    /// (integrity, version, tables, current row), then migrations and crash recovery.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir)
            .map_err(|source| StoreError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(Self::FILE_NAME);
        let marker = dir.join(Self::MARKER_FILE_NAME);
        let found = examine_file(&path, &marker)?;
        if found == Found::Database {
            inspect_with_retries(&path)?;
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_err(&path, "open", e))?;
        let mut store = Store {
            conn,
            path,
            current: None,
            version: 0,
            writes: 0,
            reported_unrecognised: Cell::new(false),
        };
        store.configure()?;
        store.migrate()?;
        store.current = read_current(&store.conn, &store.path)?;
        store.recover()?;
        store.make_wal_durable()?;
        if !marker.exists() {
            match write_marker(dir, &marker) {
                Ok(()) => {}
                // A full (or read-only) metadata file system: the store is still usable; the
                // marker is written at a later start.
                Err(e) => warn!("cannot write the store marker {}: {e}", marker.display()),
            }
        }
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open file (after migrations: [`SCHEMA_VERSION`]).
    pub fn schema_version(&self) -> u32 {
        self.version
    }

    /// Write transactions committed through this handle since it was opened (each one WAL
    /// fsync under `synchronous=FULL`; WAL checkpoints add a few more now and then).
    pub fn write_transactions(&self) -> u64 {
        self.writes
    }

    fn user_version(&self) -> Result<u32, StoreError> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.classify(e, "read the schema version"))?;
        u32::try_from(v).map_err(|_| StoreError::InvalidData {
            path: self.path.clone(),
            detail: format!("schema version {v}"),
        })
    }

    fn classify(&self, e: rusqlite::Error, operation: &'static str) -> StoreError {
        classify(&self.path, e, operation)
    }

    /// The write connection's settings: one owner, WAL, full sync. The file passed the
    /// read-only inspection already; the schema version is checked again (cheap) in case a
    /// newer checkpointd replaced it in between.
    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.classify(e, "set busy timeout"))?;
        self.conn
            .pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get::<_, String>(0))
            .map_err(|e| self.classify(e, "set locking_mode=EXCLUSIVE"))?;
        let version = self.user_version()?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::FutureVersion {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| self.classify(e, "set journal_mode=WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::InvalidData {
                path: self.path.clone(),
                detail: format!("journal_mode is {mode}, WAL could not be enabled"),
            });
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.classify(e, "set synchronous=FULL"))?;
        // Take the write lock now and keep it (locking_mode=EXCLUSIVE): one owner.
        self.conn
            .execute_batch("BEGIN EXCLUSIVE; COMMIT;")
            .map_err(|e| self.classify(e, "lock the store"))?;
        Ok(())
    }

    /// SQLite fsyncs the directory on the first sync of a newly opened WAL file (to make its
    /// creation durable). Pay that once here, at start, with a write that changes nothing
    /// (the schema version rewritten), so that every later state change costs exactly one
    /// fsync. Skipped if opening already wrote (creation, migration, recovery).
    fn make_wal_durable(&mut self) -> Result<(), StoreError> {
        if self.writes > 0 {
            return Ok(());
        }
        match self.conn.pragma_update(None, "user_version", self.version) {
            Ok(()) => self.writes += 1,
            // A full metadata file system: start anyway and serve what needs no write (the
            // first state change pays the directory fsync, or fails with ENOSPC as it must).
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) => warn!(
                "state store {}: the metadata file system is full; serving reads, state \
                 changes fail until space is freed",
                self.path.display()
            ),
            Err(e) => return Err(self.classify(e, "sync the write-ahead log")),
        }
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        self.migrate_to(SCHEMA_VERSION)
    }

    /// Apply migrations up to `target` in one transaction.
    pub(crate) fn migrate_to(&mut self, target: u32) -> Result<(), StoreError> {
        let from = self.user_version()?;
        self.version = from;
        if from >= target {
            return Ok(());
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_err(&path, "begin migration", e))?;
        for (i, sql) in (0u32..).zip(MIGRATIONS).skip_while(|(i, _)| *i < from) {
            if i >= target {
                break;
            }
            tx.execute_batch(sql).map_err(|e| sql_err(&path, "migrate the schema", e))?;
        }
        tx.pragma_update(None, "user_version", target)
            .map_err(|e| sql_err(&path, "set the schema version", e))?;
        tx.commit().map_err(|e| sql_err(&path, "commit the migration", e))?;
        self.writes += 1;
        self.version = target;
        if from == 0 {
            info!("created state store {} (schema version {target})", path.display());
        } else {
            info!("migrated state store {} from schema {from} to {target}", path.display());
        }
        Ok(())
    }

    /// Crash recovery (STYLE rule 14): a `committing` phase means the process died during a
    /// commit; roll back to `active` (the checkpoint stays, as vold's file would).
    fn recover(&mut self) -> Result<(), StoreError> {
        match self.prune_history() {
            Ok(0) => {}
            Ok(pruned) => info!("pruned {pruned} old history rows from {}", self.path.display()),
            Err(e) if e.kind() == ErrorKind::NoSpace => warn!("{e}: old rows are kept for now"),
            Err(e) => return Err(e),
        }
        let Some(row) = self.current.clone() else { return Ok(()) };
        if row.phase == Phase::Committing {
            warn!(
                "state store {}: a commit was interrupted (power cut or crash); the checkpoint \
                 stays requested with {} attempts used",
                self.path.display(),
                row.attempts_used
            );
            let fixed = CurrentRow { phase: Phase::Active, ..row };
            let mut event = HistoryEvent::new(HistoryKind::Recovery);
            event.outcome = Some("commit_interrupted".into());
            event.requested_retry = Some(fixed.requested_retry);
            event.budget_left = fixed.budget_left.map(i64::from);
            match self.apply(RowChange::Set(&fixed), &[event]) {
                Ok(()) => {}
                // Full metadata file system: serve the recovered state from memory; the file
                // keeps `committing` and the next start recovers it again.
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    warn!("{e}: the recovery is not recorded yet");
                    self.current = Some(fixed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn prune_history(&mut self) -> Result<usize, StoreError> {
        let count: i64 = self
            .conn
            .query_row("SELECT count(*) FROM history", [], |r| r.get(0))
            .map_err(|e| sql_err(&self.path, "count history", e))?;
        if count <= HISTORY_LIMIT {
            return Ok(0);
        }
        let n = self
            .conn
            .execute(
                "DELETE FROM history WHERE id <= (SELECT max(id) FROM history) - ?1",
                [HISTORY_LIMIT],
            )
            .map_err(|e| sql_err(&self.path, "prune history", e))?;
        self.writes += 1;
        Ok(n)
    }

    /// The current checkpoint as last written (no I/O).
    pub(crate) fn current(&self) -> Option<&CurrentRow> {
        self.current.as_ref()
    }

    /// One state change: update the current row and append events, in ONE transaction. The
    /// in-memory copy changes only if the transaction committed.
    pub(crate) fn apply(
        &mut self,
        change: RowChange<'_>,
        events: &[HistoryEvent],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let at = now_ms();
        // What is stored is bounded (see the module doc); the in-memory copy is the stored one.
        let bounded_row = match &change {
            RowChange::Set(row) => Some(CurrentRow {
                requesting_suffix: row
                    .requesting_suffix
                    .as_deref()
                    .map(|s| bounded(s, MAX_STORED_TEXT_BYTES).into_owned()),
                backends: bounded(&row.backends, MAX_STORED_TEXT_BYTES).into_owned(),
                ..(*row).clone()
            }),
            _ => None,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_err(&path, "begin a transaction", e))?;
        match &change {
            RowChange::Keep => {}
            RowChange::Clear => {
                tx.execute("DELETE FROM checkpoint", [])
                    .map_err(|e| sql_err(&path, "clear the checkpoint", e))?;
            }
            RowChange::Set(_) => {
                let Some(row) = &bounded_row else { unreachable!("set above for Set") };
                tx.execute(
                    "INSERT OR REPLACE INTO checkpoint (id, requested_retry, budget_left,
                        attempts_used, requesting_slot, requesting_suffix, rollback_slot_switched,
                        phase, backends, started_at_ms)
                     VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        row.requested_retry,
                        row.budget_left,
                        row.attempts_used,
                        row.requesting_slot,
                        row.requesting_suffix,
                        row.rollback_slot_switched,
                        match row.phase {
                            Phase::Active => "active",
                            Phase::Committing => "committing",
                        },
                        row.backends,
                        row.started_at_ms,
                    ],
                )
                .map_err(|e| sql_err(&path, "write the checkpoint", e))?;
            }
        }
        for ev in events {
            tx.execute(
                "INSERT INTO history (at_ms, event, requested_retry, budget_left, slot, device,
                    outcome, message, backup_used_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    at,
                    ev.kind.as_str(),
                    ev.requested_retry,
                    ev.budget_left,
                    ev.slot,
                    ev.device.as_deref().map(|t| bounded(t, MAX_STORED_PATH_BYTES)),
                    ev.outcome.as_deref().map(|t| bounded(t, MAX_STORED_WORD_BYTES)),
                    ev.message.as_deref().map(|t| bounded(t, MAX_STORED_TEXT_BYTES)),
                    ev.backup_used_bytes.and_then(|b| i64::try_from(b).ok()),
                ],
            )
            .map_err(|e| sql_err(&path, "append history", e))?;
        }
        tx.commit().map_err(|e| sql_err(&path, "commit a transaction", e))?;
        self.writes += 1;
        match change {
            RowChange::Keep => {}
            RowChange::Clear => self.current = None,
            RowChange::Set(_) => self.current = bounded_row,
        }
        Ok(())
    }

    /// Up to `limit` history events, newest first.
    pub fn history(&self, limit: usize) -> Result<Vec<HistoryEvent>, StoreError> {
        self.query_history(None, limit)
    }

    /// The newest event of `kind`.
    pub fn last_event(&self, kind: HistoryKind) -> Result<Option<HistoryEvent>, StoreError> {
        Ok(self.query_history(Some(kind), 1)?.into_iter().next())
    }

    /// Keeps `estimate` as the last estimate (replacing the one before), stamped now.
    pub fn record_estimate(&mut self, estimate: &EstimateRecord) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO last_estimate (id, at_ms, mount_point, backend,
                    device_size, basis, predicted_bytes, needed_bytes)
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    now_ms(),
                    bounded(&estimate.mount_point, MAX_STORED_PATH_BYTES),
                    bounded(&estimate.backend, MAX_STORED_WORD_BYTES),
                    stored_size(&path, "device_size", estimate.device_size)?,
                    bounded(&estimate.basis, MAX_STORED_WORD_BYTES),
                    stored_size(&path, "predicted_bytes", estimate.predicted_bytes)?,
                    stored_size(&path, "needed_bytes", estimate.needed_bytes)?,
                ],
            )
            .map_err(|e| sql_err(&path, "record the estimate", e))?;
        self.writes += 1;
        Ok(())
    }

    /// The last estimate, if one was made.
    pub fn last_estimate(&self) -> Result<Option<EstimateRecord>, StoreError> {
        self.conn
            .query_row(
                "SELECT at_ms, substr(mount_point, 1, ?1), substr(backend, 1, ?2), device_size,
                    substr(basis, 1, ?2), predicted_bytes, needed_bytes
                 FROM last_estimate WHERE id = 1",
                params![TEXT_READ_PATH, TEXT_READ_WORD],
                |r| {
                    Ok(EstimateRecord {
                        at_ms: r.get(0)?,
                        mount_point: bounded(&r.get::<_, String>(1)?, MAX_STORED_PATH_BYTES)
                            .into_owned(),
                        backend: bounded(&r.get::<_, String>(2)?, MAX_STORED_WORD_BYTES)
                            .into_owned(),
                        device_size: size(r, 3)?,
                        basis: bounded(&r.get::<_, String>(4)?, MAX_STORED_WORD_BYTES).into_owned(),
                        predicted_bytes: size(r, 5)?,
                        needed_bytes: size(r, 6)?,
                    })
                },
            )
            .optional()
            .map_err(|e| sql_err(&self.path, "read the last estimate", e))
    }

    /// Starts tracking the checkpoint requested at `started_at_ms` with the last estimate made
    /// before it. A checkpoint already tracked (the same `started_at_ms`) keeps its record.
    pub fn track_checkpoint(&mut self, started_at_ms: i64) -> Result<(), StoreError> {
        if self.tracking()?.is_some_and(|t| t.started_at_ms == started_at_ms) {
            return Ok(());
        }
        let path = self.path.clone();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO tracking (id, started_at_ms, estimate_at_ms,
                    estimated_bytes, predicted_bytes, high_water_bytes)
                 SELECT 1, ?1, e.at_ms, e.needed_bytes, e.predicted_bytes, NULL
                 FROM (SELECT 1) LEFT JOIN last_estimate e ON e.id = 1 AND e.at_ms <= ?2",
                params![started_at_ms, now_ms()],
            )
            .map_err(|e| sql_err(&path, "track the checkpoint", e))?;
        self.writes += 1;
        Ok(())
    }

    /// The checkpoint being tracked, if any.
    pub fn tracking(&self) -> Result<Option<Tracking>, StoreError> {
        self.conn
            .query_row(
                "SELECT started_at_ms, estimate_at_ms, estimated_bytes, predicted_bytes,
                    high_water_bytes FROM tracking WHERE id = 1",
                [],
                |r| {
                    let at: Option<i64> = r.get(1)?;
                    let needed = opt_size(r, 2)?;
                    let predicted = opt_size(r, 3)?;
                    Ok(Tracking {
                        started_at_ms: r.get(0)?,
                        estimate: match (at, needed, predicted) {
                            (Some(at), Some(n), Some(p)) => Some((at, n, p)),
                            _ => None,
                        },
                        high_water_bytes: opt_size(r, 4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| sql_err(&self.path, "read the tracked checkpoint", e))
    }

    /// Raises the tracked checkpoint's high-water mark to `used_bytes` if that is more (one
    /// write, only then). Returns whether it was raised; `false` when nothing is tracked.
    pub fn note_high_water(&mut self, used_bytes: u64) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let changed = self
            .conn
            .execute(
                "UPDATE tracking SET high_water_bytes = ?1
                 WHERE id = 1 AND (high_water_bytes IS NULL OR high_water_bytes < ?1)",
                [stored_size(&path, "used bytes", used_bytes)?],
            )
            .map_err(|e| sql_err(&path, "note the backup space in use", e))?;
        if changed > 0 {
            self.writes += 1;
        }
        Ok(changed > 0)
    }

    /// Records what the tracked checkpoint consumed (the larger of its high-water mark and
    /// `finished.final_used_bytes`) with the estimate made for it, linked to the newest history
    /// row of its ending, and stops tracking it: one transaction. Without a tracked checkpoint
    /// the final value alone is recorded (a checkpoint started by an older version). Nothing is
    /// recorded when no consumption is known at all. Returns the row written.
    pub fn finish_tracking(
        &mut self,
        finished: &Finished<'_>,
    ) -> Result<Option<Consumption>, StoreError> {
        let tracked = self.tracking()?;
        let high_water = tracked.as_ref().and_then(|t| t.high_water_bytes);
        let actual = match (high_water, finished.final_used_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let history_id = self.last_event(finished.ending.history_kind())?.map(|e| e.id);
        let estimate = tracked.as_ref().and_then(|t| t.estimate);
        let path = self.path.clone();
        let at = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_err(&path, "begin a transaction", e))?;
        let mut written = None;
        if let Some(actual) = actual {
            tx.execute(
                "INSERT INTO consumption (at_ms, history_id, outcome, mount_point, backend,
                    device_size, actual_bytes, estimated_bytes, predicted_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    at,
                    history_id,
                    finished.ending.as_str(),
                    bounded(finished.mount_point, MAX_STORED_PATH_BYTES),
                    bounded(finished.backend, MAX_STORED_WORD_BYTES),
                    stored_size(&path, "device_size", finished.device_size)?,
                    stored_size(&path, "actual_bytes", actual)?,
                    estimate.and_then(|(_, needed, _)| i64::try_from(needed).ok()),
                    estimate.and_then(|(_, _, predicted)| i64::try_from(predicted).ok()),
                ],
            )
            .map_err(|e| sql_err(&path, "record the consumption", e))?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "DELETE FROM consumption WHERE id <= (SELECT max(id) FROM consumption) - ?1",
                [CONSUMPTION_LIMIT],
            )
            .map_err(|e| sql_err(&path, "prune consumption", e))?;
            written = Some(Consumption {
                id,
                at_ms: at,
                history_id,
                outcome: finished.ending.as_str().to_owned(),
                mount_point: bounded(finished.mount_point, MAX_STORED_PATH_BYTES).into_owned(),
                backend: bounded(finished.backend, MAX_STORED_WORD_BYTES).into_owned(),
                device_size: finished.device_size,
                actual_bytes: actual,
                estimated_bytes: estimate.map(|(_, needed, _)| needed),
                predicted_bytes: estimate.map(|(_, _, predicted)| predicted),
            });
        }
        tx.execute("DELETE FROM tracking", []).map_err(|e| sql_err(&path, "stop tracking", e))?;
        tx.commit().map_err(|e| sql_err(&path, "commit a transaction", e))?;
        self.writes += 1;
        Ok(written)
    }

    /// Up to `limit` consumption rows, newest first: the estimator's history. A row that does
    /// not read back (a value of the wrong type or sign) is skipped, not an error.
    pub fn consumption(&self, limit: usize) -> Result<Vec<Consumption>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, at_ms, history_id, substr(outcome, 1, ?2), substr(mount_point, 1, ?3),
                    substr(backend, 1, ?2), device_size, actual_bytes, estimated_bytes,
                    predicted_bytes
                 FROM consumption ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| sql_err(&self.path, "read consumption", e))?;
        let rows = stmt
            .query_map(params![limit, TEXT_READ_WORD, TEXT_READ_PATH], |r| {
                Ok((|| -> rusqlite::Result<Consumption> {
                    Ok(Consumption {
                        id: r.get(0)?,
                        at_ms: r.get(1)?,
                        history_id: r.get(2)?,
                        outcome: bounded(&r.get::<_, String>(3)?, MAX_STORED_WORD_BYTES)
                            .into_owned(),
                        mount_point: bounded(&r.get::<_, String>(4)?, MAX_STORED_PATH_BYTES)
                            .into_owned(),
                        backend: bounded(&r.get::<_, String>(5)?, MAX_STORED_WORD_BYTES)
                            .into_owned(),
                        device_size: size(r, 6)?,
                        actual_bytes: size(r, 7)?,
                        estimated_bytes: opt_size(r, 8)?,
                        predicted_bytes: opt_size(r, 9)?,
                    })
                })()
                .ok())
            })
            .map_err(|e| sql_err(&self.path, "read consumption", e))?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(c) = row.map_err(|e| sql_err(&self.path, "read consumption", e))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn query_history(
        &self,
        kind: Option<HistoryKind>,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        // Text columns are read cut to one byte more than their bound (substr counts
        // characters, which are at least one byte), so an oversized row written by an older
        // version costs little to read; `bounded` then cuts and marks it.
        // A row that ended a tracked checkpoint shows what it really consumed and what was
        // estimated for it (the consumption row linked to it).
        let select = format!(
            "SELECT id, at_ms, event, requested_retry, budget_left, slot, \
             substr(device, 1, {}), substr(outcome, 1, {}), substr(message, 1, {}), \
             max(coalesce(backup_used_bytes, -1), coalesce((SELECT max(actual_bytes) FROM \
             consumption WHERE history_id = history.id), -1)), \
             (SELECT max(estimated_bytes) FROM consumption WHERE history_id = history.id) \
             FROM history",
            MAX_STORED_PATH_BYTES + 1,
            MAX_STORED_WORD_BYTES + 1,
            MAX_STORED_TEXT_BYTES + 1
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = match kind {
            // Served by the index history_event.
            Some(_) => format!("{select} WHERE event = ?2 ORDER BY id DESC LIMIT ?1"),
            None => format!("{select} WHERE ?2 IS NULL ORDER BY id DESC LIMIT ?1"),
        };
        let mut stmt =
            self.conn.prepare_cached(&sql).map_err(|e| sql_err(&self.path, "read history", e))?;
        let rows = stmt
            .query_map(params![limit, kind.map(HistoryKind::as_str)], |r| {
                let mut values: [Value; 11] = std::array::from_fn(|_| Value::Null);
                for (i, value) in values.iter_mut().enumerate() {
                    *value = r.get(i)?;
                }
                Ok(values)
            })
            .map_err(|e| sql_err(&self.path, "read history", e))?;
        let mut out = Vec::new();
        for row in rows {
            let values = row.map_err(|e| sql_err(&self.path, "read history", e))?;
            out.push(history_event_of(values));
        }
        let unrecognised = out.iter().filter(|e| e.kind == HistoryKind::Unrecognised).count();
        if unrecognised > 0 && !self.reported_unrecognised.replace(true) {
            warn!(
                "state store {}: {unrecognised} history row(s) not understood (reported as \
                 unrecognised), e.g. {}",
                self.path.display(),
                out.iter().find_map(|e| e.unrecognised.as_deref()).unwrap_or_default()
            );
        }
        Ok(out)
    }
}

/// One history row from its eleven columns (as `query_history` selects them). Never fails: a
/// value this code does not understand (an unknown event name, a value of the wrong type)
/// makes the row [`HistoryKind::Unrecognised`], with what was wrong in `unrecognised`.
fn history_event_of(values: [Value; 11]) -> HistoryEvent {
    let [id, at_ms, event, requested_retry, budget_left, slot, device, outcome, message, used, estimated] =
        values;
    let mut problems: Vec<String> = Vec::new();
    let mut int = |name: &str, v: Value| -> Option<i64> {
        match v {
            Value::Null => None,
            Value::Integer(i) => Some(i),
            other => {
                problems.push(format!("{name} holds {:?}", other.data_type()));
                None
            }
        }
    };
    let id = int("id", id).unwrap_or(0);
    let at_ms = int("at_ms", at_ms).unwrap_or(0);
    let requested_retry = int("requested_retry", requested_retry);
    let budget_left = int("budget_left", budget_left);
    let slot = int("slot", slot);
    // -1 stands for "none" in the select (max over the history and consumption values).
    let backup_used_bytes = int("backup_used_bytes", used).filter(|v| *v >= 0);
    let estimated_bytes = int("estimated_bytes", estimated);
    let mut text = |name: &str, v: Value, max: usize| -> Option<String> {
        match v {
            Value::Null => None,
            Value::Text(t) => Some(bounded(&t, max).into_owned()),
            other => {
                problems.push(format!("{name} holds {:?}", other.data_type()));
                None
            }
        }
    };
    let event_name = text("event", event, MAX_STORED_WORD_BYTES);
    let device = text("device", device, MAX_STORED_PATH_BYTES);
    let outcome = text("outcome", outcome, MAX_STORED_WORD_BYTES);
    let message = text("message", message, MAX_STORED_TEXT_BYTES);
    let kind = event_name.as_deref().and_then(HistoryKind::parse);
    if kind.is_none() {
        problems.insert(0, format!("event {:?}", event_name.as_deref().unwrap_or("")));
    }
    let kind = match kind {
        Some(kind) if problems.is_empty() => kind,
        _ => HistoryKind::Unrecognised,
    };
    HistoryEvent {
        id,
        at_ms,
        kind,
        requested_retry: requested_retry.and_then(|v| i32::try_from(v).ok()),
        budget_left,
        slot: slot.and_then(|v| u32::try_from(v).ok()),
        device,
        outcome,
        message,
        backup_used_bytes: backup_used_bytes.and_then(|v| u64::try_from(v).ok()),
        estimated_bytes: estimated_bytes.and_then(|v| u64::try_from(v).ok()),
        unrecognised: (!problems.is_empty()).then(|| problems.join(", ")),
    }
}

/// A SQLite error as a store error: "not a database" and "corrupt" are [`StoreError::Corrupt`],
/// busy and locked are [`StoreError::Locked`].
fn classify(path: &Path, e: rusqlite::Error, operation: &'static str) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            StoreError::Corrupt { path: path.to_path_buf(), detail: e.to_string() }
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Locked { path: path.to_path_buf() }
        }
        _ => sql_err(path, operation, e),
    }
}

/// Looks at the store file before SQLite does (SQLite takes a zero-length file for a new
/// database, and deletes a WAL it finds beside one). A store is expected when the marker
/// exists or a non-empty write-ahead log lies beside the file.
fn examine_file(path: &Path, marker: &Path) -> Result<Found, StoreError> {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let wal_len = fs::metadata(&wal).map_or(0, |m| m.len());
    let evidence = || {
        if marker.exists() {
            Some(format!("{} says a store was created here", marker.display()))
        } else if wal_len > 0 {
            Some(format!("its write-ahead log {} holds {wal_len} bytes", wal.display()))
        } else {
            None
        }
    };
    let lost = |what: &'static str, evidence: String| StoreError::Lost {
        path: path.to_path_buf(),
        what,
        evidence,
        marker: marker.to_path_buf(),
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match evidence() {
                Some(evidence) => Err(lost("missing", evidence)),
                None => Ok(Found::Nothing),
            };
        }
        Err(e) => {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("cannot examine it: {e}"),
            })
        }
    };
    if !meta.is_file() {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "not a regular file".to_owned(),
        });
    }
    if meta.len() == 0 {
        return match evidence() {
            Some(evidence) => Err(lost("empty (zero length)", evidence)),
            None => {
                warn!(
                    "state store {} is empty and no store was recorded here (a first start \
                     cut short): creating it",
                    path.display()
                );
                Ok(Found::EmptyNew)
            }
        };
    }
    let mut header = [0u8; 100];
    let read = fs::File::open(path).and_then(|mut f| {
        let mut n = 0;
        while n < header.len() {
            match f.read(&mut header[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    });
    match read {
        Ok(100) if header.starts_with(SQLITE_MAGIC) => Ok(Found::Database),
        Ok(n) => {
            let what =
                if n < 100 { "shorter than a SQLite header" } else { "without a SQLite header" };
            match evidence() {
                Some(evidence) => Err(lost(what, evidence)),
                None => Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("{what} ({} bytes)", meta.len()),
                }),
            }
        }
        Err(e) => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("cannot read its header: {e}"),
        }),
    }
}

/// [`inspect_read_only`], again after a pause when it finds damage: the inspection takes no
/// lock (it must write nothing, and a read-only file descriptor cannot take SQLite's write
/// locks), so it may read a store that a running checkpointd is checkpointing at that moment
/// and see a torn page. Real damage stays; a torn read does not, and the write connection that
/// follows then reports the store as locked by the other process.
fn inspect_with_retries(path: &Path) -> Result<(), StoreError> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        match inspect_read_only(path) {
            Err(e) if e.kind() == ErrorKind::Corrupt && attempt < ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Everything that can refuse an existing file, through a read-only connection, so that a
/// refused file stays byte-identical: integrity, schema version, the tables of that version,
/// the current row. `locking_mode=EXCLUSIVE` before the first read keeps SQLite's WAL index in
/// memory (no `-shm` file is created).
fn inspect_read_only(path: &Path) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        "unix-none",
    )
    .map_err(|e| classify(path, e, "open read-only"))?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(|e| classify(path, e, "configure the read-only connection"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| classify(path, e, "set busy timeout"))?;
    conn.pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get::<_, String>(0))
        .map_err(|e| classify(path, e, "set locking_mode=EXCLUSIVE"))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| classify(path, e, "read the schema version"))?;
    let report = quick_check(&conn, path)?;
    if report != ["ok"] {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("quick_check: {}", report.join("; ")),
        });
    }
    let version = u32::try_from(version).map_err(|_| StoreError::InvalidData {
        path: path.to_path_buf(),
        detail: format!("schema version {version}"),
    })?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::FutureVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .map_err(|e| classify(path, e, "list the tables"))?;
    let tables = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| classify(path, e, "list the tables"))?;
    let expected: &[&str] = match version {
        0 => &[],
        1 | 2 => &["checkpoint", "history"],
        _ => &["checkpoint", "history", "last_estimate", "tracking", "consumption"],
    };
    let missing: Vec<&str> =
        expected.iter().copied().filter(|t| !tables.iter().any(|have| have == t)).collect();
    if !missing.is_empty() {
        return Err(StoreError::InvalidData {
            path: path.to_path_buf(),
            detail: format!("schema version {version} without table(s) {}", missing.join(", ")),
        });
    }
    if version == 0 && !tables.is_empty() {
        return Err(StoreError::InvalidData {
            path: path.to_path_buf(),
            detail: format!(
                "not a checkpointd store (schema version 0 with tables {})",
                tables.join(", ")
            ),
        });
    }
    if version > 0 {
        read_current(&conn, path)?;
    }
    Ok(())
}

fn quick_check(conn: &Connection, path: &Path) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare("PRAGMA quick_check(10)").map_err(|e| classify(path, e, "run quick_check"))?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| classify(path, e, "run quick_check"))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| classify(path, e, "run quick_check"))
}

/// Writes the creation marker durably (file, then directory).
fn write_marker(dir: &Path, marker: &Path) -> io::Result<()> {
    let mut file = fs::File::create(marker)?;
    file.write_all(
        b"checkpointd created its state store (checkpointd.db) in this folder. While this file \
          exists, an empty or missing checkpointd.db is refused instead of being created \
          again (docs/state-machine.md).\n",
    )?;
    file.sync_all()?;
    fs::File::open(dir)?.sync_all()
}

/// The current checkpoint row, validated.
fn read_current(conn: &Connection, path: &Path) -> Result<Option<CurrentRow>, StoreError> {
    let raw = conn
        .query_row(
            "SELECT requested_retry, budget_left, attempts_used, requesting_slot,
                    requesting_suffix, rollback_slot_switched, phase, backends, started_at_ms
             FROM checkpoint WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            },
        )
        .optional()
        .map_err(|e| classify(path, e, "read the current checkpoint"))?;
    let Some((retry, budget, used, slot, suffix, switched, phase, backends, started)) = raw else {
        return Ok(None);
    };
    let bad = |detail: String| StoreError::InvalidData { path: path.to_path_buf(), detail };
    let requested_retry =
        i32::try_from(retry).map_err(|_| bad(format!("requested_retry {retry}")))?;
    let budget_left = budget
        .map(|b| u32::try_from(b).map_err(|_| bad(format!("budget_left {b}"))))
        .transpose()?;
    if (requested_retry == -1) != budget_left.is_none() {
        return Err(bad(format!("retry {requested_retry} with budget {budget:?}")));
    }
    let row = CurrentRow {
        requested_retry,
        budget_left,
        attempts_used: u32::try_from(used).map_err(|_| bad(format!("attempts_used {used}")))?,
        requesting_slot: slot
            .map(|s| u32::try_from(s).map_err(|_| bad(format!("requesting_slot {s}"))))
            .transpose()?,
        requesting_suffix: suffix,
        rollback_slot_switched: switched,
        phase: match phase.as_str() {
            "active" => Phase::Active,
            "committing" => Phase::Committing,
            other => return Err(bad(format!("phase {other:?}"))),
        },
        backends,
        started_at_ms: started,
    };
    Ok(Some(row))
}

fn sql_err(path: &Path, operation: &'static str, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite { path: path.to_path_buf(), operation, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).expect("read"))
            })
            .collect();
        out.sort();
        out
    }

    fn pending_row() -> CurrentRow {
        CurrentRow {
            requested_retry: 2,
            budget_left: Some(3),
            attempts_used: 0,
            requesting_slot: Some(0),
            requesting_suffix: Some("_a".into()),
            rollback_slot_switched: false,
            phase: Phase::Active,
            backends: "test-null".into(),
            started_at_ms: 1,
        }
    }

    /// A store with a pending checkpoint, as a power cut would leave it: the files copied while
    /// the store is open (the checkpoint is in the WAL only), no marker unless `with_marker`.
    fn crashed_copy(with_marker: bool) -> tempfile::TempDir {
        let live = temp_dir();
        let mut store = Store::open(live.path()).expect("open");
        store.apply(RowChange::Set(&pending_row()), &[]).expect("apply");
        let copy = temp_dir();
        for name in [Store::FILE_NAME, "checkpointd.db-wal"] {
            fs::copy(live.path().join(name), copy.path().join(name)).expect("copy");
        }
        if with_marker {
            fs::copy(
                live.path().join(Store::MARKER_FILE_NAME),
                copy.path().join(Store::MARKER_FILE_NAME),
            )
            .expect("copy marker");
        }
        drop(store);
        copy
    }

    #[test]
    fn a_store_whose_state_is_only_in_its_wal_opens_with_that_state() {
        let copy = crashed_copy(false);
        let wal_len = fs::metadata(copy.path().join("checkpointd.db-wal")).expect("wal").len();
        assert!(wal_len > 0, "the checkpoint must be in the WAL for this test");
        let store = Store::open(copy.path()).expect("open the crashed copy");
        assert_eq!(store.current(), Some(&pending_row()));
        assert!(copy.path().join(Store::MARKER_FILE_NAME).exists(), "marker written");
    }

    #[test]
    fn an_emptied_store_with_its_marker_is_refused_and_left_alone() {
        let dir = temp_dir();
        let mut store = Store::open(dir.path()).expect("open");
        store.apply(RowChange::Set(&pending_row()), &[]).expect("apply");
        drop(store);
        fs::write(dir.path().join(Store::FILE_NAME), b"").expect("truncate");
        let before = listing(dir.path());
        let err = Store::open(dir.path()).expect_err("an emptied store must be refused");
        assert!(matches!(err, StoreError::Lost { what: "empty (zero length)", .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let text = err.to_string();
        assert!(text.contains(Store::MARKER_FILE_NAME) && text.contains("may be lost"), "{text}");
        assert_eq!(listing(dir.path()), before, "nothing may change");
    }

    #[test]
    fn an_emptied_store_beside_a_wal_is_refused_and_the_wal_kept() {
        // No marker (e.g. a store created before markers existed): the WAL is the evidence.
        // SQLite alone would take the empty file for a new database and delete the WAL.
        let copy = crashed_copy(false);
        fs::write(copy.path().join(Store::FILE_NAME), b"").expect("truncate");
        let before = listing(copy.path());
        let err = Store::open(copy.path()).expect_err("refused");
        assert!(matches!(err, StoreError::Lost { .. }), "{err:?}");
        assert!(err.to_string().contains("write-ahead log"), "{err}");
        assert_eq!(listing(copy.path()), before);
    }

    #[test]
    fn a_missing_or_headerless_store_with_its_marker_is_refused() {
        let dir = temp_dir();
        drop(Store::open(dir.path()).expect("open"));
        let db = dir.path().join(Store::FILE_NAME);
        let mut bytes = fs::read(&db).expect("db");
        bytes[..100].fill(0);
        fs::write(&db, &bytes).expect("zero the header");
        let before = listing(dir.path());
        let err = Store::open(dir.path()).expect_err("headerless");
        assert!(matches!(err, StoreError::Lost { what: "without a SQLite header", .. }), "{err}");
        assert_eq!(listing(dir.path()), before);

        fs::remove_file(&db).expect("remove");
        let err = Store::open(dir.path()).expect_err("missing");
        assert!(matches!(err, StoreError::Lost { what: "missing", .. }), "{err}");
        assert!(!db.exists(), "no store may be created in its place");
    }

    #[test]
    fn an_empty_file_with_no_sign_of_a_store_is_a_first_start_cut_short() {
        let dir = temp_dir();
        fs::write(dir.path().join(Store::FILE_NAME), b"").expect("empty file");
        let store = Store::open(dir.path()).expect("created");
        assert_eq!(store.schema_version(), SCHEMA_VERSION);
        assert!(dir.path().join(Store::MARKER_FILE_NAME).exists());
    }

    #[test]
    fn a_refused_tableless_store_is_byte_identical() {
        // A file at the current schema version without its tables, in rollback-journal mode:
        // opening it for writing first would switch it to WAL (header bytes 18-19).
        let dir = temp_dir();
        let db = dir.path().join(Store::FILE_NAME);
        let conn = Connection::open(&db).expect("create");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION).expect("version");
        drop(conn);
        let before = listing(dir.path());
        let err = Store::open(dir.path()).expect_err("refused");
        assert!(matches!(err, StoreError::InvalidData { .. }), "{err:?}");
        assert!(err.to_string().contains("without table(s) checkpoint, history"), "{err}");
        assert_eq!(listing(dir.path()), before, "no byte and no file may change");
    }

    #[test]
    fn a_refused_store_with_a_wal_keeps_both_files_byte_identical() {
        let copy = crashed_copy(true);
        // Make it a store of a newer version, the change itself only in the WAL.
        {
            let conn = Connection::open(copy.path().join(Store::FILE_NAME)).expect("open");
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE").expect("exclusive");
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("bump");
            let copy2 = copy.path().join("snapshot");
            fs::create_dir(&copy2).expect("mkdir");
            for name in [Store::FILE_NAME, "checkpointd.db-wal", Store::MARKER_FILE_NAME] {
                fs::copy(copy.path().join(name), copy2.join(name)).expect("copy");
            }
        }
        let dir = copy.path().join("snapshot");
        let before = listing(&dir);
        let err = Store::open(&dir).expect_err("newer version");
        assert!(matches!(err, StoreError::FutureVersion { .. }), "{err:?}");
        assert_eq!(listing(&dir), before);
    }

    #[test]
    fn text_is_bounded_when_written_and_when_read() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(100);
        let cut = bounded(&long, 51);
        assert!(cut.len() <= 51 && cut.ends_with(CUT_MARK), "{cut}");

        let dir = temp_dir();
        let mut store = Store::open(dir.path()).expect("open");
        let mut event = HistoryEvent::new(HistoryKind::Restore);
        event.device = Some(format!("/{}", "d".repeat(16 << 20)));
        event.message = Some("m".repeat(1 << 20));
        event.outcome = Some("o".repeat(1000));
        store.apply(RowChange::Keep, &[event]).expect("apply");
        // A row as an older version stored it: not cut.
        store
            .conn
            .execute(
                "INSERT INTO history (at_ms, event, device, message) VALUES (1, 'restore', ?1, ?1)",
                [format!("/{}", "x".repeat(8 << 20))],
            )
            .expect("insert");
        let stored: i64 = store
            .conn
            .query_row("SELECT max(length(device)) FROM history WHERE id = 1", [], |r| r.get(0))
            .expect("length");
        assert!(usize::try_from(stored).expect("len") <= MAX_STORED_PATH_BYTES, "{stored}");
        let history = store.history(10).expect("history");
        assert_eq!(history.len(), 2);
        for event in history {
            assert!(event.device.as_ref().expect("device").len() <= MAX_STORED_PATH_BYTES);
            assert!(event.message.as_ref().expect("message").len() <= MAX_STORED_TEXT_BYTES);
            assert!(event.outcome.as_ref().map_or(0, String::len) <= MAX_STORED_WORD_BYTES);
        }
        let last = store.last_event(HistoryKind::Restore).expect("last").expect("one");
        assert!(last.device.expect("device").ends_with(CUT_MARK));
    }

    #[test]
    fn history_rows_it_does_not_understand_are_reported_not_fatal() {
        let dir = temp_dir();
        let mut store = Store::open(dir.path()).expect("open");
        store.apply(RowChange::Keep, &[HistoryEvent::new(HistoryKind::Commit)]).expect("apply");
        store
            .conn
            .execute_batch(
                "INSERT INTO history (at_ms, event, outcome) VALUES (2, 'from_the_future', 'x');
                 INSERT INTO history (at_ms, event, slot) VALUES ('yesterday', 'commit', 'one');",
            )
            .expect("insert");
        let history = store.history(10).expect("history must not fail");
        assert_eq!(history.len(), 3);
        assert_eq!(history[0].kind, HistoryKind::Unrecognised);
        let why = history[0].unrecognised.as_deref().expect("reason");
        assert!(why.contains("at_ms holds Text") && why.contains("slot holds Text"), "{why}");
        assert_eq!(history[1].kind, HistoryKind::Unrecognised);
        assert_eq!(history[1].unrecognised.as_deref(), Some("event \"from_the_future\""));
        assert_eq!(history[1].outcome.as_deref(), Some("x"));
        assert_eq!(history[2].kind, HistoryKind::Commit);
        assert_eq!(history[2].unrecognised, None);
    }

    #[test]
    fn text_read_bounds_are_one_byte_over_the_stored_ones() {
        assert_eq!(usize::try_from(TEXT_READ_PATH).ok(), Some(MAX_STORED_PATH_BYTES + 1));
        assert_eq!(usize::try_from(TEXT_READ_WORD).ok(), Some(MAX_STORED_WORD_BYTES + 1));
    }

    fn estimate_record(needed: u64) -> EstimateRecord {
        EstimateRecord {
            at_ms: 0,
            mount_point: "/data".into(),
            backend: "bow".into(),
            device_size: 1 << 30,
            basis: "trace".into(),
            predicted_bytes: needed / 2,
            needed_bytes: needed,
        }
    }

    #[test]
    fn a_version_2_store_upgrades_to_3_keeping_its_state_and_history() {
        let dir = temp_dir();
        {
            let conn = Connection::open(dir.path().join(Store::FILE_NAME)).expect("create");
            conn.execute_batch(MIGRATIONS[0]).expect("v1");
            conn.execute_batch(MIGRATIONS[1]).expect("v2");
            conn.pragma_update(None, "user_version", 2).expect("version 2");
            conn.execute(
                "INSERT INTO checkpoint VALUES (1, 2, 3, 0, 0, '_a', 0, 'active', 'bow', 5)",
                [],
            )
            .expect("checkpoint row");
            conn.execute(
                "INSERT INTO history (at_ms, event, backup_used_bytes) VALUES (4, 'commit', 7)",
                [],
            )
            .expect("history row");
        }
        let mut store = Store::open(dir.path()).expect("upgraded");
        assert_eq!(store.schema_version(), 3);
        assert_eq!(store.current().map(|r| r.started_at_ms), Some(5));
        let history = store.history(10).expect("history");
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].backup_used_bytes, Some(7));
        assert_eq!(history[0].estimated_bytes, None);
        assert_eq!(store.last_estimate().expect("read"), None);
        assert_eq!(store.tracking().expect("read"), None);
        assert!(store.consumption(10).expect("read").is_empty());
        // The new tables work at once.
        store.record_estimate(&estimate_record(10)).expect("record");
        drop(store);
        // And a version-3 store opens as it is (no second migration).
        let store = Store::open(dir.path()).expect("reopened");
        assert_eq!(store.last_estimate().expect("read").map(|e| e.needed_bytes), Some(10));
    }

    #[test]
    fn a_finished_checkpoint_records_its_high_water_mark_against_its_estimate() {
        let dir = temp_dir();
        let mut store = Store::open(dir.path()).expect("store");
        store.record_estimate(&estimate_record(3000)).expect("estimate");
        store.track_checkpoint(77).expect("track");
        // An estimate made after the start is the next update's, not this checkpoint's.
        store.record_estimate(&estimate_record(9999)).expect("later estimate");
        assert!(store.note_high_water(1000).expect("raise"));
        assert!(store.note_high_water(2500).expect("raise"));
        assert!(!store.note_high_water(2000).expect("lower: no write"));
        // Tracking the same checkpoint again keeps its record.
        store.track_checkpoint(77).expect("again");
        let tracked = store.tracking().expect("read").expect("tracked");
        assert_eq!(tracked.high_water_bytes, Some(2500));
        assert_eq!(
            tracked.estimate.map(|(_, needed, predicted)| (needed, predicted)),
            Some((3000, 1500))
        );

        store.apply(RowChange::Keep, &[HistoryEvent::new(HistoryKind::Commit)]).expect("commit");
        let finished = Finished {
            ending: Ending::Committed,
            mount_point: "/data",
            backend: "bow",
            device_size: 1 << 30,
            final_used_bytes: Some(1800),
        };
        let row = store.finish_tracking(&finished).expect("finish").expect("a row");
        assert_eq!(row.actual_bytes, 2500, "the high-water mark, not the final value");
        assert_eq!(row.estimated_bytes, Some(3000));
        assert_eq!(row.predicted_bytes, Some(1500));
        assert_eq!(store.tracking().expect("read"), None);
        assert_eq!(store.consumption(10).expect("read"), vec![row.clone()]);
        // The commit row of the history shows the estimate against the actual.
        let commit = store.last_event(HistoryKind::Commit).expect("read").expect("commit row");
        assert_eq!(row.history_id, Some(commit.id));
        assert_eq!((commit.estimated_bytes, commit.backup_used_bytes), (Some(3000), Some(2500)));
    }

    #[test]
    fn a_checkpoint_without_an_estimate_or_tracking_still_records_its_final_use() {
        let dir = temp_dir();
        let mut store = Store::open(dir.path()).expect("store");
        store
            .apply(RowChange::Keep, &[HistoryEvent::new(HistoryKind::RollbackAcknowledged)])
            .expect("ack");
        let finished = Finished {
            ending: Ending::RolledBack,
            mount_point: "/data",
            backend: "snapshot",
            device_size: 1 << 30,
            final_used_bytes: Some(4096),
        };
        let row = store.finish_tracking(&finished).expect("finish").expect("a row");
        assert_eq!((row.actual_bytes, row.estimated_bytes), (4096, None));
        assert_eq!(row.outcome, "rolled_back");
        // Nothing known at all: nothing recorded.
        let unknown = Finished { final_used_bytes: None, ..finished };
        assert_eq!(store.finish_tracking(&unknown).expect("finish"), None);
        assert_eq!(store.consumption(10).expect("read").len(), 1);
    }
}
