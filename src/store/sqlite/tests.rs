use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::{checkpoint_turn, WAL_LIMIT_PAGES};
use super::connection::{BUSY_TIMEOUT, BUSY_TIMEOUT_FAILING, WAL_KEEP_BYTES};
use super::restore::SESSION_CHUNK;
use super::schema::{DELIVERED, SCHEMA_VERSION, SERIES, SESSIONS};
use super::unfolded::{REWRITE_MIN, SERIES_ROWS};
use super::*;
use crate::area::Area;
use crate::callback::EventKind;
use crate::state::counters::{Series, Value};
use crate::state::rules::{Sequence, Session};

const NOW: i64 = 1_700_000_000_000;

/// A new store in a temporary folder (removed when the folder is dropped), and its path.
fn new_store(name: &str) -> (tempfile::TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    (dir, path, store)
}

fn stream(n: u32) -> StreamKey {
    StreamKey {
        app: format!("push{}.example.com", n % 3).into(),
        appname: "live".into(),
        stream_id: format!("s{n}").into(),
    }
}

fn live(sequence: &str) -> Option<Session> {
    Some(Session {
        sequence: Sequence::from(sequence),
        area: Area::Mainland,
        since: 1_700_000_000,
    })
}

fn sessions_of(store: &mut SqliteStore) -> HashMap<StreamKey, String> {
    let sessions = store.load().unwrap().all_sessions().unwrap();
    let map: HashMap<_, _> = sessions
        .into_iter()
        .map(|(k, s)| (k, s.sequence.to_string()))
        .collect();
    map
}

/// The `live_sessions` view lists the expected sessions (stream ids are unique in tests).
fn assert_live_sessions_view(path: &Path, expected: &HashMap<StreamKey, String>) {
    let viewed: HashMap<String, String> = Connection::open(path)
        .unwrap()
        .prepare("SELECT stream_id, sequence FROM live_sessions")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let expected_ids: HashMap<String, String> = expected
        .iter()
        .map(|(k, s)| (k.stream_id.to_string(), s.clone()))
        .collect();
    assert_eq!(viewed, expected_ids);
}

fn count(path: &Path, table: &str) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// Streams pushed, replaced and ended over many batches: what the log folds, what it
/// skips and what it still holds add up to the same sessions, now and after a reopen.
/// With trims at every commit and every third: rows folded but not deleted yet repeat what
/// `sessions` holds and change nothing, also when read again after a reopen.
#[test]
fn folding_keeps_the_newest_session_of_each_stream() {
    for trim_every in [1, 3] {
        folding_keeps_the_newest_session(trim_every);
    }
}

fn folding_keeps_the_newest_session(trim_every: u64) {
    let (_dir, path, mut store) = new_store("fold.db");
    store.fold_lag = 7;
    store.trim_every = trim_every;
    let mut expected = HashMap::new();
    for batch in 0..40_u32 {
        let mut commit = Commit::default();
        for i in 0..5 {
            let n = (batch * 5 + i) % 23;
            let session = match (batch + i) % 4 {
                0 => None,
                _ => live(&format!("{batch}-{i}")),
            };
            match &session {
                Some(s) => expected.insert(stream(n), s.sequence.to_string()),
                None => expected.remove(&stream(n)),
            };
            commit.sessions.push((stream(n), session));
        }
        store.write(&commit, NOW).unwrap();
        // Up to the lag, plus what was folded since the last trim.
        assert!(count(&path, "session_log") <= 7 + 5 * trim_every as i64);
    }
    assert!(count(&path, "sessions") > 0, "some rows were folded");
    assert_eq!(sessions_of(&mut store), expected);
    // The view for people with `sqlite3` says the same.
    assert_live_sessions_view(&path, &expected);
    drop(store);
    let mut reopened = SqliteStore::open(path, SyncMode::Normal).unwrap();
    reopened.fold_lag = 7;
    reopened.trim_every = trim_every;
    assert_eq!(sessions_of(&mut reopened), expected);
    // Folding on from what was read again (folded rows among it) ends the same way.
    for n in 0..23 {
        let commit = Commit {
            sessions: vec![(stream(n), live(&format!("after-{n}")))],
            ..Commit::default()
        };
        reopened.write(&commit, NOW).unwrap();
        expected.insert(stream(n), format!("after-{n}"));
    }
    assert_eq!(sessions_of(&mut reopened), expected);
}

