//! The ledger: the one thread that changes the state and writes it to the store.
//!
//! HTTP handlers send it verified events and wait for the answer. It takes whatever is queued
//! as one batch (group commit): applies every event to the state, writes the batch in one
//! transaction, and only then answers each request. If the write fails, the batch is undone in
//! memory and every request of it gets an error (503, so Tencent retries).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::callback::{Event, EventKind, Outcome};
use crate::state::{Change, Limits, Truth};

/// `--metrics.max-domains` default.
pub const DEFAULT_MAX_DOMAINS: usize = 10_000;
use crate::store::{Store, StoreError};

/// Largest batch written in one transaction; bounds the latency of the first request of a burst.
const MAX_BATCH: usize = 4096;
/// How often expired delivered keys are purged while the store is healthy (more often when the
/// dedup window is short).
const PURGE_EVERY: Duration = Duration::from_secs(10);
/// How long the ledger polls for the next command before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// How often a failing store is probed, so readiness recovers without waiting for a callback.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the HTTP side and the metrics read.
#[derive(Debug)]
pub struct Shared {
    /// The state; written only by the ledger thread, read by scrapes.
    pub truth: RwLock<Truth>,
    /// Why the store is failing, while it is.
    pub fault: Mutex<Option<String>>,
}

impl crate::metrics::ViewSource for Shared {
    /// Copies the numbers out under the read lock, so a scrape holds the ledger up only for the
    /// copy (no strings are built under it; sorting and writing the text come after).
    fn fill(&self, frame: &mut crate::metrics::Frame) {
        let truth = self.truth.read().unwrap_or_else(|e| e.into_inner());
        frame.fill(truth.live(), truth.counters());
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

/// The store could not record the event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event not recorded: {0}")]
pub struct Unrecorded(pub String);

enum Command {
    /// A verified event; answered once its batch is durable.
    Record {
        event: Event,
        reply: oneshot::Sender<Result<Outcome, Unrecorded>>,
    },
    /// A callback that changes nothing but its count (rejected ones). Answered once counted in
    /// memory, so a scrape after the answer sees it; stored with the next batch that commits.
    Count {
        kind: EventKind,
        outcome: Outcome,
        done: oneshot::Sender<()>,
    },
    /// Store what is queued and stop.
    Close,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// Owns the ledger thread; dropping every [`Ledger`] then calling [`LedgerThread::join`]
/// drains and persists what is queued.
pub struct LedgerThread(JoinHandle<()>);

impl LedgerThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the ledger thread panicked");
        }
    }
}

impl Ledger {
    /// Loads the state from `store` and starts the ledger thread, with the default domain cap.
    pub fn start(
        store: Box<dyn Store>,
        dedup_window: Duration,
    ) -> Result<(Ledger, LedgerThread), StoreError> {
        Self::start_with_limits(store, dedup_window, DEFAULT_MAX_DOMAINS)
    }

    /// Loads the state from `store` and starts the ledger thread.
    pub fn start_with_limits(
        mut store: Box<dyn Store>,
        dedup_window: Duration,
        max_domains: usize,
    ) -> Result<(Ledger, LedgerThread), StoreError> {
        let limits = Limits {
            dedup_window_ms: dedup_window.as_millis().min(i64::MAX as u128) as i64,
            max_domains,
        };
        let snapshot = store.load()?;
        let truth =
            Truth::restore(snapshot, limits, now_ms()).map_err(|reason| StoreError::Invalid {
                path: "state".into(),
                reason,
            })?;
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
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            rx,
            store,
            shared: shared.clone(),
            unsaved: Vec::new(),
            purge_every: (dedup_window / 2).clamp(Duration::from_millis(100), PURGE_EVERY),
        };
        let handle = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || worker.run())
            .expect("spawn the ledger thread");
        Ok((Ledger { tx, shared }, LedgerThread(handle)))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Records a verified event; resolves once it is durable (or could not be made so).
    pub async fn record(&self, event: Event) -> Result<Outcome, Unrecorded> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Record { event, reply })
            .map_err(|_| Unrecorded("the ledger has stopped".into()))?;
        answer
            .await
            .map_err(|_| Unrecorded("the ledger has stopped".into()))?
    }

    /// Asks the thread to store what is queued and stop (after the HTTP servers have drained).
    pub fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }

    /// Counts a callback that changes nothing else; resolves once the count is visible.
    pub async fn count(&self, kind: EventKind, outcome: Outcome) {
        let (done, counted) = oneshot::channel();
        if self
            .tx
            .send(Command::Count {
                kind,
                outcome,
                done,
            })
            .is_ok()
        {
            let _ = counted.await;
        }
    }
}

struct Worker {
    rx: mpsc::Receiver<Command>,
    store: Box<dyn Store>,
    shared: Arc<Shared>,
    /// Changes applied in memory whose counts are not stored yet (rejections and errors counted
    /// while the store was failing); written with the next batch.
    unsaved: Vec<Change>,
    purge_every: Duration,
}

