//! The ledger: applies verified events to the state and writes them to the store, in batches.
//!
//! HTTP handlers queue their events and wait for the answer. Whichever handler finds no batch in
//! progress starts a writer task on the runtime; it takes whatever is queued as one batch (group
//! commit), applies every event to the state, writes the batch in one transaction, and only then
//! answers each request; it goes on while events keep arriving and ends when the queue is empty.
//! If the write fails, the batch is undone in memory and every request of it gets an error (503,
//! so Tencent retries). A batch that panics (a bug) is refused the same way, and the state is
//! then rebuilt from the store: memory never stays ahead of what is stored.
//!
//! The writer runs on the runtime's own threads instead of a dedicated one, because handing each
//! event to another thread and each answer back cost more than the work itself: a sleeping
//! thread had to be woken for every batch, and every answer woke a runtime thread from outside.
//! A write blocks the runtime thread it runs on for its duration (under a millisecond), so at most
//! one thread does so at a time, and the writer yields between batches. A small thread of the
//! ledger's own purges expired dedup keys, probes a failing store and stores what is left at
//! shutdown.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{RwLock, RwLockReadGuard};
use tokio::sync::oneshot;

use crate::callback::{Event, EventKind, Outcome};
use crate::metrics::CommitStats;
use crate::state::{Change, Limits, Truth};
use crate::store::{Store, StoreError};

/// `--metrics.max-domains` default.
pub const DEFAULT_MAX_DOMAINS: usize = 10_000;

/// Largest batch written in one transaction; bounds the latency of the first request of a burst.
const MAX_BATCH: usize = 4096;
/// How often expired delivered keys are purged while the store is healthy (more often when the
/// dedup window is short).
const PURGE_EVERY: Duration = Duration::from_secs(10);
/// How often a failing store is probed, so readiness recovers without waiting for a callback.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the HTTP side and the metrics read.
#[derive(Debug)]
pub struct Shared {
    /// The state; written only under the ledger's writer lock, read by scrapes. `parking_lot`'s
    /// lock rather than the standard one, for the scrape's copy: a reader that lets go between
    /// two pieces hands the lock to the writer waiting ([`RwLockReadGuard::bump`]), where the
    /// standard lock only wakes it, and the reader's next piece usually gets in first again.
    /// No poisoning: after a panic the ledger rebuilds the state itself.
    pub truth: RwLock<Truth>,
    /// Why the store is failing, while it is.
    pub fault: Mutex<Option<String>>,
}

impl crate::metrics::ViewSource for Shared {
    /// Copies the numbers out under the read lock a piece at a time, letting go between two
    /// so that the ledger's writer, which waits for it, records its batch in between (no
    /// strings are built under it; sorting and writing the text come after).
    fn fill(&self, frame: &mut crate::metrics::Frame) {
        let mut filling = frame.filling();
        let mut truth = self.truth.read();
        while !filling.next(truth.live(), truth.counters()) {
            RwLockReadGuard::bump(&mut truth);
        }
    }
}

impl Shared {
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_fault(&self, fault: Option<String>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }
}

/// Where the ledger reads the time (unix milliseconds).
type Clock = fn() -> i64;

/// The store could not record the event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event not recorded: {0}")]
pub struct Unrecorded(pub String);

enum Command {
    /// A verified event; answered once its batch is durable.
    Record {
        /// The event to apply to the state and store.
        event: Event,
        /// Where the handler waits for the outcome; closed if its request timed out before the
        /// batch, and the event is then not recorded.
        reply: oneshot::Sender<Result<Outcome, Unrecorded>>,
    },
    /// A callback that changes nothing but its count (rejected ones). Answered once counted in
    /// memory, so a scrape after the answer sees it; stored with the next batch that commits.
    Count {
        /// The `event` label to count under.
        kind: EventKind,
        /// The `outcome` label to count under.
        outcome: Outcome,
        /// Signalled once the count is in memory.
        done: oneshot::Sender<()>,
    },
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Ledger {
    /// The queue, the store and the state, shared with the writer task and the ledger's thread.
    inner: Arc<Inner>,
    /// Tells the ledger's thread to store what only memory holds and stop.
    stop: mpsc::Sender<()>,
}

/// What the handles, the writer task and the ledger's thread share.
struct Inner {
    /// The state and the store's fault, also read by scrapes and readiness.
    shared: Arc<Shared>,
    /// Commands waiting for the next batch.
    queue: Mutex<Queue>,
    /// The store and what goes with it; locked by whoever writes (the writer task, or the
    /// ledger's thread for a purge), so batches and purges never interleave.
    worker: Mutex<Worker>,
    /// The same counters the worker updates, for `/metrics`.
    stats: CommitStats,
}

/// What waits for the writer, behind one lock so that queueing and starting a writer agree.
#[derive(Default)]
struct Queue {
    /// Waiting commands in arrival order; a writer takes at most [`MAX_BATCH`] of them at a time.
    commands: Vec<Command>,
    /// A writer task is running (or about to): it takes what is queued, so no other is started.
    writing: bool,
}

/// Owns the ledger's thread; dropping every [`Ledger`] or calling [`Ledger::close`], then
/// [`LedgerThread::join`], stores what only memory holds.
pub struct LedgerThread(JoinHandle<()>);

impl LedgerThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the ledger thread panicked");
        }
    }
}