/// Rows whose changes were all superseded leave the log even while few streams are
/// pending, and a fold writes the pending streams in key order from where the last ended.
#[test]
fn superseded_rows_leave_the_log_and_folds_sweep_in_key_order() {
    let (_dir, path, mut store) = new_store("sweep.db");
    store.fold_lag = 1_000;
    store.trim_every = 1;
    for batch in 0..200_u32 {
        let commit = Commit {
            sessions: (0..3)
                .map(|n| (stream(n), live(&format!("{batch}"))))
                .collect(),
            ..Commit::default()
        };
        store.write(&commit, NOW).unwrap();
        assert!(
            count(&path, "session_log") <= 2,
            "the log keeps only live rows"
        );
    }
    assert_eq!(
        count(&path, "sessions"),
        0,
        "nothing was old enough to fold"
    );

    let mut unfolded = Unfolded::default();
    for n in [5, 1, 4, 2, 3] {
        unfolded.push(1, &stream(n), live("s"));
    }
    let keys = |taken: Vec<(StreamKey, Option<Session>)>| -> Vec<StreamKey> {
        taken.into_iter().map(|(k, _)| k).collect()
    };
    // Key order: domain first (`stream(n)` is on push{n % 3}), then the stream id.
    assert_eq!(keys(unfolded.sweep(2, 0)), [stream(3), stream(1)]);
    unfolded.push(2, &stream(0), live("t"));
    // Young changes are passed over; the sweep goes on around the end.
    assert_eq!(
        keys(unfolded.sweep(3, 1)),
        [stream(4), stream(2), stream(5)]
    );
    assert_eq!(unfolded.folded_through, Some(1), "row 1 is done");
    assert_eq!(keys(unfolded.sweep(3, 0)), [stream(0)]);
    assert_eq!(unfolded.folded_through, Some(2));

    // Pending keys of one domain share its strings, however they came.
    for n in [1, 4, 7] {
        unfolded.push(3, &stream(n), live("u"));
    }
    let apps: Vec<_> = unfolded.pending.keys().map(|k| k.app.clone()).collect();
    assert_eq!(apps.len(), 3);
    assert!(apps.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
}

/// The strings the pending keys share leave once no key holds them: domains come and go.
#[test]
fn shared_names_of_folded_streams_are_let_go() {
    let (_dir, _path, mut store) = new_store("names.db");
    store.fold_lag = 8;
    store.trim_every = 1;
    for batch in 0..100_u32 {
        let stream = StreamKey {
            app: format!("push{batch}.example.com").into(),
            appname: "live".into(),
            stream_id: "s".into(),
        };
        let commit = Commit {
            sessions: vec![(stream, live("1"))],
            ..Commit::default()
        };
        store.write(&commit, NOW).unwrap();
    }
    let unfolded = store.unfolded.as_ref().unwrap();
    assert!(unfolded.pending.len() <= 8);
    assert!(
        unfolded.names.len() <= 8 + 2,
        "{} names",
        unfolded.names.len()
    );
}

/// Stream ids and sequences of any text, numbers among them, come back from the session
/// log's JSON as they went in, after a reopen and in the `live_sessions` view.
#[test]
fn odd_stream_ids_round_trip_through_the_session_log() {
    let (_dir, path, mut store) = new_store("odd.db");
    let odd = [
        "q\"uote\\back\nline\u{1f}日本",
        "12345",
        "null",
        "[1,2]",
        "",
    ];
    let mut expected = HashMap::new();
    for (i, id) in odd.iter().enumerate() {
        let key = StreamKey {
            app: "d.example.com".into(),
            appname: "li\"ve".into(),
            stream_id: (*id).into(),
        };
        let sequence = ["007", "18446744073709551615", "x\"y", "1e3", "-1"][i];
        let commit = Commit {
            sessions: vec![(key.clone(), live(sequence))],
            ..Commit::default()
        };
        store.write(&commit, NOW).unwrap();
        expected.insert(key, sequence.to_string());
    }
    drop(store);
    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    assert_eq!(sessions_of(&mut store), expected);
    assert_live_sessions_view(&path, &expected);
}

/// More stored sessions than one chunk of the loader: every one arrives once, and a row
/// that cannot be read fails the load instead of being skipped.
#[test]
fn stored_sessions_load_in_chunks_and_a_bad_row_fails_the_load() {
    let (_dir, path, mut store) = new_store("chunks.db");
    store.fold_lag = 64;
    let mut expected = HashMap::new();
    let rounds = (SESSION_CHUNK as u32 * 2) / 64 + 3;
    for round in 0..rounds {
        let commit = batch(round);
        for (stream, session) in &commit.sessions {
            let sequence = session.as_ref().unwrap().sequence.to_string();
            expected.insert(stream.clone(), sequence);
        }
        store.write(&commit, NOW).unwrap();
    }
    drop(store);
    assert!(count(&path, "sessions") > 2 * SESSION_CHUNK as i64);
    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    let sessions = store.load().unwrap().all_sessions().unwrap();
    assert_eq!(sessions.len(), expected.len());
    let loaded: HashMap<_, _> = sessions
        .into_iter()
        .map(|(k, s)| (k, s.sequence.to_string()))
        .collect();
    assert_eq!(loaded, expected);
    drop(store);

    Connection::open(&path)
        .unwrap()
        .execute_batch("UPDATE sessions SET area = 'moon' WHERE stream_id = 's5000'")
        .unwrap();
    let mut store = SqliteStore::open(path, SyncMode::Normal).unwrap();
    let err = store.load().unwrap().all_sessions().unwrap_err();
    assert!(err.contains("unknown area \"moon\""), "{err}");
}

#[test]
fn a_session_log_change_that_lacks_its_area_is_refused() {
    let (_dir, path, store) = new_store("torn.db");
    drop(store);
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            r#"INSERT INTO session_log (changes) VALUES ('[["d","live","s","7",null,1]]')"#,
        )
        .unwrap();
    let mut store = SqliteStore::open(path, SyncMode::Normal).unwrap();
    let Err(err) = store.load() else {
        panic!("a torn change was read");
    };
    assert!(err.to_string().contains("lacks its area"), "{err}");
}

