//! Connection handling for the listeners: what protects the exporter from slow and abusive
//! clients, and the graceful drain at shutdown.
//!
//! The callback port faces the internet. A client that opens connections and trickles its
//! headers (slowloris) or never sends its body must not hold resources for long, and no number
//! of such clients may keep a legitimate callback from being served. So: a deadline for the
//! request headers, one for the whole request (the router's job, see [`crate::http`]), and a cap
//! on concurrent connections, past which new connections wait in the kernel's accept queue.
//!
//! While a connection waits for a slot, the served ones make room for it:
//! - the answers of the busy ones close their connections (`Connection: close`); their clients
//!   connect again and queue behind it. A busy keep-alive connection never goes idle, so without
//!   that the connections waiting in the accept queue would wait for as long as the busy ones
//!   keep sending: in a reconnect burst with more senders than slots, the senders past the cap
//!   would time out instead of taking turns;
//! - the idle ones (no request in progress for `IDLE_GRACE` at least: keep-alive connections
//!   between callbacks, connections that never sent a byte, or that trickle the head of a
//!   request) are closed, as nginx reuses its idle keep-alive connections when it runs out.
//!   Otherwise each would hold its slot for nothing until its header deadline, and a few
//!   thousand silent or slowloris connections would keep every callback waiting that long;
//! - the ones whose request body has been awaited for `BODY_GRACE` (a slow POST: the head
//!   sent, the body trickled or never sent) are dropped. A callback's body comes with its head,
//!   a few hundred bytes; without that, such clients would hold their slots until
//!   `--web.request-timeout`.
//!
//! Below the cap, connections stay open; but a client that takes no part of an answer for
//! `--web.request-timeout` loses its connection (`socket`), whatever the cap.
//!
//! Layout: the slots, the notices and the connection tasks are here; `socket` watches what a
//! connection writes.

mod socket;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, Request, Version};
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

/// A connection idle for less than this is taken for a busy one between two requests and left
/// open: closing it would most likely cut off the request its client is about to send (at
/// 100 ms, 2,000 closed-loop senders against 1,024 slots had 3,314 of their requests cut off).
/// A sender that never pauses is sent `Connection: close` instead.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// A request whose body is still incomplete this long after its head is taken for a slow POST
/// and dropped while a connection waits for a slot. Tencent sends a callback's few hundred bytes
/// of body with its head; a client this slow would be answered 408 at `--web.request-timeout`.
const BODY_GRACE: Duration = Duration::from_secs(1);
/// While a connection waits for a slot, how often the idle connections are looked at.
const MAKE_ROOM_EVERY: Duration = Duration::from_millis(100);

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for a request's headers, from the moment the connection waits for them.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// How long an answer may wait for its client to take any of it before the connection is
    /// dropped.
    pub write_timeout: Duration,
}

/// What a listener tells its connections, all at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    /// Nothing yet.
    Serve,
    /// A connection waits for a slot: the idle ones close. Told again every
    /// [`MAKE_ROOM_EVERY`] while it waits.
    MakeRoom,
    /// Shutting down: every connection finishes the request it is serving and closes.
    Stop,
}