impl Ledger {
    /// Loads the state from `store` and starts the ledger, with the default domain cap.
    pub fn start(
        store: Box<dyn Store>,
        dedup_window: Duration,
    ) -> Result<(Ledger, LedgerThread), StoreError> {
        Self::start_with_limits(store, dedup_window, DEFAULT_MAX_DOMAINS)
    }

    /// Loads the state from `store` and starts the ledger.
    pub fn start_with_limits(
        store: Box<dyn Store>,
        dedup_window: Duration,
        max_domains: usize,
    ) -> Result<(Ledger, LedgerThread), StoreError> {
        Self::launch(store, dedup_window, max_domains, now_ms)
    }

    fn launch(
        mut store: Box<dyn Store>,
        dedup_window: Duration,
        max_domains: usize,
        clock: Clock,
    ) -> Result<(Ledger, LedgerThread), StoreError> {
        let limits = Limits {
            dedup_window_ms: dedup_window.as_millis().min(i64::MAX as u128) as i64,
            max_domains,
        };
        let snapshot = store.load()?;
        let now = clock();
        let truth =
            Truth::restore(snapshot, limits, now).map_err(|reason| StoreError::Invalid {
                path: "state".into(),
                reason,
            })?;
        store.cap_expiry(truth.latest_expiry(now))?;
        release_freed_memory();
        tracing::info!(
            live_streams = truth.live_total(),
            delivered_keys = truth.delivered_len(),
            "state loaded"
        );
        let shared = Arc::new(Shared {
            truth: RwLock::new(truth),
            fault: Mutex::new(None),
        });
        let stats = CommitStats::default();
        let inner = Arc::new(Inner {
            worker: Mutex::new(Worker {
                store,
                shared: shared.clone(),
                unsaved: Vec::new(),
                limits,
                clock,
                suspect: false,
                failed_at: None,
                outage: None,
                stats: stats.clone(),
            }),
            stats,
            shared,
            queue: Mutex::new(Queue::default()),
        });
        let (stop, stopped) = mpsc::channel();
        let purge_every = (dedup_window / 2).clamp(Duration::from_millis(100), PURGE_EVERY);
        let background = inner.clone();
        let handle = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || background.run_timer(stopped, purge_every))
            .expect("spawn the ledger thread");
        Ok((Ledger { inner, stop }, LedgerThread(handle)))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub fn commit_stats(&self) -> &CommitStats {
        &self.inner.stats
    }

    /// The store's own metrics (see [`Store::collectors`]).
    pub fn store_collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.inner.lock_worker().store.collectors()
    }

    /// Records a verified event; resolves once it is durable (or could not be made so).
    pub async fn record(&self, event: Event) -> Result<Outcome, Unrecorded> {
        let (reply, answer) = oneshot::channel();
        self.submit(Command::Record { event, reply });
        answer
            .await
            .map_err(|_| Unrecorded("the ledger has stopped".into()))?
    }

    /// Asks the ledger's thread to store what only memory holds and stop (after the HTTP
    /// servers have drained).
    pub fn close(&self) {
        let _ = self.stop.send(());
    }

    /// Counts a callback that changes nothing else; resolves once the count is visible.
    pub async fn count(&self, kind: EventKind, outcome: Outcome) {
        let (done, counted) = oneshot::channel();
        self.submit(Command::Count {
            kind,
            outcome,
            done,
        });
        let _ = counted.await;
    }

    /// Queues a command and starts a writer task unless one is running.
    fn submit(&self, command: Command) {
        let start = {
            let mut queue = self.inner.lock_queue();
            queue.commands.push(command);
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            let inner = self.inner.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(inner.write_while_queued());
                }
                // Outside a runtime (never in the exporter): write here and now.
                Err(_) => while inner.write_batch() {},
            }
        }
    }
}

impl Inner {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_worker(&self) -> MutexGuard<'_, Worker> {
        self.worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer task: batches until the queue is empty.
    async fn write_while_queued(self: Arc<Self>) {
        loop {
            // First let the other tasks of this runtime thread run: handlers that are ready
            // queue their events and join this batch, and the answers of the previous batch
            // go out before this thread blocks on the next write.
            tokio::task::yield_now().await;
            if !self.write_batch() {
                return;
            }
        }
    }

    /// Writes what is queued as one batch; `false` (and the writer's turn ended) if nothing was.
    fn write_batch(&self) -> bool {
        let batch = {
            let mut queue = self.lock_queue();
            if queue.commands.is_empty() {
                queue.writing = false;
                return false;
            }
            let n = queue.commands.len().min(MAX_BATCH);
            let rest = queue.commands.split_off(n);
            std::mem::replace(&mut queue.commands, rest)
        };
        self.lock_worker().guarded(|worker| worker.process(batch));
        true
    }

