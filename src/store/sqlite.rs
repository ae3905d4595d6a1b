//! The SQLite store: the default, durable across crashes and restarts.
//!
//! WAL journal, one transaction per batch, and a batch mostly *appends*. Rows keyed by stream or
//! by sequence land on random pages of a B-tree, and a commit writes every page it dirtied
//! (4 KiB) to the WAL and again at the checkpoint: upserting sessions and delivered keys in place
//! cost about 3 KiB of writes an event. Appended rows share the last pages of their table, so a
//! batch writes about the size of its rows.
//!
//! - `session_log`: one row a batch with its session changes (the session now, or none; a JSON
//!   array), in commit order. Changes older than half of [`FOLD_LAG`] are folded into
//!   `sessions` in the same transaction, swept in key order so that folds share pages. A change
//!   that a later one of the same stream supersedes is dropped without touching `sessions`, so a
//!   session pushed and disconnected within the lag costs no random write at all. (Schema 2 had
//!   a row a change: inserting them one by one was a quarter of a batch's write.)
//! - `delivered`: one row a batch with the batch's dedup keys (a JSON array). Expiry grows with
//!   the id, so expired rows are deleted from the head.
//! - `series_log`: one row a batch with the new value of each counter it changed (a JSON array),
//!   each counter named by its number in `series_names`. (Schema 3 repeated its metric and
//!   JSON labels in every row: over half of a commit's bytes.)
//!   Only the last [`SERIES_ROWS`] rows are kept: a batch also writes again the counters whose
//!   newest value is about to leave that window, a few each time. So there is no fold, and no
//!   stall: upserting the counters in place dirtied most pages of their table at every batch (a
//!   batch touches the counters of most domains), and folding a log of them into the table took
//!   10-25 ms at a time. `series` holds what a schema-1 database had; values in the log win.
//!
//! Rows leave the head of the three logs every [`TRIM_EVERY`] commits, not at each.
//!
//! At start the logs are read first; `sessions` (a million rows, say) is then read on a
//! connection and thread of its own and handed over in chunks while the state is rebuilt from
//! them, so reading and indexing take the machine's two cores instead of one after the other.
//!
//! After any failed write the connection is dropped and reopened on the next attempt (and what
//! this store holds in memory is read again), so a database that became read-only, full or
//! locked recovers by itself once the cause is gone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, Row};

use super::{Store, StoreError};
use crate::area::Area;
use crate::callback::{EventKind, StreamKey};
use crate::state::counters::{Histogram, Series, Value};
use crate::state::rules::{Sequence, Session};
use crate::state::{Commit, DeliveryKey, FastMap, FastSet, SessionFeed, Snapshot};

/// The schema this release writes; stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 4;

/// Session changes left unfolded, about: enough that a short session's push and disconnect
/// usually meet in the log and cancel out, and that folds share pages; few enough to replay in
/// milliseconds at start.
pub const FOLD_LAG: usize = 65_536;
/// Rows of `series_log` kept. Every counter is written again at least once in this many
/// batches: with N counters, about N / 256 extra values a batch.
const SERIES_ROWS: i64 = 256;
/// WAL pages after which a commit checkpoints by itself, a safety net: the [`Checkpointer`]
/// copies the WAL into the database long before, on a connection and thread of its own. A
/// checkpoint inside a commit makes every callback of that batch wait for it (and for its
/// fsyncs): at 256 pages, 20,000 callbacks/s had a p99.9 of 10.9 ms, with the checkpoints moved
/// out 4.6 ms. Once the checkpointer has copied every frame, the next commit starts the WAL over
/// from its beginning, so the file stays under about this many pages (16 MiB).
const WAL_LIMIT_PAGES: i64 = 4096;
/// Size the WAL file is cut back to when it starts over, once it grew past it: without a limit
/// the file keeps its largest size for good. Only a WAL that could not be checkpointed gets that
/// large (behind a reader holding an old snapshot, such as a long `sqlite3` session): steady
/// traffic stays under [`WAL_LIMIT_PAGES`] (16.1 MiB with 4 KiB pages). A limit below that
/// truncated and regrew the file over and over at 19,000 callbacks/s: p99 2.3 -> 6.5 ms.
const WAL_KEEP_BYTES: i64 = 20 << 20;
/// How long the checkpointer lets commits gather after one is reported before it checkpoints:
/// a checkpoint costs an fsync or two whatever it copies. Short enough that a checkpoint has
/// little to copy and often ends between two commits, which is when the next commit can start
/// the WAL over: after 20 ms it never did under a steady burst, the WAL reached the limit above,
/// and a commit checkpointed (p99.9 at the maximum rate 8.0-8.2 ms; 4.0-4.3 ms after 5 ms).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(5);
/// Commits between deletions from the head of the logs (folds, expired keys, old counter rows).
/// Deleting the oldest row of a table at every commit dirtied its first page, the free list and
/// the header each time, about a third of a small commit's WAL frames; deleting every 32nd
/// commit writes each of those pages once for 32 commits' rows.
const TRIM_EVERY: u64 = 32;
/// Expired delivered-key batches deleted by one statement.
const PURGE_STEP: i64 = 256;

const SESSIONS: &str = "
CREATE TABLE sessions (
    app TEXT NOT NULL,
    appname TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    sequence TEXT NOT NULL,
    area TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY (app, appname, stream_id)
) WITHOUT ROWID;";