/// The WAL file of the database at `path`.
fn wal_of(path: &Path) -> std::ffi::OsString {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal
}

fn size(p: &std::ffi::OsStr) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A new store in a temporary folder (kept while the first value lives): the database's path,
/// its WAL's and the store.
fn store_and_wal(name: &str) -> (tempfile::TempDir, PathBuf, std::ffi::OsString, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.db"));
    let wal = wal_of(&path);
    let store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    (dir, path, wal, store)
}

fn page_size(path: &Path) -> u64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap()
}

/// 64 new live sessions, numbered from `round * 64`.
fn batch(round: u32) -> Commit {
    Commit {
        sessions: (0..64)
            .map(|n| (stream(round * 64 + n), live(&format!("s{round}-{n}"))))
            .collect(),
        ..Commit::default()
    }
}

/// Commits reach the database file soon, long before the WAL reaches the writer's own
/// checkpoint limit, and the WAL file stays bounded under continuous writes.
#[test]
fn the_wal_is_checkpointed_off_the_commit_path() {
    let (_dir, path, wal, mut store) = store_and_wal("wal");
    let before = size(path.as_os_str());
    for round in 0..4 {
        store.write(&batch(round), NOW).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while size(path.as_os_str()) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was checkpointed into the database file ({before} bytes)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let page = page_size(&path);
    // At the limit a commit waits for the checkpointer thread's checkpoint to end, then copies
    // the rest: the WAL holds at most the limit and a batch (a few pages here). Before it waited
    // its turn, the WAL overshot by 258 pages once and by over a thousand once, on slow disks.
    let limit = (WAL_LIMIT_PAGES as u64 + 64) * (page + 24) + 32;
    for round in 4..2_000 {
        store.write(&batch(round), NOW).unwrap();
        let wal = size(&wal);
        assert!(wal <= limit, "WAL of {wal} bytes after {round} batches");
    }
}

/// A commit at the WAL limit waits for a checkpoint in progress (the checkpointer thread's, here
/// the test's turn) to end, then checkpoints itself. SQLite's automatic checkpoint did not wait:
/// it did nothing while another held the checkpoint lock, and the WAL overshot its limit.
#[test]
fn a_commit_at_the_wal_limit_waits_its_turn_then_checkpoints() {
    use std::sync::mpsc::RecvTimeoutError;
    let (_dir, path, wal, mut store) = store_and_wal("turn");
    let page = page_size(&path);
    let frames = |bytes: u64| bytes.saturating_sub(32) / (page + 24);

    // A checkpoint in progress: nothing copies the WAL, which grows up to the limit.
    let turn = checkpoint_turn();
    let (written, batches) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        for round in 0..2_000 {
            store.write(&batch(round), NOW).unwrap();
            let _ = written.send(round);
        }
        store
    });
    let mut last = 0;
    let waited = loop {
        match batches.recv_timeout(Duration::from_secs(2)) {
            Ok(round) => last = round,
            Err(RecvTimeoutError::Timeout) => break true,
            Err(RecvTimeoutError::Disconnected) => break false,
        }
    };
    let waiting_at = frames(size(&wal));

    // Its turn: it copies the WAL, which starts over, and the writer goes on. (The turn is
    // given back before any assertion: the store's checkpointer thread needs it to stop.)
    drop(turn);
    let _store = writer.join().unwrap();
    assert!(waited, "every batch written without waiting at the limit");
    assert!(
        (WAL_LIMIT_PAGES as u64..WAL_LIMIT_PAGES as u64 + 64).contains(&waiting_at),
        "the writer waited after batch {last} with {waiting_at} WAL frames"
    );
    let after = frames(size(&wal));
    assert!(
        after < WAL_LIMIT_PAGES as u64 + 64,
        "{after} WAL frames after 2,000 batches"
    );
}