    /// The ledger's thread: purges expired keys, probes a failing store, and at the end stores
    /// what only memory holds.
    fn run_timer(&self, stop: mpsc::Receiver<()>, purge_every: Duration) {
        let mut next_purge = Instant::now() + purge_every;
        loop {
            // Never asleep for longer than a probe's interval: a write may fail meanwhile, and
            // the failing store is then probed within a second, so readiness recovers without
            // waiting for traffic (or for the next purge, up to 10 s away).
            let wait = if self.shared.fault().is_some() {
                PROBE_EVERY.min(purge_every)
            } else {
                next_purge
                    .saturating_duration_since(Instant::now())
                    .min(PROBE_EVERY)
            };
            match stop.recv_timeout(wait) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let probing = self.shared.fault().is_some();
            if probing || Instant::now() >= next_purge {
                self.lock_worker().guarded(Worker::purge);
                next_purge = Instant::now() + purge_every;
            }
        }
        // Shutting down: whatever is still queued (nothing once the servers have drained),
        // then what only memory holds.
        while self.write_batch() {}
        let mut worker = self.lock_worker();
        worker.guarded(Worker::flush);
        // Closed now rather than with the last handle (a writer task may still hold one for a
        // moment): the database's lock goes with it, so an exporter started again on it in
        // the same process finds it free once this thread is joined.
        worker.store = Box::new(crate::store::Closed);
    }
}

/// The store and what writing to it takes; behind a lock, so one batch or purge writes at a time.
struct Worker {
    /// Where batches go; replaced by a closed store at shutdown, releasing the database's lock.
    store: Box<dyn Store>,
    /// The state batches are applied to, and where the store's fault is reported.
    shared: Arc<Shared>,
    /// Changes applied in memory whose counts are not stored yet (rejections and errors counted
    /// while the store was failing); written with the next batch.
    unsaved: Vec<Change>,
    /// To rebuild the state from the store with the same limits.
    limits: Limits,
    /// The time of a batch or purge: [`now_ms`], but for tests that set the clock back.
    clock: Clock,
    /// A step panicked midway: memory may hold changes the store does not, so it is rebuilt
    /// from the store before anything else is recorded.
    suspect: bool,
    /// When a batch write last failed, while no write has succeeded since. Until a probe
    /// interval has passed, batches fail without trying the store: a failed write reconnects and
    /// reads the unfolded log again, under the state's lock, and with a large log (60,000 live
    /// streams) each took hundreds of milliseconds, so a storage outage slowed every callback
    /// and scrape down to a crawl.
    failed_at: Option<Instant>,
    /// The storage outage under way, logged when it ends.
    outage: Option<Outage>,
    /// Every batch write is timed and counted here.
    stats: CommitStats,
}

/// A storage outage, from the first failure to the next success, for the line that says it
/// ended. Each refused callback is logged at debug only while an outage is known (its cause
/// was logged once): at a mass reconnect, a line each would be thousands a second.
pub(crate) struct Outage {
    /// When the store first failed.
    since: Instant,
    /// Callbacks answered 503 since.
    refused: u64,
}

impl Outage {
    /// Notes that the store fails; an outage under way goes on.
    pub(crate) fn begin(outage: &mut Option<Outage>) {
        outage.get_or_insert_with(|| Outage {
            since: Instant::now(),
            refused: 0,
        });
    }

    /// A callback answered 503, during the outage if one is under way (one that is not, is
    /// answered 503 at its deadline, and logged as an error on its own).
    pub(crate) fn refused(outage: &mut Option<Outage>) {
        if let Some(outage) = outage {
            outage.refused += 1;
        }
    }

    /// Ends the outage: how long it lasted (seconds, to a tenth) and the callbacks it refused,
    /// for the store's line that says it recovered.
    pub(crate) fn end(outage: &mut Option<Outage>) -> (f64, u64) {
        outage.take().map_or((0.0, 0), |o| {
            let tenths = (o.since.elapsed().as_secs_f64() * 10.0).round();
            (tenths / 10.0, o.refused)
        })
    }
}

impl Worker {
    /// Runs one step (a batch, a purge). A panic in it is a bug, none is known; it must not
    /// stop the ledger, nor leave memory ahead of the store, where a retried event would be
    /// found delivered and answered 200 without being stored. The requests of the step are
    /// answered 503 (their reply senders are dropped), and the state is rebuilt from the store.
    fn guarded(&mut self, step: impl FnOnce(&mut Worker)) {
        if catch_unwind(AssertUnwindSafe(|| step(self))).is_ok() {
            return;
        }
        tracing::error!("a ledger step panicked; its callbacks were answered 503 and the state is rebuilt from the store");
        self.suspect = true;
        self.trustworthy();
    }

