//! Property tests under hostile input.
//!
//! - Random histories of pushes and disconnects (duplicates, reordering, replaced sessions, late
//!   older pushes, concurrent bursts, restarts, nonsense event times and durations) go through
//!   the ledger, the same path a verified callback takes, and after every step the state must
//!   equal a small reference model of the truth rules written here, independently of the
//!   exporter's own rules; the rendered `/metrics` must say the same.
//! - Arbitrary bytes and arbitrary JSON-ish bodies go through the parser and the verifier without
//!   a panic; well-typed callbacks, in every representation Tencent uses, parse to exactly their
//!   fields; and over HTTP every hostile body is answered 200, 400, 401 or 413 and counted once.
//! - Regressions: hostile values found by these properties, pinned as plain tests.
//!
//! `PROPTEST_CASES=N` runs N cases of each property instead of the defaults below.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use tencent_css_exporter::callback::{self, Event, Outcome, StreamEvent, StreamKey};
use tencent_css_exporter::ledger::{Ledger, LedgerThread, Shared, Unrecorded};
use tencent_css_exporter::metrics::{Metrics, ViewSource};
use tencent_css_exporter::redis::RedisLedger;
use tencent_css_exporter::signature::{self, Keys, Verifier};
use tencent_css_exporter::store::{self, SyncMode};

use crate::helpers::*;

// ---------------------------------------------------------------------------------------------
// Histories of events
// ---------------------------------------------------------------------------------------------

/// The streams of every history: (app, appname, stream_id). Two domains, and one stream id that
/// exists in both, so only the whole triple tells streams apart; and the first stream again
/// without `appname` ([`NO_PATH`]).
const STREAMS: [(&str, &str, &str); 4] = [
    ("a.example.com", "live", "cam1"),
    ("a.example.com", "live", "cam2"),
    ("b.example.com", "", "cam1"),
    ("a.example.com", "", "cam1"),
];
/// The stream that is the first one without `appname`: it has the first one's sequences, so
/// that a disconnect of either finds the other's session.
const NO_PATH: usize = 3;
/// Sessions per stream; one more sequence id, [`SHARED`], is used by every stream (Tencent's
/// sequence ids are meant to be unique, and the dedup key does not include the stream).
const SEQUENCES: usize = 4;
const SHARED: usize = SEQUENCES;
/// Event times are mostly `T0` plus a few seconds: an hour ago, believable (see
/// [`believable`]) and in the past, so a push without `event_time` (which starts "now") is
/// newer than every one of them.
static T0: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| now() - 3600);
/// Event times a hostile or broken sender may claim.
const ODD_TIMES: [i64; 5] = [
    i64::MIN,
    -9_000_000_000_000_000,
    0,
    9_000_000_000_000,
    i64::MAX,
];
const SET_IDS: [Option<i64>; 9] = [
    None,
    Some(1),
    Some(6),
    Some(7),
    Some(33),
    Some(200),
    Some(0),
    Some(201),
    Some(-4),
];
const ERRCODES: [i64; 22] = [
    0,
    1,
    3,
    35,
    21,
    8,
    20,
    12,
    17,
    6,
    33,
    5,
    24,
    18,
    19,
    22,
    36,
    999,
    1000,
    -1,
    i64::MAX,
    i64::MIN,
];
/// Whether the exporter believes an event time: the odd ones are decades away from the clock,
/// `T0`'s within an hour of it; one not believed counts as absent.
fn believable(time: Option<i64>) -> Option<i64> {
    time.filter(|t| !ODD_TIMES.contains(t))
}

/// `event_type`s of events that are acknowledged and ignored.
const OTHER_TYPES: [i64; 5] = [2, 3, 100, 200, -1];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Push,
    Disconnect,
    Other,
}

/// One event of a history, in the model's terms.
#[derive(Debug, Clone)]
struct Ev {
    kind: Kind,
    stream: usize,
    /// `0..SEQUENCES`: a session of this stream; `SHARED`: the sequence id every stream uses.
    seq: usize,
    /// `event_time` (unix seconds); `None`: the callback has none.
    time: Option<i64>,
    set_id: Option<i64>,
    errcode: i64,
    push_duration_ms: Option<i64>,
    other_type: i64,
}

impl Ev {
    /// Tencent's ids are decimal numbers; one session of each stream has the digits of another
    /// with a leading zero (a different id), and the shared one is not a number at all.
    fn sequence(&self) -> String {
        let stream = if self.stream == NO_PATH {
            0
        } else {
            self.stream
        };
        match self.seq {
            SHARED => "shared".into(),
            2 => format!("0{}", 10 + stream),
            3 => format!("{}", 10 + stream),
            n => format!("{}{n}", 66744681188066 + stream as u64 * 100),
        }
    }

    fn to_event(&self) -> Event {
        let (app, appname, stream_id) = STREAMS[self.stream];
        let session = StreamEvent {
            stream: StreamKey {
                app: app.into(),
                appname: appname.into(),
                stream_id: stream_id.into(),
            },
            sequence: self.sequence(),
            event_time: self.time,
            area: tencent_css_exporter::area::Area::from_set_id(self.set_id),
        };
        match self.kind {
            Kind::Push => Event::Push(session),
            Kind::Disconnect => Event::Disconnect {
                session,
                errcode: self.errcode,
                push_duration_ms: self.push_duration_ms,
            },
            Kind::Other => Event::Other {
                event_type: self.other_type,
            },
        }
    }
}

/// One step of a history.
#[derive(Debug, Clone)]
enum Step {
    /// Record one event and wait for its answer.
    One(Ev),
    /// Deliver an event of the history so far once more (a retry by Tencent).
    Again(Index),
    /// Record several events at once: the ledger may take them as one batch.
    Burst(Vec<Ev>),
    /// Stop the ledger and start it again on the same store.
    Restart,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        prop_oneof![6 => Just(Kind::Push), 5 => Just(Kind::Disconnect), 1 => Just(Kind::Other)],
        0..STREAMS.len(),
        prop_oneof![8 => 0..SEQUENCES, 1 => Just(SHARED)],
        prop_oneof![
            16 => (0i64..6).prop_map(|k| Some(*T0 + k * 10)),
            2 => Just(None),
            1 => prop::sample::select(ODD_TIMES.to_vec()).prop_map(Some),
        ],
        prop::sample::select(SET_IDS.to_vec()),
        prop::sample::select(ERRCODES.to_vec()),
        prop::option::of(prop_oneof![
            20 => 0i64..1_000_000_000,
            1 => Just(i64::MAX),
            1 => 0..=i64::MAX,
        ]),
        prop::sample::select(OTHER_TYPES.to_vec()),
    )
        .prop_map(
            |(kind, stream, seq, time, set_id, errcode, push_duration_ms, other_type)| Ev {
                kind,
                stream,
                seq,
                time,
                set_id,
                errcode,
                push_duration_ms,
                other_type,
            },
        )
}

