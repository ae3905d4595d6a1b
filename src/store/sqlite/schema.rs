//! The tables, what each row holds, and the upgrade of databases written by older releases.

use std::path::Path;

use rusqlite::Connection;

use crate::store::StoreError;

/// The schema this release writes; stored in `PRAGMA user_version`.
pub(super) const SCHEMA_VERSION: i64 = 4;

pub(super) const SESSIONS: &str = "
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
pub(super) const SESSION_LOG: &str = "
CREATE TABLE session_log (
    id INTEGER PRIMARY KEY,
    changes TEXT NOT NULL
);";

/// `keys`: `[[sequence, event_type, expires_ms], ...]`; `expires_ms`: the latest of them.
pub(super) const DELIVERED: &str = "
CREATE TABLE delivered (
    id INTEGER PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    keys TEXT NOT NULL
);";

pub(super) const SERIES: &str = "
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
pub(super) const SERIES_LOG: &str = "
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

/// What the tables add up to, for people inspecting the database with `sqlite3`; not read by the
/// exporter, so they change without a new schema version ([`refresh_views`]). The newest
/// of each stream or series among the folded rows (id 0) and the log entries. One sort of both,
/// not an anti-join: `NOT IN` over the log's nullable JSON fields made SQLite scan the whole log
/// for each folded row (minutes, holding back the WAL, with 50,000 sessions).
pub(super) const VIEWS: &str = "
CREATE VIEW delivered_keys AS
    SELECT e.value ->> 0 AS sequence, e.value ->> 1 AS event_type, e.value ->> 2 AS expires_ms
    FROM delivered d, json_each(d.keys) e;
CREATE VIEW session_changes AS
    SELECT l.id AS id, e.key AS n, e.value ->> 0 AS app, e.value ->> 1 AS appname,
        e.value ->> 2 AS stream_id, e.value ->> 3 AS sequence, e.value ->> 4 AS area,
        e.value ->> 5 AS since
    FROM session_log l, json_each(l.changes) e;
CREATE VIEW live_sessions AS
    SELECT app, appname, stream_id, sequence, area, since FROM (
        SELECT *, row_number() OVER (PARTITION BY app, appname, stream_id
            ORDER BY id DESC, n DESC) AS age
        FROM (SELECT 0 AS id, 0 AS n, app, appname, stream_id, sequence, area, since
                FROM sessions
            UNION ALL
            SELECT id, n, app, appname, stream_id, sequence, area, since FROM session_changes))
    WHERE age = 1 AND sequence IS NOT NULL;
CREATE VIEW current_series AS
    SELECT metric, labels, value, sum_ms, buckets FROM (
        SELECT *, row_number() OVER (PARTITION BY metric, labels ORDER BY id DESC, n DESC) AS age
        FROM (SELECT 0 AS id, 0 AS n, metric, labels, value, sum_ms, buckets FROM series
            UNION ALL
            SELECT l.id, e.key, s.metric, s.labels, e.value ->> 1, e.value ->> 2, e.value ->> 3
            FROM series_log l, json_each(l.batch) e JOIN series_names s ON s.id = e.value ->> 0))
    WHERE age = 1;";

/// Schema 1 kept delivered keys in a table keyed by sequence, with an expiry index, and had no
/// session and series logs. Keys are copied by minute of expiry, oldest first, so the head of
/// the new table expires first.
pub(super) const MIGRATE_FROM_1: &str = "
DROP INDEX delivered_expiry;
ALTER TABLE delivered RENAME TO delivered_v1;";
pub(super) const MIGRATE_FROM_1_COPY: &str = "
INSERT INTO delivered (expires_ms, keys)
    SELECT max(expires_ms), json_group_array(json_array(sequence, event_type, expires_ms))
    FROM delivered_v1 GROUP BY expires_ms / 60000 ORDER BY expires_ms / 60000;
DROP TABLE delivered_v1;";

/// Schema 2 logged a row a session change; its rows become one row of schema 3, in order.
pub(super) const MIGRATE_FROM_2: &str = "
ALTER TABLE session_log RENAME TO session_log_v2;";
pub(super) const MIGRATE_FROM_2_COPY: &str = "
INSERT INTO session_log (changes)
    SELECT json_group_array(json_array(app, appname, stream_id, sequence, area, since)
        ORDER BY id)
    FROM session_log_v2 HAVING count(*) > 0;
DROP TABLE session_log_v2;";

/// Schemas 2 and 3 repeated each counter's metric and labels in the counter log: the newest
/// value of each goes to `series` (which log values override), and the log starts anew.
pub(super) const MIGRATE_SERIES_LOG: &str = "
INSERT OR REPLACE INTO series (metric, labels, value, sum_ms, buckets)
    SELECT metric, labels, value, sum_ms, buckets FROM (
        SELECT e.value ->> 0 AS metric, e.value ->> 1 AS labels, e.value ->> 2 AS value,
            e.value ->> 3 AS sum_ms, e.value ->> 4 AS buckets,
            row_number() OVER (PARTITION BY e.value ->> 0, e.value ->> 1
                ORDER BY l.id DESC, e.key DESC) AS age
        FROM series_log l, json_each(l.batch) e)
    WHERE age = 1;
DROP TABLE series_log;";
/// Every view, before they are created again as this release defines them
/// (`series_log_newest` is an earlier release's).
pub(super) const DROP_VIEWS: &str = "
DROP VIEW IF EXISTS current_series; DROP VIEW IF EXISTS series_log_newest;
DROP VIEW IF EXISTS delivered_keys; DROP VIEW IF EXISTS live_sessions;
DROP VIEW IF EXISTS session_changes;";

/// Creates the schema in a new database, upgrades an older one, and refuses one it does not
/// understand.
pub(super) fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
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

/// Creates the views again where they are not this release's (a database written by an earlier
/// release of the same schema). Nothing is written when they are; where they cannot be written
/// (a read-only file), the old ones stay, with a warning: they only serve people's queries.
pub(super) fn refresh_views(conn: &Connection, path: &Path) {
    let ours = || -> rusqlite::Result<Vec<(String, String)>> {
        let fresh = Connection::open_in_memory()?;
        fresh.execute_batch(&format!(
            "{SESSIONS}{SESSION_LOG}{DELIVERED}{SERIES}{SERIES_LOG}{VIEWS}"
        ))?;
        views(&fresh)
    };
    let update = match (ours(), views(conn)) {
        (Ok(ours), Ok(found)) if ours == found => return,
        (Ok(_), Ok(_)) => conn
            .execute_batch(&format!("BEGIN IMMEDIATE; {DROP_VIEWS}{VIEWS} COMMIT;"))
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match update {
        Ok(()) => {
            tracing::info!(path = %path.display(), "database views created again as this release defines them")
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot create the database views again; the old ones stay (they may be slow)")
        }
    }
}

fn views(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    conn.prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'view' ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}
