//! The HTTP surface: the callback endpoint, `/metrics`, health, readiness and the landing page.
//!
//! Every way a callback can fail is a `CallbackError`, turned into a status, a log line and a
//! counted outcome in one place (`CallbackError::respond`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody as _};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::time::{timeout_at, Instant};

use crate::callback::{self, Callback, EventKind, Outcome, ParseError};
use crate::ledger::{now_secs, Unrecorded};
use crate::recorder::Recorder;
use crate::scrape::{Encoding, Scrapes};
use crate::signature::{Rejection, Verifier};

/// Largest accepted callback body. Real ones are well under 2 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub recorder: Recorder,
    pub verifier: Arc<Verifier>,
    /// Where `/metrics` pages come from.
    pub scrapes: Scrapes,
    /// Where callbacks are posted; shown on the landing page.
    pub callback_path: Arc<str>,
    /// Where `/metrics` is served (`--web.telemetry-path`); linked from the landing page.
    pub telemetry_path: Arc<str>,
    /// Deadline for a whole callback request: reading the body and recording the event.
    pub request_timeout: Duration,
}

/// The router for the callback listener; with `with_ops` it also serves `/metrics`, `/healthz`
/// and `/readyz` (no separate metrics listener).
pub fn callback_router(state: AppState, with_ops: bool) -> Router {
    let callback = post(receive).fallback(wrong_method);
    let router = Router::new().route(&state.callback_path, callback);
    let router = if with_ops {
        router.merge(ops_routes(&state))
    } else {
        // Metrics live on their own listener: say so instead of linking to nothing.
        router.route("/", get(|State(app): State<AppState>| landing(app, false)))
    };
    router.with_state(state)
}

/// The router for a separate metrics listener.
pub fn ops_router(state: AppState) -> Router {
    ops_routes(&state).with_state(state)
}

