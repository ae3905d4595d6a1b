//! The exporter's state: live sessions, delivered events and counters, changed one event at a
//! time by the truth rules.
//!
//! [`Truth::apply`] returns a [`Change`] that says exactly what moved, so the ledger can persist a
//! batch of changes in one transaction and, if that fails, [`Truth::undo`] them: memory never
//! holds what the store does not.

pub mod counters;
mod delivered;
mod live;
pub mod rules;

use std::collections::BTreeMap;

use crate::area::Area;
use crate::callback::{Event, EventKind, Outcome, StreamKey};
use counters::{Counters, Delta, Domain, Series, Value};
use delivered::Delivered;
pub use delivered::{DeliveryKey, Expired};
use live::Live;
use rules::{Decision, Effect, Facts, Session};

/// What applying one event changed: enough to persist it and to undo it.
/// The hash maps and sets of the hot path. Their keys are stream ids, sequences and domains of
/// callbacks that passed the signature check, so SipHash's defence against chosen keys buys
/// little, and it was the largest single item in the writer's profile; foldhash still seeds each
/// table at random.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`FastMap`].
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

#[derive(Debug)]
pub struct Change {
    pub outcome: Outcome,
    /// Delivered-event keys this event made remembered for the dedup window: its own (unless it
    /// started a session, which holds it) and the push of a session it ended or replaced.
    delivered: [Option<DeliveryKey>; 2],
    /// The stream whose session changed, with its session before.
    session: Option<(StreamKey, Option<Session>)>,
    /// The domain this event admitted under the cap, which an undo forgets again.
    admitted: Option<Domain>,
    /// Counter changes in the order made: an undo reverts them last first, a commit stores the
    /// series they touched.
    deltas: Vec<Delta>,
}

/// What a batch of changes leaves to persist: the new values of everything it touched.
#[derive(Debug, Default)]
pub struct Commit {
    /// Each touched stream with its live session now (`None`: not live).
    pub sessions: Vec<(StreamKey, Option<Session>)>,
    /// New delivered-event keys with their expiry (unix milliseconds). The push of a live
    /// session is not among them: its session stands for it, and it comes here once the session
    /// ends or is replaced.
    pub delivered: Vec<(DeliveryKey, i64)>,
    pub series: Vec<(Series, Value)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.delivered.is_empty() && self.series.is_empty()
    }
}

/// Everything a store keeps, as loaded at start. A session implies its push was delivered.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sessions: Vec<(StreamKey, Session)>,
    /// More sessions, still being read by the store on a thread of its own while the state is
    /// rebuilt from what came first: reading a million stored sessions and indexing them take
    /// about as long each.
    pub more_sessions: Option<SessionFeed>,
    pub delivered: Vec<(DeliveryKey, i64)>,
    pub series: Vec<(Series, Value)>,
}

/// Sessions that come in chunks as they are read; an error ends the feed.
#[derive(Debug)]
pub struct SessionFeed {
    /// At most how many sessions will come, to make room for them at once.
    pub expected: usize,
    pub chunks: std::sync::mpsc::Receiver<Result<Vec<(StreamKey, Session)>, String>>,
}

impl Snapshot {
    /// Every session, once all are read (for tests: the state takes them chunk by chunk).
    #[cfg(test)]
    pub fn all_sessions(self) -> Result<Vec<(StreamKey, Session)>, String> {
        let mut all = self.sessions;
        if let Some(feed) = self.more_sessions {
            for chunk in feed.chunks {
                all.extend(chunk?);
            }
        }
        Ok(all)
    }
}

/// The numbers `/metrics` shows: live streams per (domain, area) and every counter, as read from
/// a shared store (a scrape copies them into a [`Frame`](crate::metrics::Frame), which also
/// lists at 0 every (domain, area) that had a push).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub live: BTreeMap<(Domain, Area), u64>,
    pub counters: Counters,
}

/// The live picture and the counters: the single source of every metric.
#[derive(Debug)]
pub struct Truth {
    /// The live session of every live stream.
    sessions: Live,
    /// Delivered-event keys, so that Tencent's retries count as duplicates.
    delivered: Delivered,
    /// Live sessions per (domain, area): derived from `sessions`, kept so a scrape does not have
    /// to walk every live stream. Ordered, like the counters, so that a scrape can copy it a
    /// piece at a time and resume after the last key it copied.
    live: BTreeMap<(Domain, Area), u64>,
    /// Every event metric, persisted with the rest of the state.
    counters: Counters,
    /// Domains that have series of their own, up to `max_domains` (more if restored with a
    /// smaller cap). Only grows, but for an undone event forgetting the domain it admitted.
    /// While a process runs, a domain counted under [`OTHER_DOMAIN`] is never admitted (the cap
    /// is full, and the events undone are the last ones applied): a session is uncounted under
    /// the label it was counted under.
    domains: FastSet<Domain>,
    /// Cardinality cap: events of further domains are counted under [`OTHER_DOMAIN`].
    max_domains: usize,
    /// The overflow warning is logged once a process.
    overflow_warned: bool,
}