    /// Whether memory agrees with the store, rebuilding it first if a step panicked. While it
    /// cannot be rebuilt, the store is reported failing and nothing is recorded.
    fn trustworthy(&mut self) -> bool {
        if !self.suspect {
            return true;
        }
        let snapshot = match self.store.reload() {
            // Memory is the only truth; it stays as the panic left it.
            None => {
                self.suspect = false;
                return true;
            }
            Some(Ok(snapshot)) => snapshot,
            Some(Err(e)) => {
                self.failing(format!("rebuilding the state after a panic: {e}"));
                return false;
            }
        };
        match Truth::restore(snapshot, self.limits, (self.clock)()) {
            Ok(truth) => {
                let old = std::mem::replace(&mut *self.shared.truth.write(), truth);
                drop(old);
                release_freed_memory();
                // Counts that only memory held are lost with it.
                self.unsaved.clear();
                self.suspect = false;
                self.failed_at = None;
                tracing::info!("state rebuilt from the store");
                self.healthy();
                true
            }
            Err(reason) => {
                self.failing(format!("rebuilding the state after a panic: {reason}"));
                false
            }
        }
    }

    /// Stores what only memory holds, at shutdown: tried whenever the store last failed.
    fn flush(&mut self) {
        if !self.unsaved.is_empty() {
            self.failed_at = None;
            self.process(Vec::new());
        }
        if !self.unsaved.is_empty() {
            tracing::warn!(
                series = self.unsaved.len(),
                "storage failing: callback counts not stored yet (refused callbacks, errors) are lost; those tencent_css_callbacks_total series restart lower"
            );
        }
    }

    fn process(&mut self, batch: Vec<Command>) {
        if !self.trustworthy() {
            let message = self.shared.fault().unwrap_or_default();
            for cmd in batch {
                if let Command::Record { reply, .. } = cmd {
                    Outage::refused(&mut self.outage);
                    let _ = reply.send(Err(Unrecorded(message.clone())));
                }
            }
            return;
        }
        let now = (self.clock)();
        // The state's lock is held through the write, so a scrape never sees an event that may
        // yet be undone; taken through a handle of its own, as the worker changes meanwhile.
        let shared = Arc::clone(&self.shared);
        let mut truth = shared.truth.write();
        // Changes that only count (stored with this batch, kept if it fails), and the events
        // with their changes and their callers.
        let mut counts = std::mem::take(&mut self.unsaved);
        let mut events = Vec::with_capacity(batch.len());
        let mut counted = Vec::new();
        for cmd in batch {
            match cmd {
                // Its request was answered 503 at its deadline while an earlier batch was
                // written: not recorded, so that Tencent's retry is.
                Command::Record { event, reply } if reply.is_closed() => {
                    counts.push(truth.count(event.kind(), Outcome::Error));
                }
                Command::Record { event, reply } => {
                    let change = truth.apply(&event, now);
                    events.push((event, change, reply));
                }
                Command::Count {
                    kind,
                    outcome,
                    done,
                } => {
                    counts.push(truth.count(kind, outcome));
                    counted.push(done);
                }
            }
        }
        let resting = self
            .failed_at
            .is_some_and(|failed| failed.elapsed() < PROBE_EVERY);
        let result = match resting.then(|| self.shared.fault()).flatten() {
            Some(fault) => Err(fault),
            None => {
                let commit = truth.commit_of(counts.iter().chain(events.iter().map(|e| &e.1)));
                let started = Instant::now();
                let result = self.store.write(&commit, now).map_err(|e| e.to_string());
                self.stats.written(
                    started.elapsed(),
                    events.len() + counted.len(),
                    result.is_ok(),
                );
                self.failed_at = result.is_err().then(Instant::now);
                result
            }
        };
        for done in counted {
            let _ = done.send(());
        }
        match result {
            Ok(()) => {
                // Answered under the lock: a request answered 503 at its deadline while this
                // batch was written has its event stored, and its callback counts as an error,
                // as Tencent was told. No scrape sees it counted otherwise in between, which
                // would make the counter go down; and the move is stored at once, not with the
                // next batch, so that a crash before it does not take it back.
                for (event, change, reply) in events {
                    if reply.send(Ok(change.outcome)).is_err() {
                        self.unsaved
                            .push(truth.reanswer(event.kind(), change.outcome));
                    }
                }
                drop(truth);
                self.healthy();
                if !self.unsaved.is_empty() {
                    self.process(Vec::new());
                }
            }
            Err(message) => {
                // Failing (readiness, the once-a-second try) before any callback is answered.
                self.failing(message.clone());
                // Undo the events (last first); counts of rejected callbacks and of these
                // errors stay in memory and are stored with the next batch that succeeds.
                for (_, change, _) in events.iter().rev() {
                    truth.undo(change);
                }
                for (event, change, reply) in events {
                    // A retry of an event stored before this batch (or an event that is only
                    // acknowledged) changes nothing but its count: it is answered 200 like a
                    // rejection is answered, its count kept for the next batch. Decided again
                    // on what is stored, since its original may have been in this batch.
                    if change.outcome != Outcome::Accepted {
                        let again = truth.apply(&event, now);
                        if again.outcome != Outcome::Accepted {
                            counts.push(match reply.send(Ok(again.outcome)) {
                                Ok(()) => again,
                                Err(_) => truth.reanswer(event.kind(), again.outcome),
                            });
                            continue;
                        }
                        truth.undo(&again);
                    }
                    counts.push(truth.count(event.kind(), Outcome::Error));
                    Outage::refused(&mut self.outage);
                    let _ = reply.send(Err(Unrecorded(message.clone())));
                }
                self.unsaved = Truth::counts_to_store(counts);
            }
        }
    }

