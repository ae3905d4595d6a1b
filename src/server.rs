//! Wiring: open the store (or Redis), start the ledger, serve until shutdown, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::ledger::{Ledger, LedgerThread};
use crate::recorder::Recorder;
use crate::redis::RedisLedger;

/// How long to wait for Redis at start before giving up.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
use crate::metrics::Metrics;
use crate::scrape::Scrapes;
use crate::signature::{Keys, Verifier};
use crate::store::{self, StoreError};
use crate::web::{self, Connections, Limits};

/// The sockets the exporter serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub callback: TcpListener,
    /// Set when `/metrics` has a listener of its own.
    pub metrics: Option<TcpListener>,
}

/// Why the exporter could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Redis(String),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs the exporter until `shutdown` resolves, then stops accepting, finishes the requests in
/// flight, stores what is queued and returns. `keys` is `None` only with
/// `--callback.insecure-skip-verify`.
pub async fn run(
    config: &Config,
    keys: Option<Keys>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Shutdown is heeded from the start: loading a large database or waiting for Redis takes
    // a while, and a SIGTERM meanwhile should end the exporter cleanly, not be left unhandled.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let (recorder, thread) = tokio::select! {
        opened = open_recorder(config) => opened?,
        () = stopped() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let metrics = Metrics::new(recorder.view_source());
    for collector in recorder.collectors() {
        metrics.register(collector);
    }
    let callback_connections = Connections::new("callback", config.max_connections);
    let metrics_connections = listeners
        .metrics
        .as_ref()
        .map(|_| Connections::new("metrics", config.max_connections));
    metrics.register(web::connection_metrics(
        std::iter::once(callback_connections.clone())
            .chain(metrics_connections.clone())
            .collect(),
    ));
    let state = AppState {
        scrapes: Scrapes::start(Arc::new(metrics)),
        recorder,
        verifier: Arc::new(Verifier::new(
            keys,
            config.clock_skew.as_secs() as i64,
            config.max_validity.as_secs() as i64,
        )),
        callback_path: config.callback_path.as_str().into(),
        telemetry_path: config.telemetry_path.as_str().into(),
        request_timeout: config.request_timeout,
    };

    let limits = Limits {
        header_read_timeout: config.header_read_timeout,
        drain_timeout: config.request_timeout,
        write_timeout: config.request_timeout,
    };
    tracing::info!(
        address = %listeners.callback.local_addr()?,
        callback_path = %config.callback_path,
        "serving callbacks"
    );
    let callback_router = http::callback_router(state.clone(), listeners.metrics.is_none());
    let callback = web::serve(
        listeners.callback,
        callback_router,
        limits,
        callback_connections,
        stopped(),
    );
    let result = match listeners.metrics.zip(metrics_connections) {
        Some((metrics, connections)) => {
            tracing::info!(address = %metrics.local_addr()?, "serving metrics");
            let router = http::ops_router(state.clone());
            let metrics = web::serve(metrics, router, limits, connections, stopped());
            tokio::try_join!(callback, metrics).map(drop)
        }
        None => callback.await,
    };

    tracing::info!("stopped accepting; storing what is queued");
    state.recorder.close().await;
    drop(state);
    if let Some(thread) = thread {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joining the ledger does not panic");
    }
    result.map_err(RunError::Serve)
}

/// Redis when `--storage.redis-url` is set, else the local ledger on `--storage.path`.
async fn open_recorder(config: &Config) -> Result<(Recorder, Option<LedgerThread>), RunError> {
    let (window, max_domains) = (config.dedup_window, config.max_domains);
    if let Some(url) = &config.redis_url {
        let redis = RedisLedger::connect(
            url,
            &config.redis_prefix,
            window,
            max_domains,
            REDIS_CONNECT_TIMEOUT,
        )
        .await
        .map_err(RunError::Redis)?;
        return Ok((Recorder::Redis(redis), None));
    }
    let (path, sync) = (config.storage_path.clone(), config.storage_sync);
    // Opening and loading read the whole database: keep it off the async workers.
    let (ledger, thread) = tokio::task::spawn_blocking(move || {
        let store = store::open(&path, sync)?;
        Ledger::start_with_limits(store, window, max_domains)
    })
    .await
    .expect("store loading does not panic")?;
    Ok((Recorder::Local(ledger), Some(thread)))
}
