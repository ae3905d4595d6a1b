//! `/metrics`: the event metrics written at scrape time from the state, plus the process and
//! build metrics.
//!
//! Nothing here counts anything: each scrape copies the numbers of the same state the ledger
//! persists into a [`Frame`] and writes them out, so what Prometheus sees cannot drift from what
//! is stored and survives restarts with it.
//!
//! The event metrics are written straight into the text exposition format (version 0.0.4),
//! without building the `prometheus` crate's protobuf objects: byte for byte what its
//! `TextEncoder` wrote for the same samples through a registry (a unit test holds the two
//! together), at a fraction of the cost. The crate's `Registry` still serves the build info and
//! the process metrics; their families are encoded by its `TextEncoder` and placed among the
//! event families in name order, as a registry orders them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::area::Area;
use crate::callback::{EventKind, Outcome};
use crate::errcode::ErrCode;
use crate::state::counters::{
    Counters, Domain, Histogram, CALLBACK_DELAY_BOUNDS_MS, PUSH_DURATION_BOUNDS_MS,
};

/// Where the rendered numbers come from: the local state, or a shared store's copy.
pub trait ViewSource: Send + Sync + 'static {
    /// Copies the numbers to render now into `frame` with [`Frame::fill`]. Called at every
    /// scrape, usually under the lock that the state's writer waits on: must be quick and must
    /// not block on the network. Sorting and writing the text happen after it returns.
    fn fill(&self, frame: &mut Frame);
}

const ACTIVE_STREAMS: &str = "tencent_css_active_streams";
const PUSHES: &str = "tencent_css_pushes_total";
const DISCONNECTS: &str = "tencent_css_disconnects_total";
const PUSH_DURATION: &str = "tencent_css_push_duration_seconds";
const CALLBACKS: &str = "tencent_css_callbacks_total";
const CALLBACK_DELAY: &str = "tencent_css_callback_delay_seconds";
const LAST_CALLBACK: &str = "tencent_css_last_callback_timestamp_seconds";
const DOMAINS_OVERFLOW: &str = "tencent_css_domains_overflow_total";

/// Each family: name, help, type, label names.
const FAMILIES: [(&str, &str, Kind, &[&str]); 8] = [
    (ACTIVE_STREAMS, "Live streams now, by push domain and area.", Kind::Gauge, &["domain", "area"]),
    (PUSHES, "Push-started callbacks recorded.", Kind::Counter, &["domain", "area"]),
    (DISCONNECTS, "Push-disconnected callbacks recorded, by error code and its cause class.", Kind::Counter, &["domain", "area", "errcode", "reason"]),
    (PUSH_DURATION, "How long pushes lasted, from the push_duration of disconnects.", Kind::Histogram, &["domain", "area"]),
    (CALLBACKS, "Requests to the callback path, by event and outcome.", Kind::Counter, &["event", "outcome"]),
    (CALLBACK_DELAY, "Receive time minus event_time of recorded push and disconnect callbacks.", Kind::Histogram, &[]),
    (LAST_CALLBACK, "Unix time of the last recorded push or disconnect callback; 0 before the first.", Kind::Gauge, &[]),
    (DOMAINS_OVERFLOW, "Push and disconnect events counted under domain=\"_other\" because --metrics.max-domains was reached.", Kind::Counter, &[]),
];

/// The metric type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The (event, outcome) pairs that can happen, exposed from the start at 0 so that `rate()` and
/// `increase()` see the first occurrence of each.
fn possible_callbacks() -> impl Iterator<Item = (EventKind, Outcome)> {
    use EventKind::*;
    use Outcome::*;
    let recorded = [Accepted, Duplicate, BadSignature, Expired, Malformed, Error];
    let stream_events = [Push, Disconnect]
        .into_iter()
        .flat_map(move |k| recorded.into_iter().map(move |o| (k, o)));
    let other = [Ignored, BadSignature, Expired, Malformed, Error].map(|o| (Other, o));
    stream_events
        .chain(other)
        .chain(std::iter::once((Unknown, Malformed)))
}

/// Buckets of one `tencent_css_push_duration_seconds` series: non-cumulative counts, the last
/// one above every bound, as in [`Histogram`] but without a heap allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buckets {
    counts: [u64; PUSH_DURATION_BOUNDS_MS.len() + 1],
    sum_ms: u64,
}

impl Buckets {
    fn of(h: &Histogram) -> Self {
        let mut counts = [0; PUSH_DURATION_BOUNDS_MS.len() + 1];
        // Every push-duration histogram has exactly these buckets (a store with another layout
        // is refused at load); a shorter one would be padded with zeros.
        for (to, from) in counts.iter_mut().zip(&h.counts) {
            *to = *from;
        }
        Buckets {
            counts,
            sum_ms: h.sum_ms,
        }
    }
}

