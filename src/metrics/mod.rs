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
//!
//! Layout: the families, the [`Frame`] a scrape copies and the page are here; `text` writes
//! label sets, sample lines and numbers; `storage` keeps the exporter's own storage metrics;
//! `process` the crate's process metrics with a finer CPU time; `tests` holds the text writer
//! to the crate's encoder.

#[cfg(target_os = "linux")]
mod process;
mod storage;
#[cfg(test)]
mod tests;
mod text;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts, Registry, TextEncoder};

pub use storage::{storage_ready, CommitStats};
use text::{counter_line, domain_area, push_escaped, push_seconds, HistogramText};

use crate::area::Area;
use crate::callback::{EventKind, Outcome};
use crate::errcode::ErrCode;
use crate::state::counters::{
    Counters, Domain, Histogram, CALLBACK_DELAY_BOUNDS_MS, PUSH_DURATION_BOUNDS_MS,
};

/// Where the rendered numbers come from: the local state, or a shared store's copy.
pub trait ViewSource: Send + Sync + 'static {
    /// Copies the numbers to render now into `frame` with [`Frame::fill`], or a piece at a
    /// time with [`Frame::filling`] under a lock that the state's writer waits on, or leaves it
    /// empty when it has none (the event families are then left out of the page). Called at
    /// every scrape: must be quick and must not block on the network. Sorting and writing the
    /// text happen after it returns.
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
    /// Count of each bucket of [`PUSH_DURATION_BOUNDS_MS`], then of the one above every bound.
    counts: [u64; PUSH_DURATION_BOUNDS_MS.len() + 1],
    /// Sum of the observed durations, in milliseconds; written in seconds.
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
/// state's lock, a [piece](Frame::filling) at a time; [`Metrics`] keeps one between scrapes so
/// that the copy reuses its memory.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// Live streams per (domain, area), sorted as in the state's map.
    live: Vec<((Domain, Area), u64)>,
    /// The rest in the order of [`Counters`]' maps.
    pushes: Vec<((Domain, Area), u64)>,
    /// Disconnects per (domain, area, errcode); sorted by errcode as text only when written.
    disconnects: Vec<((Domain, Area, ErrCode), u64)>,
    /// Push-duration buckets per (domain, area).
    push_duration: Vec<((Domain, Area), Buckets)>,
    /// Callbacks per (event, outcome); pairs not seen yet are written at 0 all the same.
    callbacks: Vec<((EventKind, Outcome), u64)>,
    /// Non-cumulative, as in [`Histogram`]; empty before the first observation.
    callback_delay: Vec<u64>,
    /// Sum of the callback delays, in milliseconds.
    callback_delay_sum_ms: u64,
    /// Receive time of the last accepted callback, unix milliseconds; 0 before the first.
    last_callback_ms: i64,
    /// Events counted under the overflow domain because of the domain cap.
    domains_overflow: u64,
    /// Whether the frame holds the numbers: a replica that has not read Redis yet has none, and
    /// writes none rather than zeros, which Prometheus would take for counter resets.
    filled: bool,
}

impl Frame {
    /// A frame of live streams per (domain, area) and the counters.
    #[cfg(test)]
    fn copy(live: &BTreeMap<(Domain, Area), u64>, counters: &Counters) -> Frame {
        let mut frame = Frame::default();
        frame.fill(live, counters);
        frame
    }

    /// Replaces the contents with live streams per (domain, area) and the counters, all at
    /// once, reusing the memory. A source whose numbers sit under a lock the state's writer
    /// waits on copies them in [pieces](Frame::filling) instead.
    pub fn fill(&mut self, live: &BTreeMap<(Domain, Area), u64>, counters: &Counters) {
        let mut filling = self.filling();
        while !filling.step(live, counters, usize::MAX) {}
    }

    /// Empties the frame, outside any lock, to fill it again a [piece](Filling::next) at a
    /// time.
    pub fn filling(&mut self) -> Filling<'_> {
        self.clear();
        Filling {
            frame: self,
            part: Part::Live,
        }
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
        self.filled = false;
    }

    /// `tencent_css_active_streams`: every (domain, area) that ever had a push, at 0 when nothing
    /// is live, so a series that drops to 0 stays visible (as
    /// [`Truth::live_streams`](crate::state::Truth::live_streams) lists them); sorted.
    fn active_streams(&self) -> Vec<(&Domain, Area, u64)> {
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

/// Entries of the state a scrape copies under one hold of its lock. The state's writer holds
/// the lock through each batch and waits for a reader to let go: copying 1,000 domains' 14,000
/// entries at once held it for 0.13 ms on an idle machine and 1 to 4 ms under load (the
/// entries out of the cache, the copying thread preempted), and every callback waited with it.
/// A piece of 256 holds it for tens of microseconds at most (16 µs with 1,000 domains, 69 µs
/// with 10,000, `cargo bench --bench metrics -- metrics_lock`), and the writer takes its turn
/// between two.
pub const PIECE: usize = 256;

/// A [`Frame`] being filled a piece at a time, so that a source can let go of its lock between
/// two pieces ([`Frame::filling`]).
///
/// Each family resumes after the last key it copied, so a series is copied once even if the
/// maps changed between two pieces; one the writer added behind the copy shows on the next
/// page. A page therefore holds each family as it was at some moment after the scrape was
/// asked, as with any exporter that gathers its collectors one by one: every callback answered
/// before the scrape is in it, and two families may differ by the batches recorded while it
/// was copied.
pub struct Filling<'a> {
    /// The frame, emptied when the filling began.
    frame: &'a mut Frame,
    /// The family the next piece starts with.
    part: Part,
}

