use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricType};
use prometheus::Encoder;
use proptest::prelude::*;

use super::*;
use crate::callback::{Event, StreamEvent, StreamKey};
use crate::ledger::Shared;
use crate::state::counters::{Delta, Series, Value};
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
                let event_time = [None, Some(NOW_MS / 1000 - 3), Some(NOW_MS / 1000 + 60)][k % 3];
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
        truth: parking_lot::RwLock::new(truth),
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

/// The values of `family`'s samples of `domain` in a written page.
fn values_of(page: &str, family: &str, domain: &str) -> Vec<String> {
    let domain = format!("domain=\"{domain}\"");
    page.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&domain))
        .map(|l| l.rsplit_once(' ').unwrap().1.to_string())
        .collect()
}

/// A frame filled a piece at a time: unchanged counters give the frame a copy in one piece
/// gives; counters changed between two pieces (as the ledger's writer does while a scrape lets
/// go of the lock) give each series once, those behind the copy as they were, those ahead as
/// they are when reached, a series removed under the copy's cursor skipped cleanly.
#[test]
fn a_frame_filled_in_pieces_copies_each_series_once() {
    let d = |i: usize| -> Domain { format!("d{i:04}.example").into() };
    let mainland = Area::Mainland;
    let mut counters = Counters::default();
    let mut live = BTreeMap::new();
    for i in 0..1_000 {
        counters.inc(Series::Pushes(d(i), mainland));
        counters.inc(Series::Disconnects(d(i), mainland, ErrCode::new(1)));
        live.insert((d(i), mainland), 1);
    }
    let whole = written(Frame::copy(&live, &counters), &[]);
    let mut frame = Frame::default();
    let mut filling = frame.filling();
    let mut pieces = 1;
    while !filling.next(&live, &counters) {
        pieces += 1;
    }
    // The live streams, then 1,000 disconnects and 1,000 pushes at most `PIECE` at a time.
    assert!(pieces > 1 + 2 * (1_000 / PIECE), "{pieces} pieces");
    assert_same_page(&written(frame.clone(), &[]), &whole);

    let mut filling = frame.filling();
    // Up to the first piece of disconnects, after the live streams.
    while filling.frame.disconnects.is_empty() {
        assert!(!filling.next(&live, &counters));
    }
    assert_eq!(filling.frame.live.len(), 1_000);
    let copied = filling.frame.disconnects.len();
    assert!(copied < 1_000);
    let last_copied = d(copied - 1);
    assert_eq!(filling.frame.disconnects[copied - 1].0 .0, last_copied);
    // The writer's batch: a disconnect behind the copy (of a copied domain, and of a new one
    // sorting first), one ahead of it, one of a new domain sorting last; a push of each; the
    // series the cursor stands on undone and gone.
    let changed = [d(0), "a.example".into(), d(999), "z.example".into()];
    for domain in &changed {
        counters.inc(Series::Disconnects(
            domain.clone(),
            mainland,
            ErrCode::new(1),
        ));
        counters.inc(Series::Pushes(domain.clone(), mainland));
    }
    counters.revert(&Delta::Inc(Series::Disconnects(
        last_copied.clone(),
        mainland,
        ErrCode::new(1),
    )));
    assert!(!counters
        .disconnects
        .contains_key(&(last_copied.clone(), mainland, ErrCode::new(1))));
    while !filling.next(&live, &counters) {}
    let page = written(frame, &[]);
    let disconnects = |domain: &str| values_of(&page, DISCONNECTS, domain);
    let pushes = |domain: &str| values_of(&page, PUSHES, domain);
    assert_eq!(
        disconnects("d0000.example"),
        ["1"],
        "copied before the change"
    );
    assert!(disconnects("a.example").is_empty(), "behind the copy");
    assert_eq!(
        disconnects(&last_copied),
        ["1"],
        "copied before it was undone"
    );
    assert_eq!(disconnects(&d(copied)), ["1"], "the next after the cursor");
    assert_eq!(disconnects("d0999.example"), ["2"], "ahead of the copy");
    assert_eq!(disconnects("z.example"), ["1"]);
    for domain in ["d0000.example", "d0999.example"] {
        assert_eq!(pushes(domain), ["2"]);
    }
    for domain in ["a.example", "z.example"] {
        assert_eq!(pushes(domain), ["1"]);
    }
    let lines: Vec<_> = page.lines().filter(|l| !l.starts_with('#')).collect();
    let unique: std::collections::BTreeSet<_> = lines
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().0)
        .collect();
    assert_eq!(unique.len(), lines.len(), "a series twice");
}

/// A frame its source left empty (a replica that has not read Redis yet) writes no event
/// family, not zeros, which Prometheus would take for counter resets; the others are written.
#[test]
fn a_frame_left_unfilled_writes_only_the_other_families() {
    let others = Metrics::new(shared(populated_truth())).registry.gather();
    assert!(!others.is_empty());
    let page = written(Frame::default(), &others);
    for (name, ..) in FAMILIES {
        assert!(!page.contains(&format!("# TYPE {name} ")), "{page}");
    }
    for family in &others {
        assert!(
            page.contains(&format!("# TYPE {} ", family.name())),
            "{page}"
        );
    }
    let filled = Frame::copy(populated_truth().live(), populated_truth().counters());
    assert!(written(filled, &others).contains(CALLBACKS));
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
            filled: true,
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
    let frame = Frame {
        live: vec![
            ((d("a"), Area::Unknown), 0),
            ((d("b"), Area::Mainland), 1),
            ((d("b"), Area::Overseas), 2),
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

proptest! {
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
