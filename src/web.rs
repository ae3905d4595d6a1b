//! Connection handling for the listeners: what protects the exporter from slow and abusive
//! clients, and the graceful drain at shutdown.
//!
//! The callback port faces the internet. A client that opens connections and trickles its
//! headers (slowloris) or never sends its body must not hold resources for long, and no number
//! of such clients may keep a legitimate callback from being served. So: a deadline for the
//! request headers, one for the whole request (the router's job, see [`crate::http`]), and a cap
//! on concurrent connections, past which new connections wait in the kernel's accept queue.
//!
//! While a connection waits for a slot, the answers of the served ones close their connections
//! (`Connection: close`); their clients connect again and queue behind it. A busy keep-alive
//! connection never goes idle, so without that the connections waiting in the accept queue would
//! wait for as long as the busy ones keep sending: in a reconnect burst with more senders than
//! slots, the senders past the cap would time out instead of taking turns. Below the cap,
//! connections stay open.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::Router;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for a request's headers, from the moment the connection waits for them.
    pub header_read_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets the
/// connections finish their requests (up to `limits.drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // Set while a connection waits for a slot: requests that start meanwhile close their
    // connections after their answers, which frees slots for the waiting ones.
    let wanted = Arc::new(AtomicBool::new(false));
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Past the cap, this connection waits here unserved, and those after it in the kernel's
        // accept queue, instead of costing memory and tasks.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                wanted.store(true, Ordering::Relaxed);
                let slot = tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                };
                wanted.store(false, Ordering::Relaxed);
                slot
            }
        };
        let _ = stream.set_nodelay(true);
        let inner = TowerToHyperService::new(router.clone());
        let wanted = wanted.clone();
        let service = service_fn(move |request| {
            let close = wanted.load(Ordering::Relaxed);
            let answer = inner.call(request);
            async move {
                let mut response = answer.await?;
                if close {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are clients going away or timing out; nothing to act on.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
    }
    Ok(())
}
