//! The WAL's checkpoints: a thread that copies the WAL into the database off the commit path,
//! a commit's own checkpoint at the WAL's limit, the turn they take, and their metrics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge};
use rusqlite::hooks::{CheckpointMode, Wal};
use rusqlite::{Connection, ErrorCode};

use super::connection::connect;
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
static CHECKPOINT_TURN: Mutex<Turn> = Mutex::new(Turn { failed_at: None });
/// Set while checkpoints fail (a checkpoint failed, none succeeded since): a commit at the limit
/// then leaves the checkpoint to the thread, which tries again once a
/// [`CHECKPOINT_RETRY`], instead of waiting for the thread's turn, which sorting a large WAL's
/// index makes long (a p99.9 of 225 ms at 1,000 callbacks/s with a 234-MB WAL).
static CHECKPOINTS_FAILING: AtomicBool = AtomicBool::new(false);
/// Checkpoints that failed since the process started, for
/// `tencent_css_exporter_storage_checkpoint_failures_total` itself, served by [`wal_metrics`].
static CHECKPOINT_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "tencent_css_exporter_storage_checkpoint_failures_total",
        "Checkpoints of the SQLite write-ahead log that failed since the exporter started.",
    )
    .expect("valid counter")
});
/// After a checkpoint failed, how long the next ones are skipped. Each try sorts the index of
/// the whole WAL before it copies a page: with a database file that could not be written
/// (`chattr +i`), a try at every commit past the limit took the exporter from a third of a core
/// to more than half at 1,000 callbacks/s, growing with the WAL.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// The turn to checkpoint, and what the last checkpoint of the process came to.
pub(super) struct Turn {
    /// When a checkpoint last failed, while none has succeeded since.
    failed_at: Option<Instant>,
}

/// Waits for, and takes, the turn to checkpoint.
pub(super) fn checkpoint_turn() -> MutexGuard<'static, Turn> {
    CHECKPOINT_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Turn {
    /// Runs `checkpoint` in this turn, unless one failed less than [`CHECKPOINT_RETRY`] ago.
    /// A failure is logged when checkpoints start failing, not at each: the WAL then grows
    /// with every commit (every callback is still stored, in it) until the cause is gone, and
    /// `tencent_css_exporter_storage_wal_bytes` shows it. A checkpoint that found the database
    /// busy (another process checkpointing or writing) did not fail.
    pub(super) fn run(&mut self, checkpoint: impl FnOnce() -> rusqlite::Result<()>) {
        if self
            .failed_at
            .is_some_and(|at| at.elapsed() < CHECKPOINT_RETRY)
        {
            return;
        }
        match checkpoint() {
            Ok(()) => {
                if self.failed_at.take().is_some() {
                    tracing::info!("checkpoints work again: the WAL is copied into the database");
                }
            }
            Err(e) if is_busy(&e) => {
                tracing::debug!(error = %e, "checkpoint found the database busy")
            }
            Err(e) => {
                CHECKPOINT_FAILURES.inc();
                if self.failed_at.is_none() {
                    tracing::warn!(error = %e, "checkpoint failed: the WAL cannot be copied into the database file and grows with every commit until it can (is the file writable?)");
                }
                self.failed_at = Some(Instant::now());
            }
        }
    }
}

/// Runs `checkpoint` in the process's turn (see [`Turn::run`]), and tells commits at the limit
/// whether checkpoints fail.
fn checkpoint_in_turn(checkpoint: impl FnOnce() -> rusqlite::Result<()>) {
    let mut turn = checkpoint_turn();
    turn.run(checkpoint);
    CHECKPOINTS_FAILING.store(turn.failed_at.is_some(), Ordering::Relaxed);
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// SQLite's WAL hook, called after every commit with the WAL's size: at the limit, checkpoints
/// in the commit's turn. What SQLite's own automatic checkpoint does, except for the wait.
pub(super) fn checkpoint_at_limit(wal: &Wal, pages: i32) -> rusqlite::Result<()> {
    if pages >= WAL_LIMIT_PAGES && !CHECKPOINTS_FAILING.load(Ordering::Relaxed) {
        // Its error is not returned: it would fail a commit that took place.
        checkpoint_in_turn(|| wal.checkpoint_v2(CheckpointMode::PASSIVE).map(drop));
    }
    Ok(())
}

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
                    checkpoint_in_turn(|| {
                        checkpoint(&mut conn, &path, sync).inspect_err(|_| {
                            // Tried again after a later commit, on a new connection.
                            conn = None;
                        })
                    });
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

/// Copies what the WAL holds into the database file, as far as no reader needs the WAL, in the
/// caller's turn. The connection is set up as the writer's, so the checkpoint's fsyncs follow the same `sync`.
fn checkpoint(conn: &mut Option<Connection>, path: &Path, sync: SyncMode) -> rusqlite::Result<()> {
    if conn.is_none() {
        *conn = Some(connect(path, sync)?);
    }
    let conn = conn.as_ref().expect("just opened");
    conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
        .query_row([], |_| Ok(()))
}

/// The WAL's size and the checkpoints that failed, read at each scrape: a WAL that keeps
/// growing (a reader holding an old snapshot, a database file that cannot be written) fills the
/// disk, and only then do callbacks fail.
pub(super) fn wal_metrics(path: &Path) -> Box<dyn Collector> {
    struct WalMetrics {
        /// The WAL file, `<database>-wal`.
        wal: PathBuf,
        /// Its size, set at each scrape.
        bytes: IntGauge,
        /// [`CHECKPOINT_FAILURES`].
        failures: IntCounter,
        /// Both metrics' descriptions.
        descs: Vec<Desc>,
    }
    impl Collector for WalMetrics {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            // No WAL file (between a clean stop and the next write) is an empty WAL.
            let size = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
            self.bytes.set(i64::try_from(size).unwrap_or(i64::MAX));
            let mut families = self.bytes.collect();
            families.extend(self.failures.collect());
            families
        }
    }
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let bytes = IntGauge::new(
        "tencent_css_exporter_storage_wal_bytes",
        "Size of the SQLite write-ahead log; it stays under about 20 MiB while checkpoints keep up.",
    )
    .expect("valid gauge");
    let failures = CHECKPOINT_FAILURES.clone();
    let descs = bytes
        .desc()
        .into_iter()
        .chain(failures.desc())
        .cloned()
        .collect();
    Box::new(WalMetrics {
        wal: wal.into(),
        bytes,
        failures,
        descs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint that failed is counted, and the next ones are skipped for a while (each
    /// would sort the whole WAL's index again); one that found the database busy is neither.
    #[test]
    fn a_failed_checkpoint_is_counted_and_not_tried_again_at_once() {
        let mut turn = Turn { failed_at: None };
        let failed = || {
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                None,
            ))
        };
        let busy = || {
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                None,
            ))
        };
        turn.run(busy);
        assert!(turn.failed_at.is_none());

        let before = CHECKPOINT_FAILURES.get();
        turn.run(failed);
        assert!(CHECKPOINT_FAILURES.get() > before);
        assert!(turn.failed_at.is_some());
        let mut tried = false;
        turn.run(|| {
            tried = true;
            Ok(())
        });
        assert!(!tried, "tried again at once");

        turn.failed_at = Some(Instant::now() - CHECKPOINT_RETRY);
        turn.run(|| {
            tried = true;
            Ok(())
        });
        assert!(tried);
        assert!(turn.failed_at.is_none());
    }
}
