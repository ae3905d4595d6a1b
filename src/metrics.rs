//! `/metrics`: the event metrics rendered at scrape time from the state, plus the process and
//! build metrics.
//!
//! Nothing here counts anything: [`StateCollector`] reads the same state the ledger persists, so
//! what Prometheus sees cannot drift from what is stored and survives restarts with it.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::callback::{EventKind, Outcome};
use crate::state::counters::{Histogram, CALLBACK_DELAY_BOUNDS_MS, PUSH_DURATION_BOUNDS_MS};
use crate::state::View;

/// Where the rendered numbers come from: the local state, or a shared store's copy.
pub trait ViewSource: Send + Sync + 'static {
    /// The numbers to render now. Called at every scrape: must be quick and must not block on
    /// the network.
    fn view(&self) -> View;
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
const FAMILIES: [(&str, &str, MetricType, &[&str]); 8] = [
    (ACTIVE_STREAMS, "Live streams now, by push domain and area.", MetricType::GAUGE, &["domain", "area"]),
    (PUSHES, "Push-started callbacks recorded.", MetricType::COUNTER, &["domain", "area"]),
    (DISCONNECTS, "Push-disconnected callbacks recorded, by error code and its cause class.", MetricType::COUNTER, &["domain", "area", "errcode", "reason"]),
    (PUSH_DURATION, "How long pushes lasted, from the push_duration of disconnects.", MetricType::HISTOGRAM, &["domain", "area"]),
    (CALLBACKS, "Requests to the callback path, by event and outcome.", MetricType::COUNTER, &["event", "outcome"]),
    (CALLBACK_DELAY, "Receive time minus event_time of recorded push and disconnect callbacks.", MetricType::HISTOGRAM, &[]),
    (LAST_CALLBACK, "Unix time of the last recorded push or disconnect callback; 0 before the first.", MetricType::GAUGE, &[]),
    (DOMAINS_OVERFLOW, "Push and disconnect events counted under domain=\"_other\" because --metrics.max-domains was reached.", MetricType::COUNTER, &[]),
];

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

/// Renders the event metrics from the state at each scrape.
pub struct StateCollector {
    source: Arc<dyn ViewSource>,
    descs: Vec<Desc>,
}

impl StateCollector {
    pub fn new(source: Arc<dyn ViewSource>) -> Self {
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
        StateCollector { source, descs }
    }
}

fn family(name: &str, metrics: Vec<proto::Metric>) -> MetricFamily {
    let (_, help, kind, _) = FAMILIES.iter().find(|f| f.0 == name).expect("known family");
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_string());
    mf.set_help(help.to_string());
    mf.set_field_type(*kind);
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

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let View { live, counters: c } = self.source.view();
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

/// Everything `/metrics` serves.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(source: Arc<dyn ViewSource>) -> Self {
        let registry = Registry::new();
        registry
            .register(Box::new(StateCollector::new(source)))
            .expect("state metrics register once");
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
        Metrics { registry }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