/// The `domain` label of events whose domain is beyond the cap.
pub const OTHER_DOMAIN: &str = "_other";

/// Where a domain stands under the cap.
enum Label {
    /// Admitted before: it has series of its own (or a live session restored under it).
    Own(Domain),
    /// It has series of its own from now on.
    Admitted(Domain),
    /// Over the cap: counted under [`OTHER_DOMAIN`].
    Over,
}

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
            sessions: Live::default(),
            delivered: Delivered::new(limits.dedup_window_ms),
            live: BTreeMap::new(),
            counters: Counters::default(),
            domains: FastSet::default(),
            max_domains: limits.max_domains,
            overflow_warned: false,
        }
    }

    /// Rebuilds the state a store loaded. Delivered keys already expired at `now_ms` are
    /// dropped; so are the pushes of live sessions (stored by earlier releases), which their
    /// sessions stand for.
    pub fn restore(snapshot: Snapshot, limits: Limits, now_ms: i64) -> Result<Self, String> {
        let mut truth = Truth::new(limits);
        // Series first: every domain with series of its own keeps them, whatever the cap says
        // now. Sessions are then indexed under the labels their ends will find: a session of a
        // domain without series of its own is admitted under the cap as its next event would be
        // (a session counted under the overflow label before a restart with a larger cap), so
        // its domain cannot be admitted later while the session is counted under the overflow
        // label.
        for (series, value) in snapshot.series {
            let series = truth.intern_series(series);
            truth.counters.restore(&series, value)?;
        }
        let (first, more) = (snapshot.sessions, snapshot.more_sessions);
        let expected = first.len() + more.as_ref().map_or(0, |feed| feed.expected);
        truth.sessions.reserve(expected);
        truth.delivered.reserve_held(expected);
        // Rows mostly come ordered by stream (the stored table's key): the label is then looked
        // up once a domain.
        let mut last: Option<(std::sync::Arc<str>, Domain)> = None;
        let mut restore = |sessions: Vec<(StreamKey, Session)>| {
            for (stream, session) in sessions {
                let label = match &last {
                    Some((app, label)) if *app == stream.app => label.clone(),
                    _ => {
                        let label = match truth.label(&stream.app) {
                            Label::Own(d) | Label::Admitted(d) => d,
                            Label::Over => truth.intern(OTHER_DOMAIN),
                        };
                        last = Some((stream.app.clone(), label.clone()));
                        label
                    }
                };
                truth.set_session_labelled(&stream, Some(session), label);
            }
        };
        restore(first);
        if let Some(feed) = more {
            for chunk in feed.chunks {
                restore(chunk?);
            }
        }
        for (key, expires_ms) in snapshot.delivered {
            truth.delivered.restore(key, expires_ms, now_ms);
        }
        Ok(truth)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Live streams per (domain, area), sorted. Every (domain, area) that ever had a push is
    /// listed, at 0 when nothing is live, as `/metrics` shows them.
    pub fn live_streams(&self) -> BTreeMap<(Domain, Area), u64> {
        let mut all: BTreeMap<_, _> = self
            .counters
            .pushes
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        for (key, n) in &self.live {
            *all.entry(key.clone()).or_default() += n;
        }
        all
    }

    /// Live sessions per (domain, area), ordered; a (domain, area) whose sessions all ended is
    /// not listed.
    pub fn live(&self) -> &BTreeMap<(Domain, Area), u64> {
        &self.live
    }

    pub fn live_total(&self) -> usize {
        self.sessions.len()
    }

    /// The live session of a stream.
    pub fn session(&self, stream: &StreamKey) -> Option<Session> {
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
        let (stream, current) = self.stream_of(kind, stream_event);
        let stream = stream.as_ref();
        let facts = Facts {
            current: current.as_ref(),
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

        let area = rules::counted_area(event, &effect, current.as_ref());
        let (domain, overflow, admitted) = self.admit(&stream.app);
        // A session that starts holds its push; every other event is remembered for the window,
        // and so is the push of a session that stops being live.
        let (own, session) = match effect {
            Effect::Keep => (Some(key), None),
            Effect::Start(s) => (None, Some(self.set_session(stream, Some(s)))),
            Effect::End => (Some(key), Some(self.set_session(stream, None))),
        };
        let ended = session
            .as_ref()
            .and_then(|before| before.as_ref())
            .map(|before| DeliveryKey::push_of(before.sequence.clone()));
        let delivered =
            [own, ended].map(|key| key.filter(|key| self.delivered.remember(key.clone(), now_ms)));
        let deltas = counters::tally(event, domain, area, overflow, now_ms)
            .into_iter()
            .map(|count| self.counters.apply(count))
            .collect();
        Change {
            outcome: Outcome::Accepted,
            delivered,
            session: session.map(|before| (stream.clone(), before)),
            admitted,
            deltas,
        }
    }

    /// The stream an event is about, and its live session. A disconnect whose stream is not
    /// live with its sequence ends that sequence's session under another `appname` of the same
    /// `app` and stream id, if there is one ([`rules::disconnect`]).
    fn stream_of<'e>(
        &self,
        kind: EventKind,
        event: &'e crate::callback::StreamEvent,
    ) -> (std::borrow::Cow<'e, StreamKey>, Option<Session>) {
        let current = self.sessions.get(&event.stream);
        let own = current
            .as_ref()
            .is_some_and(|c| c.sequence == event.sequence);
        if kind == EventKind::Disconnect && !own {
            if let Some((stream, session)) =
                self.sessions.other_path(&event.stream, &event.sequence)
            {
                return (std::borrow::Cow::Owned(stream), Some(session));
            }
        }
        (std::borrow::Cow::Borrowed(&event.stream), current)
    }

    /// Counts a callback that changes nothing else (duplicates, ignored and rejected ones).
    pub fn count(&mut self, kind: EventKind, outcome: Outcome) -> Change {
        Change {
            outcome,
            delivered: [None, None],
            session: None,
            admitted: None,
            deltas: vec![self.counters.inc(Series::Callbacks(kind, outcome))],
        }
    }

    /// Moves a callback counted under `outcome` to `error`: its request was answered 503 at
    /// its deadline while its batch was being written, so the event is recorded, and Tencent's
    /// retry will be a duplicate, but the request itself failed.
    pub fn reanswer(&mut self, kind: EventKind, outcome: Outcome) -> Change {
        let mut change = self.count(kind, Outcome::Error);
        change
            .deltas
            .push(self.counters.dec(Series::Callbacks(kind, outcome)));
        change
    }

    /// Reverses a change; changes of a batch are undone last first.
    pub fn undo(&mut self, change: &Change) {
        for delta in change.deltas.iter().rev() {
            self.counters.revert(delta);
        }
        if let Some((stream, before)) = &change.session {
            self.set_session(stream, before.clone());
        }
        for key in change.delivered.iter().flatten() {
            self.delivered.forget(key);
        }
        // Its series and session are gone: the domain has nothing under its label any more.
        if let Some(domain) = &change.admitted {
            self.domains.remove(domain);
        }
    }

    /// What a batch of changes (already applied) leaves to persist.
    pub fn commit_of<'a>(&self, changes: impl IntoIterator<Item = &'a Change>) -> Commit {
        let changes = changes.into_iter();
        let n = changes.size_hint().0;
        // A batch's streams and series are few and keyed by signed callbacks: the fast hash.
        // Sized for the batch up front: growing them was a few allocations a callback.
        let mut streams = FastSet::with_capacity_and_hasher(n, Default::default());
        let mut series = FastSet::with_capacity_and_hasher(2 * n, Default::default());
        let mut commit = Commit {
            sessions: Vec::with_capacity(n),
            delivered: Vec::with_capacity(n),
            series: Vec::with_capacity(2 * n),
        };
        for change in changes {
            if let Some((stream, _)) = &change.session {
                if streams.insert(stream) {
                    commit
                        .sessions
                        .push((stream.clone(), self.sessions.get(stream)));
                }
            }
            for key in change.delivered.iter().flatten() {
                if let Some(expires) = self.delivered.expiry(key) {
                    commit.delivered.push((key.clone(), expires));
                }
            }
            for delta in &change.deltas {
                let s = delta.series();
                if series.insert(s.clone()) {
                    let value = self.counters.value(&s);
                    commit.series.push((s, value));
                }
            }
        }
        commit
    }

    /// Changes whose counts are kept for a later batch (rejections and errors counted while
    /// the store fails), cut to one a series: a commit stores each series' value as it is
    /// then, so more say nothing more. Kept whole, they grew by one a callback for as long as
    /// the store failed, and every batch went through all of them.
    pub fn counts_to_store(changes: Vec<Change>) -> Vec<Change> {
        let mut seen = FastSet::default();
        changes
            .into_iter()
            .filter(|change| {
                let mut new_series = false;
                for delta in &change.deltas {
                    new_series |= seen.insert(delta.series());
                }
                // Not a count alone (none is kept today): kept as it is.
                new_series
                    || change.session.is_some()
                    || change.delivered.iter().any(Option::is_some)
            })
            .collect()
    }

    /// Forgets delivered keys whose window has passed; returns how many.
    pub fn purge(&mut self, now_ms: i64) -> usize {
        self.expire(now_ms).len()
    }

    /// Forgets delivered keys whose window has passed, and returns them: whole tables taken out
    /// in constant time, which a caller holding a lock can drop (free) after releasing it. Also
    /// gives back the memory of the live sessions' tables once they are mostly empty.
    pub fn expire(&mut self, now_ms: i64) -> Expired {
        self.sessions.shrink();
        self.delivered.expire(now_ms)
    }

    /// The latest a delivered key remembered at `now_ms` is kept until; a store brings the
    /// expiries it keeps down to it (see [`crate::store::Store::cap_expiry`]).
    pub fn latest_expiry(&self, now_ms: i64) -> i64 {
        self.delivered.latest_expiry(now_ms)
    }

    pub fn delivered_len(&self) -> usize {
        self.delivered.len()
    }

    /// Sets a stream's session, keeping the live index and the held pushes in step; returns
    /// the session before.
    fn set_session(&mut self, stream: &StreamKey, session: Option<Session>) -> Option<Session> {
        let domain = self.domain(&stream.app);
        self.set_session_labelled(stream, session, domain)
    }

    /// [`Truth::set_session`] with the stream's `domain` label already looked up.
    fn set_session_labelled(
        &mut self,
        stream: &StreamKey,
        session: Option<Session>,
        domain: Domain,
    ) -> Option<Session> {
        if let Some(s) = &session {
            *self.live.entry((domain.clone(), s.area)).or_default() += 1;
            self.delivered.hold(&s.sequence);
        }
        let before = self.sessions.set(stream, session);
        if let Some(b) = &before {
            self.delivered.release(&b.sequence);
            // A (domain, area) with nothing live leaves the index: if it ever had a push
            // recorded, `pushes_total` lists it at 0; if not (a failed batch's push undone, a
            // session restored under a label it was not pushed under) a restart would not show
            // it either.
            let key = (domain, b.area);
            if let Some(n) = self.live.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.live.remove(&key);
                }
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

    /// The `domain` label of `app`, admitting it as a domain of its own if the cap allows.
    fn label(&mut self, app: &str) -> Label {
        if let Some(d) = self.domains.get(app) {
            return Label::Own(d.clone());
        }
        // The overflow label itself does not take a place under the cap.
        let admitted = self.domains.len() - self.domains.contains(OTHER_DOMAIN) as usize;
        if admitted < self.max_domains {
            return Label::Admitted(self.intern(app));
        }
        Label::Over
    }

    /// The label of an event's `app` ([`Truth::label`]): its label, whether it overflowed, and
    /// the domain admitted just now if it was.
    fn admit(&mut self, app: &str) -> (Domain, bool, Option<Domain>) {
        match self.label(app) {
            Label::Own(d) => return (d, false, None),
            Label::Admitted(d) => return (d.clone(), false, Some(d)),
            Label::Over => {}
        }
        if !self.overflow_warned {
            self.overflow_warned = true;
            tracing::warn!(
                max_domains = self.max_domains,
                "domain cap reached: events of further domains are counted under domain=\"{OTHER_DOMAIN}\" (see --metrics.max-domains)"
            );
        }
        (self.intern(OTHER_DOMAIN), true, None)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callback::StreamEvent;

    const T: i64 = 1_700_000_000_000;
    const HOUR: i64 = 3_600_000;

    fn limits(dedup_window_ms: i64) -> Limits {
        Limits {
            dedup_window_ms,
            max_domains: 100,
        }
    }

    fn stream(id: &str) -> StreamKey {
        StreamKey {
            app: "d.example.com".into(),
            appname: "live".into(),
            stream_id: id.into(),
        }
    }

    /// An event of stream `id` that happened `event_time` seconds after `T`.
    fn stream_event(id: &str, sequence: &str, event_time: i64) -> StreamEvent {
        StreamEvent {
            stream: stream(id),
            sequence: sequence.into(),
            event_time: Some(T / 1000 + event_time),
            area: Area::Mainland,
        }
    }

    fn push(id: &str, sequence: &str, event_time: i64) -> Event {
        Event::Push(stream_event(id, sequence, event_time))
    }

    fn disconnect(id: &str, sequence: &str) -> Event {
        Event::Disconnect {
            session: stream_event(id, sequence, 0),
            errcode: 1,
            push_duration_ms: Some(1000),
        }
    }

    fn key(sequence: &str, push: bool) -> DeliveryKey {
        DeliveryKey {
            sequence: sequence.into(),
            push,
        }
    }

    /// A store that keeps what commits say, as the real ones do.
    #[derive(Default)]
    struct Stored {
        sessions: BTreeMap<StreamKey, Session>,
        delivered: BTreeMap<(String, bool), i64>,
        series: BTreeMap<Series, Value>,
    }

    impl Stored {
        fn write(&mut self, commit: Commit) {
            for (stream, session) in commit.sessions {
                match session {
                    Some(s) => self.sessions.insert(stream, s),
                    None => self.sessions.remove(&stream),
                };
            }
            for (key, expires) in commit.delivered {
                self.delivered
                    .insert((key.sequence.to_string(), key.push), expires);
            }
            self.series.extend(commit.series);
        }

        fn snapshot(&self) -> Snapshot {
            Snapshot {
                more_sessions: None,
                sessions: self
                    .sessions
                    .iter()
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect(),
                delivered: self
                    .delivered
                    .iter()
                    .map(|((s, push), e)| (key(s, *push), *e))
                    .collect(),
                series: self
                    .series
                    .iter()
                    .map(|(s, v)| (s.clone(), v.clone()))
                    .collect(),
            }
        }
    }

    /// Applies events one batch each, writing every batch to `stored`; returns the outcomes.
    fn run(truth: &mut Truth, stored: &mut Stored, events: &[(Event, i64)]) -> Vec<Outcome> {
        events
            .iter()
            .map(|(event, now)| {
                let change = truth.apply(event, *now);
                stored.write(truth.commit_of(std::slice::from_ref(&change)));
                change.outcome
            })
            .collect()
    }

    fn live(truth: &Truth, id: &str) -> Option<String> {
        truth.session(&stream(id)).map(|s| s.sequence.to_string())
    }

    use Outcome::{Accepted, Duplicate};

    #[test]
    fn a_session_and_the_retries_of_its_events() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[(push("s", "11", 10), T), (push("s", "11", 10), T + 1)],
        );
        assert_eq!(outcomes, [Accepted, Duplicate]);
        assert_eq!(live(&truth, "s").as_deref(), Some("11"));
        assert!(
            stored.delivered.is_empty(),
            "the live session stands for its push"
        );
        assert_eq!(truth.delivered_len(), 1);

        let outcomes = run(
            &mut truth,
            &mut stored,
            &[
                (disconnect("s", "11"), T + 2),
                (push("s", "11", 10), T + 3),
                (disconnect("s", "11"), T + 4),
            ],
        );
        assert_eq!(outcomes, [Accepted, Duplicate, Duplicate]);
        assert_eq!(live(&truth, "s"), None, "a retried push does not revive it");
        // The push is remembered from the disconnect on, for the whole window.
        let expires = stored.delivered[&("11".into(), true)];
        assert_eq!(stored.delivered[&("11".into(), false)], expires);
        assert!(expires >= T + 2 + HOUR, "{expires}");
        assert_eq!(truth.counters().pushes.values().sum::<u64>(), 1);
        assert_eq!(truth.counters().disconnects.values().sum::<u64>(), 1);
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[(push("s", "11", 10), expires - 1)],
        );
        assert_eq!(outcomes, [Duplicate]);
    }

    #[test]
    fn the_push_of_a_live_session_is_a_duplicate_however_long_it_lasts() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        run(&mut truth, &mut stored, &[(push("s", "11", 10), T)]);
        assert_eq!(truth.purge(T + 10 * HOUR), 0);
        let later = T + 10 * HOUR;
        let outcomes = run(&mut truth, &mut stored, &[(push("s", "11", 10), later)]);
        assert_eq!(outcomes, [Duplicate]);
        assert_eq!(truth.counters().pushes.values().sum::<u64>(), 1);
        // Then it ends: its push is remembered for a window from then.
        run(&mut truth, &mut stored, &[(disconnect("s", "11"), later)]);
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[(push("s", "11", 10), later + HOUR - 1)],
        );
        assert_eq!(outcomes, [Duplicate]);
        assert_eq!(live(&truth, "s"), None);
    }

    #[test]
    fn a_replaced_session_has_its_push_remembered() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[
                (push("s", "1", 10), T),
                (push("s", "2", 20), T + 1),
                (push("s", "1", 10), T + 2),
                (push("s", "2", 20), T + 3),
            ],
        );
        assert_eq!(outcomes, [Accepted, Accepted, Duplicate, Duplicate]);
        assert_eq!(live(&truth, "s").as_deref(), Some("2"));
        assert_eq!(
            stored.delivered.keys().collect::<Vec<_>>(),
            [&("1".to_string(), true)]
        );
        // The disconnect of the replaced session changes nothing live.
        let outcomes = run(&mut truth, &mut stored, &[(disconnect("s", "1"), T + 4)]);
        assert_eq!(outcomes, [Accepted]);
        assert_eq!(live(&truth, "s").as_deref(), Some("2"));
    }

    #[test]
    fn a_push_after_its_disconnect_is_recorded_and_remembered() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[
                (push("s", "1", 10), T),
                (disconnect("s", "2"), T + 1),
                (push("s", "2", 20), T + 2),
                (push("s", "2", 20), T + 3),
                (push("s", "1", 10), T + 4),
            ],
        );
        assert_eq!(
            outcomes,
            [Accepted, Accepted, Accepted, Duplicate, Duplicate]
        );
        assert_eq!(live(&truth, "s"), None, "session 2 replaced 1 and ended");
        assert_eq!(stored.delivered.len(), 3, "{:?}", stored.delivered);
        assert!(stored.sessions.is_empty());
    }

    #[test]
    fn a_sequence_live_in_one_stream_is_delivered_for_every_stream() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[
                (push("a", "shared", 10), T),
                (push("b", "shared", 10), T + 1),
            ],
        );
        assert_eq!(outcomes, [Accepted, Duplicate]);
        assert_eq!(live(&truth, "b"), None);
    }

    #[test]
    fn a_zero_window_remembers_only_what_is_live() {
        let mut truth = Truth::new(limits(0));
        let mut stored = Stored::default();
        let outcomes = run(
            &mut truth,
            &mut stored,
            &[
                (push("s", "1", 10), T),
                (push("s", "1", 10), T),
                (push("t", "1", 10), T),
                (disconnect("s", "1"), T),
                (disconnect("s", "1"), T),
                (push("s", "1", 10), T),
            ],
        );
        assert_eq!(
            outcomes,
            [Accepted, Duplicate, Accepted, Accepted, Accepted, Accepted]
        );
        assert_eq!(live(&truth, "s").as_deref(), Some("1"));
        assert_eq!(live(&truth, "t").as_deref(), Some("1"));
        assert!(stored.delivered.is_empty());
        assert_eq!(truth.delivered_len(), 0);
    }

    #[test]
    fn a_restart_recognises_every_retry() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        run(
            &mut truth,
            &mut stored,
            &[
                (push("live", "1", 10), T),
                (push("ended", "2", 10), T),
                (disconnect("ended", "2"), T + 1),
                (push("replaced", "3", 10), T),
                (push("replaced", "4", 20), T + 2),
            ],
        );
        let restored = |now| Truth::restore(stored.snapshot(), limits(HOUR), now).unwrap();
        let mut truth = restored(T + 10);
        assert_eq!(truth.live_total(), 2);
        assert_eq!(truth.delivered_len(), 2 + 3);
        let retries = [
            push("live", "1", 10),
            push("ended", "2", 10),
            disconnect("ended", "2"),
            push("replaced", "3", 10),
            push("replaced", "4", 20),
            push("elsewhere", "1", 30),
        ];
        for event in &retries {
            assert_eq!(truth.apply(event, T + 20).outcome, Duplicate, "{event:?}");
        }
        // After the window, only what is live is still known.
        let mut truth = restored(T + 2 * HOUR);
        assert_eq!(truth.delivered_len(), 2);
        let outcomes: Vec<_> = retries
            .iter()
            .map(|e| truth.apply(e, T + 2 * HOUR).outcome)
            .collect();
        assert_eq!(
            outcomes,
            [Duplicate, Accepted, Accepted, Accepted, Duplicate, Duplicate]
        );
    }

    /// Sessions that a store still reads while the state is rebuilt count as the others do,
    /// and a feed that fails fails the restore.
    #[test]
    fn sessions_fed_in_chunks_are_restored_and_a_failed_feed_fails() {
        let session = |sequence: &str| Session {
            sequence: sequence.into(),
            area: Area::Overseas,
            since: 10,
        };
        let (chunks, feed) = std::sync::mpsc::sync_channel(4);
        chunks.send(Ok(vec![(stream("b"), session("2"))])).unwrap();
        chunks.send(Ok(vec![(stream("c"), session("3"))])).unwrap();
        drop(chunks);
        let snapshot = Snapshot {
            sessions: vec![(stream("a"), session("1"))],
            more_sessions: Some(SessionFeed {
                expected: 2,
                chunks: feed,
            }),
            ..Snapshot::default()
        };
        let mut truth = Truth::restore(snapshot, limits(HOUR), T).unwrap();
        assert_eq!(truth.live_total(), 3);
        assert_eq!(truth.apply(&push("c", "3", 10), T).outcome, Duplicate);

        let (chunks, feed) = std::sync::mpsc::sync_channel(4);
        chunks.send(Ok(vec![(stream("b"), session("2"))])).unwrap();
        chunks
            .send(Err("database x: disk I/O error".into()))
            .unwrap();
        let snapshot = Snapshot {
            more_sessions: Some(SessionFeed {
                expected: 2,
                chunks: feed,
            }),
            ..Snapshot::default()
        };
        let err = Truth::restore(snapshot, limits(HOUR), T).unwrap_err();
        assert_eq!(err, "database x: disk I/O error");
    }

    #[test]
    fn restoring_pushes_stored_for_live_sessions_keeps_them_once() {
        // Earlier releases stored the push of every session as it started.
        let mut stored = Stored::default();
        stored.sessions.insert(
            stream("s"),
            Session {
                sequence: "1".into(),
                area: Area::Mainland,
                since: 10,
            },
        );
        stored.delivered.insert(("1".into(), true), T + HOUR);
        stored.delivered.insert(("2".into(), true), T + HOUR);
        let mut truth = Truth::restore(stored.snapshot(), limits(HOUR), T).unwrap();
        assert_eq!(truth.delivered_len(), 2);
        assert_eq!(truth.apply(&push("s", "1", 10), T).outcome, Duplicate);
        assert_eq!(truth.apply(&push("t", "2", 10), T).outcome, Duplicate);
        // Ended later, its push is remembered from then on.
        let change = truth.apply(&disconnect("s", "1"), T + HOUR);
        let commit = truth.commit_of(std::slice::from_ref(&change));
        assert!(commit
            .delivered
            .iter()
            .any(|(k, e)| *k == key("1", true) && *e >= T + 2 * HOUR));
    }

    #[test]
    fn undo_puts_back_sessions_and_delivered_keys() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        run(
            &mut truth,
            &mut stored,
            &[(push("s", "1", 10), T), (push("t", "5", 10), T)],
        );
        let before = (truth.delivered_len(), truth.live_streams());
        let batch = [
            push("s", "2", 20),
            disconnect("s", "2"),
            disconnect("t", "6"),
            push("t", "6", 20),
            push("u", "7", 20),
            push("u", "7", 20),
            disconnect("x", "9"),
        ];
        let changes: Vec<_> = batch.iter().map(|e| truth.apply(e, T + 1)).collect();
        assert_eq!(live(&truth, "s"), None);
        for change in changes.iter().rev() {
            truth.undo(change);
        }
        assert_eq!((truth.delivered_len(), truth.live_streams()), before);
        assert_eq!(live(&truth, "s").as_deref(), Some("1"));
        assert_eq!(live(&truth, "t").as_deref(), Some("5"));
        assert_eq!(live(&truth, "u"), None);
        // Everything undone is new again, everything before it still known.
        for event in &batch[..5] {
            assert_eq!(truth.apply(event, T + 2).outcome, Accepted, "{event:?}");
        }
        assert_eq!(truth.apply(&push("s", "1", 10), T + 2).outcome, Duplicate);
    }

    #[test]
    fn a_batch_commits_the_final_state_of_each_stream() {
        let mut truth = Truth::new(limits(HOUR));
        let batch = [
            push("s", "1", 10),
            push("s", "2", 20),
            disconnect("s", "2"),
            push("s", "3", 30),
        ];
        let changes: Vec<_> = batch.iter().map(|e| truth.apply(e, T)).collect();
        let commit = truth.commit_of(&changes);
        assert_eq!(commit.sessions.len(), 1);
        assert_eq!(commit.sessions[0].1.as_ref().unwrap().sequence, "3");
        let mut keys: Vec<_> = commit
            .delivered
            .iter()
            .map(|(k, _)| (k.sequence.to_string(), k.push))
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("1".to_string(), true),
                ("2".to_string(), false),
                ("2".to_string(), true)
            ]
        );
    }

    fn capped(max_domains: usize) -> Limits {
        Limits {
            dedup_window_ms: HOUR,
            max_domains,
        }
    }

    /// An event of stream `id` pushed to domain `app`, from overseas.
    fn on(app: &str, id: &str, sequence: &str) -> StreamEvent {
        StreamEvent {
            stream: StreamKey {
                app: app.into(),
                appname: "live".into(),
                stream_id: id.into(),
            },
            sequence: sequence.into(),
            event_time: Some(10),
            area: Area::Overseas,
        }
    }

    fn push_on(app: &str, id: &str, sequence: &str) -> Event {
        Event::Push(on(app, id, sequence))
    }

    fn disconnect_on(app: &str, id: &str, sequence: &str) -> Event {
        Event::Disconnect {
            session: on(app, id, sequence),
            errcode: 1,
            push_duration_ms: Some(1000),
        }
    }

    /// `tencent_css_active_streams` as `/metrics` lists it: (domain, live streams).
    fn active(truth: &Truth) -> Vec<(String, u64)> {
        truth
            .live_streams()
            .into_iter()
            .map(|((d, _), n)| (d.to_string(), n))
            .collect()
    }

    /// A session is uncounted under the label it was counted under, also when its domain got
    /// series of its own since (a restart with a larger cap), and a restart shows what was shown.
    #[test]
    fn a_session_ends_under_the_label_it_was_counted_under_when_the_cap_grows() {
        let mut truth = Truth::new(capped(1));
        let mut stored = Stored::default();
        run(
            &mut truth,
            &mut stored,
            &[
                (push_on("a.com", "a1", "1"), T),
                (push_on("b.com", "b1", "2"), T),
            ],
        );
        assert_eq!(active(&truth), [("_other".into(), 1), ("a.com".into(), 1)]);
        let same = Truth::restore(stored.snapshot(), capped(1), T).unwrap();
        assert_eq!(active(&same), active(&truth));

        let mut truth = Truth::restore(stored.snapshot(), capped(10), T).unwrap();
        run(
            &mut truth,
            &mut stored,
            &[
                (push_on("b.com", "b2", "3"), T + 1),
                (disconnect_on("b.com", "b1", "2"), T + 2),
            ],
        );
        let expected = [
            ("_other".to_string(), 0),
            ("a.com".into(), 1),
            ("b.com".into(), 1),
        ];
        assert_eq!(active(&truth), expected);
        let mut truth = Truth::restore(stored.snapshot(), capped(10), T + 3).unwrap();
        assert_eq!(active(&truth), expected);
        run(
            &mut truth,
            &mut stored,
            &[
                (disconnect_on("b.com", "b2", "3"), T + 4),
                (disconnect_on("a.com", "a1", "1"), T + 4),
            ],
        );
        assert_eq!(truth.live_total(), 0);
        assert!(
            active(&truth).iter().all(|(_, n)| *n == 0),
            "{:?}",
            active(&truth)
        );
    }

    /// A session restored under the overflow label because the cap is full stays there, and so
    /// do the later sessions of its domain.
    #[test]
    fn a_restored_session_over_a_full_cap_ends_under_the_overflow_label() {
        let mut truth = Truth::new(capped(2));
        let mut stored = Stored::default();
        run(
            &mut truth,
            &mut stored,
            &[
                (push_on("a.com", "a1", "1"), T),
                (push_on("b.com", "b1", "2"), T),
                (push_on("c.com", "c1", "3"), T),
            ],
        );
        let mut truth = Truth::restore(stored.snapshot(), capped(2), T).unwrap();
        run(
            &mut truth,
            &mut stored,
            &[
                (push_on("c.com", "c2", "4"), T + 1),
                (disconnect_on("c.com", "c1", "3"), T + 2),
            ],
        );
        assert_eq!(
            active(&truth),
            [
                ("_other".into(), 1),
                ("a.com".into(), 1),
                ("b.com".into(), 1)
            ]
        );
    }

    #[test]
    fn undo_forgets_a_domain_the_change_admitted() {
        let mut truth = Truth::new(capped(1));
        let mut stored = Stored::default();
        let batch = [push_on("a.com", "a1", "1"), push_on("c.com", "c1", "2")];
        let changes: Vec<_> = batch.iter().map(|e| truth.apply(e, T)).collect();
        for change in changes.iter().rev() {
            truth.undo(change);
        }
        run(
            &mut truth,
            &mut stored,
            &[(push_on("b.com", "b1", "3"), T + 1)],
        );
        assert_eq!(active(&truth), [("b.com".into(), 1)]);
        assert_eq!(truth.counters().domains_overflow, 0);
        // A domain admitted before the undone change stays admitted.
        let change = truth.apply(&push_on("b.com", "b2", "4"), T + 2);
        truth.undo(&change);
        run(
            &mut truth,
            &mut stored,
            &[(push_on("a.com", "a1", "1"), T + 3)],
        );
        assert_eq!(active(&truth), [("_other".into(), 1), ("b.com".into(), 1)]);
        assert_eq!(truth.counters().domains_overflow, 1);
    }

    /// A failed batch leaves no series behind: the state after the undo shows what a restart
    /// from the store shows.
    #[test]
    fn undo_leaves_no_live_series_behind() {
        let mut truth = Truth::new(limits(HOUR));
        let mut stored = Stored::default();
        let change = truth.apply(&push_on("a.com", "a1", "1"), T);
        truth.undo(&change);
        assert_eq!(active(&truth), []);
        assert!(truth.live().is_empty(), "{:?}", truth.live());

        run(&mut truth, &mut stored, &[(push_on("b.com", "b1", "2"), T)]);
        let change = truth.apply(&push_on("b.com", "b2", "3"), T + 1);
        truth.undo(&change);
        let restored = Truth::restore(stored.snapshot(), limits(HOUR), T + 2).unwrap();
        assert_eq!(active(&truth), [("b.com".into(), 1)]);
        assert_eq!(active(&truth), active(&restored));
        let live = |t: &Truth| {
            t.live()
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(live(&truth), live(&restored));
    }
}
