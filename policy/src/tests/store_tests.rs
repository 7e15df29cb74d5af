//! Store: integrity and version checks, migrations, locking, crash recovery, transactions.

use std::fs;
use std::path::Path;

use rusqlite::Connection;

use super::fakes::temp_dir;
use crate::store::{CurrentRow, Phase, RowChange};
use crate::{errno, ErrorKind, HistoryEvent, HistoryKind, Store, StoreError, MIGRATIONS};

fn db(dir: &Path) -> std::path::PathBuf {
    dir.join(Store::FILE_NAME)
}

fn row(budget: Option<u32>) -> CurrentRow {
    CurrentRow {
        requested_retry: budget.map_or(-1, |b| i32::try_from(b).unwrap() - 1),
        budget_left: budget,
        attempts_used: 0,
        requesting_slot: Some(0),
        requesting_suffix: Some("_a".into()),
        rollback_slot_switched: false,
        phase: Phase::Active,
        backends: "bow".into(),
        started_at_ms: 1,
    }
}

#[test]
fn fresh_store_is_created_at_the_current_schema_with_no_checkpoint() {
    let dir = temp_dir();
    let store = Store::open(&dir.path().join("new/sub")).unwrap();
    assert_eq!(store.schema_version(), crate::SCHEMA_VERSION);
    assert!(store.current().is_none());
    assert!(store.history(10).unwrap().is_empty());
    assert_eq!(store.write_transactions(), 1, "the creation is one migration transaction");
}

#[test]
fn state_survives_reopen() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    store.apply(RowChange::Set(&row(Some(3))), &[HistoryEvent::new(HistoryKind::Start)]).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.current(), Some(&row(Some(3))));
    assert_eq!(store.history(10).unwrap()[0].kind, HistoryKind::Start);
    // Opening a current store writes once, to make the WAL durable up front.
    assert_eq!(store.write_transactions(), 1);
}

#[test]
fn garbage_file_is_refused_as_corrupt_and_left_untouched() {
    let dir = temp_dir();
    let garbage: Vec<u8> = (0..8192u32).map(|i| u8::try_from(i * 7 % 251).unwrap()).collect();
    fs::write(db(dir.path()), &garbage).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(err.errno(), errno::EUCLEAN);
    let msg = err.to_string();
    assert!(msg.contains(Store::FILE_NAME) && msg.contains("left untouched"), "{msg}");
    assert_eq!(fs::read(db(dir.path())).unwrap(), garbage);
}

#[test]
fn damaged_page_fails_the_integrity_check_and_is_left_untouched() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    let events: Vec<HistoryEvent> = (0..400)
        .map(|i| {
            let mut e = HistoryEvent::new(HistoryKind::Restore);
            e.message = Some(format!("restore number {i} with some padding text to fill pages"));
            e
        })
        .collect();
    store.apply(RowChange::Keep, &events).unwrap();
    drop(store); // clean close: the WAL is checkpointed into the main file
    let path = db(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() >= 4 * 4096, "need several pages, have {}", bytes.len());
    // Overwrite the b-tree page header and cell pointers of page 3.
    for b in &mut bytes[2 * 4096..2 * 4096 + 64] {
        *b = 0xA5;
    }
    fs::write(&path, &bytes).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn store_from_a_newer_version_is_refused_and_left_untouched() {
    let dir = temp_dir();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(db(dir.path())).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let before = fs::read(db(dir.path())).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::FutureVersion { found: 99, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    assert_eq!(err.errno(), errno::EPROTO);
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(fs::read(db(dir.path())).unwrap(), before);
}

#[test]
fn migration_from_schema_1_keeps_data_and_adds_the_index() {
    let dir = temp_dir();
    let conn = Connection::open(db(dir.path())).unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    conn.execute("INSERT INTO checkpoint VALUES (1, 2, 3, 0, 0, '_a', 0, 'active', 'bow', 5)", [])
        .unwrap();
    conn.execute("INSERT INTO history (at_ms, event, device) VALUES (7, 'restore', '/dev/x')", [])
        .unwrap();
    drop(conn);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.schema_version(), 3);
    let cur = store.current().unwrap();
    assert_eq!((cur.requested_retry, cur.budget_left), (2, Some(3)));
    let last = store.last_event(HistoryKind::Restore).unwrap().unwrap();
    assert_eq!(last.device.as_deref(), Some("/dev/x"));
    drop(store);
    let conn = Connection::open(db(dir.path())).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'history_event'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn migrations_run_in_order_from_any_version() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    // Already current: a no-op.
    store.migrate_to(crate::SCHEMA_VERSION).unwrap();
    assert_eq!(store.write_transactions(), 1);
    assert_eq!(MIGRATIONS.len(), usize::try_from(crate::SCHEMA_VERSION).unwrap());
}

#[test]
fn second_owner_is_refused_while_the_store_is_open() {
    let dir = temp_dir();
    let first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(err.errno(), errno::EAGAIN);
    drop(first);
    Store::open(dir.path()).unwrap();
}

#[test]
fn interrupted_commit_is_rolled_back_at_open() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    let committing = CurrentRow { phase: Phase::Committing, attempts_used: 2, ..row(Some(1)) };
    store.apply(RowChange::Set(&committing), &[]).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.current(), Some(&CurrentRow { phase: Phase::Active, ..committing }));
    let last = store.history(1).unwrap().remove(0);
    assert_eq!(last.kind, HistoryKind::Recovery);
    assert_eq!(last.outcome.as_deref(), Some("commit_interrupted"));
    assert_eq!(store.write_transactions(), 1);
}

#[test]
fn each_apply_is_one_transaction_and_failed_ones_change_nothing() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    let base = store.write_transactions();
    store.apply(RowChange::Set(&row(Some(2))), &[HistoryEvent::new(HistoryKind::Start)]).unwrap();
    assert_eq!(store.write_transactions(), base + 1);
    // A value the schema's CHECK refuses: the whole transaction is rolled back.
    let bad = CurrentRow { requested_retry: -5, ..row(Some(9)) };
    let err = store.apply(RowChange::Set(&bad), &[HistoryEvent::new(HistoryKind::Abort)]);
    assert!(err.is_err());
    assert_eq!(store.current(), Some(&row(Some(2))));
    assert_eq!(store.history(10).unwrap().len(), 1);
    drop(store);
    assert_eq!(Store::open(dir.path()).unwrap().current(), Some(&row(Some(2))));
}

#[test]
fn invalid_row_is_reported_as_corrupt_data() {
    let dir = temp_dir();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(db(dir.path())).unwrap();
    // retry 2 with an unlimited (NULL) budget breaks an invariant the CHECKs do not cover.
    conn.execute(
        "INSERT INTO checkpoint VALUES (1, 2, NULL, 0, 0, '_a', 0, 'active', 'bow', 5)",
        [],
    )
    .unwrap();
    drop(conn);
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::InvalidData { .. }), "{err:?}");
    assert_eq!(err.errno(), errno::EUCLEAN);
}

#[test]
fn history_is_newest_first_and_limited() {
    let dir = temp_dir();
    let mut store = Store::open(dir.path()).unwrap();
    for kind in [HistoryKind::Start, HistoryKind::BootAttempt, HistoryKind::Commit] {
        store.apply(RowChange::Keep, &[HistoryEvent::new(kind)]).unwrap();
    }
    let h = store.history(2).unwrap();
    assert_eq!(
        h.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [HistoryKind::Commit, HistoryKind::BootAttempt]
    );
    assert!(h[0].id > h[1].id && h[0].at_ms > 0);
}
