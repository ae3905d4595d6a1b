//! Prometheus exporter for Tencent Cloud CSS (Cloud Streaming Services).
//!
//! Tencent calls the exporter whenever a live stream starts pushing or disconnects. Each callback
//! is parsed, verified, run through the truth rules that keep the set of live streams exact,
//! recorded durably, and only then acknowledged; `/metrics` renders everything from that state.
//!
//! # Layout
//!
//! One direction of flow, one module a step:
//!
//! - [`callback`]: the lenient wire format into a typed [`callback::Callback`].
//! - [`signature`]: `sign = MD5(key + t)` and the `t` window.
//! - [`errcode`] and [`area`]: the `reason` class of a disconnect code, the `area` of a `set_id`.
//! - [`state`]: the truth rules ([`state::rules`], pure) and the state they change: live
//!   sessions, delivered-event keys, counters and histograms.
//! - [`store`]: where the state is kept; in memory or in SQLite behind one interface.
//! - [`ledger`]: applies events one batch at a time (one writer task on the runtime), commits
//!   each batch in one transaction and only then answers its requests.
//! - [`redis`]: the same truth rules applied atomically in Redis, for several replicas (its keys
//!   and fields laid out in `redis::fields`);
//!   [`recorder`] is the one interface the HTTP side sees over both.
//! - [`metrics`]: `/metrics`: at each scrape, copies the state's numbers (a piece at a time,
//!   so that the ledger records its batches in between) and writes them in
//!   the Prometheus text format, with the process and build metrics and the storage metrics of
//!   this process ([`metrics::CommitStats`], kept by the ledger and by Redis).
//! - [`scrape`]: one page at a time, shared by the scrapes that wait: the state copied on one
//!   thread, the page written on another at idle priority (on the first when that one gets no
//!   CPU for too long); [`gzip`] compresses it in pieces on several threads for the scrapes
//!   that ask.
//! - [`http`]: routes, status codes and logging of outcomes.
//! - [`web`]: connection handling: header deadline, write timeout, connection cap (where served
//!   connections make room for waiting ones), graceful drain.
//! - [`server`]: [`run`] wires the above to listeners and a shutdown signal.
//! - [`config`]: flags and environment variables; [`simulate`]: the `simulate` subcommand.
//! - [`load`]: the `load` subcommand, a load generator for benchmarks and capacity planning.

pub mod area;
pub mod callback;
pub mod config;
pub mod errcode;
pub mod gzip;
pub mod http;
pub mod ledger;
pub mod load;
pub mod metrics;
pub mod recorder;
pub mod redis;
pub mod scrape;
pub mod server;
pub mod signature;
pub mod simulate;
pub mod state;
pub mod store;
pub mod web;

pub use server::{run, Listeners, RunError};
