//! Delivered-event keys: how Tencent's retries are recognised.
//!
//! A key is a session's sequence and whether the event was its push or its disconnect. Two kinds
//! of memory hold them:
//!
//! - The push of a live session is *held* for as long as the session is live, whatever the
//!   dedup window: the session itself says its push was delivered. Only its sequence number is
//!   kept (8 bytes, not a key with an expiry), and it is not persisted apart from the session.
//! - Every other delivered event (disconnects, pushes of sessions that ended, were replaced or
//!   never went live) is *remembered* for the dedup window, in generations: each covers an
//!   eighth of the window of insertion time, and a generation is forgotten as a whole once its
//!   last key is older than the window. A key is thus remembered for at least the window and at
//!   most an eighth longer, and a purge drops whole tables instead of visiting every key.
//!
//! When a session stops being live, the ledger remembers its push from then on, so a retry of it
//! stays a duplicate for a whole window after the session ended.

use std::collections::VecDeque;

use super::rules::Sequence;
use super::{FastMap, FastSet};
use crate::callback::EventKind;

/// One delivered event: a push or disconnect of one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub sequence: Sequence,
    /// `true` for a push, `false` for a disconnect.
    pub push: bool,
}

impl DeliveryKey {
    pub fn new(sequence: &str, kind: EventKind) -> Self {
        DeliveryKey {
            sequence: sequence.into(),
            push: kind == EventKind::Push,
        }
    }

    /// The push of session `sequence`.
    pub fn push_of(sequence: Sequence) -> Self {
        DeliveryKey {
            sequence,
            push: true,
        }
    }

    /// The wire `event_type` this key stands for (how the store writes it).
    pub fn event_type(&self) -> i64 {
        if self.push {
            crate::callback::EVENT_PUSH
        } else {
            crate::callback::EVENT_DISCONNECT
        }
    }
}

/// How many generations a window is cut into.
const GENERATIONS: i64 = 8;

/// A set of sequences: numbers (Tencent's, 8 bytes each) apart from the rare texts.
#[derive(Debug, Default)]
struct Sequences {
    /// Sequences that are decimal 64-bit numbers, as Tencent's are.
    numbers: FastSet<u64>,
    /// Any other sequence, kept as its text.
    texts: FastSet<Box<str>>,
}

impl Sequences {
    fn contains(&self, s: &Sequence) -> bool {
        match s {
            Sequence::Number(n) => self.numbers.contains(n),
            Sequence::Text(t) => self.texts.contains(&**t),
        }
    }

    fn insert(&mut self, s: Sequence) -> bool {
        match s {
            Sequence::Number(n) => self.numbers.insert(n),
            Sequence::Text(t) => self.texts.insert(t),
        }
    }

    fn remove(&mut self, s: &Sequence) -> bool {
        match s {
            Sequence::Number(n) => self.numbers.remove(n),
            Sequence::Text(t) => self.texts.remove(&**t),
        }
    }

    fn len(&self) -> usize {
        self.numbers.len() + self.texts.len()
    }

    /// Room for as many more keys as `like` holds.
    fn reserve_like(&mut self, like: &Sequences) {
        self.numbers.reserve(like.numbers.len());
        self.texts.reserve(like.texts.len());
    }

    /// Gives back most of the table once it is four times larger than needed.
    fn shrink(&mut self) {
        fn shrink<T: std::hash::Hash + Eq>(set: &mut FastSet<T>) {
            if set.capacity() > 4 * set.len().max(1024) {
                set.shrink_to(2 * set.len());
            }
        }
        shrink(&mut self.numbers);
        shrink(&mut self.texts);
    }
}

/// The keys inserted during one eighth of the window.
#[derive(Debug)]
struct Generation {
    /// Insertion time divided by the span of a generation.
    id: i64,
    /// When the whole generation is forgotten: the end of its span plus the window.
    expires_ms: i64,
    /// Sequences whose push was remembered during this generation's span.
    pushes: Sequences,
    /// Sequences whose disconnect was remembered during this generation's span.
    disconnects: Sequences,
}