/// A WAL that grew large (here behind a reader that kept an old snapshot) is cut back to
/// `WAL_KEEP_BYTES` once it can start over, instead of keeping its size for good.
#[test]
fn a_grown_wal_shrinks_once_it_starts_over() {
    let (_dir, path, wal, mut store) = store_and_wal("grown");
    store.write(&batch(0), NOW).unwrap();
    let mut reader = Connection::open(&path).unwrap();
    let snapshot = reader.transaction().unwrap();
    let _: i64 = snapshot
        .query_row("SELECT count(*) FROM session_log", [], |r| r.get(0))
        .unwrap();
    let mut round = 1;
    while size(&wal) <= WAL_KEEP_BYTES as u64 + (4 << 20) {
        store.write(&batch(round), NOW).unwrap();
        round += 1;
    }
    drop(snapshot);
    drop(reader);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while size(&wal) > WAL_KEEP_BYTES as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL stayed at {} bytes",
            size(&wal)
        );
        store.write(&batch(round), NOW).unwrap();
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A write that fails rolls back in the database and in what the store holds in memory.
#[test]
fn a_failed_write_leaves_nothing_behind() {
    let (_dir, path, mut store) = new_store("fail.db");
    store.fold_lag = 1;
    let commit = |n: u32, seq: &str| Commit {
        sessions: vec![(stream(n), live(seq))],
        ..Commit::default()
    };
    store.write(&commit(1, "a"), NOW).unwrap();
    store.write(&commit(2, "b"), NOW).unwrap();

    // Fails the batch's last statement, after its session rows were appended and folded.
    let admin = Connection::open(&path).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER boom BEFORE INSERT ON delivered WHEN NEW.sequence = 'boom'
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .unwrap();
    let mut failing = commit(3, "c");
    failing.sessions.push((stream(1), None));
    failing.delivered = vec![(DeliveryKey::new("boom", EventKind::Push), NOW)];
    store.write(&failing, NOW).unwrap_err();
    admin.execute_batch("DROP TRIGGER boom").unwrap();

    store.write(&commit(4, "d"), NOW).unwrap();
    let expected: HashMap<_, _> = [(1, "a"), (2, "b"), (4, "d")]
        .map(|(n, s)| (stream(n), s.to_string()))
        .into();
    assert_eq!(sessions_of(&mut store), expected);
}

/// Stream `n` pushed, and its push counted: every write appends to the session and series logs.
fn pushed(n: u32) -> Commit {
    Commit {
        sessions: vec![(stream(n), live(&format!("q{n}")))],
        series: vec![(
            Series::Pushes("push.example.com".into(), Area::Mainland),
            Value::Count(u64::from(n) + 1),
        )],
        ..Commit::default()
    }
}

/// Makes every write fail at its last statement, after its sessions were logged and folded.
const FAIL_SERIES: &str = "CREATE TRIGGER boom BEFORE INSERT ON series_log
    BEGIN SELECT RAISE(ABORT, 'injected failure'); END;";