/// `changes`: `[[app, appname, stream_id, sequence, area, since], ...]`, in order; `sequence`,
/// `area` and `since` are null when the change ended the stream's session.
const SESSION_LOG: &str = "
CREATE TABLE session_log (
    id INTEGER PRIMARY KEY,
    changes TEXT NOT NULL
);";

/// `keys`: `[[sequence, event_type, expires_ms], ...]`; `expires_ms`: the latest of them.
const DELIVERED: &str = "
CREATE TABLE delivered (
    id INTEGER PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    keys TEXT NOT NULL
);";

const SERIES: &str = "
CREATE TABLE series (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    value INTEGER NOT NULL,
    sum_ms INTEGER,
    buckets TEXT,
    PRIMARY KEY (metric, labels)
) WITHOUT ROWID;";

/// `batch`: `[[series, value], ...]` for counters and timestamps, `[series, count, sum_ms,
/// buckets]` for histograms; `series` is an id of `series_names`.
const SERIES_LOG: &str = "
CREATE TABLE series_log (
    id INTEGER PRIMARY KEY,
    batch TEXT NOT NULL
);
CREATE TABLE series_names (
    id INTEGER PRIMARY KEY,
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    UNIQUE (metric, labels)
);";

/// What the tables add up to, for people inspecting the database with `sqlite3`: the folded
/// rows that the logs have not changed since, then the newest log entry of each stream or
/// series.
const VIEWS: &str = "
CREATE VIEW series_log_newest AS
    SELECT n.metric, n.labels, v.value, v.sum_ms, v.buckets FROM (
        SELECT e.value ->> 0 AS series, e.value ->> 1 AS value, e.value ->> 2 AS sum_ms,
            e.value ->> 3 AS buckets,
            row_number() OVER (PARTITION BY e.value ->> 0 ORDER BY l.id DESC, e.key DESC) AS age
        FROM series_log l, json_each(l.batch) e) v
    JOIN series_names n ON n.id = v.series
    WHERE v.age = 1;
CREATE VIEW delivered_keys AS
    SELECT e.value ->> 0 AS sequence, e.value ->> 1 AS event_type, e.value ->> 2 AS expires_ms
    FROM delivered d, json_each(d.keys) e;
CREATE VIEW session_changes AS
    SELECT l.id AS id, e.key AS n, e.value ->> 0 AS app, e.value ->> 1 AS appname,
        e.value ->> 2 AS stream_id, e.value ->> 3 AS sequence, e.value ->> 4 AS area,
        e.value ->> 5 AS since
    FROM session_log l, json_each(l.changes) e;
CREATE VIEW live_sessions AS
    SELECT app, appname, stream_id, sequence, area, since FROM sessions
    WHERE (app, appname, stream_id) NOT IN (SELECT app, appname, stream_id FROM session_changes)
    UNION ALL
    SELECT app, appname, stream_id, sequence, area, since FROM (
        SELECT *, row_number() OVER (PARTITION BY app, appname, stream_id
            ORDER BY id DESC, n DESC) AS age
        FROM session_changes)
    WHERE age = 1 AND sequence IS NOT NULL;
CREATE VIEW current_series AS
    SELECT metric, labels, value, sum_ms, buckets FROM series
    WHERE (metric, labels) NOT IN (SELECT metric, labels FROM series_log_newest)
    UNION ALL
    SELECT metric, labels, value, sum_ms, buckets FROM series_log_newest;";

/// Schema 1 kept delivered keys in a table keyed by sequence, with an expiry index, and had no
/// session and series logs. Keys are copied by minute of expiry, oldest first, so the head of
/// the new table expires first.
const MIGRATE_FROM_1: &str = "
DROP INDEX delivered_expiry;
ALTER TABLE delivered RENAME TO delivered_v1;";
const MIGRATE_FROM_1_COPY: &str = "
INSERT INTO delivered (expires_ms, keys)
    SELECT max(expires_ms), json_group_array(json_array(sequence, event_type, expires_ms))
    FROM delivered_v1 GROUP BY expires_ms / 60000 ORDER BY expires_ms / 60000;
DROP TABLE delivered_v1;";

/// Schema 2 logged a row a session change; its rows become one row of schema 3, in order.
const MIGRATE_FROM_2: &str = "
ALTER TABLE session_log RENAME TO session_log_v2;";
const MIGRATE_FROM_2_COPY: &str = "
INSERT INTO session_log (changes)
    SELECT json_group_array(json_array(app, appname, stream_id, sequence, area, since)
        ORDER BY id)
    FROM session_log_v2 HAVING count(*) > 0;
DROP TABLE session_log_v2;";

/// Schemas 2 and 3 repeated each counter's metric and labels in the counter log: the newest
/// value of each goes to `series` (which log values override), and the log starts anew.
const MIGRATE_SERIES_LOG: &str = "
INSERT OR REPLACE INTO series (metric, labels, value, sum_ms, buckets)
    SELECT metric, labels, value, sum_ms, buckets FROM (
        SELECT e.value ->> 0 AS metric, e.value ->> 1 AS labels, e.value ->> 2 AS value,
            e.value ->> 3 AS sum_ms, e.value ->> 4 AS buckets,
            row_number() OVER (PARTITION BY e.value ->> 0, e.value ->> 1
                ORDER BY l.id DESC, e.key DESC) AS age
        FROM series_log l, json_each(l.batch) e)
    WHERE age = 1;