/// The numbers of one scrape, copied flat out of the state: one vector per family, plain numbers
/// and shared domain names (no strings are built). Filling it is all a scrape does under the
/// state's lock; [`Metrics`] keeps one between scrapes so that the copy reuses its memory.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// Live streams per (domain, area), in no particular order.
    live: Vec<((Domain, Area), u64)>,
    /// The rest in the order of [`Counters`]' maps.
    pushes: Vec<((Domain, Area), u64)>,
    disconnects: Vec<((Domain, Area, ErrCode), u64)>,
    push_duration: Vec<((Domain, Area), Buckets)>,
    callbacks: Vec<((EventKind, Outcome), u64)>,
    /// Non-cumulative, as in [`Histogram`]; empty before the first observation.
    callback_delay: Vec<u64>,
    callback_delay_sum_ms: u64,
    last_callback_ms: i64,
    domains_overflow: u64,
}

impl Frame {
    /// A frame of live streams per (domain, area) (any order) and the counters.
    #[cfg(test)]
    fn copy<'a>(
        live: impl IntoIterator<Item = (&'a (Domain, Area), &'a u64)>,
        counters: &Counters,
    ) -> Frame {
        let mut frame = Frame::default();
        frame.fill(live, counters);
        frame
    }

    /// Replaces the contents with live streams per (domain, area) (any order) and the
    /// counters, reusing the memory. Meant to be called under the state's lock on a frame
    /// already [cleared](Frame::clear) after it, so that dropping the old contents is not part of
    /// the copy.
    pub fn fill<'a>(
        &mut self,
        live: impl IntoIterator<Item = (&'a (Domain, Area), &'a u64)>,
        counters: &Counters,
    ) {
        self.clear();
        self.live
            .extend(live.into_iter().map(|(k, n)| (k.clone(), *n)));
        let Counters {
            pushes,
            disconnects,
            push_duration,
            callbacks,
            callback_delay,
            last_callback_ms,
            domains_overflow,
        } = counters;
        self.pushes
            .extend(pushes.iter().map(|(k, n)| (k.clone(), *n)));
        self.disconnects
            .extend(disconnects.iter().map(|(k, n)| (k.clone(), *n)));
        self.push_duration.extend(
            push_duration
                .iter()
                .map(|(k, h)| (k.clone(), Buckets::of(h))),
        );
        self.callbacks
            .extend(callbacks.iter().map(|(k, n)| (*k, *n)));
        if let Some(h) = callback_delay {
            self.callback_delay.extend_from_slice(&h.counts);
            self.callback_delay_sum_ms = h.sum_ms;
        }
        self.last_callback_ms = *last_callback_ms;
        self.domains_overflow = *domains_overflow;
    }

    /// Empties the frame, keeping its memory; drops its references to domain names.
    pub fn clear(&mut self) {
        self.live.clear();
        self.pushes.clear();
        self.disconnects.clear();
        self.push_duration.clear();
        self.callbacks.clear();
        self.callback_delay.clear();
        self.callback_delay_sum_ms = 0;
        self.last_callback_ms = 0;
        self.domains_overflow = 0;
    }

    /// `tencent_css_active_streams`: every (domain, area) that ever had a push, at 0 when nothing
    /// is live, so a series that drops to 0 stays visible (as
    /// [`Truth::live_streams`](crate::state::Truth::live_streams) lists them); sorted.
    fn active_streams(&mut self) -> Vec<(&Domain, Area, u64)> {
        self.live.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let (live, pushes) = (&self.live, &self.pushes);
        let mut out = Vec::with_capacity(live.len().max(pushes.len()));
        let (mut i, mut j) = (0, 0);
        loop {
            let key = match (live.get(i), pushes.get(j)) {
                (None, None) => break,
                (Some((l, _)), Some((p, _))) => l.min(p),
                (Some((l, _)), None) => l,
                (None, Some((p, _))) => p,
            };
            let mut n = 0;
            while let Some((_, m)) = live.get(i).filter(|(l, _)| l == key) {
                n += m;
                i += 1;
            }
            while pushes.get(j).is_some_and(|(p, _)| p == key) {
                j += 1;
            }
            out.push((&key.0, key.1, n));
        }
        out
    }
}

/// Everything `/metrics` serves.
pub struct Metrics {
    source: Arc<dyn ViewSource>,
    /// Build info and process metrics.
    registry: Registry,
    /// Length of the last page, to size the next one's buffer.
    last_len: AtomicUsize,
    /// The frame of the last scrape, emptied, for the next one to fill.
    spare: Mutex<Option<Frame>>,
}