fn history(restarts: bool, max_len: usize) -> BoxedStrategy<Vec<Step>> {
    let one = ev().prop_map(Step::One);
    let again = any::<Index>().prop_map(Step::Again);
    let burst = prop::collection::vec(ev(), 2..6).prop_map(Step::Burst);
    let step = if restarts {
        prop_oneof![12 => one, 4 => again, 2 => burst, 1 => Just(Step::Restart)].boxed()
    } else {
        prop_oneof![12 => one, 4 => again, 2 => burst].boxed()
    };
    prop::collection::vec(step, 1..max_len).boxed()
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// When a session started, as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Since {
    /// The push's `event_time`.
    At(i64),
    /// No `event_time`: the time the exporter received it, somewhere in `lo..=hi`.
    Received { lo: i64, hi: i64 },
}

impl Since {
    /// Whether a session starting at `self` started before one starting at `other`.
    fn before(self, other: Since) -> bool {
        match (self, other) {
            (Since::At(a), Since::At(b)) => a < b,
            (Since::At(a), Since::Received { lo, hi }) => {
                assert!(a < lo || a > hi, "event time {a} too close to the clock");
                a < lo
            }
            (Since::Received { lo, hi }, Since::At(b)) => {
                assert!(hi < b || lo >= b, "event time {b} too close to the clock");
                hi < b
            }
            // Received later than (or in the same second as) the live one.
            (Since::Received { .. }, Since::Received { .. }) => false,
        }
    }

    fn holds(self, since: i64) -> bool {
        match self {
            Since::At(a) => since == a,
            Since::Received { lo, hi } => (lo..=hi).contains(&since),
        }
    }
}

#[derive(Debug, Clone)]
struct LiveSession {
    sequence: String,
    area: &'static str,
    since: Since,
}

fn area_label(set_id: Option<i64>) -> &'static str {
    match set_id {
        Some(id) if (1..=6).contains(&id) => "mainland",
        Some(id) if (7..=200).contains(&id) => "overseas",
        _ => "unknown",
    }
}

fn errcode_label(code: i64) -> String {
    if (0..1000).contains(&code) {
        code.to_string()
    } else {
        "other".into()
    }
}

/// The cause class of a disconnect code, from the table of the callback protocol.
fn reason_label(errcode: &str) -> &'static str {
    match errcode {
        "1" | "2" | "3" | "4" | "35" => "client_stop",
        "21" => "operator",
        "8" | "20" => "no_data",
        "12" | "13" | "14" | "15" | "16" | "17" => "network",
        "6" | "7" | "23" | "33" => "protocol",
        "5" | "9" | "10" | "11" | "24" => "internal",
        "18" | "19" => "rejected",
        _ => "unknown",
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Push => "push",
        Kind::Disconnect => "disconnect",
        Kind::Other => "other",
    }
}