impl Generation {
    fn keys(&self, push: bool) -> &Sequences {
        if push {
            &self.pushes
        } else {
            &self.disconnects
        }
    }

    fn keys_mut(&mut self, push: bool) -> &mut Sequences {
        if push {
            &mut self.pushes
        } else {
            &mut self.disconnects
        }
    }

    fn len(&self) -> usize {
        self.pushes.len() + self.disconnects.len()
    }
}

/// The push sequences of live sessions. A sequence is live in one stream at most, except in a
/// state restored from a time it was not (a zero window, or an older release that forgot the
/// push of a long session): `more` counts those extra holders.
#[derive(Debug, Default)]
struct Held {
    /// The push sequence of every live session, once each.
    sequences: Sequences,
    /// How many more live sessions hold a sequence than the one in `sequences`; absent when only
    /// one does.
    more: FastMap<Sequence, usize>,
}

impl Held {
    fn hold(&mut self, s: &Sequence) {
        if !self.sequences.insert(s.clone()) {
            *self.more.entry(s.clone()).or_default() += 1;
        }
    }

    fn release(&mut self, s: &Sequence) {
        match self.more.get_mut(s) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.more.remove(s);
            }
            None => {
                self.sequences.remove(s);
            }
        }
    }

    fn len(&self) -> usize {
        self.sequences.len() + self.more.values().sum::<usize>()
    }
}

/// Delivered keys forgotten by a purge. Dropping this frees their memory: a caller that purged
/// under a lock can drop it after releasing the lock.
#[derive(Debug, Default)]
#[must_use = "dropping the expired keys frees them; see also `len`"]
pub struct Expired(Vec<Generation>);

impl Expired {
    /// How many keys were forgotten.
    pub fn len(&self) -> usize {
        self.0.iter().map(Generation::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|g| g.len() == 0)
    }
}

/// The delivered events the ledger knows of.
#[derive(Debug)]
pub struct Delivered {
    /// How long an event is remembered, in milliseconds; 0 remembers nothing.
    window_ms: i64,
    /// The insertion time a generation covers: an eighth of the window, rounded up.
    span_ms: i64,
    /// Oldest first, ids increasing (several may share the current id after the clock was set
    /// back; keys go to the first of them).
    generations: VecDeque<Generation>,
    /// Pushes of live sessions: delivered for as long as the session is live, with no expiry.
    held: Held,
}

impl Delivered {
    pub fn new(window_ms: i64) -> Self {
        let window_ms = window_ms.max(0);
        let span_ms = (window_ms / GENERATIONS + i64::from(window_ms % GENERATIONS != 0)).max(1);
        Delivered {
            window_ms,
            span_ms,
            generations: VecDeque::new(),
            held: Held::default(),
        }
    }

    fn remembers(&self) -> bool {
        self.window_ms > 0
    }

    /// Whether the event was delivered: a live session's push, or remembered and not expired at
    /// `now_ms`.
    pub fn contains(&self, key: &DeliveryKey, now_ms: i64) -> bool {
        if !self.remembers() {
            return false;
        }
        if key.push && self.held.sequences.contains(&key.sequence) {
            return true;
        }
        // Newest first: retries mostly come within minutes.
        self.generations
            .iter()
            .rev()
            .take_while(|g| g.expires_ms > now_ms)
            .any(|g| g.keys(key.push).contains(&key.sequence))
    }

    /// When a remembered key is forgotten (unix milliseconds); `None` if it is not remembered
    /// (held keys included: they have no expiry while their session is live).
    pub fn expiry(&self, key: &DeliveryKey) -> Option<i64> {
        self.generations
            .iter()
            .rev()
            .find(|g| g.keys(key.push).contains(&key.sequence))
            .map(|g| g.expires_ms)
    }

    /// Holds the push of a session that went live.
    pub fn hold(&mut self, sequence: &Sequence) {
        if self.remembers() {
            self.held.hold(sequence);
        }
    }