DROP TABLE series_log;";
/// Every view, before they are created again as this release defines them.
const DROP_VIEWS: &str = "
DROP VIEW IF EXISTS current_series; DROP VIEW IF EXISTS series_log_newest;
DROP VIEW IF EXISTS delivered_keys; DROP VIEW IF EXISTS live_sessions;
DROP VIEW IF EXISTS session_changes;";

/// How hard each commit is pushed to disk (`--storage.sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// Survives a crash of the process; a power loss may lose the last commits.
    Normal,
    /// Also survives power loss: fsync on every commit.
    Full,
}

/// A SQLite database file.
pub struct SqliteStore {
    path: PathBuf,
    sync: SyncMode,
    /// `None` after a failure: reopened before the next write.
    conn: Option<Connection>,
    /// The session-log rows not folded yet, as committed; `None` whenever `conn` is, because a
    /// failed write may have changed it before its transaction rolled back.
    unfolded: Option<Unfolded>,
    /// Session-log rows left unfolded: [`FOLD_LAG`], smaller in tests.
    fold_lag: usize,
    /// Commits between trims of the logs: [`TRIM_EVERY`], other values in tests.
    trim_every: u64,
    /// Copies the WAL into the database off the commit path; told after every commit.
    checkpointer: Checkpointer,
}