impl Metrics {
    pub fn new(source: Arc<dyn ViewSource>) -> Self {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "tencent_css_exporter_build_info",
                "Always 1; the version of the running exporter as a label.",
            ),
            &["version"],
        )
        .expect("valid build info");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("build info registers once");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        Metrics {
            source,
            registry,
            last_len: AtomicUsize::new(16 * 1024),
            spare: Mutex::new(None),
        }
    }

    /// Adds the exporter's own metrics of a part that keeps them (the ledger's commits, the
    /// store's readiness) to every page.
    pub fn register(&self, collector: Box<dyn Collector>) {
        self.registry
            .register(collector)
            .expect("each of the exporter's own metrics registers once");
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Concurrent scrapes: the first takes the spare frame, the others start empty ones.
        let mut frame = spare.unwrap_or_default();
        self.source.fill(&mut frame);
        let mut out = String::with_capacity(self.last_len.load(Ordering::Relaxed) + 4096);
        write_page(&mut out, &mut frame, &self.registry.gather());
        self.last_len.store(out.len(), Ordering::Relaxed);
        frame.clear();
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame);
        out
    }
}

/// Writes the event families of `frame` and the `others` (sorted by name, as
/// `Registry::gather` returns them) into `out`, every family in name order.
fn write_page(out: &mut String, frame: &mut Frame, others: &[MetricFamily]) {
    let mut order: Vec<usize> = (0..FAMILIES.len()).collect();
    order.sort_unstable_by_key(|i| FAMILIES[*i].0);
    let mut others = others.iter().peekable();
    for i in order {
        let name = FAMILIES[i].0;
        while let Some(mf) = others.next_if(|mf| mf.name() < name) {
            encode(out, mf);
        }
        write_family(out, i, frame);
    }
    for mf in others {
        encode(out, mf);
    }
}

fn encode(out: &mut String, mf: &MetricFamily) {
    TextEncoder::new()
        .encode_utf8(std::slice::from_ref(mf), out)
        .expect("a gathered family encodes");
}

/// Writes one event family; nothing at all when it has no series (as a registry drops empty
/// families).
fn write_family(out: &mut String, family: usize, frame: &mut Frame) {
    let (name, help, kind, _) = FAMILIES[family];
    let header = |out: &mut String| {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        push_escaped(out, help, false);
        out.push_str("\n# TYPE ");
        out.push_str(name);
        out.push(' ');
        out.push_str(kind.as_str());
        out.push('\n');
    };
    // The label set of the current series, `{a="x",b="y"` without the closing brace.
    let mut labels = String::with_capacity(256);
    match name {
        ACTIVE_STREAMS => {
            let rows = frame.active_streams();
            if rows.is_empty() {
                return;
            }
            header(out);
            for (d, a, n) in rows {
                domain_area(&mut labels, d, a);
                counter_line(out, name, &labels, n);
            }
        }
        PUSHES => {
            if frame.pushes.is_empty() {
                return;
            }
            header(out);
            for ((d, a), n) in &frame.pushes {
                domain_area(&mut labels, d, *a);
                counter_line(out, name, &labels, *n);
            }
        }
        DISCONNECTS => {
            if frame.disconnects.is_empty() {
                return;
            }
            header(out);
            // Series are ordered by label values as text: within a (domain, area), errcode "14"
            // comes before "8", and "other" last.
            for run in frame
                .disconnects
                .chunk_by_mut(|((d1, a1, _), _), ((d2, a2, _), _)| a1 == a2 && d1 == d2)
            {
                run.sort_unstable_by_key(|((_, _, e), _)| e.text_rank());
                let ((d, a, _), _) = &run[0];
                domain_area(&mut labels, d, *a);
                let common = labels.len();
                for ((_, _, e), n) in run.iter() {
                    labels.truncate(common);
                    labels.push_str(",errcode=\"");
                    labels.push_str(e.as_str());
                    labels.push_str("\",reason=\"");
                    labels.push_str(e.reason().as_str());
                    labels.push('"');
                    counter_line(out, name, &labels, *n);
                }
            }
        }
        PUSH_DURATION => {
            if frame.push_duration.is_empty() {
                return;
            }
            header(out);
            let text = HistogramText::new(name, &PUSH_DURATION_BOUNDS_MS, true);
            for ((d, a), h) in &frame.push_duration {
                domain_area(&mut labels, d, *a);
                text.write(out, &labels, &h.counts, h.sum_ms);
            }
        }
        CALLBACKS => {
            header(out);
            let mut all: BTreeMap<(&str, &str), u64> = possible_callbacks()
                .map(|(k, o)| ((k.as_str(), o.as_str()), 0))
                .collect();
            for ((k, o), n) in &frame.callbacks {
                all.insert((k.as_str(), o.as_str()), *n);
            }
            for ((k, o), n) in all {
                labels.clear();
                labels.push_str("{event=\"");
                labels.push_str(k);
                labels.push_str("\",outcome=\"");
                labels.push_str(o);
                labels.push('"');
                counter_line(out, name, &labels, n);
            }
        }
        CALLBACK_DELAY => {
            header(out);
            let text = HistogramText::new(name, &CALLBACK_DELAY_BOUNDS_MS, false);
            text.write(out, "", &frame.callback_delay, frame.callback_delay_sum_ms);
        }
        LAST_CALLBACK => {
            header(out);
            out.push_str(name);
            out.push(' ');
            push_seconds(out, frame.last_callback_ms);
            out.push('\n');
        }
        DOMAINS_OVERFLOW => {
            header(out);
            counter_line(out, name, "", frame.domains_overflow);
        }
        _ => unreachable!("every family is written"),
    }
}

