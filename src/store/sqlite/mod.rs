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
//!   A batch also writes again a few of the counters whose newest value is over
//!   [`SERIES_ROWS`](unfolded::SERIES_ROWS) rows old (at most half as many as it changed,
//!   [`REWRITE_MIN`](unfolded::REWRITE_MIN) at least), and the rows before the oldest that
//!   holds a counter's newest value are deleted. So there is no fold, and no stall: upserting
//!   the counters in place dirtied most pages of their table at every batch (a batch touches
//!   the counters of most domains), and folding a log of them into the table took 10-25 ms at
//!   a time. `series` holds what a schema-1 database had; values in the log win.
//!
//! Rows leave the head of the three logs every [`TRIM_EVERY`] commits, not at each.
//!
//! At start the logs are read first; `sessions` (a million rows, say) is then read on a
//! connection and thread of its own and handed over in chunks while the state is rebuilt from
//! them, so reading and indexing take the machine's two cores instead of one after the other.
//!
//! After any failed write the connection is dropped and reopened on the next attempt, so a
//! database that became read-only, full or locked recovers by itself once the cause is gone.
//! What this store holds in memory is read again after the first failed write only: the writes
//! after it work on a copy.
//!
//! Layout: [`schema`] (the tables and the upgrades), [`connection`] (connections, the batch's
//! transaction), [`checkpoint`] (the WAL's checkpoints, on a thread and at its limit, and
//! their metrics), [`unfolded`] (what the logs hold, in memory, and the
//! fold), [`rows`] (values to and from columns), [`restore`] (what start reads back); the store
//! itself, below, writes a batch and answers for it.

mod checkpoint;
mod connection;
mod restore;
mod rows;
mod schema;
mod unfolded;

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};

use super::{Store, StoreError};
use crate::callback::StreamKey;
use crate::state::{Commit, DeliveryKey, FastSet, SessionFeed, Snapshot};
use checkpoint::{wal_metrics, Checkpointer};
use connection::{connect, WriteTransaction, BUSY_TIMEOUT, BUSY_TIMEOUT_FAILING};
use restore::{read_delivered, read_series_table, read_sessions, read_unfolded, SESSION_CHUNKS};
use schema::{migrate, refresh_views};
use unfolded::Unfolded;

/// Session changes left unfolded, about: enough that a short session's push and disconnect
/// usually meet in the log and cancel out, and that folds share pages; few enough to replay in
/// milliseconds at start.
pub const FOLD_LAG: usize = 65_536;

/// Commits between deletions from the head of the logs (folds, expired keys, old counter rows).
/// Deleting the oldest row of a table at every commit dirtied its first page, the free list and
/// the header each time, about a third of a small commit's WAL frames; deleting every 32nd
/// commit writes each of those pages once for 32 commits' rows.
const TRIM_EVERY: u64 = 32;
/// Expired delivered-key batches deleted by one statement.
const PURGE_STEP: i64 = 256;

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
    /// The database file: reopened after a failure, and named in errors.
    path: PathBuf,
    /// `--storage.sync`, set on every connection opened on the file.
    sync: SyncMode,
    /// `None` after a failure: reopened before the next write.
    conn: Option<Connection>,
    /// The session-log rows not folded yet, as committed; `None` after a write failed on it,
    /// which may have changed it before its transaction rolled back.
    unfolded: Option<Unfolded>,
    /// Something failed on the database and no write has succeeded since. A database that
    /// keeps failing (full, locked, read-only) is tried once a second, with every callback and
    /// scrape waiting, so a try should cost little: writes then work on a copy of `unfolded`
    /// and keep it when they fail (reading the log again took 100-250 ms with 60,000 live
    /// streams, the copy takes a few), and a lock is waited for [`BUSY_TIMEOUT_FAILING`], not
    /// [`BUSY_TIMEOUT`] (a database locked by another process stalled them 2 s a second).
    failing: bool,
    /// Times the logs were read into `unfolded`, for tests.
    #[cfg(test)]
    log_reads: usize,
    /// Session-log rows left unfolded: [`FOLD_LAG`], smaller in tests.
    fold_lag: usize,
    /// Commits between trims of the logs: [`TRIM_EVERY`], other values in tests.
    trim_every: u64,
    /// Copies the WAL into the database off the commit path; told after every commit.
    checkpointer: Checkpointer,
    /// The lock on `<path>.lock`, held while the store is open: a second exporter on the same
    /// database would write its counters' values and log rows over this one's (the store keeps
    /// absolute values and numbers its rows), losing counts answered 200.
    _lock: Option<File>,
}

