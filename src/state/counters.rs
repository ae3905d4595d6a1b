//! The exporter's event metrics as plain data: counters and histograms keyed by their labels.
//!
//! They are part of the state (persisted with it, reloaded at start) rather than `prometheus`
//! counters kept in step by hand, so a restart continues every series where it was. Histogram
//! sums are kept in integer milliseconds so that undoing a failed batch is exact.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::area::Area;
use crate::callback::{Event, EventKind, Outcome};
use crate::errcode::ErrCode;

/// A push domain (`app`), shared between the sessions and the series that name it.
pub type Domain = Arc<str>;

/// Upper bounds of `tencent_css_push_duration_seconds`, in milliseconds: 10 s to 24 h.
pub const PUSH_DURATION_BOUNDS_MS: [u64; 11] = [
    10_000, 30_000, 60_000, 300_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 14_400_000,
    28_800_000, 86_400_000,
];

/// Upper bounds of `tencent_css_callback_delay_seconds`, in milliseconds: Tencent delivers within
/// a second normally and retries for about 12 minutes after a failure.
pub const CALLBACK_DELAY_BOUNDS_MS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 180_000, 600_000, 900_000,
];

/// Largest value a histogram takes, in milliseconds (a year): anything longer is nonsense from
/// the sender and must not overflow the stored sum.
pub const MAX_OBSERVATION_MS: u64 = 365 * 24 * 3_600_000;

/// A histogram with fixed bounds: one count per bucket plus the overflow bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// Non-cumulative counts; the last one is above every bound.
    pub counts: Vec<u64>,
    pub sum_ms: u64,
}

impl Histogram {
    fn new(bounds: &[u64]) -> Self {
        Histogram {
            counts: vec![0; bounds.len() + 1],
            sum_ms: 0,
        }
    }

    fn bucket(bounds: &[u64], ms: u64) -> usize {
        bounds.partition_point(|b| *b < ms)
    }

    fn observe(&mut self, bounds: &[u64], ms: u64) {
        self.counts[Self::bucket(bounds, ms)] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    fn unobserve(&mut self, bounds: &[u64], ms: u64) {
        let count = &mut self.counts[Self::bucket(bounds, ms)];
        *count = count.saturating_sub(1);
        self.sum_ms = self.sum_ms.saturating_sub(ms);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// One persisted series: a metric and its label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Series {
    Pushes(Domain, Area),
    Disconnects(Domain, Area, ErrCode),
    PushDuration(Domain, Area),
    Callbacks(EventKind, Outcome),
    CallbackDelay,
    LastCallback,
    DomainsOverflow,
}

/// The value of one series, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Count(u64),
    Histogram(Histogram),
    TimestampMs(i64),
}

impl Series {
    /// The metric name the series is stored under (the exposed name without its prefix).
    pub fn metric(&self) -> &'static str {
        match self {
            Series::Pushes(..) => "pushes_total",
            Series::Disconnects(..) => "disconnects_total",
            Series::PushDuration(..) => "push_duration_seconds",
            Series::Callbacks(..) => "callbacks_total",
            Series::CallbackDelay => "callback_delay_seconds",
            Series::LastCallback => "last_callback_timestamp_seconds",
            Series::DomainsOverflow => "domains_overflow_total",
        }
    }

    /// Label values in a fixed order.
    pub fn labels(&self) -> Vec<String> {
        match self {
            Series::Pushes(d, a) | Series::PushDuration(d, a) => {
                vec![d.to_string(), a.as_str().into()]
            }
            Series::Disconnects(d, a, e) => vec![d.to_string(), a.as_str().into(), e.to_string()],
            Series::Callbacks(k, o) => vec![k.as_str().into(), o.as_str().into()],
            Series::CallbackDelay | Series::LastCallback | Series::DomainsOverflow => vec![],
        }
    }

