//! Connections set up for the exporter's write pattern, the batch's transaction, and the thread
//! that checkpoints the WAL off the commit path.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::hooks::{CheckpointMode, Wal};
use rusqlite::{Connection, OpenFlags};

use super::SyncMode;

/// WAL pages after which a commit checkpoints by itself, a safety net: the [`Checkpointer`]
/// copies the WAL into the database long before, on a connection and thread of its own. A
/// checkpoint inside a commit makes every callback of that batch wait for it (and for its
/// fsyncs): at 256 pages, 20,000 callbacks/s had a p99.9 of 10.9 ms, with the checkpoints moved
/// out 4.6 ms. Once every frame has been copied, the next commit starts the WAL over from its
/// beginning, so the file stays under this many pages (16 MiB) and one batch's.
pub(super) const WAL_LIMIT_PAGES: i32 = 4096;
/// Whose turn it is to checkpoint: the [`Checkpointer`] thread's, or a commit's at
/// [`WAL_LIMIT_PAGES`]. SQLite does not wait for its checkpoint lock: a commit's checkpoint
/// while the thread held it did nothing, and on a slow disk, where the thread's checkpoints
/// take long and commits keep adding frames, the WAL went past its limit by over a thousand
/// pages (21 MB). Taking turns here, a commit at the limit waits for the thread's checkpoint to
/// end, then copies the rest itself. One lock for the process: the WAL hook that takes it is a
/// plain function, and the exporter has one database.
static CHECKPOINT_TURN: Mutex<()> = Mutex::new(());

/// Waits for, and takes, the turn to checkpoint.
pub(super) fn checkpoint_turn() -> MutexGuard<'static, ()> {
    // Nothing is guarded but the turn itself.
    CHECKPOINT_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SQLite's WAL hook, called after every commit with the WAL's size: at the limit, checkpoints
/// in the commit's turn. What SQLite's own automatic checkpoint does, except for the wait.
fn checkpoint_at_limit(wal: &Wal, pages: i32) -> rusqlite::Result<()> {
    if pages >= WAL_LIMIT_PAGES {
        let _turn = checkpoint_turn();
        // An error here would fail a commit that took place; the next commit tries again.
        if let Err(e) = wal.checkpoint_v2(CheckpointMode::PASSIVE) {
            tracing::debug!(error = %e, pages, "checkpoint at the WAL limit failed");
        }
    }
    Ok(())
}

/// Size the WAL file is cut back to when it starts over, once it grew past it: without a limit
/// the file keeps its largest size for good. Only a WAL that could not be checkpointed gets that
/// large (behind a reader holding an old snapshot, such as a long `sqlite3` session): steady
/// traffic stays under [`WAL_LIMIT_PAGES`] (16.1 MiB with 4 KiB pages). A limit below that
/// truncated and regrew the file over and over at 19,000 callbacks/s: p99 2.3 -> 6.5 ms.
pub(super) const WAL_KEEP_BYTES: i64 = 20 << 20;
/// How long the checkpointer lets commits gather after one is reported before it checkpoints:
/// a checkpoint costs an fsync or two whatever it copies. Short enough that a checkpoint has
/// little to copy and often ends between two commits, which is when the next commit can start
/// the WAL over: after 20 ms it never did under a steady burst, the WAL reached the limit above,
/// and a commit checkpointed (p99.9 at the maximum rate 8.0-8.2 ms; 4.0-4.3 ms after 5 ms).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(5);

/// A thread with a connection of its own that checkpoints the WAL (passively: it never blocks
/// the writer) shortly after commits, so that commits do not have to.
pub(super) struct Checkpointer {
    /// Nudged after each commit; a full channel means a nudge is already pending. Dropped to
    /// stop the thread.
    nudge: Option<std::sync::mpsc::SyncSender<()>>,
    /// The checkpointing thread, joined on drop once `nudge` is dropped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(path: PathBuf, sync: SyncMode) -> Checkpointer {
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
    pub(super) fn committed(&self) {
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
    let _turn = checkpoint_turn();
    conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
        .query_row([], |_| Ok(()))
}

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