/// While the database keeps failing (it is tried once a second then), the logs are read again
/// once, after the first failure, not at every try: the tries after it work on a copy of what
/// the logs hold. Once the database answers, the writes go on from what it holds.
#[test]
fn a_database_that_keeps_failing_is_read_once() {
    let (_dir, path, mut store) = new_store("failing.db");
    store.fold_lag = 4;
    store.trim_every = 3;
    for n in 0..20 {
        store.write(&pushed(n), NOW).unwrap();
    }
    let reads = store.log_reads;
    let admin = Connection::open(&path).unwrap();
    admin.execute_batch(FAIL_SERIES).unwrap();
    for n in 20..30 {
        store.write(&pushed(n), NOW).unwrap_err();
    }
    assert_eq!(store.log_reads, reads + 1);
    admin.execute_batch("DROP TRIGGER boom").unwrap();
    for n in 30..40 {
        store.write(&pushed(n), NOW).unwrap();
    }
    assert_eq!(store.log_reads, reads + 1);

    let expected: HashMap<_, _> = (0..20)
        .chain(30..40)
        .map(|n| (stream(n), format!("q{n}")))
        .collect();
    assert_eq!(sessions_of(&mut store), expected);
    drop(store);
    let mut reopened = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    assert_eq!(sessions_of(&mut reopened), expected);
    assert_live_sessions_view(&path, &expected);
}

/// A database locked by another process: the write that meets the lock waits for it as long as
/// ever, the tries after it briefly (each holds callbacks and scrapes up), and once a write goes
/// through, a lock is waited for as long as before.
#[test]
fn a_locked_database_is_waited_for_briefly_while_it_fails() {
    let (_dir, path, mut store) = new_store("locked.db");
    store.write(&pushed(0), NOW).unwrap();
    let patience = |store: &SqliteStore| -> u128 {
        let ms: i64 = store
            .conn
            .as_ref()
            .expect("connected")
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        ms as u128
    };
    assert_eq!(patience(&store), BUSY_TIMEOUT.as_millis());

    let admin = Connection::open(&path).unwrap();
    admin.execute_batch("BEGIN IMMEDIATE").unwrap();
    store.write(&pushed(1), NOW).unwrap_err();
    // A purge with nothing expired only reads: it reconnects, as a try would, and keeps it.
    store.purge(NOW).unwrap();
    assert_eq!(patience(&store), BUSY_TIMEOUT_FAILING.as_millis());
    store.write(&pushed(1), NOW).unwrap_err();

    admin.execute_batch("ROLLBACK").unwrap();
    store.write(&pushed(1), NOW).unwrap();
    assert_eq!(patience(&store), BUSY_TIMEOUT.as_millis());
    let expected: HashMap<_, _> = (0..2).map(|n| (stream(n), format!("q{n}"))).collect();
    assert_eq!(sessions_of(&mut store), expected);
}

/// A write reported failed may have been made all the same (an fsync that failed after its
/// last frame was written): the logs are then read again, not written over from the copy.
#[test]
fn a_write_made_despite_its_failure_has_the_logs_read_again() {
    let (_dir, path, mut store) = new_store("made.db");
    for n in 0..5 {
        store.write(&pushed(n), NOW).unwrap();
    }
    let admin = Connection::open(&path).unwrap();
    admin.execute_batch(FAIL_SERIES).unwrap();
    store.write(&pushed(5), NOW).unwrap_err();
    store.write(&pushed(5), NOW).unwrap_err();
    let reads = store.log_reads;
    // What that write would have made, made behind the store's back.
    admin
        .execute_batch(
            "DROP TRIGGER boom;
             INSERT INTO session_log (changes) VALUES
                 ('[[\"push2.example.com\",\"live\",\"s5\",\"q5\",\"mainland\",1700000000]]');
             INSERT INTO series_log (id, batch) SELECT max(id) + 1, '[]' FROM series_log;",
        )
        .unwrap();
    store.write(&pushed(6), NOW).unwrap();
    assert_eq!(store.log_reads, reads + 1);
    let expected: HashMap<_, _> = (0..7).map(|n| (stream(n), format!("q{n}"))).collect();
    assert_eq!(sessions_of(&mut store), expected);
}

/// A batch of 100 delivered keys, `from` on, expiring at `expires`.
fn keys(from: u32, expires: i64) -> Commit {
    Commit {
        delivered: (from..from + 100)
            .map(|n| (DeliveryKey::new(&n.to_string(), EventKind::Push), expires))
            .collect(),
        ..Commit::default()
    }
}