/// What the exporter must hold after a history: the truth rules, restated.
#[derive(Debug, Default)]
struct Model {
    /// Delivered events are remembered (a long dedup window) or forgotten at once (a zero one).
    remembers: bool,
    delivered: HashSet<(String, Kind)>,
    live: BTreeMap<usize, LiveSession>,
    pushes: BTreeMap<(String, &'static str), u64>,
    disconnects: BTreeMap<(String, &'static str, String), u64>,
    callbacks: BTreeMap<(&'static str, &'static str), u64>,
    durations: BTreeMap<(String, &'static str), u64>,
    delays: u64,
    recorded: u64,
}

/// Every way an event can go, as [`Model::apply`] tells them apart.
const RULES: [&str; 13] = [
    "ignored",
    "duplicate push",
    "duplicate disconnect",
    "push starts a session",
    "push replaces another session",
    "push of the live session again",
    "late push of an older session",
    "push after its disconnect ends the live session",
    "push after its disconnect, of unknown start, leaves the live session",
    "push after its disconnect, nothing live",
    "disconnect ends its session",
    "disconnect ends its session under another appname",
    "disconnect of a session not live",
];

thread_local! {
    /// How often each rule came up in this thread's cases.
    static RULES_SEEN: std::cell::RefCell<BTreeMap<&'static str, u64>> = Default::default();
}

fn seen(rule: &'static str) {
    RULES_SEEN.with(|r| *r.borrow_mut().entry(rule).or_default() += 1);
}

/// Fails unless every rule came up in the cases run on this thread (so the generators keep
/// reaching every branch), and says how often.
fn assert_every_rule_seen() {
    assert_rules_seen(&[]);
}

/// [`assert_every_rule_seen`], but for the rules in `except`, which the cases cannot reach.
fn assert_rules_seen(except: &[&str]) {
    let seen = RULES_SEEN.with(|r| r.borrow().clone());
    eprintln!("rules exercised: {seen:#?}");
    for rule in RULES.into_iter().filter(|r| !except.contains(r)) {
        assert!(
            seen.get(rule).copied().unwrap_or(0) > 0,
            "no case exercised {rule:?}"
        );
    }
}

impl Model {
    fn new(remembers: bool) -> Self {
        Model {
            remembers,
            ..Model::default()
        }
    }

    /// Applies one event received at `now`; returns the outcome the exporter must answer.
    fn apply(&mut self, ev: &Ev, now: Since) -> &'static str {
        let event = kind_label(ev.kind);
        if ev.kind == Kind::Other {
            *self.callbacks.entry((event, "ignored")).or_default() += 1;
            seen("ignored");
            return "ignored";
        }
        let sequence = ev.sequence();
        let retry = self.delivered.contains(&(sequence.clone(), ev.kind));
        // The push of the session live in its stream is a retry even when nothing is remembered
        // (a zero window): that session was counted when it started.
        let live_again = ev.kind == Kind::Push
            && self
                .live
                .get(&ev.stream)
                .is_some_and(|l| l.sequence == sequence);
        if retry || live_again {
            *self.callbacks.entry((event, "duplicate")).or_default() += 1;
            seen(match (retry, ev.kind) {
                (false, _) => "push of the live session again",
                (true, Kind::Push) => "duplicate push",
                (true, _) => "duplicate disconnect",
            });
            return "duplicate";
        }
        if self.remembers {
            self.delivered.insert((sequence.clone(), ev.kind));
        }
        *self.callbacks.entry((event, "accepted")).or_default() += 1;
        self.recorded += 1;
        if believable(ev.time).is_some() {
            self.delays += 1;
        }
        let domain = STREAMS[ev.stream].0.to_string();
        let area = area_label(ev.set_id);
        if ev.kind == Kind::Push {
            *self.pushes.entry((domain, area)).or_default() += 1;
            let since = believable(ev.time).map_or(now, Since::At);
            let its_disconnect_came_first = self
                .delivered
                .contains(&(sequence.clone(), Kind::Disconnect));
            let live = self.live.get(&ev.stream);
            let older_than_live = live.is_some_and(|l| since.before(l.since));
            if older_than_live {
                seen("late push of an older session");
            } else if its_disconnect_came_first && live.is_some() && believable(ev.time).is_none() {
                // It may be older than the live one: that one's own disconnect ends it.
                seen("push after its disconnect, of unknown start, leaves the live session");
            } else if its_disconnect_came_first {
                // It replaced whatever was live, and is over already.
                seen(match self.live.remove(&ev.stream) {
                    Some(_) => "push after its disconnect ends the live session",
                    None => "push after its disconnect, nothing live",
                });
            } else {
                seen(match live {
                    Some(_) => "push replaces another session",
                    None => "push starts a session",
                });
                self.live.insert(
                    ev.stream,
                    LiveSession {
                        sequence,
                        area,
                        since,
                    },
                );
            }
        } else {
            let (app, _, id) = STREAMS[ev.stream];
            let is_its_session = |i: &usize, l: &LiveSession| {
                (STREAMS[*i].0, STREAMS[*i].2) == (app, id) && l.sequence == sequence
            };
            let own = self
                .live
                .get(&ev.stream)
                .is_some_and(|l| is_its_session(&ev.stream, l));
            let other = (!own)
                .then(|| {
                    self.live
                        .iter()
                        .find(|(i, l)| is_its_session(i, l))
                        .map(|(i, _)| *i)
                })
                .flatten();
            let ended = if own {
                seen("disconnect ends its session");
                self.live.remove(&ev.stream)
            } else if let Some(other) = other {
                // appname is not needed to account for an event: its sequence finds its push.
                seen("disconnect ends its session under another appname");
                self.live.remove(&other)
            } else {
                seen("disconnect of a session not live");
                None
            };
            // One that names no area counts under the area of the session it ends.
            let area = match ended {
                Some(ended) if area == "unknown" => ended.area,
                _ => area,
            };
            let code = errcode_label(ev.errcode);
            *self
                .disconnects
                .entry((domain.clone(), area, code))
                .or_default() += 1;
            if ev.push_duration_ms.is_some() {
                *self.durations.entry((domain, area)).or_default() += 1;
            }
        }
        "accepted"
    }

    /// Live streams per (domain, area): every pair that ever had a push, 0 when none is live.
    fn gauges(&self) -> BTreeMap<(String, &'static str), u64> {
        let mut gauges: BTreeMap<_, _> = self.pushes.keys().map(|k| (k.clone(), 0)).collect();
        for (stream, live) in &self.live {
            *gauges
                .entry((STREAMS[*stream].0.to_string(), live.area))
                .or_default() += 1;
        }
        gauges
    }
}

fn stream_key(i: usize) -> StreamKey {
    let (app, appname, stream_id) = STREAMS[i];
    StreamKey {
        app: app.into(),
        appname: appname.into(),
        stream_id: stream_id.into(),
    }
}

fn nonzero<K: Ord, V: Into<u64> + Copy>(map: impl IntoIterator<Item = (K, V)>) -> BTreeMap<K, u64> {
    map.into_iter()
        .map(|(k, v)| (k, v.into()))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Compares the exporter's state with the model.
fn check_state(shared: &Shared, model: &Model, context: &str) -> Result<(), TestCaseError> {
    let truth = shared.truth.read();
    for i in 0..STREAMS.len() {
        let actual = truth.session(&stream_key(i));
        let expected = model.live.get(&i);
        match (&actual, expected) {
            (None, None) => {}
            (Some(a), Some(e)) => {
                prop_assert_eq!(
                    &a.sequence,
                    &e.sequence,
                    "{}: session of stream {}",
                    context,
                    i
                );
                prop_assert_eq!(a.area.as_str(), e.area, "{}: area of stream {}", context, i);
                prop_assert!(
                    e.since.holds(a.since),
                    "{}: stream {} live since {}, model says {:?}",
                    context,
                    i,
                    a.since,
                    e.since
                );
            }
            _ => prop_assert!(
                false,
                "{}: stream {} is {:?}, model says {:?}",
                context,
                i,
                actual,
                expected
            ),
        }
    }
    prop_assert_eq!(
        truth.live_total(),
        model.live.len(),
        "{}: live_total",
        context
    );
    let gauges: BTreeMap<(String, &str), u64> = truth
        .live_streams()
        .into_iter()
        .map(|((d, a), n)| ((d.to_string(), a.as_str()), n))
        .collect();
    prop_assert_eq!(&gauges, &model.gauges(), "{}: live_streams", context);
    let c = truth.counters();
    let pushes = nonzero(
        c.pushes
            .iter()
            .map(|((d, a), n)| ((d.to_string(), a.as_str()), *n)),
    );
    prop_assert_eq!(&pushes, &model.pushes, "{}: pushes", context);
    let disconnects = nonzero(
        c.disconnects
            .iter()
            .map(|((d, a, e), n)| ((d.to_string(), a.as_str(), e.to_string()), *n)),
    );
    prop_assert_eq!(&disconnects, &model.disconnects, "{}: disconnects", context);
    let callbacks = nonzero(
        c.callbacks
            .iter()
            .map(|((k, o), n)| ((k.as_str(), o.as_str()), *n)),
    );
    prop_assert_eq!(&callbacks, &model.callbacks, "{}: callbacks", context);
    let durations = nonzero(
        c.push_duration
            .iter()
            .map(|((d, a), h)| ((d.to_string(), a.as_str()), h.count())),
    );
    prop_assert_eq!(&durations, &model.durations, "{}: push durations", context);
    let delays = c.callback_delay.as_ref().map_or(0, |h| h.count());
    prop_assert_eq!(delays, model.delays, "{}: callback delays", context);
    prop_assert_eq!(
        c.last_callback_ms > 0,
        model.recorded > 0,
        "{}: last callback timestamp {}",
        context,
        c.last_callback_ms
    );
    Ok(())
}

/// Compares the rendered `/metrics` with the model.
fn check_metrics(source: Arc<dyn ViewSource>, model: &Model) -> Result<Scrape, TestCaseError> {
    let scrape = Scrape::parse(Metrics::new(source).render());
    let series = |name: &str, labels: &[&str]| -> BTreeMap<Vec<String>, f64> {
        scrape
            .matching(name, &[])
            .map(|s| {
                let key = labels.iter().map(|l| s.labels[*l].clone()).collect();
                (key, s.value)
            })
            .collect()
    };
    let gauges: BTreeMap<Vec<String>, f64> = model
        .gauges()
        .into_iter()
        .map(|((d, a), n)| (vec![d, a.into()], n as f64))
        .collect();
    prop_assert_eq!(
        series("tencent_css_active_streams", &["domain", "area"]),
        gauges
    );
    let pushes: BTreeMap<Vec<String>, f64> = model
        .pushes
        .iter()
        .map(|((d, a), n)| (vec![d.clone(), a.to_string()], *n as f64))
        .collect();
    prop_assert_eq!(
        series("tencent_css_pushes_total", &["domain", "area"]),
        pushes
    );
    let disconnects: BTreeMap<Vec<String>, f64> = model
        .disconnects
        .iter()
        .map(|((d, a, e), n)| {
            let key = vec![d.clone(), a.to_string(), e.clone(), reason_label(e).into()];
            (key, *n as f64)
        })
        .collect();
    prop_assert_eq!(
        series(
            "tencent_css_disconnects_total",
            &["domain", "area", "errcode", "reason"]
        ),
        disconnects
    );
    let mut callbacks = series("tencent_css_callbacks_total", &["event", "outcome"]);
    callbacks.retain(|_, v| *v > 0.0);
    let expected: BTreeMap<Vec<String>, f64> = model
        .callbacks
        .iter()
        .map(|((k, o), n)| (vec![k.to_string(), o.to_string()], *n as f64))
        .collect();
    prop_assert_eq!(callbacks, expected);
    let mut durations = series(
        "tencent_css_push_duration_seconds_count",
        &["domain", "area"],
    );
    durations.retain(|_, v| *v > 0.0);
    let expected: BTreeMap<Vec<String>, f64> = model
        .durations
        .iter()
        .map(|((d, a), n)| (vec![d.clone(), a.to_string()], *n as f64))
        .collect();
    prop_assert_eq!(durations, expected);
    prop_assert_eq!(
        scrape.value("tencent_css_callback_delay_seconds_count", &[]),
        model.delays as f64
    );
    prop_assert_eq!(
        scrape.value("tencent_css_last_callback_timestamp_seconds", &[]) > 0.0,
        model.recorded > 0
    );
    Ok(scrape)
}

// ---------------------------------------------------------------------------------------------
// Driving the ledger
// ---------------------------------------------------------------------------------------------

/// How long delivered events are remembered: an hour, or not at all.
fn window(remembers: bool) -> Duration {
    if remembers {
        Duration::from_secs(3600)
    } else {
        Duration::ZERO
    }
}

fn now_secs() -> i64 {
    tencent_css_exporter::ledger::now_ms().div_euclid(1000)
}

type Answer = Result<Outcome, Unrecorded>;

/// Records events together: every `record` sends its event before any answer is awaited, in
/// order, so the ledger sees them queued as one batch (or a few).
async fn record_together(ledger: &Ledger, events: Vec<Event>) -> Vec<Answer> {
    let mut pending: Vec<Pin<Box<dyn Future<Output = Answer> + '_>>> = events
        .into_iter()
        .map(|e| Box::pin(ledger.record(e)) as Pin<Box<dyn Future<Output = Answer> + '_>>)
        .collect();
    let mut answers: Vec<Option<Answer>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, answer) in pending.iter_mut().zip(answers.iter_mut()) {
            if answer.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(a) => *answer = Some(a),
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    answers.into_iter().map(Option::unwrap).collect()
}

/// Where a history is recorded.
enum Backing {
    Memory,
    Sqlite(tempfile::TempDir),
}

impl Backing {
    fn path(&self) -> String {
        match self {
            Backing::Memory => store::MEMORY.into(),
            Backing::Sqlite(dir) => dir.path().join("exporter.db").display().to_string(),
        }
    }

    fn start(&self, remembers: bool) -> Result<(Ledger, LedgerThread), TestCaseError> {
        let store = store::open(&self.path(), SyncMode::Normal)
            .map_err(|e| TestCaseError::fail(format!("open the store: {e}")))?;
        Ledger::start(store, window(remembers))
            .map_err(|e| TestCaseError::fail(format!("start the ledger: {e}")))
    }
}

/// The events a step delivers (none for a retry before anything was delivered); `None` for a
/// restart.
fn events_of(step: &Step, delivered: &[Ev]) -> Option<Vec<Ev>> {
    Some(match step {
        Step::One(ev) => vec![ev.clone()],
        Step::Again(_) if delivered.is_empty() => vec![],
        Step::Again(index) => vec![index.get(delivered).clone()],
        Step::Burst(events) => events.clone(),
        Step::Restart => return None,
    })
}

/// The answer to `ev` must be the outcome the model expects.
fn check_outcome(
    context: &str,
    ev: &Ev,
    answer: Answer,
    expected: &str,
) -> Result<(), TestCaseError> {
    let outcome = answer.map_err(|e| TestCaseError::fail(format!("{context}: {e}")))?;
    prop_assert_eq!(
        outcome.as_str(),
        expected,
        "{}: outcome of {:?}",
        context,
        ev
    );
    Ok(())
}

/// A restart changes no exporter metric.
fn check_restart(before: &Scrape, after: &Scrape) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        before.exporter_samples(),
        after.exporter_samples(),
        "a restart changes no exporter metric"
    );
    Ok(())
}

/// Runs one history against the ledger and the model, checking after every step.
async fn run_history(
    backing: Backing,
    remembers: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let mut model = Model::new(remembers);
    let (mut ledger, mut thread) = backing.start(remembers)?;
    let mut delivered: Vec<Ev> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let context = format!("after step {n} ({step:?})");
        let Some(batch) = events_of(step, &delivered) else {
            let before = check_metrics(ledger.shared().clone(), &model)?;
            ledger.close();
            thread.join();
            (ledger, thread) = backing.start(remembers)?;
            check_state(ledger.shared(), &model, &context)?;
            let after = check_metrics(ledger.shared().clone(), &model)?;
            check_restart(&before, &after)?;
            continue;
        };
        let lo = now_secs();
        let answers = record_together(&ledger, batch.iter().map(Ev::to_event).collect()).await;
        let hi = now_secs();
        for (ev, answer) in batch.iter().zip(answers) {
            let expected = model.apply(ev, Since::Received { lo, hi });
            check_outcome(&context, ev, answer, expected)?;
        }
        delivered.extend(batch);
        check_state(ledger.shared(), &model, &context)?;
    }
    check_metrics(ledger.shared().clone(), &model)?;
    ledger.close();
    thread.join();
    Ok(())
}

/// Runs one history against the Redis ledger and the model. Events are recorded one after the
/// other (a burst too): concurrent scripts may run in any order, and the model needs one. A
/// restart is a new connection, with a new ledger, to the same keys.
///
/// A ledger that does not remember (a zero window) gives its keys the shortest expiry Redis
/// takes, 1 ms, and every event waits a little longer than that, so each key it set has expired
/// in Redis itself: the model's "forgotten at once".
async fn run_redis_history(
    url: &str,
    remembers: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    // Every case has keys of its own on the shared server.
    static CASES: AtomicUsize = AtomicUsize::new(0);
    let prefix = format!("case{}:", CASES.fetch_add(1, Ordering::Relaxed));
    let connect = || async {
        RedisLedger::connect(
            url,
            &prefix,
            window(remembers),
            10_000,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| TestCaseError::fail(format!("connect to redis: {e}")))
    };
    let mut model = Model::new(remembers);
    let mut ledger = connect().await?;
    let mut delivered: Vec<Ev> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let context = format!("after step {n} ({step:?})");
        let Some(batch) = events_of(step, &delivered) else {
            let before = redis_metrics(&ledger, &model).await?;
            ledger = connect().await?;
            let after = redis_metrics(&ledger, &model).await?;
            check_restart(&before, &after)?;
            continue;
        };
        for ev in &batch {
            if !remembers {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            let lo = now_secs();
            let answer = ledger.record(ev.to_event()).await;
            let hi = now_secs();
            let expected = model.apply(ev, Since::Received { lo, hi });
            check_outcome(&context, ev, answer, expected)?;
        }
        delivered.extend(batch);
        redis_metrics(&ledger, &model).await?;
    }
    Ok(())
}

/// Compares what Redis holds, as a scrape would render it, with the model.
async fn redis_metrics(ledger: &Arc<RedisLedger>, model: &Model) -> Result<Scrape, TestCaseError> {
    ledger.refresh_now().await;
    check_metrics(ledger.clone(), model)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `cases` unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Failures are turned into named regression tests in this file instead.
        failure_persistence: None,
        ..Config::default()
    }
}

fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

#[test]
fn truth_rules_hold_for_random_histories_in_memory() {
    let rt = runtime();
    let strategy = (prop::bool::weighted(0.8), history(false, 40));
    run(2000, strategy, |(remembers, steps)| {
        rt.block_on(run_history(Backing::Memory, remembers, steps))
    });
    assert_every_rule_seen();
}

#[test]
fn truth_rules_hold_for_random_histories_across_restarts() {
    let rt = runtime();
    let strategy = (prop::bool::weighted(0.8), history(true, 30));
    run(150, strategy, |(remembers, steps)| {
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(run_history(Backing::Sqlite(dir), remembers, steps))
    });
    assert_every_rule_seen();
}

#[test]
fn truth_rules_hold_for_random_histories_in_redis() {
    // The dedup window is an hour here: a push of the live session is always a retry it holds.
    redis_histories(300, true, &["push of the live session again"]);
}

/// The same with keys that expire: what Redis forgets must be what the local ledger forgets,
/// the live session's push excepted (still a retry, known from the session itself).
#[test]
fn truth_rules_hold_for_random_histories_in_redis_with_expired_keys() {
    // Nothing delivered is remembered, so no event is a retry of a delivered one, and no push
    // finds its disconnect delivered before it.
    redis_histories(
        100,
        false,
        &[
            "duplicate push",
            "duplicate disconnect",
            "push after its disconnect ends the live session",
            "push after its disconnect, of unknown start, leaves the live session",
            "push after its disconnect, nothing live",
        ],
    );
}