    fn purge(&mut self) {
        if !self.trustworthy() {
            return;
        }
        let now = (self.clock)();
        let (expired, latest) = {
            let mut truth = self.shared.truth.write();
            (truth.expire(now), truth.latest_expiry(now))
        };
        // Freed here, after the lock is released: scrapes do not wait for the deallocation.
        let purged = expired.len();
        drop(expired);
        // After the clock was set back, the keys stored while it was ahead come down with
        // those in memory (a read of the newest row otherwise).
        let result = self
            .store
            .cap_expiry(latest)
            .and_then(|()| self.store.purge(now));
        match result {
            Ok(()) => {
                tracing::debug!(purged, "expired delivered keys purged");
                // The store answers again: the next batch tries it.
                self.failed_at = None;
                if !self.unsaved.is_empty() {
                    self.process(Vec::new());
                } else {
                    self.healthy();
                }
            }
            Err(e) => self.failing(e.to_string()),
        }
    }

    fn healthy(&mut self) {
        if let Some(fault) = self.shared.fault() {
            let (seconds, refused) = Outage::end(&mut self.outage);
            tracing::info!(was = %fault, seconds, refused, "storage recovered");
            self.shared.set_fault(None);
            release_freed_memory();
        }
    }

    fn failing(&mut self, message: String) {
        if self.shared.fault().as_deref() != Some(&message) {
            tracing::error!(error = %message, "storage failing: callbacks are refused with 503 until it recovers");
        }
        Outage::begin(&mut self.outage);
        self.shared.set_fault(Some(message));
    }
}

/// Gives the memory of the loaded rows back to the system once they became the state. They
/// lie under what the state allocated while they were read, so glibc cannot shrink its heap by
/// itself: with a million live streams, about 90 MiB kept for nothing. A few milliseconds, once.
/// Also once a failing store recovers: what its tries read and copied was freed on whichever
/// threads wrote, and glibc kept each thread's share (60,000 live streams and 20 outages of a
/// second: 31 MiB of RSS grew to 98 MiB; 31-34 MiB with this).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Wall-clock time in unix seconds.
pub fn now_secs() -> i64 {
    now_ms().div_euclid(1000)
}