    /// Stops holding the push of a session no longer live (its caller remembers it if needed).
    pub fn release(&mut self, sequence: &Sequence) {
        if self.remembers() {
            self.held.release(sequence);
        }
    }

    /// Remembers a delivered event from `now_ms` for the window; `false` if nothing is
    /// remembered or the newest generation has it already, so an undo knows whether to
    /// [`Delivered::forget`] it. The caller knows the key is not remembered yet (it was not
    /// [`Delivered::contains`], or it was held): no older generation is searched.
    pub fn remember(&mut self, key: DeliveryKey, now_ms: i64) -> bool {
        if !self.remembers() {
            return false;
        }
        // A clock that went back files the key with the newest generation: remembered longer,
        // until the next purge brings that generation to the clock (see `expire`).
        let id = self
            .generation_id(now_ms)
            .max(self.generations.back().map_or(i64::MIN, |g| g.id));
        let generation = self.generation(id);
        generation.keys_mut(key.push).insert(key.sequence)
    }

    /// Puts back a key a store kept with its expiry, as at start: into the generation that
    /// forgets it at or after `expires_ms` (never later than one inserted now). Keys expired at
    /// `now_ms`, and pushes of live sessions (held already), are left out.
    pub fn restore(&mut self, key: DeliveryKey, expires_ms: i64, now_ms: i64) {
        if !self.remembers()
            || expires_ms <= now_ms
            || (key.push && self.held.sequences.contains(&key.sequence))
        {
            return;
        }
        // The first generation whose `expires_ms` (its end plus the window) is not before the
        // key's: (id + 1) * span + window >= expires.
        let id = expires_ms
            .saturating_sub(self.window_ms)
            .div_euclid(self.span_ms)
            .saturating_add(i64::from(
                expires_ms.saturating_sub(self.window_ms) % self.span_ms != 0,
            ))
            .saturating_sub(1)
            .min(self.generation_id(now_ms));
        self.generation(id).keys_mut(key.push).insert(key.sequence);
    }

    /// Forgets a key [`Delivered::remember`] added (an undone event).
    pub fn forget(&mut self, key: &DeliveryKey) {
        if let Some(g) = self
            .generations
            .iter_mut()
            .rev()
            .find(|g| g.keys(key.push).contains(&key.sequence))
        {
            g.keys_mut(key.push).remove(&key.sequence);
        }
    }

    /// Keys delivered and not forgotten yet: held ones and remembered ones.
    pub fn len(&self) -> usize {
        self.held.len() + self.generations.iter().map(Generation::len).sum::<usize>()
    }

    /// Room for `n` more held sessions (a restore).
    pub fn reserve_held(&mut self, n: usize) {
        if self.remembers() {
            self.held.sequences.numbers.reserve(n);
        }
    }

    /// The latest a key remembered at `now_ms` is kept until: the end of the current
    /// generation's span plus the window.
    pub fn latest_expiry(&self, now_ms: i64) -> i64 {
        self.expiry_of(self.generation_id(now_ms))
    }

    fn expiry_of(&self, id: i64) -> i64 {
        id.saturating_add(1)
            .saturating_mul(self.span_ms)
            .saturating_add(self.window_ms)
    }

    /// Takes out the generations expired at `now_ms`: a few tables, whatever their size.
    ///
    /// Generations filed ahead of `now_ms` (the clock was set back, say after the exporter
    /// started on a clock hours ahead) become the current one first. Their keys all arrived
    /// before now, so a window from now is still at least a window from each; left as they
    /// were, they would be kept for as long as the clock had been ahead, and hold every later
    /// generation behind them.
    pub fn expire(&mut self, now_ms: i64) -> Expired {
        let current = self.generation_id(now_ms);
        let expires_ms = self.expiry_of(current);
        for g in self.generations.iter_mut().rev() {
            if g.id <= current {
                break;
            }
            g.id = current;
            g.expires_ms = expires_ms;
        }
        let mut expired = Vec::new();
        while self
            .generations
            .front()
            .is_some_and(|g| g.expires_ms <= now_ms)
        {
            expired.extend(self.generations.pop_front());
        }
        self.held.sequences.shrink();
        Expired(expired)
    }