/// A thread with a connection of its own that checkpoints the WAL (passively: it never blocks
/// the writer) shortly after commits, so that commits do not have to.
struct Checkpointer {
    /// Nudged after each commit; a full channel means a nudge is already pending. Dropped to
    /// stop the thread.
    nudge: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: PathBuf, sync: SyncMode) -> Checkpointer {
        let (nudge, nudged) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let mut conn = None;
                while nudged.recv().is_ok() {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    while nudged.try_recv().is_ok() {}
                    if let Err(e) = checkpoint(&mut conn, &path, sync) {
                        // The writer's own checkpoints still bound the WAL; try again after the
                        // next commit, on a new connection.
                        tracing::debug!(error = %e, "background checkpoint failed");
                        conn = None;
                    }
                }
            })
            .expect("spawn the checkpoint thread");
        Checkpointer {
            nudge: Some(nudge),
            thread: Some(thread),
        }
    }

    /// A commit happened: checkpoint soon.
    fn committed(&self) {
        if let Some(nudge) = &self.nudge {
            let _ = nudge.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.nudge.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies what the WAL holds into the database file, as far as no reader needs the WAL. The
/// connection is set up as the writer's, so the checkpoint's fsyncs follow the same `sync`.
fn checkpoint(conn: &mut Option<Connection>, path: &Path, sync: SyncMode) -> rusqlite::Result<()> {
    if conn.is_none() {
        *conn = Some(connect(path, sync)?);
    }
    let conn = conn.as_ref().expect("just opened");
    conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
        .query_row([], |_| Ok(()))
}

/// The session changes not folded into `sessions`, in memory so that folding needs no reads.
#[derive(Debug, Default)]
struct Unfolded {
    /// The newest unfolded change of each stream, in the order of `sessions`' primary key, so
    /// that a fold sweeps the table's pages in order (see [`Unfolded::sweep`]).
    pending: BTreeMap<StreamKey, Pending>,
    /// Log rows not deleted yet, oldest first, with how many of their changes are in `pending`.
    /// The oldest rows with none left are done: their changes are folded or superseded.
    rows: VecDeque<(i64, usize)>,
    /// Where the next sweep starts: just after this stream.
    cursor: Option<StreamKey>,
    /// The `app` and `appname` strings of the keys in `pending`, shared so that those keys
    /// compare by pointer (the state forgets its own copy with a domain's last live stream);
    /// strings no key holds any more leave at each trim.
    names: Names,
    /// Number of the next change, to tell a change's age in changes.
    next: u64,
    /// What `series_log` holds.
    series: SeriesLog,
    /// Batches written since the connection was opened, to trim the logs every few.
    writes: u64,
    /// The newest row done but still in the log, to delete at the next trim.
    folded_through: Option<i64>,
}

/// A stream's newest unfolded change.
#[derive(Debug)]
struct Pending {
    /// The log row holding it.
    row: i64,
    /// Its number (see [`Unfolded::next`]).
    number: u64,
    /// The session it set; `None`: ended.
    session: Option<Session>,
}

/// A counter as a `series_log` row holds it: its number in `series_names` and value, and for a
/// histogram the sum of milliseconds and the buckets.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum LoggedValue {
    Plain(i64, i64),
    Histogram(i64, i64, i64, String),
}

/// What `series_log` holds, in memory so that a batch knows which counters to write again.
#[derive(Debug, Default)]
struct SeriesLog {
    /// Newest value of every counter in the log, with the row that holds it.
    latest: FastMap<Series, (Value, i64)>,
    /// Counters by the row they were last written in, oldest first. An entry whose row is not
    /// the counter's latest any more is stale and skipped.
    order: VecDeque<(Series, i64)>,
    /// Id of the newest row.
    last_row: i64,
    /// Each counter's number in `series_names`.
    ids: FastMap<Series, i64>,
}

impl SeriesLog {
    fn record(&mut self, series: Series, value: Value, row: i64) {
        self.order.push_back((series.clone(), row));
        self.latest.insert(series, (value, row));
    }

    /// Records the batch's values as row `row`; returns the counters to write again in it,
    /// those whose newest value would otherwise leave the kept window with this row.
    fn next_row(&mut self, batch: &[(Series, Value)], row: i64) -> Vec<Series> {
        for (series, value) in batch {
            self.record(series.clone(), value.clone(), row);
        }
        let mut again = Vec::new();
        while let Some((series, at)) = self.order.front() {
            if self.latest.get(series).map(|(_, r)| r) != Some(at) {
                self.order.pop_front();
                continue;
            }
            if *at > row - SERIES_ROWS {
                break;
            }
            let (series, _) = self.order.pop_front().expect("just seen");
            if let Some(latest) = self.latest.get_mut(&series) {
                latest.1 = row;
            }
            self.order.push_back((series.clone(), row));
            again.push(series);
        }
        again
    }
}

impl Unfolded {
    fn push(&mut self, row: i64, stream: &StreamKey, session: Option<Session>) {
        let number = self.next;
        self.next += 1;
        match self.rows.back_mut() {
            Some((last, count)) if *last == row => *count += 1,
            _ => self.rows.push_back((row, 1)),
        }
        let change = Pending {
            row,
            number,
            session,
        };
        let stream = StreamKey {
            app: intern(&mut self.names, &stream.app),
            appname: intern(&mut self.names, &stream.appname),
            stream_id: stream.stream_id.clone(),
        };
        if let Some(superseded) = self.pending.insert(stream, change) {
            self.resolved(superseded.row);
        }
    }

    /// One change of `row` left `pending`; the oldest rows with none left are done.
    fn resolved(&mut self, row: i64) {
        if let Ok(i) = self.rows.binary_search_by_key(&row, |(r, _)| *r) {
            self.rows[i].1 -= 1;
        }
        while let Some((row, 0)) = self.rows.front() {
            self.folded_through = Some(*row);
            self.rows.pop_front();
        }
    }

    /// Takes the changes to fold now: of up to `visit` pending streams, from where the last
    /// sweep ended (in key order, around the end), those whose change is at least `min_age`
    /// changes old. A short session's push and disconnect usually meet in `pending` within
    /// that age and cost no write to `sessions`. The others are folded in key order, a stretch
    /// of the table at a time: with many pending changes, several of them share each page the
    /// fold writes, where taking the oldest first wrote a random page for nearly each one.
    fn sweep(&mut self, visit: usize, min_age: u64) -> Vec<(StreamKey, Option<Session>)> {
        let young = self.next.saturating_sub(min_age);
        let mut due = Vec::new();
        let cursor = self.cursor.take();
        let (after, before) = match &cursor {
            Some(c) => (
                self.pending
                    .range::<StreamKey, _>((Bound::Excluded(c), Bound::Unbounded)),
                Some(self.pending.range::<StreamKey, _>(..=c)),
            ),
            None => (self.pending.range::<StreamKey, _>(..), None),
        };
        let mut last = None;
        for (stream, change) in after.chain(before.into_iter().flatten()).take(visit) {
            if change.number < young {
                due.push(stream.clone());
            }
            last = Some(stream);
        }
        self.cursor = last.cloned().or(cursor);
        due.into_iter()
            .map(|stream| {
                let change = self.pending.remove(&stream).expect("just seen");
                self.resolved(change.row);
                (stream, change.session)
            })
            .collect()
    }
}

impl SqliteStore {
    /// Opens (creating it and its folder if needed) and checks the database. A file that is not
    /// a database of ours is an error, never silently replaced.
    pub fn open(path: PathBuf, sync: SyncMode) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Folder {
                path: path.clone(),
                source,
            })?;
        }
        let checkpointer = Checkpointer::start(path.clone(), sync);
        let mut store = SqliteStore {
            path,
            sync,
            conn: None,
            unfolded: None,
            fold_lag: FOLD_LAG,
            trim_every: TRIM_EVERY,
            checkpointer,
        };
        store.with_conn(|_, _| Ok(()))?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the connection (reopening it after a failure) and the unfolded rows; on
    /// failure both are dropped, to be read again.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Connection, &mut Unfolded) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        if self.conn.is_none() {
            let conn = connect(&self.path, self.sync).map_err(|e| self.err(e))?;
            migrate(&conn, &self.path)?;
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut().expect("just opened");
        let result = match &mut self.unfolded {
            Some(unfolded) => f(conn, unfolded),
            None => read_unfolded(conn).and_then(|mut unfolded| {
                let result = f(conn, &mut unfolded);
                self.unfolded = Some(unfolded);
                result
            }),
        };
        result.map_err(|e| {
            self.conn = None;
            self.unfolded = None;
            self.err(e)
        })
    }
}

/// SQLite creates the `-wal` and `-shm` files with the database file's permissions. If they were
/// created while the database was read-only, they stay read-only after the database is made
/// writable again and every reopen would fail; give them the database's permissions back.
fn align_sidecar_permissions(path: &Path) {
    let Ok(db) = std::fs::metadata(path) else {
        return;
    };
    for suffix in ["-wal", "-shm"] {
        let mut sidecar = path.as_os_str().to_owned();
        sidecar.push(suffix);
        let Ok(meta) = std::fs::metadata(&sidecar) else {
            continue;
        };
        if meta.permissions() != db.permissions() {
            let _ = std::fs::set_permissions(&sidecar, db.permissions());
        }
    }
}