/// `cases` histories (restarts included) against a `redis-server` of the test's own; every rule
/// but those in `unreachable` must come up.
fn redis_histories(cases: u32, remembers: bool, unreachable: &[&str]) {
    let rt = runtime();
    let Some(redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let url = redis.url();
    run(cases, history(true, 30), |steps| {
        rt.block_on(run_redis_history(&url, remembers, steps))
    });
    assert_rules_seen(unreachable);
}

// ---------------------------------------------------------------------------------------------
// Hostile bodies
// ---------------------------------------------------------------------------------------------

/// A JSON-ish value, rendered by hand so that it can hold what a JSON library would not write:
/// numbers out of every range, invalid escapes, truncated tokens.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    /// A number token, verbatim.
    Num(String),
    Str(String),
    /// Any token, verbatim (possibly not JSON at all).
    Raw(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn render(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) | J::Raw(n) => out.push_str(n),
            J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.render(out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (name, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(name).unwrap());
                    out.push(':');
                    value.render(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    fn from_json(v: &serde_json::Value) -> J {
        match v {
            serde_json::Value::Null => J::Null,
            serde_json::Value::Bool(b) => J::Bool(*b),
            serde_json::Value::Number(n) => J::Num(n.to_string()),
            serde_json::Value::String(s) => J::Str(s.clone()),
            serde_json::Value::Array(a) => J::Arr(a.iter().map(J::from_json).collect()),
            serde_json::Value::Object(o) => J::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), J::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// Every field the exporter reads (in the order its parser declares them), and a few it does
/// not.
pub const FIELDS: [&str; 20] = [
    "event_type",
    "t",
    "sign",
    "app",
    "appname",
    "stream_id",
    "channel_id",
    "sequence",
    "event_time",
    "errcode",
    "set_id",
    "push_duration",
    "errmsg",
    "node",
    "user_ip",
    "width",
    "height",
    "appid",
    "idc_id",
    "stream_param",
];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (-3i64..205).prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345678901234567890",
            "18446744073709551616",
            "9223372036854775808",
            "-9223372036854775809",
            "9223372036854775807",
            "-9223372036854775808",
            "9e15",
            "8999999999999999.0",
            "9007199254740993",
            "1.5",
            "-0",
            "0.0",
            "1E2",
            "0e0",
        ])
        .prop_map(String::from),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ 0-9+.eE-]{0,12}",
        "\\PC{0,24}",
        prop::sample::select(vec![
            "",
            " ",
            "\t\n",
            "live",
            "test.domain.com",
            "1",
            "0",
            " 1700000000 ",
            "0x10",
            "NaN",
            "-inf",
            "null",
            "\u{0}",
            "\u{feff}1",
            "😀",
            "\u{202e}evil",
        ])
        .prop_map(String::from),
    ]
}

