//! The exporter's state: live sessions, delivered events and counters, changed one event at a
//! time by the truth rules.
//!
//! [`Truth::apply`] returns a [`Change`] that says exactly what moved, so the ledger can persist a
//! batch of changes in one transaction and, if that fails, [`Truth::undo`] them: memory never
//! holds what the store does not.

pub mod counters;
mod delivered;
pub mod rules;

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::area::Area;
use crate::callback::{Event, EventKind, Outcome, StreamKey};
use counters::{Counters, Delta, Domain, Series, Value};
use delivered::Delivered;
pub use delivered::DeliveryKey;
use rules::{Decision, Effect, Facts, Session};

/// What applying one event changed: enough to persist it and to undo it.
#[derive(Debug)]
pub struct Change {
    pub outcome: Outcome,
    /// A delivered-event key recorded by this event.
    delivered: Option<DeliveryKey>,
    /// The stream whose session changed, with its session before.
    session: Option<(StreamKey, Option<Session>)>,
    deltas: Vec<Delta>,
}

/// What a batch of changes leaves to persist: the new values of everything it touched.
#[derive(Debug, Default)]
pub struct Commit {
    /// Each touched stream with its live session now (`None`: not live).
    pub sessions: Vec<(StreamKey, Option<Session>)>,
    /// New delivered-event keys with their expiry (unix milliseconds).
    pub delivered: Vec<(DeliveryKey, i64)>,
    pub series: Vec<(Series, Value)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.delivered.is_empty() && self.series.is_empty()
    }
}

/// Everything a store keeps, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sessions: Vec<(StreamKey, Session)>,
    pub delivered: Vec<(DeliveryKey, i64)>,
    pub series: Vec<(Series, Value)>,
}

/// The numbers `/metrics` shows: live streams per (domain, area) and every counter, as read from
/// a shared store (a scrape copies them into a [`Frame`](crate::metrics::Frame)).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub live: BTreeMap<(Domain, Area), u64>,
    pub counters: Counters,
}

impl View {
    /// Every (domain, area) that ever had a push is listed, at 0 when nothing is live, so a
    /// series that drops to 0 stays visible, also after a restart.
    pub fn live_streams<'a>(
        live: impl IntoIterator<Item = (&'a (Domain, Area), &'a u64)>,
        counters: &Counters,
    ) -> BTreeMap<(Domain, Area), u64> {
        let mut all: BTreeMap<_, _> = counters.pushes.keys().map(|k| (k.clone(), 0)).collect();
        for (key, n) in live {
            *all.entry(key.clone()).or_default() += n;
        }
        all
    }
}

/// The live picture and the counters: the single source of every metric.
#[derive(Debug)]
pub struct Truth {
    sessions: HashMap<StreamKey, Session>,
    delivered: Delivered,
    /// Live sessions per (domain, area): derived from `sessions`, kept so a scrape does not have
    /// to walk every live stream.
    live: HashMap<(Domain, Area), u64>,
    counters: Counters,
    /// Domains that have series of their own. Only grows, up to `max_domains`.
    domains: HashSet<Domain>,
    /// Every `app` and `appname` seen in a live session, so a million sessions of one domain
    /// share one string.
    names: HashSet<std::sync::Arc<str>>,
    /// How long a delivered event is remembered, in milliseconds.
    dedup_window_ms: i64,
    /// Cardinality cap: events of further domains are counted under [`OTHER_DOMAIN`].
    max_domains: usize,
    /// The overflow warning is logged once a process.
    overflow_warned: bool,
}

/// The `domain` label of events whose domain is beyond the cap.
pub const OTHER_DOMAIN: &str = "_other";

/// Settings of the state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a delivered event is remembered, in milliseconds.
    pub dedup_window_ms: i64,
    /// Most domains with series of their own.
    pub max_domains: usize,
}

impl Truth {
    pub fn new(limits: Limits) -> Self {
        Truth {
            sessions: HashMap::new(),
            delivered: Delivered::default(),
            live: HashMap::new(),
            counters: Counters::default(),
            domains: HashSet::new(),
            names: HashSet::new(),
            dedup_window_ms: limits.dedup_window_ms,
            max_domains: limits.max_domains,
            overflow_warned: false,
        }
    }

