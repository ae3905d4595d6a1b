//! Any sequence of small events through `state::Truth::apply`, on a clock the input moves:
//!
//! - `live_total` equals the sum of the `live_streams` gauges, and every live session is counted
//!   under its own domain and area;
//! - undoing the last change restores the previous state exactly (apart from series left at 0),
//!   and applying the event again gives the same outcome and the same state;
//! - a duplicate changes nothing but its own count;
//! - a "restart" (the state rebuilt from every commit, as a store keeps them) loses nothing.

#![no_main]

use std::collections::{BTreeMap, HashMap};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tencent_css_exporter::area::Area;
use tencent_css_exporter::callback::{Event, EventKind, Outcome, StreamEvent, StreamKey};
use tencent_css_exporter::state::counters::{Counters, Histogram, Series, Value};
use tencent_css_exporter::state::rules::Session;
use tencent_css_exporter::state::{Commit, DeliveryKey, Limits, Snapshot, Truth};

const DOMAINS: [&str; 5] = [
    "a.example",
    "b.example",
    "c.example",
    "d.example",
    "e.example",
];
/// Fewer than `DOMAINS`, so the domain cap is reached.
const MAX_DOMAINS: usize = 3;
const DEDUP_WINDOW_MS: i64 = 10_000;
const START_MS: i64 = 1_700_000_000_000;

#[derive(Arbitrary, Debug)]
enum Op {
    Push {
        stream: u8,
        seq: u8,
        time: Option<i8>,
        set_id: u8,
    },
    Disconnect {
        stream: u8,
        seq: u8,
        time: Option<i8>,
        set_id: u8,
        errcode: i16,
        duration_ms: Option<u32>,
    },
    Other {
        event_type: i8,
    },
    /// A callback counted without being applied (rejected ones).
    Count {
        kind: u8,
        outcome: u8,
    },
    /// The clock moves on.
    Wait {
        ms: u16,
    },
    Purge,
    Restart,
}

fn stream(n: u8) -> StreamKey {
    StreamKey {
        app: DOMAINS[n as usize % DOMAINS.len()].into(),
        appname: "live".into(),
        stream_id: format!("s{}", (n as usize / DOMAINS.len()) % 2).into(),
    }
}

fn stream_event(stream_n: u8, seq: u8, time: Option<i8>, set_id: u8, now_ms: i64) -> StreamEvent {
    StreamEvent {
        stream: stream(stream_n),
        // Sessions ids that streams may share: decimal numbers, the same digits with a leading
        // zero (another id), and text.
        sequence: match seq % 16 {
            n @ 0..=7 => format!("{}", n + 10),
            n @ 8..=11 => format!("0{}", n + 2),
            n => format!("q{n}"),
        },
        event_time: time.map(|t| now_ms / 1000 + t as i64),
        area: Area::from_set_id(Some(set_id as i64 % 10)),
    }
}

/// Everything observable, with series at 0 left out.
#[derive(Debug, PartialEq)]
struct Picture {
    sessions: BTreeMap<StreamKey, (String, Area, i64)>,
    live: BTreeMap<(String, Area), u64>,
    counters: String,
}

fn nonzero_hist(h: &Histogram) -> bool {
    h.count() > 0 || h.sum_ms > 0
}

fn normalized(c: &Counters) -> String {
    let pushes: BTreeMap<_, _> = c.pushes.iter().filter(|(_, n)| **n > 0).collect();
    let disconnects: BTreeMap<_, _> = c.disconnects.iter().filter(|(_, n)| **n > 0).collect();
    let callbacks: BTreeMap<_, _> = c.callbacks.iter().filter(|(_, n)| **n > 0).collect();
    let durations: BTreeMap<_, _> = c
        .push_duration
        .iter()
        .filter(|(_, h)| nonzero_hist(h))
        .collect();
    let delay = c.callback_delay.as_ref().filter(|h| nonzero_hist(h));
    format!(
        "{pushes:?} {disconnects:?} {callbacks:?} {durations:?} {delay:?} {} {}",
        c.last_callback_ms, c.domains_overflow
    )
}

fn picture(truth: &Truth) -> Picture {
    let mut sessions = BTreeMap::new();
    for n in 0..(DOMAINS.len() * 2) as u8 {
        let key = stream(n);
        if let Some(s) = truth.session(&key) {
            sessions.insert(key, (s.sequence.to_string(), s.area, s.since));
        }
    }
    let live = truth
        .live_streams()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|((d, a), n)| ((d.to_string(), a), n))
        .collect();
    Picture {
        sessions,
        live,
        counters: normalized(truth.counters()),
    }
}