    fn generation_id(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(self.span_ms)
    }

    /// The generation `id`, created in its place if there is none yet. A new newest generation
    /// gets the room its predecessor needed, so that a steady rate of events does not grow (and
    /// rehash) its tables step by step.
    fn generation(&mut self, id: i64) -> &mut Generation {
        let at = self.generations.partition_point(|g| g.id < id);
        if !matches!(self.generations.get(at), Some(g) if g.id == id) {
            let mut new = Generation {
                id,
                expires_ms: self.expiry_of(id),
                pushes: Sequences::default(),
                disconnects: Sequences::default(),
            };
            if at == self.generations.len() {
                if let Some(previous) = self.generations.back() {
                    new.pushes.reserve_like(&previous.pushes);
                    new.disconnects.reserve_like(&previous.disconnects);
                }
            }
            self.generations.insert(at, new);
        }
        &mut self.generations[at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const T: i64 = 1_700_000_000_000;

    fn push(s: &str) -> DeliveryKey {
        DeliveryKey::new(s, EventKind::Push)
    }

    fn disconnect(s: &str) -> DeliveryKey {
        DeliveryKey::new(s, EventKind::Disconnect)
    }

    #[test]
    fn remembered_for_the_window_and_at_most_an_eighth_longer() {
        let mut d = Delivered::new(HOUR);
        assert!(d.remember(push("1"), T));
        assert!(d.remember(disconnect("abc"), T));
        assert!(
            !d.remember(push("1"), T + 5),
            "already in the newest generation"
        );
        let expires = d.expiry(&push("1")).unwrap();
        assert!(
            (T + HOUR..=T + HOUR + HOUR / 8).contains(&expires),
            "{expires}"
        );
        for key in [push("1"), disconnect("abc")] {
            assert!(d.contains(&key, T + HOUR - 1));
            assert!(d.contains(&key, expires - 1));
            assert!(!d.contains(&key, expires), "expired even before a purge");
        }
        assert!(
            !d.contains(&disconnect("1"), T),
            "push and disconnect differ"
        );
        assert!(!d.contains(&push("01"), T), "sequences are exact");
        assert_eq!(d.len(), 2);
        assert_eq!(d.expire(expires - 1).len(), 0);
        assert_eq!(d.expire(expires).len(), 2);
        assert_eq!(d.len(), 0);
        assert_eq!(d.expiry(&push("1")), None);
    }

    #[test]
    fn a_purge_drops_whole_generations_only() {
        let mut d = Delivered::new(800);
        for t in 0..1000 {
            d.remember(push(&t.to_string()), T + t);
        }
        // Generations of 100 ms: each is forgotten 800 ms after its end.
        assert!(d.generations.len() >= 10);
        let expired = d.expire(T + 100 + 800);
        assert_eq!(expired.len(), 100, "exactly the first generation");
        assert!(!d.contains(&push("99"), T + 900));
        assert!(d.contains(&push("100"), T + 900));
        assert_eq!(d.len(), 900);
    }

    #[test]
    fn held_pushes_need_no_window_and_are_remembered_once_released() {
        let mut d = Delivered::new(HOUR);
        let s = Sequence::from("42");
        d.hold(&s);
        assert!(d.contains(&push("42"), T + 10 * HOUR), "held while live");
        assert!(!d.contains(&disconnect("42"), T));
        assert_eq!(d.expiry(&push("42")), None, "nothing to persist while held");
        d.release(&s);
        assert!(!d.contains(&push("42"), T));
        assert!(d.remember(push("42"), T));
        assert!(d.contains(&push("42"), T + HOUR - 1));
        // Held twice (a restored state): held until both are released.
        d.hold(&Sequence::from("7"));
        d.hold(&Sequence::from("7"));
        d.release(&Sequence::from("7"));
        assert!(d.contains(&push("7"), T));
        d.release(&Sequence::from("7"));
        assert!(!d.contains(&push("7"), T));
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let mut d = Delivered::new(0);
        d.hold(&Sequence::from("1"));
        assert!(!d.remember(push("2"), T));
        d.restore(push("3"), T + 1000, T);
        for key in [push("1"), push("2"), push("3")] {
            assert!(!d.contains(&key, T));
        }
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn forget_undoes_remember() {
        let mut d = Delivered::new(HOUR);
        assert!(d.remember(push("1"), T));
        d.forget(&push("1"));
        assert!(!d.contains(&push("1"), T));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn restored_keys_expire_as_stored_or_when_the_window_says() {
        let mut d = Delivered::new(HOUR);
        // A key stored with an expiry is forgotten no earlier than that.
        for (i, offset) in [1, HOUR / 3, HOUR - 1, HOUR].into_iter().enumerate() {
            let key = disconnect(&i.to_string());
            d.restore(key.clone(), T + offset, T);
            let e = d.expiry(&key).unwrap();
            assert!(
                e >= T + offset && e <= T + offset + HOUR / 8,
                "{offset}: {e}"
            );
        }
        // Already expired: left out.
        d.restore(disconnect("old"), T, T);
        assert_eq!(d.expiry(&disconnect("old")), None);
        // Stored under a longer window: forgotten no later than a key remembered now.
        d.restore(disconnect("long"), T + 10 * HOUR, T);
        d.remember(disconnect("now"), T);
        assert_eq!(
            d.expiry(&disconnect("long")),
            d.expiry(&disconnect("now")),
            "the window now in force"
        );
        // The push of a live session is held, not remembered twice.
        d.hold(&Sequence::from("9"));
        d.restore(push("9"), T + HOUR, T);
        assert_eq!(d.expiry(&push("9")), None);
        // Generations stay ordered whatever the order of the restored keys.
        assert!(d
            .generations
            .iter()
            .zip(d.generations.iter().skip(1))
            .all(|(a, b)| a.id < b.id && a.expires_ms < b.expires_ms));
    }

    #[test]
    fn a_clock_that_goes_back_keeps_keys_longer_not_shorter() {
        let mut d = Delivered::new(HOUR);
        d.remember(push("1"), T);
        d.remember(push("2"), T - HOUR);
        assert!(d.expiry(&push("2")).unwrap() >= T + HOUR);
        assert_eq!(d.generations.len(), 1);
    }

    /// Started on a clock a day ahead, then set right: the keys of the day ahead are kept a
    /// window from the correction, not a day, and do not hold up the generations after them.
    #[test]
    fn keys_filed_on_a_clock_ahead_are_forgotten_a_window_after_it_is_set_back() {
        const DAY: i64 = 24 * HOUR;
        let mut d = Delivered::new(HOUR);
        d.remember(push("ahead"), T + DAY);
        d.remember(disconnect("ahead"), T + DAY + 1);
        assert_eq!(d.expire(T).len(), 0);
        assert_eq!(d.expiry(&push("ahead")), Some(d.latest_expiry(T)));
        d.remember(push("after"), T + HOUR / 2);
        assert!(d.contains(&push("ahead"), T + HOUR));
        assert_eq!(
            d.expire(d.latest_expiry(T)).len(),
            2,
            "the keys filed ahead"
        );
        assert!(!d.contains(&push("ahead"), d.latest_expiry(T)));
        assert!(d.contains(&push("after"), d.latest_expiry(T)));
        assert_eq!(d.expire(d.latest_expiry(T + HOUR / 2)).len(), 1);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn huge_windows_do_not_overflow() {
        let mut d = Delivered::new(i64::MAX);
        assert!(d.remember(push("1"), T));
        assert!(d.contains(&push("1"), i64::MAX - 1));
        assert_eq!(d.expire(T).len(), 0);
        d.restore(push("2"), i64::MAX, T);
        assert!(d.contains(&push("2"), T));
    }
}