/// Takes the database's lock file, `<path>.lock`, which the system frees when the process ends
/// however it ends. A lock file that cannot be made or locked (a read-only folder, a file system
/// without locks) gets a warning: the lock is a safety net, not a reason to stay down.
fn lock(path: &Path) -> Result<Option<File>, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let taken = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map(|file| (file.try_lock(), file));
    let e = match taken {
        Ok((Ok(()), file)) => return Ok(Some(file)),
        Ok((Err(TryLockError::WouldBlock), _)) => {
            return Err(StoreError::InUse {
                path: path.to_owned(),
                lock: lock_path,
            })
        }
        Ok((Err(TryLockError::Error(e)), _)) | Err(e) => e,
    };
    tracing::warn!(
        path = %lock_path.display(),
        error = %e,
        "cannot lock the database against a second exporter: make sure only one uses it"
    );
    Ok(None)
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
        let lock = lock(&path)?;
        let checkpointer = Checkpointer::start(path.clone(), sync);
        let mut store = SqliteStore {
            path,
            sync,
            conn: None,
            unfolded: None,
            failing: false,
            #[cfg(test)]
            log_reads: 0,
            fold_lag: FOLD_LAG,
            trim_every: TRIM_EVERY,
            checkpointer,
            _lock: lock,
        };
        let path = store.path.clone();
        store.with_conn(|conn| {
            refresh_views(conn, &path);
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Opens the connection again after a failure. What the logs hold in memory outlives it
    /// only if the database still ends where it says: a commit reported failed can have been
    /// made all the same (an fsync that failed after its last frame was written), and the
    /// series log then holds a row more.
    fn reconnect(&mut self) -> Result<(), StoreError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let conn = connect(&self.path, self.sync).map_err(|e| self.err(e))?;
        if self.failing {
            conn.busy_timeout(BUSY_TIMEOUT_FAILING)
                .map_err(|e| self.err(e))?;
        }
        migrate(&conn, &self.path)?;
        if let Some(unfolded) = &self.unfolded {
            let last: i64 = conn
                .query_row("SELECT coalesce(max(id), 0) FROM series_log", [], |r| {
                    r.get(0)
                })
                .map_err(|e| self.err(e))?;
            if last != unfolded.series.last_row {
                tracing::warn!(
                    last,
                    expected = unfolded.series.last_row,
                    "the database changed during a failure; its logs are read again"
                );
                self.unfolded = None;
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// Runs `f` on the connection (reopening it after a failure); on failure it is dropped, so
    /// that a database that became read-only, full or locked is opened afresh at the next try.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        if let Err(e) = self.reconnect() {
            self.failing = true;
            return Err(e);
        }
        let conn = self.conn.as_mut().expect("just opened");
        f(conn).map_err(|e| {
            self.conn = None;
            self.failing = true;
            self.err(e)
        })
    }

    /// Runs `f` on the connection and the unfolded rows (read from the logs if need be). On
    /// failure the connection is dropped, and so are the rows, which `f` may have changed before
    /// its transaction rolled back, unless `f` worked on a copy (`copy`): the rows as they were
    /// are kept then.
    fn with_unfolded<T>(
        &mut self,
        copy: bool,
        f: impl FnOnce(&mut Connection, &mut Unfolded) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        if let Err(e) = self.reconnect() {
            self.failing = true;
            return Err(e);
        }
        let conn = self.conn.as_mut().expect("just opened");
        let unfolded = match self.unfolded.take() {
            Some(unfolded) => Ok(unfolded),
            None => {
                #[cfg(test)]
                {
                    self.log_reads += 1;
                }
                read_unfolded(conn)
            }
        };
        let result = unfolded.and_then(|mut unfolded| {
            let kept = copy.then(|| unfolded.clone());
            match f(conn, &mut unfolded) {
                Ok(value) => {
                    self.unfolded = Some(unfolded);
                    Ok(value)
                }
                Err(e) => {
                    self.unfolded = kept;
                    Err(e)
                }
            }
        });
        result.map_err(|e| {
            self.conn = None;
            self.failing = true;
            self.err(e)
        })
    }
}

/// Appends a batch's new delivered-event keys to `delivered` as one row.
fn log_delivered(conn: &Connection, delivered: &[(DeliveryKey, i64)]) -> rusqlite::Result<()> {
    let Some(latest) = delivered.iter().map(|(_, e)| *e).max() else {
        return Ok(());
    };
    let keys: Vec<_> = delivered
        .iter()
        .map(|(key, expires_ms)| (key.sequence.to_string(), key.event_type(), expires_ms))
        .collect();
    let keys = serde_json::to_string(&keys).expect("keys serialize");
    conn.prepare_cached("INSERT INTO delivered (expires_ms, keys) VALUES (?1, ?2)")?
        .execute(params![latest, keys])?;
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
        let (mut snapshot, pending, expected) = self.with_unfolded(false, |conn, unfolded| {
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
            snapshot.delivered = read_delivered(conn)?;
            // The log's values win over the table's (written by schema 1).
            snapshot.series = read_series_table(conn)?
                .into_iter()
                .filter(|(series, _)| !unfolded.series.latest.contains_key(series))
                .collect();
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

    fn cap_expiry(&mut self, until_ms: i64) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            // The newest batch expires last, unless the window or the clock changed: nothing
            // is written in the usual case (a read-only database still starts), and only a
            // changed one costs a pass over the table. The oldest is read too: after a cap
            // that failed (a locked database), newer rows within the window may follow the
            // rows that are ahead, which reach the head as the rows before them expire.
            let ahead: bool = conn.query_row(
                "SELECT coalesce(max(expires_ms) > ?1, 0) FROM (
                    SELECT expires_ms FROM (SELECT expires_ms FROM delivered ORDER BY id DESC LIMIT 1)
                    UNION ALL
                    SELECT expires_ms FROM (SELECT expires_ms FROM delivered ORDER BY id LIMIT 1))",
                [until_ms],
                |r| r.get(0),
            )?;
            if ahead {
                conn.execute(
                    "UPDATE delivered SET expires_ms = ?1 WHERE expires_ms > ?1",
                    [until_ms],
                )?;
            }
            Ok(())
        })
    }

    fn write(&mut self, commit: &Commit, now_ms: i64) -> Result<(), StoreError> {
        if commit.is_empty() {
            return Ok(());
        }
        let (lag, trim_every) = (self.fold_lag, self.trim_every);
        let was_failing = self.failing;
        let result = self.with_unfolded(was_failing, |conn, unfolded| {
            let tx = WriteTransaction::begin(conn)?;
            // The heads of the logs are trimmed every few commits, not at each (TRIM_EVERY).
            let trim = unfolded.count_write(trim_every);
            unfolded.log_sessions(&tx, &commit.sessions, lag, trim)?;
            log_delivered(&tx, &commit.delivered)?;
            // Expired batches go with every few new ones, so the table keeps pace with steady
            // traffic in small steps instead of large purges.
            if trim {
                expire(&tx, now_ms, 4 * trim_every as i64)?;
            }
            unfolded.series.append(&tx, &commit.series, trim)?;
            tx.commit()
        });
        result?;
        if was_failing {
            self.failing = false;
            let conn = self.conn.as_ref().expect("just written on");
            conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.err(e))?;
        }
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

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![wal_metrics(&self.path)]
    }

    fn purge(&mut self, now_ms: i64) -> Result<(), StoreError> {
        self.with_conn(|conn| {
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

#[cfg(test)]
mod tests;
