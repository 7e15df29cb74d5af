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
//! in one transaction; a file from a newer version is refused without being touched. The
//! integrity check (`PRAGMA quick_check`) runs before anything is written.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
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
];

/// The schema version this code writes.
pub const SCHEMA_VERSION: u32 = 2;

/// History rows kept; older rows are pruned at open.
pub const HISTORY_LIMIT: i64 = 10_000;

const BUSY_TIMEOUT: Duration = Duration::from_millis(500);

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
            StoreError::Corrupt { .. } | StoreError::InvalidData { .. } => ErrorKind::Corrupt,
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
    /// Backup space consumed, as reported by the backends.
    pub backup_used_bytes: Option<u64>,
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
        }
    }
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

    /// Open (creating if needed) the store in `dir`: integrity check, version check,
    /// migrations, crash recovery.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir)
            .map_err(|source| StoreError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(Self::FILE_NAME);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_err(&path, "open", e))?;
        let mut store = Store { conn, path, current: None, version: 0, writes: 0 };
        store.configure_and_check()?;
        store.migrate()?;
        store.current = store.read_current()?;
        store.recover()?;
        store.make_wal_durable()?;
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
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt { path: self.path.clone(), detail: e.to_string() }
            }
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Locked { path: self.path.clone() }
            }
            _ => sql_err(&self.path, operation, e),
        }
    }

    /// Everything before the first write: lock mode, version and integrity checks, then WAL.
    fn configure_and_check(&mut self) -> Result<(), StoreError> {
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.classify(e, "set busy timeout"))?;
        // Read-only pragmas and checks first: a refused file must stay byte-identical.
        let _: String = self
            .conn
            .pragma_query_value(None, "locking_mode", |r| r.get(0))
            .map_err(|e| self.classify(e, "query the locking mode"))?;
        self.conn
            .pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get::<_, String>(0))
            .map_err(|e| self.classify(e, "set locking_mode=EXCLUSIVE"))?;
        let version = self.user_version()?;
        let report = self.quick_check()?;
        if report != ["ok"] {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("quick_check: {}", report.join("; ")),
            });
        }
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
        self.conn
            .pragma_update(None, "user_version", self.version)
            .map_err(|e| self.classify(e, "sync the write-ahead log"))?;
        self.writes += 1;
        Ok(())
    }

    fn quick_check(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA quick_check(10)")
            .map_err(|e| self.classify(e, "run quick_check"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.classify(e, "run quick_check"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.classify(e, "run quick_check"))
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
        let pruned = self.prune_history()?;
        if pruned > 0 {
            info!("pruned {pruned} old history rows from {}", self.path.display());
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
            self.apply(RowChange::Set(&fixed), &[event])?;
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

    fn read_current(&self) -> Result<Option<CurrentRow>, StoreError> {
        let raw = self
            .conn
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
            .map_err(|e| self.classify(e, "read the current checkpoint"))?;
        let Some((retry, budget, used, slot, suffix, switched, phase, backends, started)) = raw
        else {
            return Ok(None);
        };
        let bad = |detail: String| StoreError::InvalidData { path: self.path.clone(), detail };
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
            RowChange::Set(row) => {
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
                    ev.device,
                    ev.outcome,
                    ev.message,
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
            RowChange::Set(row) => self.current = Some(row.clone()),
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

    fn query_history(
        &self,
        kind: Option<HistoryKind>,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        const SELECT: &str = "SELECT id, at_ms, event, requested_retry, budget_left, slot, \
                              device, outcome, message, backup_used_bytes FROM history";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = match kind {
            // Served by the index history_event.
            Some(_) => format!("{SELECT} WHERE event = ?2 ORDER BY id DESC LIMIT ?1"),
            None => format!("{SELECT} WHERE ?2 IS NULL ORDER BY id DESC LIMIT ?1"),
        };
        let mut stmt =
            self.conn.prepare_cached(&sql).map_err(|e| sql_err(&self.path, "read history", e))?;
        let rows = stmt
            .query_map(params![limit, kind.map(HistoryKind::as_str)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<i64>>(9)?,
                ))
            })
            .map_err(|e| sql_err(&self.path, "read history", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at_ms, event, retry, budget, slot, device, outcome, message, used) =
                row.map_err(|e| sql_err(&self.path, "read history", e))?;
            let kind = HistoryKind::parse(&event).ok_or_else(|| StoreError::InvalidData {
                path: self.path.clone(),
                detail: format!("history event {event:?}"),
            })?;
            out.push(HistoryEvent {
                id,
                at_ms,
                kind,
                requested_retry: retry.and_then(|v| i32::try_from(v).ok()),
                budget_left: budget,
                slot: slot.and_then(|v| u32::try_from(v).ok()),
                device,
                outcome,
                message,
                backup_used_bytes: used.and_then(|v| u64::try_from(v).ok()),
            });
        }
        Ok(out)
    }
}

fn sql_err(path: &Path, operation: &'static str, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite { path: path.to_path_buf(), operation, source }
}
