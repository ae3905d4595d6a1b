//! The exporter's own storage metrics (`tencent_css_exporter_storage_*`): what this process wrote
//! to its store and whether the store accepts writes.

use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, IntCounter, IntGauge};

/// The writes of this process to its store since it started: whether and how fast the store keeps
/// up, and how many callbacks share a commit (the ledger's group commit; with Redis each recorded
/// callback is a transaction of its own). Kept in memory only, like the process metrics: they
/// describe this process, not the events, so they start at 0 with it.
#[derive(Clone)]
pub struct CommitStats {
    /// How long each batch's write to the store took (a slow or saturated disk shows here
    /// before callbacks time out).
    duration: prometheus::Histogram,
    /// Batch writes attempted.
    commits: IntCounter,
    /// Batch writes the store refused; their callbacks got 503.
    failures: IntCounter,
    /// Callbacks answered by the writes that succeeded; over `commits`, the average batch.
    callbacks: IntCounter,
}

/// Upper bounds of `tencent_css_exporter_storage_commit_duration_seconds`: from a commit of a
/// few events in page cache to one waiting on a slow fsync or a lock.
const COMMIT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Default for CommitStats {
    fn default() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        CommitStats {
            duration: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "tencent_css_exporter_storage_commit_duration_seconds",
                    "Time taken to write one batch of callbacks to the store (with Redis: one callback).",
                )
                .buckets(COMMIT_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
            commits: counter(
                "tencent_css_exporter_storage_commits_total",
                "Batch writes to the store attempted since the exporter started.",
            ),
            failures: counter(
                "tencent_css_exporter_storage_commit_failures_total",
                "Batch writes the store refused since the exporter started (their callbacks got 503).",
            ),
            callbacks: counter(
                "tencent_css_exporter_storage_committed_callbacks_total",
                "Callbacks written by successful batch writes since the exporter started.",
            ),
        }
    }
}

impl CommitStats {
    /// The collectors to register for `/metrics`.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.duration.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.callbacks.clone()),
        ]
    }

    /// Batch writes the store refused so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    /// One write to the store, of `callbacks` callbacks, took `took`; `ok`: it succeeded.
    pub fn written(&self, took: Duration, callbacks: usize, ok: bool) {
        self.duration.observe(took.as_secs_f64());
        self.commits.inc();
        if ok {
            self.callbacks.inc_by(callbacks as u64);
        } else {
            self.failures.inc();
        }
    }
}

/// `tencent_css_exporter_storage_ready`: 1 while the store accepts writes, 0 while it fails (what
/// `/readyz` says), read at each scrape from the part that knows.
pub fn storage_ready(ready: impl Fn() -> bool + Send + Sync + 'static) -> Box<dyn Collector> {
    struct StorageReady<F> {
        gauge: IntGauge,
        ready: F,
    }
    impl<F: Fn() -> bool + Send + Sync> Collector for StorageReady<F> {
        fn desc(&self) -> Vec<&Desc> {
            self.gauge.desc()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            self.gauge.set(i64::from((self.ready)()));
            self.gauge.collect()
        }
    }
    Box::new(StorageReady {
        gauge: IntGauge::new(
            "tencent_css_exporter_storage_ready",
            "1 while the store accepts writes, 0 while it fails and callbacks get 503 (as /readyz).",
        )
        .expect("valid gauge"),
        ready,
    })
}
