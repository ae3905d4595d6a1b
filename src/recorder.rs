//! Where verified callbacks are recorded: the local ledger (memory or SQLite, one process) or
//! Redis (the truth shared by several replicas). The HTTP side sees one interface.

use std::sync::Arc;

use prometheus::core::Collector;

use crate::callback::{Event, EventKind, Outcome};
use crate::ledger::{Ledger, Unrecorded};
use crate::metrics::{storage_ready, ViewSource};
use crate::redis::RedisLedger;

/// The recording backend.
#[derive(Clone)]
pub enum Recorder {
    Local(Ledger),
    Redis(Arc<RedisLedger>),
}

impl Recorder {
    /// Records a verified event; resolves once it is durable (or could not be made so).
    pub async fn record(&self, event: Event) -> Result<Outcome, Unrecorded> {
        match self {
            Recorder::Local(l) => l.record(event).await,
            // On a task of its own: the HTTP side gives up at its deadline (503) by dropping
            // this future, and the transition must still end, and count its error and set the
            // fault if it fails, as the local ledger's batch does.
            Recorder::Redis(r) => {
                let redis = r.clone();
                tokio::spawn(async move { redis.record(event).await })
                    .await
                    .unwrap_or_else(|e| Err(Unrecorded(format!("recording failed: {e}"))))
            }
        }
    }

    /// Stores what only memory holds before the process ends: the local ledger's last batch
    /// and counts (on its thread, joined by the caller), Redis's counts kept while it was away.
    pub async fn close(&self) {
        match self {
            Recorder::Local(l) => l.close(),
            Recorder::Redis(r) => r.close().await,
        }
    }

    /// Counts a callback that changes nothing else; resolves once the count is visible.
    pub async fn count(&self, kind: EventKind, outcome: Outcome) {
        match self {
            Recorder::Local(l) => l.count(kind, outcome).await,
            Recorder::Redis(r) => r.count(kind, outcome).await,
        }
    }

    /// Why recording is failing, while it is (for `/readyz`).
    pub fn fault(&self) -> Option<String> {
        match self {
            Recorder::Local(l) => l.shared().fault(),
            Recorder::Redis(r) => r.fault(),
        }
    }

    /// Brings the numbers to render up to date before a scrape.
    pub async fn refresh(&self) {
        if let Recorder::Redis(r) = self {
            r.refresh().await;
        }
    }

    /// The exporter's own storage metrics: readiness, the commits of this process, and what
    /// the store reports of itself.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let (stats, mut all) = match self {
            Recorder::Local(l) => (l.commit_stats(), l.store_collectors()),
            Recorder::Redis(r) => (r.commit_stats(), Vec::new()),
        };
        all.extend(stats.collectors());
        let recorder = self.clone();
        all.push(storage_ready(move || recorder.fault().is_none()));
        all
    }

    pub fn view_source(&self) -> Arc<dyn ViewSource> {
        match self {
            Recorder::Local(l) => l.shared().clone(),
            Recorder::Redis(r) => r.clone(),
        }
    }
}