/// Wall-clock time in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::area::Area;
    use crate::callback::{StreamEvent, StreamKey};
    use crate::state::counters::{Series, Value};
    use crate::state::{Commit, Snapshot};
    use crate::store::{MemoryStore, SqliteStore, SyncMode};

    /// How a [`Faulty`] store's writes go wrong while it is armed.
    #[derive(Clone)]
    enum Fault {
        /// The next write panics, before it writes anything (a bug), once.
        Panic,
        /// Every write fails (a full disk), for as long as it is armed.
        Fail,
        /// The next write waits until this is set (a database another process holds), once, and
        /// 10 s at most. A gate rather than a fixed time: a test on a loaded machine may not
        /// look again before a fixed time is over.
        Held(Arc<AtomicBool>),
    }

    /// A store that goes wrong when told to.
    struct Faulty<S> {
        inner: S,
        armed: Arc<AtomicBool>,
        fault: Fault,
    }

    impl<S: Store> Store for Faulty<S> {
        fn load(&mut self) -> Result<Snapshot, StoreError> {
            self.inner.load()
        }

        fn write(&mut self, commit: &Commit, now_ms: i64) -> Result<(), StoreError> {
            match &self.fault {
                Fault::Panic if self.armed.swap(false, Ordering::SeqCst) => {
                    panic!("injected panic in a store write")
                }
                Fault::Fail if self.armed.load(Ordering::SeqCst) => {
                    return Err(StoreError::Invalid {
                        path: "test".into(),
                        reason: "disk full".into(),
                    })
                }
                Fault::Held(release) if self.armed.swap(false, Ordering::SeqCst) => {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                _ => {}
            }
            self.inner.write(commit, now_ms)
        }

        fn purge(&mut self, now_ms: i64) -> Result<(), StoreError> {
            self.inner.purge(now_ms)
        }

        fn cap_expiry(&mut self, until_ms: i64) -> Result<(), StoreError> {
            self.inner.cap_expiry(until_ms)
        }

        fn reload(&mut self) -> Option<Result<Snapshot, StoreError>> {
            self.inner.reload()
        }
    }

    /// A store that goes wrong as `fault` says while armed, and its switch.
    fn faulty<S: Store>(inner: S, fault: Fault, armed: bool) -> (Arc<AtomicBool>, Faulty<S>) {
        let armed = Arc::new(AtomicBool::new(armed));
        let store = Faulty {
            inner,
            armed: armed.clone(),
            fault,
        };
        (armed, store)
    }

    /// A database in a temporary folder (removed when dropped), its path, and a faulty store on
    /// it with its switch.
    fn faulty_database(
        fault: Fault,
        armed: bool,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Arc<AtomicBool>,
        Faulty<SqliteStore>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exporter.db");
        let inner = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
        let (armed, store) = faulty(inner, fault, armed);
        (dir, path, armed, store)
    }

    fn push(id: &str, sequence: &str) -> Event {
        Event::Push(StreamEvent {
            stream: StreamKey {
                app: "d.example.com".into(),
                appname: "live".into(),
                stream_id: id.into(),
            },
            sequence: sequence.into(),
            event_time: Some(1_700_000_000),
            area: Area::Mainland,
        })
    }

    fn start(store: impl Store + 'static) -> (Ledger, LedgerThread) {
        Ledger::start(Box::new(store), Duration::from_secs(3600)).unwrap()
    }

    /// Stores what is left and stops, as at shutdown.
    fn stop(ledger: Ledger, thread: LedgerThread) {
        ledger.close();
        drop(ledger);
        thread.join();
    }

    async fn record(ledger: &Ledger, event: Event) -> Result<Outcome, Unrecorded> {
        tokio::time::timeout(Duration::from_secs(10), ledger.record(event))
            .await
            .expect("the ledger answers")
    }

    fn live(ledger: &Ledger) -> usize {
        ledger.shared().truth.read().live_total()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_batch_is_refused_and_the_state_rebuilt_from_the_store() {
        let (_dir, path, armed, store) = faulty_database(Fault::Panic, false);
        let (ledger, thread) = start(store);

        assert_eq!(
            record(&ledger, push("a", "1")).await.unwrap(),
            Outcome::Accepted
        );
        armed.store(true, Ordering::SeqCst);
        assert!(record(&ledger, push("b", "2")).await.is_err());
        // Not stored, so not in memory either: its retry is recorded, not taken for a duplicate.
        assert_eq!(
            record(&ledger, push("b", "2")).await.unwrap(),
            Outcome::Accepted
        );
        assert_eq!(live(&ledger), 2);
        assert!(ledger.shared().fault().is_none());
        assert_eq!(
            record(&ledger, push("c", "3")).await.unwrap(),
            Outcome::Accepted
        );
        assert_eq!(
            record(&ledger, push("c", "3")).await.unwrap(),
            Outcome::Duplicate
        );
        assert_eq!(live(&ledger), 3);
        stop(ledger, thread);

        let (ledger, thread) = start(SqliteStore::open(path, SyncMode::Normal).unwrap());
        assert_eq!(live(&ledger), 3);
        assert_eq!(
            record(&ledger, push("b", "2")).await.unwrap(),
            Outcome::Duplicate
        );
        stop(ledger, thread);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_memory_only_a_panicking_batch_does_not_stop_the_ledger() {
        let (_armed, store) = faulty(MemoryStore, Fault::Panic, true);
        let (ledger, thread) = start(store);
        assert!(record(&ledger, push("a", "1")).await.is_err());
        assert!(record(&ledger, push("b", "2")).await.is_ok());
        stop(ledger, thread);
    }

    fn push_to(app: &str, id: &str, sequence: &str) -> Event {
        let Event::Push(mut s) = push(id, sequence) else {
            unreachable!()
        };
        s.stream.app = app.into();
        Event::Push(s)
    }

    /// What `read` takes from the ledger's counters.
    fn counted<T>(ledger: &Ledger, read: impl FnOnce(&crate::state::counters::Counters) -> T) -> T {
        read(ledger.shared().truth.read().counters())
    }

    /// `tencent_css_callbacks_total` of pushes with `outcome`.
    fn pushes(ledger: &Ledger, outcome: Outcome) -> Value {
        counted(ledger, |c| {
            c.value(&Series::Callbacks(EventKind::Push, outcome))
        })
    }

    /// `tencent_css_active_streams` as `/metrics` shows it.
    fn active(ledger: &Ledger) -> Vec<(String, Area, u64)> {
        let truth = ledger.shared().truth.read();
        truth
            .live_streams()
            .into_iter()
            .map(|((d, a), n)| (d.to_string(), a, n))
            .collect()
    }

    /// A batch that cannot be stored leaves nothing behind: not the domain it admitted under
    /// the cap, not a live series at 0; what is shown equals what a restart shows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_admits_no_domain_and_leaves_no_series() {
        let (_dir, path, failing, store) = faulty_database(Fault::Fail, true);
        let hour = Duration::from_secs(3600);
        let (ledger, thread) = Ledger::start_with_limits(Box::new(store), hour, 1).unwrap();
        assert!(record(&ledger, push_to("a.com", "a1", "1")).await.is_err());
        assert_eq!(active(&ledger), []);
        failing.store(false, Ordering::SeqCst);
        recovered(&ledger).await;
        assert_eq!(
            record(&ledger, push_to("b.com", "b1", "2")).await.unwrap(),
            Outcome::Accepted
        );
        let shown = active(&ledger);
        assert_eq!(shown, [("b.com".into(), Area::Mainland, 1)]);
        assert_eq!(counted(&ledger, |c| c.domains_overflow), 0);
        stop(ledger, thread);

        // The ledger's thread closed the store (and freed its lock) as it ended.
        let store = SqliteStore::open(path, SyncMode::Normal).unwrap();
        let (ledger, thread) = Ledger::start_with_limits(Box::new(store), hour, 1).unwrap();
        assert_eq!(active(&ledger), shown);
        stop(ledger, thread);
    }

    /// While the store fails, a retry of an event stored before is acknowledged as a duplicate
    /// (its count stored later); an event whose original was in the failing batch is not.
    #[tokio::test(flavor = "current_thread")]
    async fn a_retry_of_a_stored_event_is_acknowledged_while_the_store_fails() {
        let (failing, store) = faulty(MemoryStore, Fault::Fail, false);
        let (ledger, thread) = start(store);
        let duplicates = || pushes(&ledger, Outcome::Duplicate);
        assert_eq!(
            record(&ledger, push("a", "1")).await.unwrap(),
            Outcome::Accepted
        );
        failing.store(true, Ordering::SeqCst);
        assert_eq!(
            record(&ledger, push("a", "1")).await.unwrap(),
            Outcome::Duplicate
        );
        assert!(record(&ledger, push("b", "2")).await.is_err());
        // One batch (the writer runs once both are queued, on this one thread): the second is
        // a duplicate of the first only as long as the first stands.
        let (first, retry) = tokio::join!(
            record(&ledger, push("c", "3")),
            record(&ledger, push("c", "3"))
        );
        assert!(first.is_err() && retry.is_err(), "{first:?} {retry:?}");
        assert_eq!(duplicates(), Value::Count(1));
        failing.store(false, Ordering::SeqCst);
        recovered(&ledger).await;
        assert_eq!(
            record(&ledger, push("c", "3")).await.unwrap(),
            Outcome::Accepted
        );
        assert_eq!(live(&ledger), 2);
        assert_eq!(duplicates(), Value::Count(1));
        stop(ledger, thread);
    }

    /// While the store fails for a long time, the counts waiting to be stored stay one a
    /// series, however many callbacks are refused; all of them are stored once it recovers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_kept_while_the_store_fails_do_not_grow_with_the_callbacks() {
        let (_dir, path, failing, store) = faulty_database(Fault::Fail, true);
        let (ledger, thread) = start(store);
        for n in 0..300 {
            assert!(record(&ledger, push("a", &n.to_string())).await.is_err());
            ledger.count(EventKind::Push, Outcome::BadSignature).await;
        }
        // Errors and bad signatures of pushes.
        assert_eq!(ledger.inner.lock_worker().unsaved.len(), 2);
        failing.store(false, Ordering::SeqCst);
        recovered(&ledger).await;
        assert_eq!(
            record(&ledger, push("b", "1")).await.unwrap(),
            Outcome::Accepted
        );
        stop(ledger, thread);
        let (ledger, thread) = start(SqliteStore::open(path, SyncMode::Normal).unwrap());
        for (outcome, n) in [
            (Outcome::Error, 300),
            (Outcome::BadSignature, 300),
            (Outcome::Accepted, 1),
        ] {
            assert_eq!(pushes(&ledger, outcome), Value::Count(n), "{outcome:?}");
        }
        stop(ledger, thread);
    }

    /// While the store fails, it is tried once a probe interval, not at every batch; callbacks
    /// meanwhile get their error at once, and it recovers within the probe interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_is_tried_once_a_probe_interval() {
        let (failing, store) = faulty(MemoryStore, Fault::Fail, true);
        let (ledger, thread) = start(store);
        let started = Instant::now();
        for n in 0..50 {
            assert!(record(&ledger, push("a", &n.to_string())).await.is_err());
        }
        // Tried at the first callback, and once a second after: the calls took under 3 s.
        let failures = ledger.commit_stats().failures();
        // The probe's try, once a second from the ledger's start, may come in between.
        let tries = 2 + started.elapsed().as_secs();
        assert!((1..=tries).contains(&failures), "{failures} writes tried");
        assert_eq!(pushes(&ledger, Outcome::Error), Value::Count(50));
        failing.store(false, Ordering::SeqCst);
        recovered(&ledger).await;
        assert_eq!(
            record(&ledger, push("b", "1")).await.unwrap(),
            Outcome::Accepted
        );
        stop(ledger, thread);
    }

    /// At shutdown, what only memory holds is stored even if the store failed a moment ago.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stores_the_counts_of_a_store_that_just_recovered() {
        let (_dir, path, failing, store) = faulty_database(Fault::Fail, true);
        let (ledger, thread) = start(store);
        assert!(record(&ledger, push("a", "1")).await.is_err());
        failing.store(false, Ordering::SeqCst);
        stop(ledger, thread);
        let (ledger, thread) = start(SqliteStore::open(path, SyncMode::Normal).unwrap());
        assert_eq!(pushes(&ledger, Outcome::Error), Value::Count(1));
        stop(ledger, thread);
    }

    /// A request that gave up at its deadline (answered 503) counts as an error: its event is
    /// not recorded if its batch had not begun, recorded if it was being written (and
    /// Tencent's retry is then a duplicate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_gave_up_counts_as_an_error() {
        let release = Arc::new(AtomicBool::new(false));
        let (_dir, path, slow, store) = faulty_database(Fault::Held(release.clone()), true);
        let (ledger, thread) = start(store);
        let stored_errors = || -> i64 {
            rusqlite::Connection::open(&path)
                .unwrap()
                .query_row(
                    "SELECT value FROM current_series WHERE metric = 'callbacks_total'
                        AND labels = '[\"push\",\"error\"]'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(0)
        };
        let push_outcome = |outcome| pushes(&ledger, outcome);
        // The slow write takes its turn (and disarms itself) once it begins. Watched from a
        // thread of the blocking pool, not with the runtime's timers: the held write blocks a
        // worker, and the runtime's timers may then not fire until it ends (seen under load:
        // the wait outlasted the write, whose request was answered).
        let write_began = || {
            let slow = slow.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    while slow.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .await
                .unwrap()
            }
        };
        // Gave up while its batch was written.
        tokio::select! {
            answer = ledger.record(push("a", "1")) => panic!("answered: {answer:?}"),
            () = write_began() => {}
        }
        release.store(true, Ordering::SeqCst);
        eventually(|| push_outcome(Outcome::Error) == Value::Count(1)).await;
        assert_eq!(push_outcome(Outcome::Accepted), Value::Count(0));
        assert_eq!(live(&ledger), 1, "recorded");
        // Stored at once, not with the next batch (none comes here) or purge (10 s away).
        let deadline = Instant::now() + Duration::from_secs(2);
        while stored_errors() != 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(stored_errors(), 1);
        assert_eq!(
            record(&ledger, push("a", "1")).await.unwrap(),
            Outcome::Duplicate
        );
        // Gave up before its batch began: queued behind a slow batch, then dropped.
        release.store(false, Ordering::SeqCst);
        slow.store(true, Ordering::SeqCst);
        let before = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.record(push("c", "3")).await }
        });
        write_began().await;
        {
            // Queued, then given up before an answer: polled once (a timeout would need the
            // runtime's timers, which the held write may stall), then dropped.
            let mut queued = std::pin::pin!(ledger.record(push("b", "2")));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(std::future::Future::poll(queued.as_mut(), &mut cx).is_pending());
        }
        release.store(true, Ordering::SeqCst);
        assert_eq!(before.await.unwrap().unwrap(), Outcome::Accepted);
        eventually(|| push_outcome(Outcome::Error) == Value::Count(2)).await;
        assert_eq!(live(&ledger), 2, "not recorded");
        assert_eq!(
            record(&ledger, push("b", "2")).await.unwrap(),
            Outcome::Accepted
        );
        assert_eq!(push_outcome(Outcome::Accepted), Value::Count(2));
        stop(ledger, thread);
    }

    /// Waits for the store's next probe (within a second) to find it healthy again.
    async fn recovered(ledger: &Ledger) {
        eventually(|| ledger.shared().fault().is_none()).await;
    }

    /// Waits up to 10 s for `done`.
    async fn eventually(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the test below sets its ledger's clock to.
    static CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

    /// Started on a clock a day ahead (a machine that booted on local time), then set right:
    /// the keys delivered meanwhile are forgotten a window after the correction, in memory and
    /// in the database, and the last callback's time follows the clock back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clock_set_back_does_not_keep_keys_or_the_last_callback_ahead() {
        const T: i64 = 1_700_000_000_000;
        const DAY: i64 = 86_400_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exporter.db");
        let store = SqliteStore::open(path.clone(), SyncMode::Normal).unwrap();
        CLOCK.store(T + DAY, Ordering::SeqCst);
        // Purged every second (half the window).
        let window = Duration::from_secs(2);
        let (ledger, thread) =
            Ledger::launch(Box::new(store), window, 10, || CLOCK.load(Ordering::SeqCst)).unwrap();
        let disconnect = |id: &str, sequence: &str| {
            let Event::Push(session) = push(id, sequence) else {
                unreachable!()
            };
            Event::Disconnect {
                session,
                errcode: 0,
                push_duration_ms: None,
            }
        };
        for event in [push("a", "1"), disconnect("a", "1")] {
            record(&ledger, event).await.unwrap();
        }
        CLOCK.store(T, Ordering::SeqCst);
        for event in [push("b", "2"), disconnect("b", "2")] {
            record(&ledger, event).await.unwrap();
        }
        assert_eq!(counted(&ledger, |c| c.last_callback_ms), T);
        // The next purge brings the stored expiries down to a window from now.
        let stored = |sql: &str| -> i64 {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.query_row(sql, [], |r| r.get(0)).unwrap()
        };
        let latest_stored = || stored("SELECT coalesce(max(expires_ms), 0) FROM delivered");
        let deadline = Instant::now() + Duration::from_secs(20);
        while latest_stored() > T + 3_000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(latest_stored() <= T + 3_000, "{}", latest_stored() - T);
        // Every key has had its window from the correction: all are forgotten.
        CLOCK.store(T + 10_000, Ordering::SeqCst);
        let rows = || stored("SELECT count(*) FROM delivered");
        let held = || ledger.shared().truth.read().delivered_len();
        while (held() > 0 || rows() > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!((held(), rows()), (0, 0), "keys left in memory and stored");
        stop(ledger, thread);
    }
}