impl Worker {
    fn run(mut self) {
        let mut next_purge = Instant::now() + self.purge_every;
        loop {
            let wait = next_purge.saturating_duration_since(Instant::now());
            match self.next(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(cmd) => batch.push(cmd),
                            Err(_) => break,
                        }
                    }
                    let closing = batch.iter().any(|c| matches!(c, Command::Close));
                    self.process(batch);
                    if closing {
                        break;
                    }
                    if self.shared.fault().is_some() {
                        // Probe soon, so readiness recovers without waiting for traffic.
                        next_purge = next_purge.min(Instant::now() + PROBE_EVERY);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_purge {
                self.purge();
                let healthy = self.shared.fault().is_none();
                next_purge = Instant::now()
                    + if healthy {
                        self.purge_every
                    } else {
                        PROBE_EVERY.min(self.purge_every)
                    };
            }
        }
        // Shutting down: store what only memory holds.
        if !self.unsaved.is_empty() {
            self.process(Vec::new());
        }
    }

    /// The next command, waiting up to `wait`. Polls for a short while first: under load the
    /// next callback usually arrives within microseconds, and catching it awake saves the
    /// wake-up of a sleeping thread, which on a busy machine can cost a scheduler slice.
    fn next(&self, wait: Duration) -> Result<Command, RecvTimeoutError> {
        let spin_until = Instant::now() + SPIN;
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => return Ok(cmd),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(RecvTimeoutError::Disconnected)
                }
                Err(mpsc::TryRecvError::Empty) if Instant::now() < spin_until => {
                    std::thread::yield_now()
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        self.rx.recv_timeout(wait.saturating_sub(SPIN))
    }

    fn process(&mut self, batch: Vec<Command>) {
        let now = now_ms();
        let mut truth = self.shared.truth.write().unwrap_or_else(|e| e.into_inner());
        let mut changes = std::mem::take(&mut self.unsaved);
        let mut replies = Vec::with_capacity(batch.len());
        let mut counted = Vec::new();
        for cmd in batch {
            match cmd {
                Command::Record { event, reply } => {
                    changes.push(truth.apply(&event, now));
                    replies.push((event.kind(), changes.len() - 1, reply));
                }
                Command::Count {
                    kind,
                    outcome,
                    done,
                } => {
                    changes.push(truth.count(kind, outcome));
                    counted.push(done);
                }
                Command::Close => {}
            }
        }
        let commit = truth.commit_of(&changes);
        let result = self.store.write(&commit, now);
        for done in counted {
            let _ = done.send(());
        }
        match result {
            Ok(()) => {
                drop(truth);
                self.healthy();
                for (_, i, reply) in replies {
                    let _ = reply.send(Ok(changes[i].outcome));
                }
            }
            Err(e) => {
                let message = e.to_string();
                // Undo the events (last first); counts of rejected callbacks and of these
                // errors stay in memory and are stored with the next batch that succeeds.
                let mut is_event = vec![false; changes.len()];
                for (_, i, _) in replies.iter().rev() {
                    truth.undo(&changes[*i]);
                    is_event[*i] = true;
                }
                let mut kept: Vec<Change> = changes
                    .into_iter()
                    .zip(is_event)
                    .filter(|(_, event)| !event)
                    .map(|(c, _)| c)
                    .collect();
                for (kind, _, reply) in replies {
                    kept.push(truth.count(kind, Outcome::Error));
                    let _ = reply.send(Err(Unrecorded(message.clone())));
                }
                self.unsaved = kept;
                drop(truth);
                self.failing(message);
            }
        }
    }

    fn purge(&mut self) {
        let now = now_ms();
        let expired = self
            .shared
            .truth
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .expire(now);
        // Freed here, after the lock is released: scrapes do not wait for the deallocation.
        let purged = expired.len();
        drop(expired);
        let result = self.store.purge(now);
        match result {
            Ok(()) => {
                tracing::debug!(purged, "expired delivered keys purged");
                if !self.unsaved.is_empty() {
                    self.process(Vec::new());
                } else {
                    self.healthy();
                }
            }
            Err(e) => self.failing(e.to_string()),
        }
    }

    fn healthy(&self) {
        if let Some(fault) = self.shared.fault() {
            tracing::info!(was = %fault, "storage recovered");
            self.shared.set_fault(None);
        }
    }

    fn failing(&self, message: String) {
        if self.shared.fault().as_deref() != Some(&message) {
            tracing::error!(error = %message, "storage failing: callbacks are refused with 503 until it recovers");
        }
        self.shared.set_fault(Some(message));
    }
}

/// Gives the memory of the loaded rows back to the system once they became the state. They
/// lie under what the state allocated while they were read, so glibc cannot shrink its heap by
/// itself: with a million live streams, about 90 MiB kept for nothing. A few milliseconds, once.
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
