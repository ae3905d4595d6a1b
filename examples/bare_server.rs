//! The HTTP stack ceiling: a bare axum handler that reads the body of `POST /callback` and answers
//! `{"code":0}`, with nothing else (no parsing, no sign check, no ledger, no storage).
//!
//! It uses the same axum version, features and tokio runtime as the exporter, so the request rate
//! `tencent-css-exporter load` reaches against it is the most the exporter could reach on the same
//! machine; BENCHMARKS.md compares the two.
//!
//! ```text
//! cargo run --release --example bare_server -- 127.0.0.1:9878
//! tencent-css-exporter load --target http://127.0.0.1:9878/callback
//! ```

use axum::body::Bytes;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9878".into());
    // The exporter's runtime: tokio's default multi-threaded runtime, one worker per core.
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {address}: {e}"));
        eprintln!("bare server answering POST /callback on {address}");
        let app = Router::new().route(
            "/callback",
            post(|_body: Bytes| async { Json(json!({ "code": 0 })) }),
        );
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .expect("serve");
    });
}