/// Tokens a JSON parser must refuse or handle with care.
fn raw() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "\"\\ud800\"",
        "\"\\udc00x\"",
        "\"\\u0000\"",
        "\"\\ud83d\\ude00\"",
        "\"\\x\"",
        "\"unterminated",
        "tru",
        "nul",
        "01",
        "+1",
        ".5",
        "1.",
        "-",
        "NaN",
        "Infinity",
        "",
        "[",
        "{",
        "}",
        ",",
    ])
    .prop_map(String::from)
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
        1 => text(),
    ]
}

/// Any value, sometimes with a token that is not JSON.
fn value() -> impl Strategy<Value = J> {
    values(true)
}

/// Any valid JSON value.
fn json_value() -> impl Strategy<Value = J> {
    values(false)
}

fn values(with_raw: bool) -> BoxedStrategy<J> {
    let json = prop_oneof![
        2 => Just(J::Null),
        2 => any::<bool>().prop_map(J::Bool),
        6 => number().prop_map(J::Num),
        6 => text().prop_map(J::Str),
    ];
    let leaf = if with_raw {
        prop_oneof![16 => json, 1 => raw().prop_map(J::Raw)].boxed()
    } else {
        json.boxed()
    };
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((field_name(), inner), 0..6).prop_map(J::Obj),
        ]
    })
    .boxed()
}

/// The sample payloads with fields replaced (`Some`) or removed (`None`).
fn mutated_sample() -> impl Strategy<Value = Vec<(String, J)>> {
    (
        prop::bool::ANY,
        prop::collection::vec(
            (
                prop::sample::select(FIELDS.to_vec()),
                prop::option::weighted(0.8, value()),
            ),
            0..5,
        ),
    )
        .prop_map(|(is_push, changes)| {
            let sample = sample(if is_push { "push" } else { "disconnect" });
            let mut fields: Vec<(String, J)> = sample
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), J::from_json(v)))
                .collect();
            for (name, change) in changes {
                fields.retain(|(k, _)| k != name);
                if let Some(v) = change {
                    fields.push((name.into(), v));
                }
            }
            fields
        })
}

/// Gives a body a current `t` and its right sign (as a number or a string, sign in either case).
fn sign_fields(fields: &mut Vec<(String, J)>, t_as_text: bool, upper: bool) {
    let t = now() + 600;
    let sign = signature::sign(KEY, t);
    fields.retain(|(k, _)| k != "t" && k != "sign");
    fields.push((
        "t".into(),
        if t_as_text {
            J::Str(t.to_string())
        } else {
            J::Num(t.to_string())
        },
    ));
    fields.push((
        "sign".into(),
        J::Str(if upper { sign.to_uppercase() } else { sign }),
    ));
}

/// A hostile callback body.
#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    /// Any JSON-ish value (mostly not an object).
    Value(J),
    /// An object of callback fields with values of any type.
    Object(Vec<(String, J)>),
    /// A sample payload with a few fields changed; signed right if `signed`.
    Sample {
        fields: Vec<(String, J)>,
        signed: Option<(bool, bool)>,
    },
    /// A body cut short.
    Truncated(Box<Body>, Index),
    /// A signed sample padded to around the body limit.
    Padded(usize),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Bytes(b) => b.clone(),
            Body::Value(v) => v.text().into_bytes(),
            Body::Object(fields) => J::Obj(fields.clone()).text().into_bytes(),
            Body::Sample { fields, signed } => {
                let mut fields = fields.clone();
                if let Some((t_as_text, upper)) = signed {
                    sign_fields(&mut fields, *t_as_text, *upper);
                }
                J::Obj(fields).text().into_bytes()
            }
            Body::Truncated(body, at) => {
                let mut bytes = body.bytes();
                if !bytes.is_empty() {
                    bytes.truncate(at.index(bytes.len()));
                }
                bytes
            }
            Body::Padded(size) => {
                let mut body = signed(sample("push"));
                body["padding"] = json!("");
                let room = size.saturating_sub(body.to_string().len());
                body["padding"] = json!("x".repeat(room));
                body.to_string().into_bytes()
            }
        }
    }
}