/// A batch's transaction, begun and committed through cached statements:
/// `Connection::transaction` parses `BEGIN IMMEDIATE` and `COMMIT` again at every batch (1.7 %
/// of the exporter's CPU in a profile at 12,000 callbacks/s). Rolled back when dropped
/// uncommitted (a failed statement or commit, or a panic).
struct WriteTransaction<'c> {
    conn: &'c Connection,
}

impl<'c> WriteTransaction<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(WriteTransaction { conn })
    }

    fn commit(self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    }
}

impl std::ops::Deref for WriteTransaction<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for WriteTransaction<'_> {
    fn drop(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

fn connect(path: &Path, sync: SyncMode) -> rusqlite::Result<Connection> {
    align_sidecar_permissions(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Tencent waits about 20 s for an answer; a lock held longer than this is a fault to report.
    conn.busy_timeout(Duration::from_secs(2))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match sync {
        SyncMode::Normal => "NORMAL",
        SyncMode::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_LIMIT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
    Ok(conn)
}

/// Creates the schema in a new database, upgrades an older one, and refuses one it does not
/// understand.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let script = match version {
        SCHEMA_VERSION => return Ok(()),
        0 => {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(err)?;
            if tables > 0 {
                return Err(StoreError::Invalid {
                    path: path.to_owned(),
                    reason: "holds tables but no exporter schema version; not ours".into(),
                });
            }
            format!("{SESSIONS}{SESSION_LOG}{DELIVERED}{SERIES}{SERIES_LOG}{VIEWS}")
        }
        1 => format!(
            "{MIGRATE_FROM_1}{DELIVERED}{MIGRATE_FROM_1_COPY}{SESSION_LOG}{SERIES_LOG}{VIEWS}"
        ),
        2 => format!(
            "{DROP_VIEWS}{MIGRATE_FROM_2}{SESSION_LOG}{MIGRATE_FROM_2_COPY}\
             {MIGRATE_SERIES_LOG}{SERIES_LOG}{VIEWS}"
        ),
        3 => format!("{DROP_VIEWS}{MIGRATE_SERIES_LOG}{SERIES_LOG}{VIEWS}"),
        other => {
            let relation = if other > SCHEMA_VERSION {
                "newer than"
            } else {
                "not one"
            };
            return Err(StoreError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "schema version {other} is {relation} this release understands \
                     ({SCHEMA_VERSION} and older)"
                ),
            });
        }
    };
    if version != 0 {
        tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "upgrading the database schema");
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {script} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        err(e)
    })
}

/// A stored area; an unknown one is an error, never a guess.
fn area_of(text: &str) -> Result<Area, String> {
    Area::from_label(text).ok_or_else(|| format!("unknown area {text:?}"))
}

/// An `area` column (see [`area_of`]).
fn area(r: &Row, idx: usize) -> rusqlite::Result<Area> {
    area_of(r.get_ref(idx)?.as_str()?)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e.into()))
}

/// The strings of `app` and `appname` read so far: a million streams of a hundred domains then
/// hold a hundred copies of each, not a million, and keys that share them compare quickly.
type Names = FastSet<Arc<str>>;

fn intern(names: &mut Names, text: &str) -> Arc<str> {
    match names.get(text) {
        Some(shared) => shared.clone(),
        None => {
            let shared: Arc<str> = text.into();
            names.insert(shared.clone());
            shared
        }
    }
}

/// A stream key from columns 0-2.
fn stream_key(r: &Row, names: &mut Names) -> rusqlite::Result<StreamKey> {
    Ok(StreamKey {
        app: intern(names, r.get_ref(0)?.as_str()?),
        appname: intern(names, r.get_ref(1)?.as_str()?),
        stream_id: r.get_ref(2)?.as_str()?.into(),
    })
}

/// A session from columns 3 (sequence), 4 (area) and 5 (since); `None` if the sequence is NULL.
fn session(r: &Row) -> rusqlite::Result<Option<Session>> {
    let Some(sequence) = r.get_ref(3)?.as_str_or_null()? else {
        return Ok(None);
    };
    Ok(Some(Session {
        sequence: Sequence::from(sequence),
        area: area(r, 4)?,
        since: r.get(5)?,
    }))
}

/// Stored sessions sent at a time by [`read_sessions`], and chunks it may read ahead.
const SESSION_CHUNK: usize = 8192;
const SESSION_CHUNKS: usize = 8;

/// Sends the sessions of `sessions` whose streams have no pending change, in chunks; stops
/// early if nobody listens any more.
fn read_sessions(
    conn: &Connection,
    pending: &FastSet<StreamKey>,
    chunks: &std::sync::mpsc::SyncSender<Result<Vec<(StreamKey, Session)>, String>>,
) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare("SELECT app, appname, stream_id, sequence, area, since FROM sessions")?;
    let mut rows = stmt.query([])?;
    let mut names = Names::default();
    let mut chunk = Vec::with_capacity(SESSION_CHUNK);
    while let Some(r) = rows.next()? {
        let stream = stream_key(r, &mut names)?;
        if pending.contains(&stream) {
            continue;
        }
        if let Some(session) = session(r)? {
            chunk.push((stream, session));
        }
        if chunk.len() == SESSION_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(SESSION_CHUNK));
            if chunks.send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    let _ = chunks.send(Ok(chunk));
    Ok(())
}

/// A change of a `session_log` row, as [`SESSION_LOG`] describes it.
type LoggedChange = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
);