    /// Rebuilds the state a store loaded. Delivered keys already expired at `now_ms` are dropped.
    pub fn restore(snapshot: Snapshot, limits: Limits, now_ms: i64) -> Result<Self, String> {
        let mut truth = Truth::new(limits);
        // Series first: every domain with series of its own keeps them, whatever the cap says
        // now, and sessions are then indexed under the same labels as before.
        for (series, value) in snapshot.series {
            let series = truth.intern_series(series);
            truth.counters.restore(&series, value)?;
        }
        for (stream, session) in snapshot.sessions {
            truth.set_session(&stream, Some(session));
        }
        let mut delivered = snapshot.delivered;
        delivered.sort_by_key(|(_, expires)| *expires);
        for (key, expires_ms) in delivered {
            if expires_ms > now_ms {
                truth.delivered.insert(key, expires_ms);
            }
        }
        Ok(truth)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Live streams per (domain, area); see [`View::live_streams`].
    pub fn live_streams(&self) -> BTreeMap<(Domain, Area), u64> {
        View::live_streams(&self.live, &self.counters)
    }

    /// Live sessions per (domain, area), in no order; a (domain, area) whose sessions all ended
    /// may be listed at 0 or not at all.
    pub fn live(&self) -> &HashMap<(Domain, Area), u64> {
        &self.live
    }

    pub fn live_total(&self) -> usize {
        self.sessions.len()
    }

    /// The live session of a stream.
    pub fn session(&self, stream: &StreamKey) -> Option<&Session> {
        self.sessions.get(stream)
    }

    /// Applies one accepted-for-processing event (signature and `t` already verified).
    pub fn apply(&mut self, event: &Event, now_ms: i64) -> Change {
        let (kind, stream_event) = match event {
            Event::Other { .. } => return self.count(EventKind::Other, Outcome::Ignored),
            Event::Push(s) => (EventKind::Push, s),
            Event::Disconnect { session, .. } => (EventKind::Disconnect, session),
        };
        let key = DeliveryKey::new(&stream_event.sequence, kind);
        let facts = Facts {
            current: self.sessions.get(&stream_event.stream),
            already_delivered: self.delivered.contains(&key, now_ms),
            disconnect_seen: kind == EventKind::Push
                && self.delivered.contains(
                    &DeliveryKey::new(&stream_event.sequence, EventKind::Disconnect),
                    now_ms,
                ),
        };
        let decision = rules::decide(event, facts, now_ms.div_euclid(1000));
        let effect = match decision {
            Some(Decision::Accept(effect)) => effect,
            _ => return self.count(kind, Outcome::Duplicate),
        };

        self.delivered
            .insert(key.clone(), now_ms.saturating_add(self.dedup_window_ms));
        let (domain, overflow) = self.admit(&stream_event.stream.app);
        let session = match effect {
            Effect::Keep => None,
            Effect::Start(s) => Some(self.set_session(&stream_event.stream, Some(s))),
            Effect::End => Some(self.set_session(&stream_event.stream, None)),
        };
        let deltas = counters::tally(event, domain, overflow, now_ms)
            .into_iter()
            .map(|count| self.counters.apply(count))
            .collect();
        Change {
            outcome: Outcome::Accepted,
            delivered: Some(key),
            session: session.map(|before| (stream_event.stream.clone(), before)),
            deltas,
        }
    }

    /// Counts a callback that changes nothing else (duplicates, ignored and rejected ones).
    pub fn count(&mut self, kind: EventKind, outcome: Outcome) -> Change {
        Change {
            outcome,
            delivered: None,
            session: None,
            deltas: vec![self.counters.inc(Series::Callbacks(kind, outcome))],
        }
    }

    /// Reverses a change; changes of a batch are undone last first.
    pub fn undo(&mut self, change: &Change) {
        for delta in change.deltas.iter().rev() {
            self.counters.revert(delta);
        }
        if let Some((stream, before)) = &change.session {
            self.set_session(stream, before.clone());
        }
        if let Some(key) = &change.delivered {
            self.delivered.remove(key);
        }
    }

    /// What a batch of changes (already applied) leaves to persist.
    pub fn commit_of(&self, changes: &[Change]) -> Commit {
        let mut streams = HashSet::new();
        let mut series = HashSet::new();
        let mut commit = Commit::default();
        for change in changes {
            if let Some((stream, _)) = &change.session {
                if streams.insert(stream) {
                    commit
                        .sessions
                        .push((stream.clone(), self.sessions.get(stream).cloned()));
                }
            }
            if let Some(key) = &change.delivered {
                if let Some(expires) = self.delivered.expiry(key) {
                    commit.delivered.push((key.clone(), expires));
                }
            }
            for delta in &change.deltas {
                let s = delta.series();
                if !series.contains(&s) {
                    commit.series.push((s.clone(), self.counters.value(&s)));
                    series.insert(s);
                }
            }
        }
        commit
    }

    /// Forgets delivered keys whose window has passed; returns how many.
    pub fn purge(&mut self, now_ms: i64) -> usize {
        self.delivered.purge(now_ms)
    }

    pub fn delivered_len(&self) -> usize {
        self.delivered.len()
    }

    /// Sets a stream's session, keeping the live index in step; returns the session before.
    fn set_session(&mut self, stream: &StreamKey, session: Option<Session>) -> Option<Session> {
        let domain = self.domain(&stream.app);
        if let Some(s) = &session {
            *self.live.entry((domain.clone(), s.area)).or_default() += 1;
        }
        let before = match session {
            Some(s) => match self.sessions.get_mut(stream) {
                Some(current) => Some(std::mem::replace(current, s)),
                None => {
                    let key = StreamKey {
                        app: self.name(&stream.app),
                        appname: self.name(&stream.appname),
                        stream_id: stream.stream_id.clone(),
                    };
                    self.sessions.insert(key, s)
                }
            },
            None => self.sessions.remove(stream),
        };
        if let Some(b) = &before {
            if let Some(n) = self.live.get_mut(&(domain, b.area)) {
                *n = n.saturating_sub(1);
            }
        }
        before
    }

    /// The `domain` label of `app`: itself once admitted, else [`OTHER_DOMAIN`].
    fn domain(&mut self, app: &str) -> Domain {
        match self.domains.get(app) {
            Some(d) => d.clone(),
            None => self.intern(OTHER_DOMAIN),
        }
    }

    /// Admits `app` as a domain of its own if the cap allows; returns its label and whether it
    /// overflowed.
    fn admit(&mut self, app: &str) -> (Domain, bool) {
        if let Some(d) = self.domains.get(app) {
            return (d.clone(), false);
        }
        // The overflow label itself does not take a place under the cap.
        let admitted = self.domains.len() - self.domains.contains(OTHER_DOMAIN) as usize;
        if admitted < self.max_domains {
            return (self.intern(app), false);
        }
        if !self.overflow_warned {
            self.overflow_warned = true;
            tracing::warn!(
                max_domains = self.max_domains,
                "domain cap reached: events of further domains are counted under domain=\"{OTHER_DOMAIN}\" (see --metrics.max-domains)"
            );
        }
        (self.intern(OTHER_DOMAIN), true)
    }

    fn name(&mut self, name: &std::sync::Arc<str>) -> std::sync::Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        self.names.insert(name.clone());
        name.clone()
    }

    fn intern(&mut self, name: &str) -> Domain {
        if let Some(d) = self.domains.get(name) {
            return d.clone();
        }
        let d: Domain = name.into();
        self.domains.insert(d.clone());
        d
    }

    fn intern_series(&mut self, series: Series) -> Series {
        match series {
            Series::Pushes(d, a) => Series::Pushes(self.intern(&d), a),
            Series::PushDuration(d, a) => Series::PushDuration(self.intern(&d), a),
            Series::Disconnects(d, a, e) => Series::Disconnects(self.intern(&d), a, e),
            other => other,
        }
    }
}
