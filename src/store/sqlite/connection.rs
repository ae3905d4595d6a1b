//! Connections set up for the exporter's write pattern, and the batch's transaction.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::checkpoint::checkpoint_at_limit;
use super::SyncMode;

/// Size the WAL file is cut back to when it starts over, once it grew past it: without a limit
/// the file keeps its largest size for good. Only a WAL that could not be checkpointed gets that
/// large (behind a reader holding an old snapshot, such as a long `sqlite3` session): steady
/// traffic stays under [`WAL_LIMIT_PAGES`](super::checkpoint::WAL_LIMIT_PAGES) (16.1 MiB with 4 KiB pages). A limit below that
/// truncated and regrew the file over and over at 19,000 callbacks/s: p99 2.3 -> 6.5 ms.
pub(super) const WAL_KEEP_BYTES: i64 = 20 << 20;

/// How long a statement waits for a lock another connection holds (a `sqlite3` session writing,
/// say). Tencent waits about 20 s for an answer; a lock held longer than this is a fault to
/// report.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// The same while the database is failing: each once-a-second try waits this long at most, with
/// the state's lock held (callbacks and scrapes wait for it), instead of [`BUSY_TIMEOUT`].
pub(super) const BUSY_TIMEOUT_FAILING: Duration = Duration::from_millis(50);

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
pub(super) struct WriteTransaction<'c> {
    /// The connection the transaction was begun on, and is rolled back on if dropped uncommitted.
    conn: &'c Connection,
}

impl<'c> WriteTransaction<'c> {
    pub(super) fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(WriteTransaction { conn })
    }

    pub(super) fn commit(self) -> rusqlite::Result<()> {
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

pub(super) fn connect(path: &Path, sync: SyncMode) -> rusqlite::Result<Connection> {
    align_sidecar_permissions(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match sync {
        SyncMode::Normal => "NORMAL",
        SyncMode::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // Replaces SQLite's automatic checkpoint (at 1,000 pages, and never waiting for its turn).
    conn.wal_hook(Some(checkpoint_at_limit));
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
    Ok(conn)
}