fn logged_change(change: LoggedChange) -> Result<(StreamKey, Option<Session>), String> {
    let (app, appname, stream_id, sequence, area, since) = change;
    // Shared once pending (see `Unfolded::names`).
    let stream = StreamKey {
        app: app.into(),
        appname: appname.into(),
        stream_id: stream_id.into(),
    };
    let session = match (sequence, area, since) {
        (None, _, _) => None,
        (Some(sequence), Some(area), Some(since)) => Some(Session {
            sequence: Sequence::from(sequence.as_str()),
            area: area_of(&area)?,
            since,
        }),
        _ => return Err(format!("the session of {stream} lacks its area or start")),
    };
    Ok((stream, session))
}

fn read_unfolded(conn: &Connection) -> rusqlite::Result<Unfolded> {
    let mut unfolded = Unfolded::default();
    // Parsed here rather than with `json_each`, which took five times as long.
    let mut stmt = conn.prepare("SELECT id, changes FROM session_log ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let bad = |e: String| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, e.into());
        let changes: Vec<LoggedChange> =
            serde_json::from_str(r.get_ref(1)?.as_str()?).map_err(|e| bad(e.to_string()))?;
        for change in changes {
            let (stream, session) = logged_change(change).map_err(bad)?;
            unfolded.push(id, &stream, session);
        }
    }
    let mut stmt = conn.prepare("SELECT id, metric, labels FROM series_names")?;
    let mut rows = stmt.query([])?;
    let mut names = HashMap::new();
    while let Some(r) = rows.next()? {
        let (id, metric, labels): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let series = decode_name(&metric, &labels)?;
        unfolded.series.ids.insert(series.clone(), id);
        names.insert(id, series);
    }
    let mut stmt = conn.prepare("SELECT id, batch FROM series_log ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row: i64 = r.get(0)?;
        let batch: Vec<LoggedValue> = serde_json::from_str(r.get_ref(1)?.as_str()?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, Box::new(e)))?;
        for logged in batch {
            let (id, value, sum_ms, buckets) = match logged {
                LoggedValue::Plain(id, value) => (id, value, None, None),
                LoggedValue::Histogram(id, count, sum_ms, buckets) => {
                    (id, count, Some(sum_ms), Some(buckets))
                }
            };
            let series = names.get(&id).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    Type::Text,
                    format!("counter {id} of the log has no name").into(),
                )
            })?;
            let value = decode_value(series, value, sum_ms, buckets.as_deref())
                .ok_or_else(|| unknown_series(series.metric(), &format!("{id}")))?;
            unfolded.series.record(series.clone(), value, row);
        }
        unfolded.series.last_row = row;
    }
    Ok(unfolded)
}

/// Folds pending session changes into `sessions` (see [`Unfolded::sweep`]): each batch visits
/// twice as many pending streams as it brings changes, more while over `lag` are pending, and
/// folds those at least `lag / 2` changes old. So a change waits between `lag / 2` and about
/// `lag` changes, and at most about `lag` are pending. Rows whose changes are all folded or
/// superseded are deleted from the log later, a chunk at a time ([`TRIM_EVERY`]); until then
/// they repeat what `sessions` holds, and read again after a restart they are folded again to
/// the same result.
fn fold(
    conn: &Connection,
    unfolded: &mut Unfolded,
    changes: usize,
    lag: usize,
) -> rusqlite::Result<()> {
    let visit = (2 * changes + 1).max(unfolded.pending.len().saturating_sub(lag));
    let effective = unfolded.sweep(visit, (lag / 2) as u64);
    if effective.is_empty() {
        return Ok(());
    }
    let mut upsert = conn.prepare_cached(
        "INSERT OR REPLACE INTO sessions (app, appname, stream_id, sequence, area, since)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut delete = conn.prepare_cached(
        "DELETE FROM sessions WHERE app = ?1 AND appname = ?2 AND stream_id = ?3",
    )?;
    for (stream, session) in effective {
        let key = (&*stream.app, &*stream.appname, &*stream.stream_id);
        match session {
            Some(s) => upsert.execute(params![
                key.0,
                key.1,
                key.2,
                s.sequence.to_string(),
                s.area.as_str(),
                s.since
            ])?,
            None => delete.execute(params![key.0, key.1, key.2])?,
        };
    }
    Ok(())
}