/// Expired keys leave from the head of the table as batches come, valid ones stay.
#[test]
fn writes_and_purges_delete_expired_delivered_keys() {
    let (_dir, path, mut store) = new_store("expire.db");
    store.trim_every = 1;
    store.write(&keys(0, NOW + 10), NOW).unwrap();
    store.write(&keys(100, NOW + 20), NOW).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 200);
    // The first 100 expired: the next write deletes them while adding its own.
    store.write(&keys(200, NOW + 1_000), NOW + 15).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 200);
    store.purge(NOW + 25).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 100);
    let loaded = store.load().unwrap().delivered;
    assert!(loaded.iter().all(|(_, e)| *e == NOW + 1_000));
}

/// Keys written under a longer window (or a clock that was ahead) are brought down to the
/// window at start, so that they do not hold up the deletion of the keys written after them.
#[test]
fn keys_of_a_longer_window_do_not_outlive_the_window_at_start() {
    let (_dir, path, mut store) = new_store("cap.db");
    store.trim_every = 1;
    store.write(&keys(0, NOW + 3_600_000), NOW).unwrap();
    // Started again with a window of 3 s.
    store.cap_expiry(NOW + 3_000).unwrap();
    store.write(&keys(100, NOW + 3_000), NOW).unwrap();
    store.purge(NOW + 3_001).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 0);
    // Nothing to bring down: nothing written.
    store.write(&keys(200, NOW + 9_000), NOW + 4_000).unwrap();
    store.cap_expiry(NOW + 10_000).unwrap();
    store.purge(NOW + 9_001).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 0);
}

/// Keys ahead of the window at the head of the table are brought down even when newer ones
/// within it came after (a cap that failed, the database locked, while the clock was back).
#[test]
fn keys_ahead_at_the_head_are_brought_down_behind_newer_ones() {
    let (_dir, path, mut store) = new_store("cap-head.db");
    store.trim_every = 1;
    store.write(&keys(0, NOW + 86_400_000), NOW).unwrap();
    store.write(&keys(100, NOW + 3_000), NOW).unwrap();
    store.cap_expiry(NOW + 3_000).unwrap();
    store.purge(NOW + 3_001).unwrap();
    assert_eq!(count(&path, "delivered_keys"), 0);
}

