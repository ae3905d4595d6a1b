//! The SQLite store: the default, durable across crashes and restarts.
//!
//! WAL journal, one transaction per batch. After any failed write the connection is dropped and
//! reopened on the next attempt, so a database that became read-only, full or locked recovers
//! by itself once the cause is gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use super::{Store, StoreError};
use crate::area::Area;
use crate::callback::{EventKind, StreamKey};
use crate::state::counters::{Histogram, Series, Value};
use crate::state::rules::{Sequence, Session};
use crate::state::{Commit, DeliveryKey, Snapshot};

/// The schema this release writes; stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE sessions (
    app TEXT NOT NULL,
    appname TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    sequence TEXT NOT NULL,
    area TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY (app, appname, stream_id)
) WITHOUT ROWID;
CREATE TABLE delivered (
    sequence TEXT NOT NULL,
    event_type INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (sequence, event_type)
) WITHOUT ROWID;
CREATE INDEX delivered_expiry ON delivered (expires_ms);
CREATE TABLE series (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    value INTEGER NOT NULL,
    sum_ms INTEGER,
    buckets TEXT,
    PRIMARY KEY (metric, labels)
) WITHOUT ROWID;
";

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
        let mut store = SqliteStore {
            path,
            sync,
            conn: None,
        };
        store.connection()?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The open connection, reopening it after a failure.
    fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            let conn = connect(&self.path, self.sync).map_err(|e| self.err(e))?;
            migrate(&conn, &self.path)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    /// Runs `f` on the connection; on failure the connection is dropped to be reopened.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let result = f(self.connection()?);
        result.map_err(|e| {
            self.conn = None;
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
    Ok(conn)
}

/// Creates the schema in a new database and refuses one it does not understand.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    match version {
        SCHEMA_VERSION => Ok(()),
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
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(err)
        }
        newer => Err(StoreError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "schema version {newer} is newer than this release understands ({SCHEMA_VERSION})"
            ),
        }),
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let rows = self.with_conn(|conn| {
            let mut snapshot = Snapshot::default();
            let mut stmt = conn
                .prepare("SELECT app, appname, stream_id, sequence, area, since FROM sessions")?;
            let mut rows = stmt.query([])?;
            let mut bad_area = Vec::new();
            while let Some(r) = rows.next()? {
                let area: String = r.get(4)?;
                let Some(area) = Area::from_label(&area) else {
                    bad_area.push(area);
                    continue;
                };
                snapshot.sessions.push((
                    StreamKey {
                        app: r.get::<_, String>(0)?.into(),
                        appname: r.get::<_, String>(1)?.into(),
                        stream_id: r.get::<_, String>(2)?.into(),
                    },
                    Session {
                        sequence: Sequence::from(r.get_ref(3)?.as_str()?),
                        area,
                        since: r.get(5)?,
                    },
                ));
            }
            let mut stmt =
                conn.prepare("SELECT sequence, event_type, expires_ms FROM delivered")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let sequence: String = r.get(0)?;
                let event_type: i64 = r.get(1)?;
                let kind = EventKind::from_event_type(Some(event_type));
                snapshot
                    .delivered
                    .push((DeliveryKey::new(&sequence, kind), r.get(2)?));
            }
            let mut stmt =
                conn.prepare("SELECT metric, labels, value, sum_ms, buckets FROM series")?;
            let raw = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((snapshot, raw, bad_area))
        })?;
        let (mut snapshot, raw, bad_area) = rows;
        if let Some(area) = bad_area.first() {
            return Err(self.invalid(format!("session with unknown area {area:?}")));
        }
        for (metric, labels, value, sum_ms, buckets) in raw {
            let series = serde_json::from_str::<Vec<String>>(&labels)
                .ok()
                .and_then(|labels| Series::decode(&metric, &labels))
                .ok_or_else(|| self.invalid(format!("unknown series {metric}{labels}")))?;
            let value = decode_value(&series, value, sum_ms, buckets.as_deref())
                .ok_or_else(|| self.invalid(format!("bad value of {metric}{labels}")))?;
            snapshot.series.push((series, value));
        }
        Ok(snapshot)
    }

    fn write(&mut self, commit: &Commit) -> Result<(), StoreError> {
        if commit.is_empty() {
            return Ok(());
        }
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO sessions (app, appname, stream_id, sequence, area, since)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                let mut delete = tx.prepare_cached(
                    "DELETE FROM sessions WHERE app = ?1 AND appname = ?2 AND stream_id = ?3",
                )?;
                for (stream, session) in &commit.sessions {
                    match session {
                        Some(s) => upsert.execute(params![
                            &*stream.app,
                            &*stream.appname,
                            &*stream.stream_id,
                            s.sequence.to_string(),
                            s.area.as_str(),
                            s.since
                        ])?,
                        None => delete.execute(params![
                            &*stream.app,
                            &*stream.appname,
                            &*stream.stream_id
                        ])?,
                    };
                }
                let mut delivered = tx.prepare_cached(
                    "INSERT OR REPLACE INTO delivered (sequence, event_type, expires_ms)
                     VALUES (?1, ?2, ?3)",
                )?;
                for (key, expires_ms) in &commit.delivered {
                    delivered.execute(params![
                        key.sequence.to_string(),
                        key.event_type(),
                        expires_ms
                    ])?;
                }
                let mut series = tx.prepare_cached(
                    "INSERT OR REPLACE INTO series (metric, labels, value, sum_ms, buckets)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (s, value) in &commit.series {
                    let labels = serde_json::to_string(&s.labels()).expect("strings serialize");
                    let (value, sum_ms, buckets) = encode_value(value);
                    series.execute(params![s.metric(), labels, value, sum_ms, buckets])?;
                }
            }
            tx.commit()
        })
    }

    fn purge(&mut self, now_ms: i64) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.prepare_cached("DELETE FROM delivered WHERE expires_ms <= ?1")?
                .execute([now_ms])
                .map(drop)
        })
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