fn check_live(truth: &Truth) {
    let live = truth.live_streams();
    assert_eq!(truth.live_total() as u64, live.values().sum::<u64>());
    // Per area, the gauges add up to the live sessions of that area (whichever domain label the
    // cap gave them).
    let mut sessions: BTreeMap<Area, u64> = BTreeMap::new();
    for n in 0..(DOMAINS.len() * 2) as u8 {
        if let Some(s) = truth.session(&stream(n)) {
            *sessions.entry(s.area).or_default() += 1;
        }
    }
    let mut gauges: BTreeMap<Area, u64> = BTreeMap::new();
    for ((_, area), n) in live {
        if n > 0 {
            *gauges.entry(area).or_default() += n;
        }
    }
    assert_eq!(gauges, sessions);
}

/// What a store holds: the last value written for each key.
#[derive(Default)]
struct Stored {
    sessions: BTreeMap<StreamKey, Option<Session>>,
    delivered: HashMap<DeliveryKey, i64>,
    series: BTreeMap<Series, Value>,
}

impl Stored {
    fn write(&mut self, commit: Commit) {
        self.sessions.extend(commit.sessions);
        self.delivered.extend(commit.delivered);
        self.series.extend(commit.series);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            more_sessions: None,
            sessions: self
                .sessions
                .iter()
                .filter_map(|(k, s)| s.clone().map(|s| (k.clone(), s)))
                .collect(),
            delivered: self
                .delivered
                .iter()
                .map(|(k, e)| (k.clone(), *e))
                .collect(),
            series: self
                .series
                .iter()
                .map(|(s, v)| (s.clone(), v.clone()))
                .collect(),
        }
    }
}

fn limits() -> Limits {
    Limits {
        dedup_window_ms: DEDUP_WINDOW_MS,
        max_domains: MAX_DOMAINS,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut truth = Truth::new(limits());
    let mut stored = Stored::default();
    let mut now = START_MS;
    for op in ops {
        let event = match op {
            Op::Push {
                stream,
                seq,
                time,
                set_id,
            } => Event::Push(stream_event(stream, seq, time, set_id, now)),
            Op::Disconnect {
                stream,
                seq,
                time,
                set_id,
                errcode,
                duration_ms,
            } => Event::Disconnect {
                session: stream_event(stream, seq, time, set_id, now),
                errcode: errcode as i64,
                push_duration_ms: duration_ms.map(i64::from),
            },
            Op::Other { event_type } => Event::Other {
                event_type: if (0..=1).contains(&event_type) {
                    2
                } else {
                    event_type as i64
                },
            },
            Op::Count { kind, outcome } => {
                let kind = EventKind::ALL[kind as usize % EventKind::ALL.len()];
                let outcome = Outcome::ALL[outcome as usize % Outcome::ALL.len()];
                let change = truth.count(kind, outcome);
                stored.write(truth.commit_of(&[change]));
                check_live(&truth);
                continue;
            }
            Op::Wait { ms } => {
                now += ms as i64;
                continue;
            }
            Op::Purge => {
                let before = picture(&truth);
                truth.purge(now);
                stored.delivered.retain(|_, expires| *expires > now);
                assert_eq!(
                    picture(&truth),
                    before,
                    "purging changes nothing observable"
                );
                continue;
            }
            Op::Restart => {
                let before = picture(&truth);
                truth = Truth::restore(stored.snapshot(), limits(), now).expect("restore");
                assert_eq!(picture(&truth), before, "a restart loses nothing");
                check_live(&truth);
                continue;
            }
        };

        let before = picture(&truth);
        let change = truth.apply(&event, now);
        let after = picture(&truth);
        let exact = format!("{:?}", truth.counters());
        check_live(&truth);

        if change.outcome == Outcome::Duplicate {
            assert_eq!(
                before.sessions, after.sessions,
                "a duplicate changes no session"
            );
            assert_eq!(before.live, after.live, "a duplicate changes no gauge");
        }

        truth.undo(&change);
        assert_eq!(
            picture(&truth),
            before,
            "undo restores the state before {event:?}"
        );
        check_live(&truth);

        let again = truth.apply(&event, now);
        assert_eq!(
            again.outcome, change.outcome,
            "the same event, the same outcome"
        );
        assert_eq!(picture(&truth), after);
        assert_eq!(format!("{:?}", truth.counters()), exact);
        stored.write(truth.commit_of(&[again]));
    }
});