/// Counter values go to the series log, which keeps its last rows only: a counter that is
/// not changed any more is written again before its row goes, and a reload sees the newest
/// value of every counter, odd labels byte for byte.
#[test]
fn series_keep_their_newest_value_through_the_log() {
    let (_dir, path, mut store) = new_store("series.db");
    let pushes = |d: u64| {
        let domain = match d {
            0 => "q\"uote\\back\nline\u{1f}日本.example.com".to_string(),
            _ => format!("d{d}.example.com"),
        };
        Series::Pushes(domain.into(), Area::Overseas)
    };
    // Domain 0 once, then only the others, for more batches than the log keeps.
    let once = Commit {
        series: vec![(pushes(0), Value::Count(7))],
        ..Commit::default()
    };
    store.write(&once, NOW).unwrap();
    let batches = 3 * SERIES_ROWS as u64;
    for n in 0..batches {
        let commit = Commit {
            series: (1..100).map(|d| (pushes(d), Value::Count(n + d))).collect(),
            ..Commit::default()
        };
        store.write(&commit, NOW).unwrap();
    }
    assert!(count(&path, "series_log") < SERIES_ROWS + TRIM_EVERY as i64);
    let viewed: i64 = Connection::open(&path)
        .unwrap()
        .query_row("SELECT max(value) FROM current_series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(viewed, (batches - 1 + 99) as i64);
    assert_eq!(count(&path, "current_series"), 100);
    drop(store);

    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    let mut loaded = store.load().unwrap().series;
    loaded.sort_by_key(|(_, v)| match v {
        Value::Count(c) => *c,
        _ => 0,
    });
    let mut expected: Vec<_> = (1..100)
        .map(|d| (pushes(d), Value::Count(batches - 1 + d)))
        .collect();
    expected.insert(0, (pushes(0), Value::Count(7)));
    assert_eq!(loaded, expected);
}

/// With many more counters than a batch changes, a batch writes again only a few of them
/// (half as many as it changed, at least `REWRITE_MIN`), not every counter that aged past
/// `SERIES_ROWS` at once; the log is trimmed only as far as no counter's newest value is lost,
/// and a reload still sees every counter.
#[test]
fn many_counters_are_written_again_a_few_a_batch() {
    let (_dir, path, mut store) = new_store("many.db");
    let idle = |d: u64| Series::Pushes(format!("idle{d}.example.com").into(), Area::Mainland);
    let busy = |d: u64| Series::Pushes(format!("busy{d}.example.com").into(), Area::Mainland);
    let counters = 2_000;
    let first = Commit {
        series: (0..counters).map(|d| (idle(d), Value::Count(d))).collect(),
        ..Commit::default()
    };
    store.write(&first, NOW).unwrap();
    let batches = 4 * SERIES_ROWS as u64;
    for n in 0..batches {
        let commit = Commit {
            series: (0..2).map(|d| (busy(d), Value::Count(n))).collect(),
            ..Commit::default()
        };
        store.write(&commit, NOW).unwrap();
    }
    let conn = Connection::open(&path).unwrap();
    let widest: i64 = conn
        .query_row(
            "SELECT max(json_array_length(batch)) FROM series_log WHERE id > 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(widest, 2 + REWRITE_MIN as i64);
    // 8 a batch once 256 rows old: all 2,000 are written again within 250 batches, and the
    // row that held them goes at the next trim.
    let oldest: i64 = conn
        .query_row("SELECT min(id) FROM series_log", [], |r| r.get(0))
        .unwrap();
    assert!(oldest > 1, "the first row is still there");
    assert_eq!(count(&path, "current_series"), counters as i64 + 2);
    drop(conn);
    drop(store);

    let mut store = SqliteStore::open(path, SyncMode::Normal).unwrap();
    let loaded: HashMap<Series, Value> = store.load().unwrap().series.into_iter().collect();
    assert_eq!(loaded.len(), counters as usize + 2);
    for d in 0..counters {
        assert_eq!(loaded[&idle(d)], Value::Count(d));
    }
    assert_eq!(loaded[&busy(1)], Value::Count(batches - 1));
}

/// A schema-2 database (a session-log row a change, counters logged with their names) is
/// upgraded in place: its changes keep their order in one row, the newest logged value of
/// each counter is kept, and what they add up to is unchanged. (Schema 3 differs from 2 only
/// in the session log, so its upgrade is the second half of this one.)
#[test]
fn schema_2_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch(&format!(
            "{SESSIONS}{DELIVERED}{SERIES}
             CREATE TABLE series_log (id INTEGER PRIMARY KEY, batch TEXT NOT NULL);
             INSERT INTO series VALUES ('pushes_total', '[\"d.example.com\",\"overseas\"]',
                3, NULL, NULL);
             INSERT INTO series_log (batch) VALUES
                ('[[\"pushes_total\",\"[\\\"d.example.com\\\",\\\"mainland\\\"]\",5,null,null]]'),
                ('[[\"pushes_total\",\"[\\\"d.example.com\\\",\\\"mainland\\\"]\",6,null,null]]');
             CREATE TABLE session_log (id INTEGER PRIMARY KEY, app TEXT NOT NULL,
                appname TEXT NOT NULL, stream_id TEXT NOT NULL, sequence TEXT, area TEXT,
                since INTEGER);
             CREATE VIEW live_sessions AS SELECT app FROM session_log;
             CREATE VIEW delivered_keys AS SELECT keys FROM delivered;
             INSERT INTO sessions VALUES ('d.example.com', 'live', 's3', '30', 'overseas', 3);
             INSERT INTO session_log (app, appname, stream_id, sequence, area, since) VALUES
                ('d.example.com', 'live', 's1', '10', 'mainland', 1),
                ('d.example.com', 'live', 's2', '20', 'mainland', 2),
                ('d.example.com', 'live', 's1', NULL, NULL, NULL),
                ('d.example.com', 'live', 's2', '21', 'overseas', 4);
             PRAGMA user_version = 2;"
        ))
        .unwrap();
    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    let expected: HashMap<_, _> = [(2, "21"), (3, "30")]
        .map(|(n, s)| (stream(n), s.to_string()))
        .into_iter()
        .map(|(mut k, s)| {
            k.app = "d.example.com".into();
            (k, s)
        })
        .collect();
    assert_eq!(sessions_of(&mut store), expected);
    assert_eq!(count(&path, "session_log"), 1);
    assert_eq!(count(&path, "live_sessions"), 2);
    let mut series = store.load().unwrap().series;
    series.sort_by_key(|(s, _)| s.labels());
    let pushes = |area| Series::Pushes("d.example.com".into(), area);
    assert_eq!(
        series,
        [
            (pushes(Area::Mainland), Value::Count(6)),
            (pushes(Area::Overseas), Value::Count(3))
        ]
    );
    assert_eq!(count(&path, "series_log"), 0);
    let version: i64 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // The upgraded log folds like a new one.
    store.fold_lag = 0;
    store.trim_every = 1;
    store
        .write(
            &Commit {
                sessions: vec![(stream(9), live("90"))],
                ..Commit::default()
            },
            NOW,
        )
        .unwrap();
    assert_eq!(count(&path, "session_log"), 0);
    assert_eq!(count(&path, "sessions"), 3);
}

/// A database of the first release is upgraded in place, keeping everything it held.
#[test]
fn schema_1_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE sessions (app TEXT NOT NULL, appname TEXT NOT NULL,
                stream_id TEXT NOT NULL, sequence TEXT NOT NULL, area TEXT NOT NULL,
                since INTEGER NOT NULL, PRIMARY KEY (app, appname, stream_id)) WITHOUT ROWID;
             CREATE TABLE delivered (sequence TEXT NOT NULL, event_type INTEGER NOT NULL,
                expires_ms INTEGER NOT NULL, PRIMARY KEY (sequence, event_type)) WITHOUT ROWID;
             CREATE INDEX delivered_expiry ON delivered (expires_ms);
             CREATE TABLE series (metric TEXT NOT NULL, labels TEXT NOT NULL,
                value INTEGER NOT NULL, sum_ms INTEGER, buckets TEXT,
                PRIMARY KEY (metric, labels)) WITHOUT ROWID;
             INSERT INTO sessions VALUES ('d.example.com', 'live', 's1', '42', 'mainland', 7);
             INSERT INTO delivered VALUES ('42', 1, 2000), ('41', 0, 1000);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    let snapshot = store.load().unwrap();
    let mut delivered: Vec<_> = snapshot
        .delivered
        .iter()
        .map(|(k, e)| (k.sequence.to_string(), *e))
        .collect();
    delivered.sort();
    assert_eq!(
        delivered,
        [("41".to_string(), 1000), ("42".to_string(), 2000)]
    );
    let sessions = snapshot.all_sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].0.stream_id.as_ref(), "s1");
    assert_eq!(sessions[0].1.since, 7);
    let version: i64 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