fn body() -> impl Strategy<Value = Body> {
    let leaf = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Body::Bytes),
        2 => value().prop_map(Body::Value),
        4 => prop::collection::vec((field_name(), value()), 0..16).prop_map(Body::Object),
        6 => (
            mutated_sample(),
            prop::option::weighted(0.7, (prop::bool::ANY, prop::bool::ANY))
        )
            .prop_map(|(fields, signed)| Body::Sample { fields, signed }),
    ];
    prop_oneof![
        20 => leaf.clone(),
        2 => (leaf, any::<Index>()).prop_map(|(b, at)| Body::Truncated(Box::new(b), at)),
    ]
}

/// What a parsed callback always satisfies, and the verifier never panicking on it.
fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = callback::parse(bytes);
    match (&parsed, &callback::parse(bytes)) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
        _ => prop_assert!(false, "parse is not deterministic"),
    }
    let cb = match parsed {
        Ok(cb) => cb,
        Err(e) => {
            let _ = (e.kind(), e.to_string());
            return Ok(());
        }
    };
    if let Some(s) = cb.event.stream_event() {
        for field in [&*s.stream.app, &*s.stream.stream_id, s.sequence.as_str()] {
            prop_assert!(!field.is_empty(), "empty required field in {:?}", cb);
            prop_assert_eq!(field.trim(), field);
        }
    }
    if let Event::Disconnect {
        push_duration_ms: Some(ms),
        ..
    } = cb.event
    {
        prop_assert!(ms >= 0);
    }
    let verifier = Verifier::new(Some(Keys::from_list(KEY)), 60, 900);
    let insecure = Verifier::new(None, 60, 900);
    for now in [now(), cb.t, 0, i64::MIN, i64::MAX] {
        let _ = verifier.verify(cb.t, cb.sign.as_deref(), now);
        let _ = insecure.verify(cb.t, cb.sign.as_deref(), now);
    }
    Ok(())
}

#[test]
fn arbitrary_bytes_never_panic_the_parser_or_verifier() {
    run(3000, prop::collection::vec(any::<u8>(), 0..512), |bytes| {
        check_parse(&bytes)
    });
}

#[test]
fn arbitrary_json_never_panics_the_parser_or_verifier() {
    run(3000, body(), |body| check_parse(&body.bytes()));
}

// ---------------------------------------------------------------------------------------------
// Well-typed callbacks in every representation Tencent uses
// ---------------------------------------------------------------------------------------------

/// How an integer field is written.
#[derive(Debug, Clone, Copy)]
enum IntStyle {
    Number,
    /// A decimal string, with spaces around.
    Text,
    /// An integral float (`42.0`), where f64 is exact.
    Float,
}

fn int_json(n: i64, style: IntStyle) -> J {
    match style {
        IntStyle::Number => J::Num(n.to_string()),
        IntStyle::Text => J::Str(format!(" {n} ")),
        IntStyle::Float if n.abs() < 1_000_000_000_000 => J::Num(format!("{n}.0")),
        IntStyle::Float => J::Num(n.to_string()),
    }
}

/// Non-empty text without surrounding whitespace, as Tencent sends names and ids.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{1,24}",
        "\\PC{1,16}".prop_filter("trimmed, not empty", |s| {
            !s.trim().is_empty() && s.trim() == s
        }),
    ]
}

#[derive(Debug, Clone)]
struct WellTyped {
    push: bool,
    t: i64,
    app: String,
    appname: Option<String>,
    stream_id: String,
    /// Sent as `channel_id` only, as older payloads do.
    channel_id_only: bool,
    sequence: String,
    /// Sequence ids are long decimal numbers; sent as a JSON number.
    sequence_as_number: Option<u64>,
    event_time: Option<i64>,
    set_id: Option<i64>,
    errcode: Option<i64>,
    push_duration: Option<i64>,
    styles: [IntStyle; 6],
    /// Fields the exporter does not read, with anything in them.
    extra: Vec<(String, J)>,
}

fn well_typed() -> impl Strategy<Value = WellTyped> {
    let style = prop_oneof![
        Just(IntStyle::Number),
        Just(IntStyle::Text),
        Just(IntStyle::Float)
    ];
    (
        (
            any::<bool>(),
            any::<i64>(),
            name(),
            prop::option::of(name()),
            name(),
            any::<bool>(),
            name(),
            prop::option::weighted(0.3, any::<u64>()),
        ),
        (
            prop::option::of(any::<i64>()),
            prop::option::of(-5i64..300),
            prop::option::of(prop_oneof![-2i64..40, any::<i64>()]),
            prop::option::of(prop_oneof![0i64..100_000_000, any::<i64>()]),
            prop::array::uniform6(style),
            prop::collection::vec(
                (
                    prop::sample::select(FIELDS[12..].to_vec()).prop_map(String::from),
                    json_value(),
                ),
                0..6,
            ),
        ),
    )
        .prop_map(
            |(
                (push, t, app, appname, stream_id, channel_id_only, sequence, sequence_as_number),
                (event_time, set_id, errcode, push_duration, styles, extra),
            )| WellTyped {
                push,
                t,
                app,
                appname,
                stream_id,
                channel_id_only,
                sequence,
                sequence_as_number,
                event_time,
                set_id,
                errcode,
                push_duration,
                styles,
                extra,
            },
        )
}

impl WellTyped {
    fn body(&self) -> Vec<u8> {
        let s = &self.styles;
        let mut fields = vec![
            ("event_type".to_string(), int_json(self.push as i64, s[0])),
            ("t".into(), int_json(self.t, s[1])),
            ("app".into(), J::Str(self.app.clone())),
            (
                if self.channel_id_only {
                    "channel_id"
                } else {
                    "stream_id"
                }
                .into(),
                J::Str(self.stream_id.clone()),
            ),
            (
                "sequence".into(),
                match self.sequence_as_number {
                    Some(n) => J::Num(n.to_string()),
                    None => J::Str(self.sequence.clone()),
                },
            ),
        ];
        if let Some(appname) = &self.appname {
            fields.push(("appname".into(), J::Str(appname.clone())));
        }
        for (name, v, style) in [
            ("event_time", self.event_time, s[2]),
            ("set_id", self.set_id, s[3]),
            ("errcode", self.errcode, s[4]),
            ("push_duration", self.push_duration, s[5]),
        ] {
            if let Some(v) = v {
                fields.push((name.into(), int_json(v, style)));
            }
        }
        fields.extend(self.extra.iter().cloned());
        J::Obj(fields).text().into_bytes()
    }