    /// The inverse of [`Series::metric`] and [`Series::labels`]; `None` for anything this
    /// release does not know.
    pub fn decode(metric: &str, labels: &[String]) -> Option<Series> {
        let domain = |i: usize| labels.get(i).map(|d| Domain::from(d.as_str()));
        let area = |i: usize| labels.get(i).and_then(|a| Area::from_label(a));
        let series = match (metric, labels.len()) {
            ("pushes_total", 2) => Series::Pushes(domain(0)?, area(1)?),
            ("push_duration_seconds", 2) => Series::PushDuration(domain(0)?, area(1)?),
            ("disconnects_total", 3) => {
                Series::Disconnects(domain(0)?, area(1)?, ErrCode::from_label(&labels[2])?)
            }
            ("callbacks_total", 2) => Series::Callbacks(
                EventKind::from_label(&labels[0])?,
                Outcome::from_label(&labels[1])?,
            ),
            ("callback_delay_seconds", 0) => Series::CallbackDelay,
            ("last_callback_timestamp_seconds", 0) => Series::LastCallback,
            ("domains_overflow_total", 0) => Series::DomainsOverflow,
            _ => return None,
        };
        Some(series)
    }
}

/// One thing an event counts, before it is applied anywhere (to [`Counters`] in memory, or to a
/// shared store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// A counter series goes up by one.
    Inc(Series),
    /// A histogram series observes a value, in milliseconds (already capped).
    Observe(Series, u64),
    /// The last-accepted timestamp moves to this time (unix milliseconds), if later.
    Touch(i64),
}

/// Everything an accepted push or disconnect counts: its own counter, its histograms, the
/// accepted callback, the last-callback time and, when its domain is over the cap, the overflow.
/// Its series have the labels `domain` and `area` ([`crate::state::rules::counted_area`]).
pub fn tally(event: &Event, domain: Domain, area: Area, overflow: bool, now_ms: i64) -> Vec<Count> {
    let mut counts = Vec::with_capacity(6);
    let Some(s) = event.stream_event() else {
        return counts;
    };
    match event {
        Event::Push(_) => counts.push(Count::Inc(Series::Pushes(domain, area))),
        Event::Disconnect {
            errcode,
            push_duration_ms,
            ..
        } => {
            let errcode = ErrCode::new(*errcode);
            counts.push(Count::Inc(Series::Disconnects(
                domain.clone(),
                area,
                errcode,
            )));
            if let Some(ms) = push_duration_ms {
                let ms = (*ms).clamp(0, MAX_OBSERVATION_MS as i64) as u64;
                counts.push(Count::Observe(Series::PushDuration(domain, area), ms));
            }
        }
        Event::Other { .. } => {}
    }
    if let Some(event_time) = super::rules::believable(s.event_time, now_ms.div_euclid(1000)) {
        let delay_ms = now_ms.saturating_sub(event_time.saturating_mul(1000));
        let delay_ms = delay_ms.clamp(0, MAX_OBSERVATION_MS as i64) as u64;
        counts.push(Count::Observe(Series::CallbackDelay, delay_ms));
    }
    counts.push(Count::Inc(Series::Callbacks(
        event.kind(),
        Outcome::Accepted,
    )));
    if overflow {
        counts.push(Count::Inc(Series::DomainsOverflow));
    }
    counts.push(Count::Touch(now_ms));
    counts
}

/// One change to the counters, kept so a failed batch can be undone exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// A counter series went up by one.
    Inc(Series),
    /// A counter series went down by one: a callback counted under another outcome after all.
    Dec(Series),
    /// A histogram series observed a value.
    Observe(Series, u64),
    /// The last-accepted timestamp moved; holds the value before.
    Timestamp { before: i64 },
}

impl Series {
    /// Bucket bounds (milliseconds) of a histogram series; `None` for the others.
    pub fn bounds(&self) -> Option<&'static [u64]> {
        match self {
            Series::PushDuration(..) => Some(&PUSH_DURATION_BOUNDS_MS),
            Series::CallbackDelay => Some(&CALLBACK_DELAY_BOUNDS_MS),
            _ => None,
        }
    }

    /// Index of the bucket `ms` falls in (the last one is above every bound).
    pub fn bucket(&self, ms: u64) -> usize {
        Histogram::bucket(self.bounds().unwrap_or(&[]), ms)
    }
}

impl Delta {
    pub fn series(&self) -> Series {
        match self {
            Delta::Inc(s) | Delta::Dec(s) | Delta::Observe(s, _) => s.clone(),
            Delta::Timestamp { .. } => Series::LastCallback,
        }
    }
}