/// The views read the folded rows and the logs once each, however many rows there are: no
/// subquery run for each folded row (with `NOT IN` over the log's nullable JSON fields, SQLite
/// scanned the whole log for each, and counting 50,000 live sessions took minutes).
#[test]
fn the_views_read_each_table_once() {
    let (_dir, path, _store) = new_store("plan.db");
    let conn = Connection::open(&path).unwrap();
    for view in ["live_sessions", "current_series"] {
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN SELECT count(*) FROM {view}"))
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let per_row: Vec<_> = plan
            .iter()
            .filter(|step| step.contains("LIST SUBQUERY") || step.contains("CORRELATED"))
            .collect();
        assert!(per_row.is_empty(), "{view}: {plan:#?}");
    }
}

/// A database whose views an earlier release wrote gets this release's, and keeps its schema
/// version (the release before can still open it); its tables are kept as they are.
#[test]
fn earlier_views_are_created_again() {
    let (_dir, path, mut store) = new_store("v4.db");
    store.fold_lag = 0;
    store
        .write(
            &Commit {
                sessions: vec![(stream(1), live("10")), (stream(2), live("20"))],
                ..Commit::default()
            },
            NOW,
        )
        .unwrap();
    store
        .write(
            &Commit {
                sessions: vec![(stream(1), None)],
                ..Commit::default()
            },
            NOW,
        )
        .unwrap();
    drop(store);
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP VIEW live_sessions; CREATE VIEW live_sessions AS SELECT 'old' AS stream_id;
             CREATE VIEW series_log_newest AS SELECT 1;",
        )
        .unwrap();
    let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
    let expected = HashMap::from([(stream(2), "20".to_string())]);
    assert_eq!(sessions_of(&mut store), expected);
    assert_live_sessions_view(&path, &expected);
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let leftover: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'series_log_newest'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftover, 0);
}