/// Whether a connection is idle, and since when; whether its request still waits for its body.
struct Activity {
    /// Requests in progress.
    requests: AtomicUsize,
    /// When the last request ended, or the connection was accepted: milliseconds from `epoch`.
    since_ms: AtomicU64,
    /// When the head of the request in progress was received: milliseconds from `epoch`.
    head_ms: AtomicU64,
    /// The request in progress has not received its whole body yet (see [`Watched`]).
    reading: AtomicBool,
    /// An answer is being written that the client has not taken yet (see [`socket`]).
    writing: AtomicBool,
    /// The listener's start, shared by its connections: an instant in an atomic, as a number.
    epoch: Instant,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        Activity {
            requests: AtomicUsize::new(0),
            since_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            head_ms: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request's head was received; `body_pending` unless it has no body.
    fn started(&self, body_pending: bool) {
        self.head_ms.store(self.now_ms(), Ordering::Relaxed);
        self.reading.store(body_pending, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The request's body has been received, or will not be read.
    fn body_done(&self) {
        self.reading.store(false, Ordering::Relaxed);
    }

    fn ended(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.requests.fetch_sub(1, Ordering::Relaxed);
    }

    /// A write waits for the client to take what was sent before.
    fn write_blocked(&self) {
        self.writing.store(true, Ordering::Relaxed);
    }

    /// The client took some of the answer: idle (if nothing else goes on) from now.
    fn write_unblocked(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.writing.store(false, Ordering::Relaxed);
    }

    /// How long no request has been in progress, nor an answer waited for its client; `None`
    /// while one is (a handler that returned its answer is not done while the answer is sent).
    fn idle_for(&self) -> Option<Duration> {
        let busy =
            self.requests.load(Ordering::Relaxed) > 0 || self.writing.load(Ordering::Relaxed);
        (!busy).then(|| {
            let since = self.since_ms.load(Ordering::Relaxed);
            Duration::from_millis(self.now_ms().saturating_sub(since))
        })
    }

    /// How long the request in progress has waited for the rest of its body; `None` if no
    /// request is in progress or its body is in.
    fn body_awaited_for(&self) -> Option<Duration> {
        let waiting =
            self.requests.load(Ordering::Relaxed) > 0 && self.reading.load(Ordering::Relaxed);
        waiting.then(|| {
            let head = self.head_ms.load(Ordering::Relaxed);
            Duration::from_millis(self.now_ms().saturating_sub(head))
        })
    }
}

/// A request body that tells its connection's [`Activity`] when it has all been received (or
/// failed, or was dropped unread): until then the request waits on its client.
struct Watched {
    /// The body as hyper delivers it; every frame is passed through unchanged.
    body: Incoming,
    /// Taken once the body is done.
    activity: Option<Arc<Activity>>,
}

impl Watched {
    fn new(body: Incoming, activity: &Arc<Activity>) -> Watched {
        let pending = !body.is_end_stream();
        activity.started(pending);
        Watched {
            body,
            // Bodiless requests (scrapes, probes) need not be watched: no reference taken.
            activity: pending.then(|| activity.clone()),
        }
    }

    fn done(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.body_done();
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.done();
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.body.is_end_stream() {
            self.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How a connection was made to leave room for one waiting for a slot.
#[derive(Debug, Clone, Copy)]
enum Evicted {
    /// Closed with no request in progress.
    Idle = 0,
    /// Dropped while it trickled the head of a request.
    Slowloris = 1,
    /// Answered with `Connection: close`, where it would have stayed open.
    Busy = 2,
    /// Dropped while its request waited for the rest of its body.
    SlowBody = 3,
}

impl Evicted {
    const ALL: [Evicted; 4] = [
        Evicted::Idle,
        Evicted::Slowloris,
        Evicted::Busy,
        Evicted::SlowBody,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Evicted::Idle => "idle",
            Evicted::Slowloris => "slowloris",
            Evicted::Busy => "busy",
            Evicted::SlowBody => "slow_body",
        }
    }
}

/// A listener's connection slots, and what happened at its cap: shared by [`serve`], which
/// uses them, and [`connection_metrics`], which shows them.
#[derive(Clone)]
pub struct Connections(Arc<ConnectionsInner>);

/// What the clones of a listener's [`Connections`] share.
struct ConnectionsInner {
    /// The `listener` label: `callback` or `metrics`.
    listener: &'static str,
    /// `--web.max-connections` (at most `u32::MAX`, so that the drain can take every slot back
    /// at once, and never over the semaphore's own maximum, which would panic).
    capacity: usize,
    /// A permit a connection served.
    slots: Arc<Semaphore>,
    /// Connections that found every slot taken.
    waits: AtomicU64,
    /// Connections made to leave room, by [`Evicted`].
    evicted: [AtomicU64; Evicted::ALL.len()],
}

impl Connections {
    pub fn new(listener: &'static str, max_connections: usize) -> Connections {
        let capacity = max_connections.clamp(1, u32::MAX as usize);
        Connections(Arc::new(ConnectionsInner {
            listener,
            capacity,
            slots: Arc::new(Semaphore::new(capacity)),
            waits: AtomicU64::new(0),
            evicted: Default::default(),
        }))
    }

    fn evicted(&self, how: Evicted) {
        self.0.evicted[how as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The `tencent_css_exporter_http_*` metrics of the listeners, read at each scrape.
pub fn connection_metrics(listeners: Vec<Connections>) -> Box<dyn Collector> {
    struct ConnectionMetrics {
        /// What is read at each scrape.
        listeners: Vec<Connections>,
        /// The families, set from `listeners` at each scrape.
        open: IntGaugeVec,
        limit: IntGaugeVec,
        waits: IntCounterVec,
        evicted: IntCounterVec,
    }
    impl ConnectionMetrics {
        fn families(&self) -> [&dyn Collector; 4] {
            [&self.open, &self.limit, &self.waits, &self.evicted]
        }
    }
    impl Collector for ConnectionMetrics {
        fn desc(&self) -> Vec<&Desc> {
            self.families().into_iter().flat_map(|f| f.desc()).collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            // Counters only move up: each is brought to its atomic's value.
            let catch_up = |counter: prometheus::IntCounter, now: u64| {
                counter.inc_by(now.saturating_sub(counter.get()))
            };
            for c in &self.listeners {
                let c = &c.0;
                let served = c.capacity - c.slots.available_permits().min(c.capacity);
                self.open
                    .with_label_values(&[c.listener])
                    .set(served as i64);
                self.limit
                    .with_label_values(&[c.listener])
                    .set(c.capacity as i64);
                catch_up(
                    self.waits.with_label_values(&[c.listener]),
                    c.waits.load(Ordering::Relaxed),
                );
                for how in Evicted::ALL {
                    catch_up(
                        self.evicted.with_label_values(&[c.listener, how.as_str()]),
                        c.evicted[how as usize].load(Ordering::Relaxed),
                    );
                }
            }
            self.families()
                .into_iter()
                .flat_map(|f| f.collect())
                .collect()
        }
    }
    let listener = &["listener"];
    Box::new(ConnectionMetrics {
        listeners,
        open: IntGaugeVec::new(
            Opts::new(
                "tencent_css_exporter_http_connections",
                "Connections being served, each in one of the listener's --web.max-connections slots.",
            ),
            listener,
        )
        .expect("valid gauge"),
        limit: IntGaugeVec::new(
            Opts::new(
                "tencent_css_exporter_http_connections_limit",
                "Connections the listener serves at once (--web.max-connections).",
            ),
            listener,
        )
        .expect("valid gauge"),
        waits: IntCounterVec::new(
            Opts::new(
                "tencent_css_exporter_http_connection_waits_total",
                "Connections that found every slot taken and waited for one.",
            ),
            listener,
        )
        .expect("valid counter"),
        evicted: IntCounterVec::new(
            Opts::new(
                "tencent_css_exporter_http_connections_evicted_total",
                "Connections made to leave room for a waiting one: idle (closed), slowloris (dropped mid-head), slow_body (dropped while its request body was incomplete), busy (answered with Connection: close).",
            ),
            &["listener", "reason"],
        )
        .expect("valid counter"),
    })
}

/// Whether the connection of `request` stays open after its answer, as its client asks.
fn keeps_alive<B>(request: &Request<B>) -> bool {
    let says = |word: &str| {
        request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(word))
    };
    match request.version() {
        Version::HTTP_10 => says("keep-alive"),
        _ => !says("close"),
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets the
/// connections finish their requests (up to `limits.drain_timeout`). At most as many
/// connections as `connections` has slots are served at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    connections: Connections,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (slots, capacity) = (connections.0.slots.clone(), connections.0.capacity);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        // A client may end its side once its request is sent, and still read the answer: a
        // callback recorded then must be answered, or its retry is a duplicate.
        .half_close(true);
    // Set while a connection waits for a slot: requests that start meanwhile close their
    // connections after their answers.
    let wanted = Arc::new(AtomicBool::new(false));
    let (notices, notice) = watch::channel(Notice::Serve);
    let epoch = Instant::now();
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
                connections.0.waits.fetch_add(1, Ordering::Relaxed);
                wanted.store(true, Ordering::Relaxed);
                let slot = loop {
                    notices.send_replace(Notice::MakeRoom);
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => break Some(slot.expect("the semaphore is never closed")),
                        () = tokio::time::sleep(MAKE_ROOM_EVERY) => {}
                        () = &mut shutdown => break None,
                    }
                };
                wanted.store(false, Ordering::Relaxed);
                match slot {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let inner = TowerToHyperService::new(router.clone());
        let activity = Arc::new(Activity::new(epoch));
        let service = {
            let (wanted, activity, connections) =
                (wanted.clone(), activity.clone(), connections.clone());
            service_fn(move |request: Request<Incoming>| {
                let request = request.map(|body| Watched::new(body, &activity));
                let close = wanted.load(Ordering::Relaxed);
                // Only looked at while a connection waits: nothing more for every callback.
                let makes_room = (close && keeps_alive(&request)).then(|| connections.clone());
                let answer = inner.call(request);
                let activity = activity.clone();
                async move {
                    let answer = answer.await;
                    activity.ended();
                    let mut response = answer?;
                    if close {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        // Counted when it makes room: not for a request that closed anyway,
                        // nor one dropped before its answer (counted as that).
                        if let Some(connections) = makes_room {
                            connections.evicted(Evicted::Busy);
                        }
                    }
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let stream = socket::Socket::new(stream, activity.clone(), limits.write_timeout);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let (mut notice, connections) = (notice.clone(), connections.clone());
        tokio::spawn(async move {
            tokio::pin!(connection);
            // Asked to make room while idle, by an earlier notice.
            let mut asked = false;
            let ended = loop {
                tokio::select! {
                    biased;
                    ended = connection.as_mut() => {
                        if asked {
                            connections.evicted(Evicted::Idle);
                        }
                        break ended;
                    }
                    changed = notice.changed() => {
                        // The sender is gone only once `serve` has returned.
                        let told = changed.map_or(Notice::Stop, |()| *notice.borrow_and_update());
                        match told {
                            Notice::Stop => {
                                // Closes an idle connection at once, a busy one after its answer.
                                connection.as_mut().graceful_shutdown();
                                break connection.await;
                            }
                            // A busy one closes after its answer if its request started while
                            // the connection waited (`wanted`).
                            Notice::MakeRoom if activity.idle_for() >= Some(IDLE_GRACE) => {
                                if asked {
                                    // Still open a notice later, and still no request: it has
                                    // been trickling the head of one for over a second
                                    // (slowloris). Dropped.
                                    tracing::debug!("closed a connection that held a slot without finishing a request head");
                                    connections.evicted(Evicted::Slowloris);
                                    break Ok(());
                                }
                                // hyper closes an idle connection at once, unless it holds
                                // bytes of a request already.
                                connection.as_mut().graceful_shutdown();
                                asked = true;
                            }
                            Notice::MakeRoom if activity.body_awaited_for() >= Some(BODY_GRACE) => {
                                tracing::debug!("closed a connection whose request body was still incomplete a second after its head");
                                connections.evicted(Evicted::SlowBody);
                                break Ok(());
                            }
                            Notice::MakeRoom | Notice::Serve => {}
                        }
                    }
                }
            };
            // Errors here are clients going away or timing out; nothing to act on.
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    notices.send_replace(Notice::Stop);
    // Every connection holds its slot until it ends: with every slot back, all have ended.
    let drained = tokio::time::timeout(limits.drain_timeout, slots.acquire_many(capacity as u32));
    if drained.await.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    Ok(())
}