/// Every event metric. Ordered maps, so the exposition is sorted and stable.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub pushes: BTreeMap<(Domain, Area), u64>,
    pub disconnects: BTreeMap<(Domain, Area, ErrCode), u64>,
    pub push_duration: BTreeMap<(Domain, Area), Histogram>,
    pub callbacks: BTreeMap<(EventKind, Outcome), u64>,
    pub callback_delay: Option<Histogram>,
    /// Receive time of the last accepted callback, unix milliseconds; 0 before the first.
    pub last_callback_ms: i64,
    /// Events counted under the overflow domain because of the domain cap.
    pub domains_overflow: u64,
}

impl Counters {
    fn counter(&mut self, series: &Series) -> Option<&mut u64> {
        Some(match series {
            Series::Pushes(d, a) => self.pushes.entry((d.clone(), *a)).or_default(),
            Series::Disconnects(d, a, e) => {
                self.disconnects.entry((d.clone(), *a, *e)).or_default()
            }
            Series::Callbacks(k, o) => self.callbacks.entry((*k, *o)).or_default(),
            Series::DomainsOverflow => &mut self.domains_overflow,
            _ => return None,
        })
    }

    fn histogram(&mut self, series: &Series) -> Option<(&mut Histogram, &'static [u64])> {
        Some(match series {
            Series::PushDuration(d, a) => (
                self.push_duration
                    .entry((d.clone(), *a))
                    .or_insert_with(|| Histogram::new(&PUSH_DURATION_BOUNDS_MS)),
                &PUSH_DURATION_BOUNDS_MS[..],
            ),
            Series::CallbackDelay => (
                self.callback_delay
                    .get_or_insert_with(|| Histogram::new(&CALLBACK_DELAY_BOUNDS_MS)),
                &CALLBACK_DELAY_BOUNDS_MS[..],
            ),
            _ => return None,
        })
    }

    pub fn inc(&mut self, series: Series) -> Delta {
        if let Some(c) = self.counter(&series) {
            *c += 1;
        }
        Delta::Inc(series)
    }

    pub fn dec(&mut self, series: Series) -> Delta {
        if let Some(c) = self.counter(&series) {
            *c = c.saturating_sub(1);
        }
        Delta::Dec(series)
    }

    pub fn observe(&mut self, series: Series, ms: u64) -> Delta {
        let ms = ms.min(MAX_OBSERVATION_MS);
        if let Some((h, bounds)) = self.histogram(&series) {
            h.observe(bounds, ms);
        }
        Delta::Observe(series, ms)
    }

    /// Applies what an event counts; the returned delta undoes it.
    pub fn apply(&mut self, count: Count) -> Delta {
        match count {
            Count::Inc(series) => self.inc(series),
            Count::Observe(series, ms) => self.observe(series, ms),
            Count::Touch(now_ms) => self.touch(now_ms),
        }
    }

    /// Sets the last-accepted timestamp to the time the ledger recorded the callback at. The
    /// ledger reads its clock a batch at a time, in order, so this goes back only when the clock
    /// was set back, and then follows it: kept at its highest, it stayed ahead for as long as
    /// the clock had been (hours, for a machine that started on local time), and
    /// `time() - tencent_css_last_callback_timestamp_seconds` could not say that callbacks
    /// stopped.
    pub fn touch(&mut self, now_ms: i64) -> Delta {
        let before = self.last_callback_ms;
        self.last_callback_ms = now_ms;
        Delta::Timestamp { before }
    }

    pub fn revert(&mut self, delta: &Delta) {
        match delta {
            Delta::Inc(series) => {
                if let Some(c) = self.counter(series) {
                    *c = c.saturating_sub(1);
                }
            }
            Delta::Dec(series) => {
                if let Some(c) = self.counter(series) {
                    *c += 1;
                }
            }
            Delta::Observe(series, ms) => {
                if let Some((h, bounds)) = self.histogram(series) {
                    h.unobserve(bounds, *ms);
                }
            }
            Delta::Timestamp { before } => self.last_callback_ms = *before,
        }
        self.forget_if_empty(&delta.series());
    }

    /// A series back at zero after an undo was created by the undone event: drop it, so a
    /// failed batch leaves no series behind (a (domain, area) that never had a push recorded
    /// must not appear).
    fn forget_if_empty(&mut self, series: &Series) {
        match series {
            Series::Pushes(d, a) => {
                let key = (d.clone(), *a);
                if self.pushes.get(&key) == Some(&0) {
                    self.pushes.remove(&key);
                }
            }
            Series::Disconnects(d, a, e) => {
                let key = (d.clone(), *a, *e);
                if self.disconnects.get(&key) == Some(&0) {
                    self.disconnects.remove(&key);
                }
            }
            Series::PushDuration(d, a) => {
                let key = (d.clone(), *a);
                if self.push_duration.get(&key).is_some_and(|h| h.count() == 0) {
                    self.push_duration.remove(&key);
                }
            }
            Series::Callbacks(k, o) => {
                if self.callbacks.get(&(*k, *o)) == Some(&0) {
                    self.callbacks.remove(&(*k, *o));
                }
            }
            Series::CallbackDelay | Series::LastCallback | Series::DomainsOverflow => {}
        }
    }