/// `{domain="…",area="…"` into `labels`.
fn domain_area(labels: &mut String, domain: &str, area: Area) {
    labels.clear();
    labels.push_str("{domain=\"");
    push_escaped(labels, domain, true);
    labels.push_str("\",area=\"");
    labels.push_str(area.as_str());
    labels.push('"');
}

/// A sample whose value is a count (counters, and the gauge of live streams):
/// `name{labels} value`. `labels` lacks its closing brace, or is empty.
fn counter_line(out: &mut String, name: &str, labels: &str, n: u64) {
    out.push_str(name);
    out.push_str(labels);
    out.push_str(if labels.is_empty() { " " } else { "} " });
    push_count(out, n);
    out.push('\n');
}

/// The fixed text of a histogram family's samples, made once a page.
struct HistogramText {
    bucket: String,
    sum: String,
    count: String,
    /// `,le="…"} ` per bound and last `+Inf` (`{le="…"} ` when the series have no labels),
    /// with the bounds written as the `prometheus` crate writes `ms as f64 / 1000.0`.
    les: Vec<String>,
    /// What follows the labels of `_sum` and `_count`.
    close: &'static str,
}

impl HistogramText {
    fn new(name: &str, bounds_ms: &[u64], labelled: bool) -> Self {
        let open = if labelled { "," } else { "{" };
        let les = bounds_ms
            .iter()
            .map(|b| (*b as f64 / 1000.0).to_string())
            .chain(std::iter::once("+Inf".to_owned()))
            .map(|le| format!("{open}le=\"{le}\"}} "))
            .collect();
        HistogramText {
            bucket: format!("{name}_bucket"),
            sum: format!("{name}_sum"),
            count: format!("{name}_count"),
            les,
            close: if labelled { "} " } else { " " },
        }
    }

    /// One series: cumulative `_bucket`s, `+Inf`, `_sum` (seconds) and `_count`. `labels` lacks
    /// its closing brace, or is empty; `counts` are non-cumulative, the last one above every
    /// bound; missing ones count as 0.
    fn write(&self, out: &mut String, labels: &str, counts: &[u64], sum_ms: u64) {
        let (bounds, inf) = self.les.split_at(self.les.len() - 1);
        let mut cumulative = 0;
        for (le, n) in bounds
            .iter()
            .zip(counts.iter().chain(std::iter::repeat(&0)))
        {
            cumulative += n;
            out.push_str(&self.bucket);
            out.push_str(labels);
            out.push_str(le);
            push_count(out, cumulative);
            out.push('\n');
        }
        let count = counts.iter().sum();
        out.push_str(&self.bucket);
        out.push_str(labels);
        out.push_str(&inf[0]);
        push_count(out, count);
        out.push('\n');
        out.push_str(&self.sum);
        out.push_str(labels);
        out.push_str(self.close);
        push_seconds(out, sum_ms);
        out.push('\n');
        out.push_str(&self.count);
        out.push_str(labels);
        out.push_str(self.close);
        push_count(out, count);
        out.push('\n');
    }
}

/// Largest integer below which every `u64` is exactly an `f64`.
const EXACT_F64: u64 = 1 << 53;

/// A count as the `prometheus` crate writes it: converted to `f64`, then formatted (which for
/// integers below 2^53 is their decimal digits).
fn push_count(out: &mut String, n: u64) {
    if n <= EXACT_F64 {
        push_decimal(out, n);
    } else {
        let _ = write!(out, "{}", n as f64);
    }
}