/// The families of a [`Frame`] in the order they are copied. Disconnects before pushes, and the
/// callbacks' counters last: as the counters only grow from one piece to the next, a page never shows
/// more disconnects than pushes, nor more pushes and disconnects than accepted callbacks, unless
/// the state itself did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Live,
    Disconnects,
    PushDuration,
    Pushes,
    /// The callbacks' counters (a few dozen) and the single numbers.
    Rest,
    Done,
}

impl Filling<'_> {
    /// Copies the next [`PIECE`] entries from the state as it is now; `true` once the frame
    /// holds every family.
    pub fn next(&mut self, live: &BTreeMap<(Domain, Area), u64>, counters: &Counters) -> bool {
        self.step(live, counters, PIECE)
    }

    fn step(
        &mut self,
        live: &BTreeMap<(Domain, Area), u64>,
        counters: &Counters,
        mut budget: usize,
    ) -> bool {
        let frame = &mut *self.frame;
        loop {
            let count = |n: &u64| *n;
            let finished = match self.part {
                Part::Live => copy_after(live, &mut frame.live, &mut budget, count),
                Part::Disconnects => copy_after(
                    &counters.disconnects,
                    &mut frame.disconnects,
                    &mut budget,
                    count,
                ),
                Part::PushDuration => copy_after(
                    &counters.push_duration,
                    &mut frame.push_duration,
                    &mut budget,
                    Buckets::of,
                ),
                Part::Pushes => copy_after(&counters.pushes, &mut frame.pushes, &mut budget, count),
                Part::Rest => {
                    frame
                        .callbacks
                        .extend(counters.callbacks.iter().map(|(k, n)| (*k, *n)));
                    if let Some(h) = &counters.callback_delay {
                        frame.callback_delay.extend_from_slice(&h.counts);
                        frame.callback_delay_sum_ms = h.sum_ms;
                    }
                    frame.last_callback_ms = counters.last_callback_ms;
                    frame.domains_overflow = counters.domains_overflow;
                    frame.filled = true;
                    true
                }
                Part::Done => return true,
            };
            if !finished {
                return false;
            }
            self.part = match self.part {
                Part::Live => Part::Disconnects,
                Part::Disconnects => Part::PushDuration,
                Part::PushDuration => Part::Pushes,
                Part::Pushes => Part::Rest,
                Part::Rest | Part::Done => Part::Done,
            };
        }
    }
}

/// Copies into `out` the entries of `map` after the last key `out` holds, at most `budget` of
/// them (taken off it); whether `map` has none left after them.
fn copy_after<K: Ord + Clone, V, T>(
    map: &BTreeMap<K, V>,
    out: &mut Vec<(K, T)>,
    budget: &mut usize,
    item: impl Fn(&V) -> T,
) -> bool {
    let rest = match out.last().map(|(last, _)| last.clone()) {
        Some(last) => map.range((Bound::Excluded(last), Bound::Unbounded)),
        None => map.range(..),
    };
    let before = out.len();
    out.extend(rest.take(*budget).map(|(k, v)| (k.clone(), item(v))));
    *budget -= out.len() - before;
    // Fewer than the budget were left: the map is done.
    *budget > 0
}

/// Everything `/metrics` serves.
pub struct Metrics {
    /// Where each scrape copies its numbers from: the local ledger's state, or Redis.
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
            .register(Box::new(process::ProcessMetrics::for_self()))
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
        self.write(self.copy())
    }

    /// Copies what the next page shows: the state's numbers, under the lock the ledger's
    /// writer waits on, and the registry's families. The part of a scrape that holds anything
    /// up; [`Metrics::write`] then takes no lock a callback waits on.
    pub fn copy(&self) -> Copied {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Concurrent scrapes: the first takes the spare frame, the others start empty ones.
        let mut frame = spare.unwrap_or_default();
        self.source.fill(&mut frame);
        Copied {
            frame,
            others: self.registry.gather(),
        }
    }

    /// The text exposition of what `copied` holds.
    pub fn write(&self, copied: Copied) -> String {
        let Copied { mut frame, others } = copied;
        let mut out = String::with_capacity(self.last_len.load(Ordering::Relaxed) + 4096);
        write_page(&mut out, &mut frame, &others);
        self.last_len.store(out.len(), Ordering::Relaxed);
        frame.clear();
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame);
        out
    }
}

/// The numbers of one page, copied by [`Metrics::copy`] and written by [`Metrics::write`].
pub struct Copied {
    /// The event metrics, from the state.
    frame: Frame,
    /// The registry's families: build info, process metrics, the exporter's own.
    others: Vec<MetricFamily>,
}

/// Writes the event families of `frame` (none if it was not filled) and the `others` (sorted by
/// name, as `Registry::gather` returns them) into `out`, every family in name order.
fn write_page(out: &mut String, frame: &mut Frame, others: &[MetricFamily]) {
    if !frame.filled {
        for mf in others {
            encode(out, mf);
        }
        return;
    }
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