    fn sequence(&self) -> String {
        self.sequence_as_number
            .map_or_else(|| self.sequence.clone(), |n| n.to_string())
    }
}

#[test]
fn well_typed_callbacks_parse_to_exactly_their_fields() {
    run(2000, well_typed(), |w| {
        let cb = callback::parse(&w.body()).map_err(|e| {
            TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&w.body())))
        })?;
        prop_assert_eq!(cb.t, w.t);
        prop_assert_eq!(cb.sign, None);
        let s = cb.event.stream_event().expect("a push or a disconnect");
        prop_assert_eq!(
            cb.event.kind().as_str(),
            if w.push { "push" } else { "disconnect" }
        );
        prop_assert_eq!(&*s.stream.app, w.app.as_str());
        prop_assert_eq!(&*s.stream.appname, w.appname.as_deref().unwrap_or(""));
        prop_assert_eq!(&*s.stream.stream_id, w.stream_id.as_str());
        prop_assert_eq!(s.sequence.clone(), w.sequence());
        prop_assert_eq!(s.event_time, w.event_time);
        prop_assert_eq!(s.area.as_str(), area_label(w.set_id));
        if let Event::Disconnect {
            errcode,
            push_duration_ms,
            ..
        } = cb.event
        {
            prop_assert_eq!(errcode, w.errcode.unwrap_or(0));
            prop_assert_eq!(push_duration_ms, w.push_duration.filter(|d| *d >= 0));
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Hostile bodies over HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_bodies_over_http_get_a_client_status_and_are_all_counted() {
    let app = spawn_app().await;
    let mut runner = TestRunner::new(config(300));
    let strategy = prop_oneof![
        40 => body(),
        1 => (60 * 1024..70 * 1024usize).prop_map(Body::Padded),
    ];
    let requests = runner.config().cases as usize;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for _ in 0..requests {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let answer = app.post_raw(body.bytes(), "application/json").await;
        assert!(
            [200, 400, 401, 413].contains(&answer.status),
            "{} ({}) for {body:?}",
            answer.status,
            answer.body
        );
        *statuses.entry(answer.status).or_default() += 1;
    }
    // Every answer, rejections included, is given only once the request is counted.
    let s = app.scrape().await;
    assert_eq!(s.sum("tencent_css_callbacks_total", &[]), requests as f64);
    let outcomes = |list: &[&str]| -> f64 {
        list.iter()
            .map(|o| s.sum("tencent_css_callbacks_total", &[("outcome", o)]))
            .sum()
    };
    let status = |code: u16| statuses.get(&code).copied().unwrap_or(0) as f64;
    assert_eq!(
        outcomes(&["accepted", "duplicate", "ignored"]),
        status(200),
        "{statuses:?}"
    );
    assert_eq!(
        outcomes(&["malformed"]),
        status(400) + status(413),
        "{statuses:?}"
    );
    assert_eq!(
        outcomes(&["bad_signature", "expired"]),
        status(401),
        "{statuses:?}"
    );
    assert_eq!(outcomes(&["error"]), 0.0);
    assert_eq!(
        s.callbacks("push", "accepted"),
        s.sum("tencent_css_pushes_total", &[])
    );
    assert_eq!(
        s.callbacks("disconnect", "accepted"),
        s.sum("tencent_css_disconnects_total", &[])
    );
    assert!(s.sum("tencent_css_active_streams", &[]) <= s.sum("tencent_css_pushes_total", &[]));
    eprintln!("answers by status: {statuses:?}");
    // Every kind of answer came up, so the bodies reach past the parser.
    for code in [200, 400, 401] {
        assert!(statuses.contains_key(&code), "no {code} among {statuses:?}");
    }
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the properties above
// ---------------------------------------------------------------------------------------------

/// Records each body (parsed as the HTTP handler parses it) through a ledger on a SQLite file,
/// then starts a new ledger on that file, as a restart of the exporter does.
fn record_then_restart(bodies: Vec<serde_json::Value>) -> Result<(), String> {
    let rt = runtime();
    let backing = Backing::Sqlite(tempfile::tempdir().unwrap());
    let (ledger, thread) = backing.start(true).unwrap();
    for body in bodies {
        let cb = callback::parse(body.to_string().as_bytes()).unwrap();
        let outcome = rt.block_on(ledger.record(cb.event)).unwrap();
        assert_eq!(outcome, Outcome::Accepted);
    }
    ledger.close();
    thread.join();
    let store = store::open(&backing.path(), SyncMode::Normal).map_err(|e| e.to_string())?;
    Ledger::start(store, window(true))
        .map(|(ledger, thread)| {
            ledger.close();
            thread.join();
        })
        .map_err(|e| e.to_string())
}

/// One signed disconnect claiming a push of 2^63 - 1 ms, then an ordinary one, take the push
/// duration sum past `i64::MAX`; the store must still load what it wrote.
#[test]
fn a_huge_push_duration_does_not_stop_a_restart() {
    let mut hostile = disconnect("a.example.com", "cam1", "seq-1", 1, 1);
    hostile["push_duration"] = json!("9223372036854775807");
    let ordinary = disconnect("a.example.com", "cam1", "seq-2", 1, 1);
    record_then_restart(vec![hostile, ordinary]).unwrap();
}

/// One signed push with an `event_time` far in the past, then an ordinary one, take the callback
/// delay sum past `i64::MAX`; the store must still load what it wrote.
#[test]
fn an_event_time_far_in_the_past_does_not_stop_a_restart() {
    let mut hostile = push("a.example.com", "cam1", "seq-1", 1);
    hostile["event_time"] = json!(i64::MIN);
    let ordinary = push("a.example.com", "cam2", "seq-2", 1);
    record_then_restart(vec![hostile, ordinary]).unwrap();
}