/// Milliseconds as seconds, as the `prometheus` crate writes `ms as f64 / 1000.0`.
///
/// Below 10^15 ms that is the exact decimal `ms / 1000` without trailing zeros: `ms as f64` is
/// exact, the division rounds to the nearest `f64`, and a decimal of at most 15 significant
/// digits is the only such decimal that rounds to its `f64`, so it is the shortest one, which
/// `f64`'s `Display` prints. Beyond that the float is formatted.
fn push_seconds<T: Into<i128>>(out: &mut String, ms: T) {
    let ms: i128 = ms.into();
    match u64::try_from(ms) {
        Ok(ms) if ms < 1_000_000_000_000_000 => {
            push_decimal(out, ms / 1000);
            let frac = ms % 1000;
            if frac != 0 {
                out.push('.');
                let digits = [frac / 100, frac / 10 % 10, frac % 10];
                let mut digits = digits.as_slice();
                while let [rest @ .., 0] = digits {
                    digits = rest;
                }
                for d in digits {
                    out.push(char::from(b'0' + *d as u8));
                }
            }
        }
        _ => {
            let _ = write!(out, "{}", ms as f64 / 1000.0);
        }
    }
}

/// The decimal digits of `n`.
fn push_decimal(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `value` escaped as in the text format: `\` and newline always, `"` in label values.
fn push_escaped(out: &mut String, value: &str, quote: bool) {
    let special = |b: u8| b == b'\\' || b == b'\n' || (quote && b == b'"');
    if !value.bytes().any(special) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, RwLock};

    use prometheus::core::{Collector, Desc};
    use prometheus::proto::{self, LabelPair, MetricType};
    use prometheus::Encoder;
    use proptest::prelude::*;

    use super::*;
    use crate::callback::{Event, StreamEvent, StreamKey};
    use crate::ledger::Shared;
    use crate::state::counters::{Series, Value};
    use crate::state::{Limits, Snapshot, Truth, View};

    /// The previous way of rendering the event metrics, kept as the reference the text writer is
    /// held to: protobuf families from a [`View`], ordered by a `Registry`, encoded by
    /// `TextEncoder`.
    struct ProtoCollector {
        view: View,
        descs: Vec<Desc>,
    }

    impl ProtoCollector {
        fn new(view: View) -> Self {
            let descs = FAMILIES
                .iter()
                .map(|(name, help, _, labels)| {
                    let labels = labels.iter().map(|l| l.to_string()).collect();
                    Desc::new(
                        name.to_string(),
                        help.to_string(),
                        labels,
                        Default::default(),
                    )
                    .expect("valid metric description")
                })
                .collect();
            ProtoCollector { view, descs }
        }
    }

    fn family(name: &str, metrics: Vec<proto::Metric>) -> MetricFamily {
        let (_, help, kind, _) = FAMILIES.iter().find(|f| f.0 == name).expect("known family");
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(match kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
            Kind::Histogram => MetricType::HISTOGRAM,
        });
        mf.set_metric(metrics);
        mf
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
        pairs
            .iter()
            .map(|(name, value)| {
                let mut lp = LabelPair::default();
                lp.set_name(name.to_string());
                lp.set_value(value.to_string());
                lp
            })
            .collect()
    }

    fn counter(pairs: &[(&str, &str)], value: u64) -> proto::Metric {
        let mut c = proto::Counter::default();
        c.set_value(value as f64);
        let mut m = proto::Metric::from_label(labels(pairs));
        m.set_counter(c);
        m
    }

    fn gauge(pairs: &[(&str, &str)], value: f64) -> proto::Metric {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        let mut m = proto::Metric::from_label(labels(pairs));
        m.set_gauge(g);
        m
    }

    fn histogram(pairs: &[(&str, &str)], h: &Histogram, bounds_ms: &[u64]) -> proto::Metric {
        let mut cumulative = 0;
        let buckets = bounds_ms
            .iter()
            .zip(&h.counts)
            .map(|(bound, count)| {
                cumulative += count;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound as f64 / 1000.0);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut ph = proto::Histogram::default();
        ph.set_bucket(buckets);
        ph.set_sample_count(h.count());
        ph.set_sample_sum(h.sum_ms as f64 / 1000.0);
        let mut m = proto::Metric::from_label(labels(pairs));
        m.set_histogram(ph);
        m
    }

    impl Collector for ProtoCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let View { live, counters: c } = self.view.clone();
            let active = live
                .iter()
                .map(|((d, a), n)| gauge(&[("domain", d), ("area", a.as_str())], *n as f64))
                .collect();
            let pushes = c
                .pushes
                .iter()
                .map(|((d, a), n)| counter(&[("domain", d), ("area", a.as_str())], *n))
                .collect();
            let disconnects = c
                .disconnects
                .iter()
                .map(|((d, a, e), n)| {
                    let code = e.to_string();
                    let pairs = [
                        ("domain", &**d),
                        ("area", a.as_str()),
                        ("errcode", &code),
                        ("reason", e.reason().as_str()),
                    ];
                    counter(&pairs, *n)
                })
                .collect();
            let durations = c
                .push_duration
                .iter()
                .map(|((d, a), h)| {
                    histogram(
                        &[("domain", d), ("area", a.as_str())],
                        h,
                        &PUSH_DURATION_BOUNDS_MS,
                    )
                })
                .collect();
            let callbacks = possible_callbacks()
                .chain(c.callbacks.keys().copied())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|(k, o)| {
                    let n = c.callbacks.get(&(k, o)).copied().unwrap_or(0);
                    counter(&[("event", k.as_str()), ("outcome", o.as_str())], n)
                })
                .collect();
            let delay = c.callback_delay.unwrap_or_else(|| Histogram {
                counts: vec![0; CALLBACK_DELAY_BOUNDS_MS.len() + 1],
                sum_ms: 0,
            });
            vec![
                family(ACTIVE_STREAMS, active),
                family(PUSHES, pushes),
                family(DISCONNECTS, disconnects),
                family(PUSH_DURATION, durations),
                family(CALLBACKS, callbacks),
                family(
                    CALLBACK_DELAY,
                    vec![histogram(&[], &delay, &CALLBACK_DELAY_BOUNDS_MS)],
                ),
                family(
                    LAST_CALLBACK,
                    vec![gauge(&[], c.last_callback_ms as f64 / 1000.0)],
                ),
                family(DOMAINS_OVERFLOW, vec![counter(&[], c.domains_overflow)]),
            ]
        }
    }

    const NOW_MS: i64 = 1_700_000_000_123;

    /// The page the previous code made of `view`, with `others` (build info and process
    /// metrics, gathered once so both sides see the same values) in the same registry.
    fn reference(view: View, others: &[MetricFamily]) -> String {
        let registry = Registry::new();
        registry
            .register(Box::new(ProtoCollector::new(view)))
            .unwrap();
        let mut families = registry.gather();
        families.extend(others.iter().cloned());
        // A registry orders families by name (and every name is registered once).
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn written(mut frame: Frame, others: &[MetricFamily]) -> String {
        let mut out = String::new();
        write_page(&mut out, &mut frame, others);
        out
    }

    /// Equal pages, or the first line where they differ.
    fn assert_same_page(written: &str, reference: &str) {
        for (i, (w, r)) in written.lines().zip(reference.lines()).enumerate() {
            assert_eq!(w, r, "line {}", i + 1);
        }
        assert_eq!(written.lines().count(), reference.lines().count());
        assert_eq!(written, reference);
    }

    fn stream_event(app: &str, k: usize, area: Area, event_time: Option<i64>) -> StreamEvent {
        StreamEvent {
            stream: StreamKey {
                app: app.into(),
                appname: "live".into(),
                stream_id: format!("s{k}").into(),
            },
            sequence: format!("q{k}"),
            event_time,
            area,
        }
    }

    /// Domains whose labels need escaping, sort surprisingly or overflow the cap; all areas;
    /// codes whose text order is not their numeric order and codes that collapse into `other`;
    /// counts beyond 2^53 and sums with and without fractions of a second.
    fn populated_truth() -> Truth {
        let limits = Limits {
            dedup_window_ms: 3_600_000,
            max_domains: 9,
        };
        let big = |counts: u64, sum_ms: u64| {
            Value::Histogram(Histogram {
                counts: vec![counts; PUSH_DURATION_BOUNDS_MS.len() + 1],
                sum_ms,
            })
        };
        let huge: Domain = "huge.example".into();
        let series = vec![
            (
                Series::Pushes(huge.clone(), Area::Unknown),
                Value::Count(u64::MAX),
            ),
            (
                Series::Pushes(huge.clone(), Area::Mainland),
                Value::Count((1 << 53) + 1),
            ),
            (
                Series::Disconnects(huge.clone(), Area::Mainland, ErrCode::new(3)),
                Value::Count(1 << 60),
            ),
            (
                Series::PushDuration(huge.clone(), Area::Unknown),
                big(1 << 40, u64::MAX),
            ),
            (
                Series::PushDuration(huge.clone(), Area::Mainland),
                big(1, 999_999_999_999_999),
            ),
            (
                Series::PushDuration(huge, Area::Overseas),
                big(2, 1_000_000_000_000_001),
            ),
            (
                Series::Callbacks(EventKind::Unknown, Outcome::Accepted),
                Value::Count(7),
            ),
            (Series::DomainsOverflow, Value::Count(3)),
        ];
        let snapshot = Snapshot {
            series,
            ..Default::default()
        };
        let mut truth = Truth::restore(snapshot, limits, NOW_MS).unwrap();
        let domains = [
            "push2.example",
            "push10.example",
            "a\"quoted\"",
            "back\\slash\\",
            "new\nline",
            "ünï.example",
            "Upper.example",
            "",
            "over1.example",
            "over2.example",
        ];
        let areas = [Area::Mainland, Area::Overseas, Area::Unknown];
        let codes = [1, 8, 14, 21, 3, 100, 999, 1000, -1, 0];
        let durations = [
            Some(1),
            Some(999),
            Some(10_000),
            Some(10_001),
            Some(128_581),
            None,
            Some(123_456_789),
            Some(i64::MAX),
            Some(-5),
        ];
        let mut k = 0;
        for (i, app) in domains.iter().enumerate() {
            for (j, area) in areas.iter().enumerate().skip(i % 2) {
                for n in 0..(i + j) % 5 + 1 {
                    k += 1;
                    let event_time =
                        [None, Some(NOW_MS / 1000 - 3), Some(NOW_MS / 1000 + 60)][k % 3];
                    let push = stream_event(app, k, *area, event_time);
                    truth.apply(&Event::Push(push.clone()), NOW_MS + k as i64);
                    if n % 3 == 2 {
                        continue; // stays live
                    }
                    let ended = Event::Disconnect {
                        session: push,
                        errcode: codes[(k * 7) % codes.len()],
                        push_duration_ms: durations[k % durations.len()],
                    };
                    truth.apply(&ended, NOW_MS + 1_000 + k as i64);
                }
            }
        }
        for (kind, outcome) in [
            (EventKind::Other, Outcome::Ignored),
            (EventKind::Unknown, Outcome::Malformed),
            (EventKind::Push, Outcome::BadSignature),
            (EventKind::Disconnect, Outcome::Error),
            (EventKind::Other, Outcome::Duplicate),
        ] {
            truth.count(kind, outcome);
        }
        truth
    }

    fn shared(truth: Truth) -> Arc<Shared> {
        Arc::new(Shared {
            truth: RwLock::new(truth),
            fault: Mutex::new(None),
        })
    }

    fn view_of(truth: &Truth) -> View {
        View {
            live: truth.live_streams(),
            counters: truth.counters().clone(),
        }
    }

    #[test]
    fn text_writer_matches_the_prometheus_encoder() {
        let truth = populated_truth();
        let view = view_of(&truth);
        let shared = shared(truth);
        let metrics = Metrics::new(shared.clone());
        let others = metrics.registry.gather();
        let reference = reference(view.clone(), &others);
        assert!(
            reference.contains("domain=\"a\\\"quoted\\\"\""),
            "{reference}"
        );
        assert!(reference.contains("domain=\"new\\nline\""));
        assert!(reference.contains("domain=\"back\\\\slash\\\\\""));
        assert!(reference.contains("domain=\"_other\""));
        assert!(reference.contains("errcode=\"other\""));
        assert!(reference.contains("e+") || reference.contains("18446744073709552000"));
        assert!(reference.contains("process_") == cfg!(target_os = "linux"));
        // From the ledger's state, through its lock.
        let mut frame = Frame::default();
        shared.fill(&mut frame);
        assert_same_page(&written(frame.clone(), &others), &reference);
        // Filling a used frame again gives the same.
        shared.fill(&mut frame);
        assert_same_page(&written(frame, &others), &reference);
        // From a view as a shared store delivers it (live streams already merged).
        assert_same_page(
            &written(Frame::copy(&view.live, &view.counters), &others),
            &reference,
        );
        // Whole scrapes (the second reusing the first one's frame): the same page but for the
        // process metrics of their own moment.
        let strip = |page: &str| {
            page.lines()
                .filter(|l| !l.contains("process_"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_same_page(&strip(&metrics.render()), &strip(&reference));
        assert_same_page(&strip(&metrics.render()), &strip(&reference));
    }

    #[test]
    fn text_writer_matches_on_an_empty_state() {
        let limits = Limits {
            dedup_window_ms: 1_000,
            max_domains: 10,
        };
        let truth = Truth::new(limits);
        let view = view_of(&truth);
        let others = Metrics::new(shared(Truth::new(limits))).registry.gather();
        let reference = reference(view, &others);
        assert!(!reference.contains(ACTIVE_STREAMS));
        assert!(reference.contains(CALLBACK_DELAY));
        assert_same_page(
            &written(Frame::copy(truth.live(), truth.counters()), &others),
            &reference,
        );
    }

    #[test]
    fn a_negative_or_huge_last_callback_time_is_written_as_the_encoder_does() {
        for ms in [-1_500, -1, 1, 1_000, i64::MAX, i64::MIN, 1 << 53] {
            let frame = Frame {
                last_callback_ms: ms,
                ..Default::default()
            };
            let mut view = View::default();
            view.counters.last_callback_ms = ms;
            assert_same_page(&written(frame, &[]), &reference(view, &[]));
        }
    }

    #[test]
    fn active_streams_lists_pushed_series_at_zero_and_sums_live_ones() {
        let d = |s: &str| Domain::from(s);
        let mut frame = Frame {
            live: vec![
                ((d("b"), Area::Overseas), 2),
                ((d("a"), Area::Unknown), 0),
                ((d("b"), Area::Mainland), 1),
            ],
            pushes: vec![((d("a"), Area::Mainland), 5), ((d("b"), Area::Overseas), 9)],
            ..Default::default()
        };
        let rows: Vec<_> = frame
            .active_streams()
            .into_iter()
            .map(|(d, a, n)| (d.to_string(), a, n))
            .collect();
        assert_eq!(
            rows,
            [
                ("a".into(), Area::Mainland, 0),
                ("a".into(), Area::Unknown, 0),
                ("b".into(), Area::Mainland, 1),
                ("b".into(), Area::Overseas, 2),
            ]
        );
    }

    #[test]
    fn labels_in_enum_order_are_in_text_order() {
        // Series keyed by (domain, area) are written in map order; a registry sorts them by
        // label text. The two agree only while the areas' order is their labels' order.
        let areas = [Area::Mainland, Area::Overseas, Area::Unknown];
        for pair in areas.windows(2) {
            assert!(pair[0] < pair[1] && pair[0].as_str() < pair[1].as_str());
        }
    }

    fn seconds(ms: i64) -> String {
        let mut out = String::new();
        push_seconds(&mut out, ms);
        out
    }

    fn count(n: u64) -> String {
        let mut out = String::new();
        push_count(&mut out, n);
        out
    }

    #[test]
    fn numbers_are_written_as_f64_display_writes_them() {
        for ms in [
            0,
            1,
            10,
            100,
            999,
            1_000,
            1_001,
            1_010,
            1_100,
            128_581,
            999_999_999_999_999,
        ] {
            assert_eq!(seconds(ms), (ms as f64 / 1000.0).to_string(), "{ms}");
        }
        assert_eq!(seconds(1_500), "1.5");
        assert_eq!(seconds(-1_500), "-1.5");
        for n in [
            0,
            1,
            9,
            10,
            u64::from(u32::MAX),
            EXACT_F64 - 1,
            EXACT_F64,
            EXACT_F64 + 1,
            u64::MAX,
        ] {
            assert_eq!(count(n), (n as f64).to_string(), "{n}");
        }
    }

    proptest! {
        #[test]
        fn seconds_are_written_as_f64_display_writes_them(
            ms in prop_oneof![0..1_000_000_000_000_000_i64, any::<i64>()]
        ) {
            prop_assert_eq!(seconds(ms), (ms as f64 / 1000.0).to_string());
        }

        #[test]
        fn large_sums_are_written_as_f64_display_writes_them(ms in any::<u64>()) {
            let mut out = String::new();
            push_seconds(&mut out, ms);
            prop_assert_eq!(out, (ms as f64 / 1000.0).to_string());
        }

        #[test]
        fn counts_are_written_as_f64_display_writes_them(
            n in prop_oneof![0..=EXACT_F64 * 2, any::<u64>()]
        ) {
            prop_assert_eq!(count(n), (n as f64).to_string());
        }

        #[test]
        fn escaping_matches_the_encoder(value in "[a-z\\\\\"\n\u{e9}_]{0,12}") {
            let truth = {
                let mut t = Truth::new(Limits { dedup_window_ms: 1_000, max_domains: 10 });
                t.apply(&Event::Push(stream_event(&value, 1, Area::Mainland, None)), NOW_MS);
                t
            };
            let reference = reference(view_of(&truth), &[]);
            prop_assert_eq!(written(Frame::copy(truth.live(), truth.counters()), &[]), reference);
        }
    }
}