fn ops_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(|State(app): State<AppState>| landing(app, true)))
        .route(&state.telemetry_path, get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

/// Why a callback was not recorded.
#[derive(Debug, thiserror::Error)]
enum CallbackError {
    #[error("body over {MAX_BODY} bytes")]
    TooLarge,
    #[error("cannot read the body")]
    Unreadable,
    #[error("body not received within the request timeout")]
    SlowBody,
    #[error("only POST is accepted")]
    WrongMethod,
    #[error(transparent)]
    Malformed(#[from] ParseError),
    #[error("{rejection}")]
    Rejected {
        /// Which check failed: tells the `bad_signature` outcome from `expired`.
        rejection: Rejection,
        /// The refused callback, for the `event` label and the log line.
        callback: Box<Callback>,
    },
    #[error("{error}")]
    Unrecorded {
        /// Why storage did not record the event; logged and sent in the 503's body.
        error: Unrecorded,
        /// The callback Tencent will retry, for the `event` label and the log line.
        callback: Box<Callback>,
    },
}

impl CallbackError {
    fn kind(&self) -> EventKind {
        match self {
            CallbackError::Malformed(e) => e.kind(),
            CallbackError::Rejected { callback, .. }
            | CallbackError::Unrecorded { callback, .. } => callback.event.kind(),
            _ => EventKind::Unknown,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            CallbackError::Rejected {
                rejection: Rejection::BadSignature,
                ..
            } => Outcome::BadSignature,
            CallbackError::Rejected { .. } => Outcome::Expired,
            CallbackError::Unrecorded { .. } => Outcome::Error,
            _ => Outcome::Malformed,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            CallbackError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            CallbackError::SlowBody => StatusCode::REQUEST_TIMEOUT,
            CallbackError::WrongMethod => StatusCode::METHOD_NOT_ALLOWED,
            CallbackError::Unreadable | CallbackError::Malformed(_) => StatusCode::BAD_REQUEST,
            CallbackError::Rejected { .. } => StatusCode::UNAUTHORIZED,
            // Tencent retries anything but 200: exactly what a storage failure needs.
            CallbackError::Unrecorded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Counts (unless the ledger already did), logs and answers.
    async fn respond(self, recorder: &Recorder) -> Response {
        let (kind, outcome, status) = (self.kind(), self.outcome(), self.status());
        // Storage errors are counted by the ledger itself, in the batch that failed.
        if outcome != Outcome::Error {
            recorder.count(kind, outcome).await;
        }
        let stream = match &self {
            CallbackError::Rejected { callback, .. }
            | CallbackError::Unrecorded { callback, .. } => callback
                .event
                .stream_event()
                .map(|s| (Some(s.stream.to_string()), Some(s.sequence.clone()))),
            CallbackError::Malformed(ParseError::Missing {
                stream, sequence, ..
            }) => Some((stream.clone(), sequence.clone())),
            CallbackError::Malformed(ParseError::AppTooLong { sequence, .. }) => {
                Some((None, sequence.clone()))
            }
            _ => None,
        };
        let (stream, sequence) = stream.unwrap_or_default();
        match outcome {
            // A storage outage was logged with its cause when it began, and its refused
            // callbacks are counted when it ends: a line each would be thousands a second at a
            // mass reconnect. A 503 without an outage (the request's deadline) is an error.
            Outcome::Error if recorder.fault().is_some() => tracing::debug!(
                event = kind.as_str(), stream, sequence, error = %self, "callback not recorded, answered 503 so Tencent retries"
            ),
            Outcome::Error => tracing::error!(
                event = kind.as_str(), stream, sequence, error = %self, "callback not recorded, answered 503 so Tencent retries"
            ),
            _ => tracing::warn!(
                event = kind.as_str(), outcome = outcome.as_str(), stream, sequence, reason = %self, "callback refused"
            ),
        }
        let mut response = (
            status,
            Json(json!({ "code": status.as_u16(), "message": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        response
    }
}

async fn receive(State(app): State<AppState>, body: Body) -> Response {
    match handle(&app, body).await {
        // The one answer Tencent waits for, the same bytes every time: nothing to serialize.
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"code":0}"#,
        )
            .into_response(),
        Err(e) => e.respond(&app.recorder).await,
    }
}

async fn handle(app: &AppState, body: Body) -> Result<(), CallbackError> {
    // A body declared over the cap is refused at once: reading it first would keep the client
    // until it had sent the cap, or until the deadline (408) if it waits for `100 Continue`.
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(CallbackError::TooLarge);
    }
    let deadline = Instant::now() + app.request_timeout;
    let body = match timeout_at(deadline, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_elapsed) => return Err(CallbackError::SlowBody),
        Ok(Err(e)) if is_length_limit(&e) => return Err(CallbackError::TooLarge),
        Ok(Err(_)) => return Err(CallbackError::Unreadable),
        Ok(Ok(body)) => body,
    };
    let callback = callback::parse(&body)?;
    if let Err(rejection) = app
        .verifier
        .verify(callback.t, callback.sign.as_deref(), now_secs())
    {
        return Err(CallbackError::Rejected {
            rejection,
            callback: Box::new(callback),
        });
    }
    let recorded = timeout_at(deadline, app.recorder.record(callback.event.clone()))
        .await
        .unwrap_or_else(|_elapsed| {
            // The batch may still commit; Tencent's retry will then be a duplicate.
            Err(Unrecorded(
                "storage did not answer within the request timeout".into(),
            ))
        });
    match recorded {
        Ok(outcome) => {
            let s = callback.event.stream_event();
            tracing::debug!(
                event = callback.event.kind().as_str(),
                outcome = outcome.as_str(),
                stream = s.map(|s| s.stream.to_string()),
                sequence = s.map(|s| s.sequence.as_str()),
                "callback recorded"
            );
            Ok(())
        }
        Err(error) => Err(CallbackError::Unrecorded {
            error,
            callback: Box::new(callback),
        }),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

async fn wrong_method(State(app): State<AppState>) -> Response {
    CallbackError::WrongMethod.respond(&app.recorder).await
}

async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let encoding = Encoding::accepted(headers.get_all(header::ACCEPT_ENCODING));
    app.recorder.refresh().await;
    match app.scrapes.page(encoding).await {
        Ok(page) => {
            let mut response = (
                [
                    (header::CONTENT_TYPE, prometheus::TEXT_FORMAT),
                    // Caches between the exporter and a scraper keep one page per encoding.
                    (header::VARY, "accept-encoding"),
                ],
                page.body,
            )
                .into_response();
            if page.encoding == Encoding::Gzip {
                response.headers_mut().insert(
                    header::CONTENT_ENCODING,
                    header::HeaderValue::from_static("gzip"),
                );
            }
            response
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(app): State<AppState>) -> Response {
    match app.recorder.fault() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(fault) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: storage failing: {fault}\n"),
        )
            .into_response(),
    }
}

async fn landing(app: AppState, with_ops: bool) -> Html<String> {
    let links = if with_ops {
        format!(
            "<ul>
<li><a href=\"{metrics}\">Metrics</a></li>
<li><a href=\"/healthz\">Health</a></li>
<li><a href=\"/readyz\">Readiness</a></li>
</ul>",
            metrics = app.telemetry_path
        )
    } else {
        "<p>Metrics, health and readiness are served on the separate metrics address.</p>".into()
    };
    Html(format!(
        "<!doctype html>
<html><head><title>Tencent CSS Exporter</title></head>
<body>
<h1>Tencent CSS Exporter</h1>
<p>Version {version}. Receives Tencent Cloud CSS push and disconnect callbacks on
<code>POST {path}</code> and exports live streams for Prometheus.</p>
{links}
</body></html>
",
        version = env!("CARGO_PKG_VERSION"),
        path = app.callback_path,
    ))
}