/// Deletes up to `step` batches of delivered keys expired at `now_ms` from the head of the
/// table; returns how many.
fn expire(conn: &Connection, now_ms: i64, step: i64) -> rusqlite::Result<usize> {
    // Expiry grows with the id: if the oldest key is still valid, so is every other.
    let head: Option<(i64, i64)> = conn
        .prepare_cached("SELECT id, expires_ms FROM delivered ORDER BY id LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match head {
        Some((id, expires_ms)) if expires_ms <= now_ms => conn
            .prepare_cached("DELETE FROM delivered WHERE id < ?1 AND expires_ms <= ?2")?
            .execute(params![id.saturating_add(step), now_ms]),
        _ => Ok(0),
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let (mut snapshot, pending, expected) = self.with_conn(|conn, unfolded| {
            let mut snapshot = Snapshot::default();
            // Folded sessions of streams the log has not changed since are read below, on a
            // connection and thread of their own while the state is rebuilt; the log's word
            // is here.
            let expected: i64 =
                conn.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))?;
            let pending: FastSet<StreamKey> = unfolded.pending.keys().cloned().collect();
            for (stream, change) in &unfolded.pending {
                if let Some(session) = &change.session {
                    snapshot.sessions.push((stream.clone(), session.clone()));
                }
            }
            let mut stmt = conn.prepare("SELECT keys FROM delivered ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let keys: Vec<(String, i64, i64)> = serde_json::from_str(r.get_ref(0)?.as_str()?)
                    .map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e))
                })?;
                snapshot.delivered.extend(keys.into_iter().map(
                    |(sequence, event_type, expires)| {
                        let kind = EventKind::from_event_type(Some(event_type));
                        (DeliveryKey::new(&sequence, kind), expires)
                    },
                ));
            }
            // The log's values win over the table's (written by schema 1).
            let mut stmt =
                conn.prepare("SELECT metric, labels, value, sum_ms, buckets FROM series")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (series, value) =
                    decode_series((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))?;
                if !unfolded.series.latest.contains_key(&series) {
                    snapshot.series.push((series, value));
                }
            }
            let latest = &unfolded.series.latest;
            snapshot
                .series
                .extend(latest.iter().map(|(s, (v, _))| (s.clone(), v.clone())));
            Ok((snapshot, pending, expected))
        })?;
        let reader = connect(&self.path, self.sync).map_err(|e| self.err(e))?;
        let path = self.path.clone();
        let (chunks, feed) = std::sync::mpsc::sync_channel(SESSION_CHUNKS);
        std::thread::Builder::new()
            .name("session-loader".into())
            .spawn(move || {
                if let Err(e) = read_sessions(&reader, &pending, &chunks) {
                    let _ = chunks.send(Err(format!("database {}: {e}", path.display())));
                }
            })
            .map_err(|e| StoreError::Invalid {
                path: self.path.clone(),
                reason: format!("cannot start the thread that reads the sessions: {e}"),
            })?;
        snapshot.more_sessions = Some(SessionFeed {
            expected: usize::try_from(expected).unwrap_or(0),
            chunks: feed,
        });
        Ok(snapshot)
    }

    fn write(&mut self, commit: &Commit, now_ms: i64) -> Result<(), StoreError> {
        if commit.is_empty() {
            return Ok(());
        }
        let (lag, trim_every) = (self.fold_lag, self.trim_every);
        self.with_conn(|conn, unfolded| {
            let tx = WriteTransaction::begin(conn)?;
            {
                if !commit.sessions.is_empty() {
                    let changes: Vec<_> = commit
                        .sessions
                        .iter()
                        .map(|(stream, session)| {
                            let (sequence, area, since) = match session {
                                Some(s) => (
                                    Some(s.sequence.to_string()),
                                    Some(s.area.as_str()),
                                    Some(s.since),
                                ),
                                None => (None, None, None),
                            };
                            (
                                &*stream.app,
                                &*stream.appname,
                                &*stream.stream_id,
                                sequence,
                                area,
                                since,
                            )
                        })
                        .collect();
                    let changes = serde_json::to_string(&changes).expect("changes serialize");
                    tx.prepare_cached("INSERT INTO session_log (changes) VALUES (?1)")?
                        .execute([changes])?;
                    let row = tx.last_insert_rowid();
                    for (stream, session) in &commit.sessions {
                        unfolded.push(row, stream, session.clone());
                    }
                }
                unfolded.writes += 1;
                let trim = unfolded.writes % trim_every == 0;
                fold(&tx, unfolded, commit.sessions.len(), lag)?;
                if trim {
                    unfolded.names.retain(|name| Arc::strong_count(name) > 1);
                    if let Some(last) = unfolded.folded_through.take() {
                        tx.prepare_cached("DELETE FROM session_log WHERE id <= ?1")?
                            .execute([last])?;
                    }
                }

                if let Some(latest) = commit.delivered.iter().map(|(_, e)| *e).max() {
                    let keys: Vec<_> = commit
                        .delivered
                        .iter()
                        .map(|(key, expires_ms)| {
                            (key.sequence.to_string(), key.event_type(), expires_ms)
                        })
                        .collect();
                    let keys = serde_json::to_string(&keys).expect("keys serialize");
                    tx.prepare_cached("INSERT INTO delivered (expires_ms, keys) VALUES (?1, ?2)")?
                        .execute(params![latest, keys])?;
                }
                // Expired batches go with every few new ones, so the table keeps pace with
                // steady traffic in small steps instead of large purges.
                if trim {
                    expire(&tx, now_ms, 4 * trim_every as i64)?;
                }

                if !commit.series.is_empty() {
                    let row = unfolded.series.last_row + 1;
                    let again = unfolded.series.next_row(&commit.series, row);
                    let log = &mut unfolded.series;
                    let mut values = String::with_capacity(32 * (commit.series.len() + 1));
                    values.push('[');
                    let changed = commit.series.iter().map(|(s, _)| s);
                    for series in changed.chain(&again) {
                        let id = match log.ids.get(series) {
                            Some(id) => *id,
                            None => {
                                let labels = serde_json::to_string(&series.labels())
                                    .expect("strings serialize");
                                tx.prepare_cached(
                                    "INSERT INTO series_names (metric, labels) VALUES (?1, ?2)",
                                )?
                                .execute(params![series.metric(), labels])?;
                                let id = tx.last_insert_rowid();
                                log.ids.insert(series.clone(), id);
                                id
                            }
                        };
                        if values.len() > 1 {
                            values.push(',');
                        }
                        encode_logged(&mut values, id, &log.latest[series].0);
                    }
                    values.push(']');
                    tx.prepare_cached("INSERT INTO series_log (id, batch) VALUES (?1, ?2)")?
                        .execute(params![row, values])?;
                    if trim {
                        tx.prepare_cached("DELETE FROM series_log WHERE id <= ?1")?
                            .execute([row - SERIES_ROWS])?;
                    }
                    unfolded.series.last_row = row;
                }
            }
            tx.commit()
        })?;
        self.checkpointer.committed();
        Ok(())
    }

    fn reload(&mut self) -> Option<Result<Snapshot, StoreError>> {
        // A transaction cut short by a panic was rolled back when it was dropped; the unfolded
        // rows and the series log may have taken its changes all the same.
        self.conn = None;
        self.unfolded = None;
        Some(self.load())
    }

    fn purge(&mut self, now_ms: i64) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            // A few steps at most, so a purge after a long burst does not hold the ledger up;
            // the next purges and the writes take the rest.
            for _ in 0..4 {
                if expire(conn, now_ms, PURGE_STEP)? == 0 {
                    break;
                }
            }
            Ok(())
        })?;
        self.checkpointer.committed();
        Ok(())
    }
}