    /// The current value of a series, for the store.
    pub fn value(&self, series: &Series) -> Value {
        let count = |c: Option<&u64>| Value::Count(c.copied().unwrap_or(0));
        match series {
            Series::Pushes(d, a) => count(self.pushes.get(&(d.clone(), *a))),
            Series::Disconnects(d, a, e) => count(self.disconnects.get(&(d.clone(), *a, *e))),
            Series::Callbacks(k, o) => count(self.callbacks.get(&(*k, *o))),
            Series::DomainsOverflow => Value::Count(self.domains_overflow),
            Series::PushDuration(d, a) => Value::Histogram(
                self.push_duration
                    .get(&(d.clone(), *a))
                    .cloned()
                    .unwrap_or_else(|| Histogram::new(&PUSH_DURATION_BOUNDS_MS)),
            ),
            Series::CallbackDelay => Value::Histogram(
                self.callback_delay
                    .clone()
                    .unwrap_or_else(|| Histogram::new(&CALLBACK_DELAY_BOUNDS_MS)),
            ),
            Series::LastCallback => Value::TimestampMs(self.last_callback_ms),
        }
    }

    /// Puts back a value read from the store. A histogram stored with other bounds (a release
    /// that changed them) is refused rather than misread.
    pub fn restore(&mut self, series: &Series, value: Value) -> Result<(), String> {
        match value {
            Value::Count(n) => match self.counter(series) {
                Some(c) => *c = n,
                None => return Err(format!("{} is not a counter", series.metric())),
            },
            Value::Histogram(stored) => match self.histogram(series) {
                Some((h, _)) if h.counts.len() == stored.counts.len() => *h = stored,
                _ => return Err(format!("{} has a different bucket layout", series.metric())),
            },
            Value::TimestampMs(ms) => self.last_callback_ms = ms,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut h = Histogram::new(&PUSH_DURATION_BOUNDS_MS);
        h.observe(&PUSH_DURATION_BOUNDS_MS, 10_000);
        h.observe(&PUSH_DURATION_BOUNDS_MS, 10_001);
        h.observe(&PUSH_DURATION_BOUNDS_MS, 90_000_000);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[11], 1);
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_ms, 90_020_001);
    }

    #[test]
    fn revert_undoes_exactly() {
        let mut c = Counters::default();
        let d: Domain = "a.example".into();
        let deltas = [
            c.inc(Series::Pushes(d.clone(), Area::Mainland)),
            c.observe(Series::PushDuration(d.clone(), Area::Mainland), 123_456),
            c.observe(Series::CallbackDelay, 7),
            c.touch(5_000),
        ];
        let after = c.clone();
        for delta in deltas.iter().rev() {
            c.revert(delta);
        }
        // Series the undone events created are gone, not left at zero.
        assert!(c.pushes.is_empty());
        assert!(c.push_duration.is_empty());
        assert_eq!(c.callback_delay.as_ref().unwrap().sum_ms, 0);
        assert_eq!(c.last_callback_ms, 0);
        assert_eq!(after.last_callback_ms, 5_000);
    }

    #[test]
    fn series_encode_and_decode() {
        let d: Domain = "a.example".into();
        for s in [
            Series::Pushes(d.clone(), Area::Overseas),
            Series::Disconnects(d.clone(), Area::Unknown, ErrCode::new(4000)),
            Series::PushDuration(d, Area::Mainland),
            Series::Callbacks(EventKind::Other, Outcome::Ignored),
            Series::CallbackDelay,
            Series::LastCallback,
            Series::DomainsOverflow,
        ] {
            assert_eq!(Series::decode(s.metric(), &s.labels()), Some(s));
        }
        assert_eq!(Series::decode("pushes_total", &["d".into()]), None);
        assert_eq!(Series::decode("nope", &[]), None);
    }
}