fn encode_value(value: &Value) -> (i64, Option<i64>, Option<String>) {
    match value {
        Value::Count(n) => (i64::try_from(*n).unwrap_or(i64::MAX), None, None),
        Value::TimestampMs(ms) => (*ms, None, None),
        Value::Histogram(h) => {
            let buckets = h
                .counts
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            (clamp(h.count()), Some(clamp(h.sum_ms)), Some(buckets))
        }
    }
}

/// A counter's entry of a `series_log` row, as JSON: `[id,value]`, or `[id,count,sum,"b,b"]`.
fn encode_logged(out: &mut String, id: i64, value: &Value) {
    let (value, sum_ms, buckets) = encode_value(value);
    out.push('[');
    out.push_str(itoa::Buffer::new().format(id));
    out.push(',');
    out.push_str(itoa::Buffer::new().format(value));
    if let (Some(sum_ms), Some(buckets)) = (sum_ms, buckets) {
        out.push(',');
        out.push_str(itoa::Buffer::new().format(sum_ms));
        // Digits and commas only: no escaping needed.
        out.push_str(",\"");
        out.push_str(&buckets);
        out.push('"');
    }
    out.push(']');
}

fn unknown_series(metric: &str, labels: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        1,
        Type::Text,
        format!("unknown series or value: {metric}{labels}").into(),
    )
}

/// A counter from its metric and JSON labels; an unknown one is a conversion error, never a
/// guess.
fn decode_name(metric: &str, labels: &str) -> rusqlite::Result<Series> {
    serde_json::from_str::<Vec<String>>(labels)
        .ok()
        .and_then(|l| Series::decode(metric, &l))
        .ok_or_else(|| unknown_series(metric, labels))
}

/// A counter and its value from the columns of `series`.
fn decode_series(
    (metric, labels, value, sum_ms, buckets): (String, String, i64, Option<i64>, Option<String>),
) -> rusqlite::Result<(Series, Value)> {
    let series = decode_name(&metric, &labels)?;
    let value = decode_value(&series, value, sum_ms, buckets.as_deref())
        .ok_or_else(|| unknown_series(&metric, &labels))?;
    Ok((series, value))
}

fn decode_value(
    series: &Series,
    value: i64,
    sum_ms: Option<i64>,
    buckets: Option<&str>,
) -> Option<Value> {
    Some(match series {
        Series::PushDuration(..) | Series::CallbackDelay => {
            let counts = buckets?
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<u64>, _>>()
                .ok()?;
            Value::Histogram(Histogram {
                counts,
                sum_ms: u64::try_from(sum_ms?).ok()?,
            })
        }
        Series::LastCallback => Value::TimestampMs(value),
        _ => Value::Count(u64::try_from(value).ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
        let Err(err) = SqliteStore::open(path, SyncMode::Normal) else {
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let wal = wal_of(&path);
        let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
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

        let page: u64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        // A commit's own checkpoint at the limit is a passive one, which SQLite skips while the
        // checkpointer thread holds the checkpoint lock: the WAL overshoots by what commits
        // write during one background checkpoint (258 pages once, on a slow disk). Without
        // the commits' own checkpoints the WAL passes this bound after about 1,016 batches.
        let limit = (WAL_LIMIT_PAGES as u64 + 1024) * (page + 24) + 32;
        for round in 4..2_000 {
            store.write(&batch(round), NOW).unwrap();
            let wal = size(&wal);
            assert!(wal <= limit, "WAL of {wal} bytes after {round} batches");
        }
    }

    /// A WAL that grew large (here behind a reader that kept an old snapshot) is cut back to
    /// `WAL_KEEP_BYTES` once it can start over, instead of keeping its size for good.
    #[test]
    fn a_grown_wal_shrinks_once_it_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grown.db");
        let wal = wal_of(&path);
        let mut store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
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

    /// Expired keys leave from the head of the table as batches come, valid ones stay.
    #[test]
    fn writes_and_purges_delete_expired_delivered_keys() {
        let (_dir, path, mut store) = new_store("expire.db");
        store.trim_every = 1;
        let keys = |from: u32, expires: i64| Commit {
            delivered: (from..from + 100)
                .map(|n| (DeliveryKey::new(&n.to_string(), EventKind::Push), expires))
                .collect(),
            ..Commit::default()
        };
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
}
