//! The truth rules: what one push or disconnect does to its stream, as a pure function.
//!
//! Everything here is decided from the event and a few facts about the current state, without
//! I/O, so the rules can be tested exhaustively and replayed identically after a restart.

use std::fmt;

/// A push session id. Tencent's are decimal 64-bit numbers, kept as a number when they are one
/// (no allocation for a million live sessions), as text otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sequence {
    Number(u64),
    Text(Box<str>),
}

impl Sequence {
    /// The number a canonical decimal string stands for; only that form becomes a number, so
    /// the text round-trips exactly.
    fn canonical_number(s: &str) -> Option<u64> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        canonical.then(|| s.parse().ok()).flatten()
    }
}

impl From<&str> for Sequence {
    fn from(s: &str) -> Self {
        match Sequence::canonical_number(s) {
            Some(n) => Sequence::Number(n),
            None => Sequence::Text(s.into()),
        }
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sequence::Number(n) => write!(f, "{n}"),
            Sequence::Text(s) => f.write_str(s),
        }
    }
}

impl PartialEq<str> for Sequence {
    fn eq(&self, other: &str) -> bool {
        match self {
            Sequence::Number(n) => Sequence::canonical_number(other) == Some(*n),
            Sequence::Text(t) => **t == *other,
        }
    }
}

impl PartialEq<String> for Sequence {
    fn eq(&self, other: &String) -> bool {
        *self == *other.as_str()
    }
}

impl PartialEq<&str> for Sequence {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

/// A stream's live push session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The push session id; only a disconnect with the same id ends it.
    pub sequence: Sequence,
    /// The area the session was pushed in (its `area` label while live).
    pub area: crate::area::Area,
    /// When the session started (unix seconds): the push's `event_time`, or when it was received
    /// if it had no believable one ([`believable`]).
    pub since: i64,
}

/// The facts about the present that the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The stream's live session, if any.
    pub current: Option<&'a Session>,
    /// The very same event (sequence and type) was already recorded: within the dedup window,
    /// or, for a push, its session is live (in this stream or, with a reused sequence, another).
    pub already_delivered: bool,
    /// For a push: its own disconnect was already recorded (delivery order is not guaranteed).
    pub disconnect_seen: bool,
}

/// What happens to the stream's live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The stream's session is left as it is.
    Keep,
    /// The stream is live under this session, replacing any older one.
    Start(Session),
    /// The stream is no longer live.
    End,
}

/// The decision for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A retry of a recorded event: acknowledged, counted only as a duplicate.
    Duplicate,
    /// A new event: counted, with this effect on the live set.
    Accept(Effect),
}

/// How long before the time a callback is received its `event_time` may be and still be
/// believed: Tencent gives up a delivery after about 13 minutes of retries, so a day is far
/// more than any real delay, and an `event_time` of 0 or in milliseconds is not believed.
pub const EVENT_TIME_PAST_SECS: i64 = 24 * 3600;
/// How long after the time a callback is received its `event_time` may be: clocks that differ
/// by more fail the `t` check first.
pub const EVENT_TIME_AHEAD_SECS: i64 = 3600;

/// An event's `event_time`, if it is believable when received at `now_secs` (see
/// [`EVENT_TIME_PAST_SECS`]). One that is not would make a session look older (or newer) than
/// every other of its stream, for good, and put a year into the delay histogram.
pub fn believable(event_time: Option<i64>, now_secs: i64) -> Option<i64> {
    event_time.filter(|t| {
        (now_secs.saturating_sub(EVENT_TIME_PAST_SECS)
            ..=now_secs.saturating_add(EVENT_TIME_AHEAD_SECS))
            .contains(t)
    })
}

/// When a push's session started, as far as it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Its `event_time`.
    At(i64),
    /// It has no believable `event_time`: when it was received, which says nothing about how it
    /// stands to a session whose disconnect was already seen.
    Received(i64),
}

impl Start {
    fn secs(self) -> i64 {
        match self {
            Start::At(t) | Start::Received(t) => t,
        }
    }
}

/// The decision for a push or disconnect (`None` for other events). A push without a
/// believable `event_time` started `now_secs`.
pub fn decide(event: &crate::callback::Event, facts: Facts, now_secs: i64) -> Option<Decision> {
    use crate::callback::Event;
    match event {
        Event::Push(s) => Some(push(
            &s.sequence,
            believable(s.event_time, now_secs).map_or(Start::Received(now_secs), Start::At),
            s.area,
            facts,
        )),
        Event::Disconnect { session, .. } => Some(disconnect(&session.sequence, facts)),
        Event::Other { .. } => None,
    }
}

/// A push of session `sequence` that started at `start`.
pub fn push(sequence: &str, start: Start, area: crate::area::Area, facts: Facts) -> Decision {
    if facts.already_delivered {
        return Decision::Duplicate;
    }
    let since = start.secs();
    let effect = match facts.current {
        // The live session's own push again: a retry, whatever the dedup window remembers. The
        // session was counted when it started.
        Some(current) if current.sequence == *sequence => return Decision::Duplicate,
        // A late push of a session older than the live one must not replace it.
        Some(current) if since < current.since => Effect::Keep,
        // An ended session of unknown start may be older than the live one (a late delivery):
        // the live one's own disconnect will end it if it was replaced.
        Some(_) if facts.disconnect_seen && matches!(start, Start::Received(_)) => Effect::Keep,
        // The session already ended before its push arrived: it replaced whatever was live
        // before it (Tencent allows one publisher a stream) and is itself gone.
        Some(_) if facts.disconnect_seen => Effect::End,
        None if facts.disconnect_seen => Effect::Keep,
        _ => Effect::Start(Session {
            sequence: sequence.into(),
            area,
            since,
        }),
    };
    Decision::Accept(effect)
}

/// The `area` an accepted event is counted under: its own, but for a disconnect that names
/// none (no `set_id`, or one out of range) the area of the session it ends, so that a session's
/// push and disconnect count under one area.
pub fn counted_area(
    event: &crate::callback::Event,
    effect: &Effect,
    current: Option<&Session>,
) -> crate::area::Area {
    use crate::area::Area;
    use crate::callback::Event;
    match (event, effect, current) {
        (Event::Disconnect { session, .. }, Effect::End, Some(ended))
            if session.area == Area::Unknown =>
        {
            ended.area
        }
        (Event::Push(s) | Event::Disconnect { session: s, .. }, _, _) => s.area,
        (Event::Other { .. }, _, _) => Area::Unknown,
    }
}

/// A disconnect of session `sequence`. Its stream's `current` session is the one with its
/// `app` and stream id whose sequence it is, under any `appname`, if there is one: `appname`
/// is not needed to account for an event, and a sequence is one push session's alone.
pub fn disconnect(sequence: &str, facts: Facts) -> Decision {
    if facts.already_delivered {
        return Decision::Duplicate;
    }
    let effect = match facts.current {
        Some(current) if current.sequence == *sequence => Effect::End,
        // An older (or unknown) session ending says nothing about the live one.
        _ => Effect::Keep,
    };
    Decision::Accept(effect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::area::Area;

    fn session(seq: &str, since: i64) -> Session {
        Session {
            sequence: seq.into(),
            area: Area::Mainland,
            since,
        }
    }

    fn facts(current: Option<&Session>) -> Facts<'_> {
        Facts {
            current,
            already_delivered: false,
            disconnect_seen: false,
        }
    }

    #[test]
    fn sequences_are_numbers_when_canonical_and_round_trip() {
        for text in ["6674468118806626493", "0", "18446744073709551615"] {
            assert!(
                matches!(Sequence::from(text), Sequence::Number(_)),
                "{text}"
            );
            assert_eq!(Sequence::from(text).to_string(), text);
        }
        for text in ["007", "", "abc", "18446744073709551616", "-1", "1 "] {
            assert!(
                matches!(Sequence::from(text), Sequence::Text(_)),
                "{text:?}"
            );
            assert_eq!(Sequence::from(text).to_string(), text);
        }
        assert_ne!(Sequence::from("7"), Sequence::from("07"));
        assert!(Sequence::Number(42) == "42");
        assert!(Sequence::Number(42) != "042");
        assert!(Sequence::Text("042".into()) == "042");
    }

    #[test]
    fn push_starts_a_session() {
        assert_eq!(
            push("a", Start::At(10), Area::Mainland, facts(None)),
            Decision::Accept(Effect::Start(session("a", 10)))
        );
    }

    #[test]
    fn newer_push_replaces_an_unfinished_session() {
        let old = session("a", 10);
        assert_eq!(
            push("b", Start::At(20), Area::Mainland, facts(Some(&old))),
            Decision::Accept(Effect::Start(session("b", 20)))
        );
    }

    #[test]
    fn late_push_of_an_older_session_keeps_the_newer_one() {
        let live = session("b", 20);
        assert_eq!(
            push("a", Start::At(10), Area::Mainland, facts(Some(&live))),
            Decision::Accept(Effect::Keep)
        );
    }

    #[test]
    fn push_after_its_own_disconnect_does_not_go_live() {
        let f = Facts {
            disconnect_seen: true,
            ..facts(None)
        };
        assert_eq!(
            push("a", Start::At(10), Area::Mainland, f),
            Decision::Accept(Effect::Keep)
        );
        let old = session("z", 5);
        let f = Facts {
            disconnect_seen: true,
            ..facts(Some(&old))
        };
        assert_eq!(
            push("a", Start::At(10), Area::Mainland, f),
            Decision::Accept(Effect::End)
        );
    }

    #[test]
    fn an_ended_session_of_unknown_start_leaves_the_live_one() {
        let live = session("b", 20);
        let f = Facts {
            disconnect_seen: true,
            ..facts(Some(&live))
        };
        assert_eq!(
            push("a", Start::Received(30), Area::Mainland, f),
            Decision::Accept(Effect::Keep)
        );
        // Of unknown start but not over: taken as the newer one.
        assert_eq!(
            push("a", Start::Received(30), Area::Mainland, facts(Some(&live))),
            Decision::Accept(Effect::Start(session("a", 30)))
        );
    }

    #[test]
    fn an_event_time_far_from_now_is_not_believed() {
        let now = 1_700_000_000;
        for t in [now, now - EVENT_TIME_PAST_SECS, now + EVENT_TIME_AHEAD_SECS] {
            assert_eq!(believable(Some(t), now), Some(t));
        }
        for t in [
            0,
            -1,
            now * 1000,
            now - EVENT_TIME_PAST_SECS - 1,
            now + EVENT_TIME_AHEAD_SECS + 1,
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(believable(Some(t), now), None, "{t}");
        }
        assert_eq!(believable(None, now), None);
        assert_eq!(believable(Some(i64::MAX), i64::MAX), Some(i64::MAX));
        assert_eq!(believable(Some(i64::MIN), i64::MIN), Some(i64::MIN));
    }

    #[test]
    fn a_disconnect_without_an_area_counts_under_its_sessions() {
        use crate::callback::{Event, StreamEvent, StreamKey};
        let event = |push: bool, area| {
            let s = StreamEvent {
                stream: StreamKey {
                    app: "d".into(),
                    appname: "live".into(),
                    stream_id: "s".into(),
                },
                sequence: "a".into(),
                event_time: None,
                area,
            };
            if push {
                Event::Push(s)
            } else {
                Event::Disconnect {
                    session: s,
                    errcode: 1,
                    push_duration_ms: None,
                }
            }
        };
        let live = session("a", 1);
        let bye = event(false, Area::Unknown);
        assert_eq!(
            counted_area(&bye, &Effect::End, Some(&live)),
            Area::Mainland
        );
        assert_eq!(counted_area(&bye, &Effect::Keep, None), Area::Unknown);
        // An area of its own is its own; a push is counted under its own whatever it ends.
        let overseas = event(false, Area::Overseas);
        assert_eq!(
            counted_area(&overseas, &Effect::End, Some(&live)),
            Area::Overseas
        );
        let push = event(true, Area::Unknown);
        assert_eq!(
            counted_area(&push, &Effect::End, Some(&live)),
            Area::Unknown
        );
    }

    #[test]
    fn disconnect_ends_only_its_own_session() {
        let live = session("b", 20);
        assert_eq!(
            disconnect("b", facts(Some(&live))),
            Decision::Accept(Effect::End)
        );
        assert_eq!(
            disconnect("a", facts(Some(&live))),
            Decision::Accept(Effect::Keep)
        );
        assert_eq!(disconnect("a", facts(None)), Decision::Accept(Effect::Keep));
    }

    #[test]
    fn push_of_the_live_session_is_a_retry_even_if_forgotten() {
        // The dedup window may have forgotten the push (or be zero): the session says it came.
        let live = session("a", 10);
        for since in [5, 10, 20] {
            assert_eq!(
                push("a", Start::At(since), Area::Overseas, facts(Some(&live))),
                Decision::Duplicate
            );
        }
        let f = Facts {
            disconnect_seen: true,
            ..facts(Some(&live))
        };
        assert_eq!(
            push("a", Start::At(10), Area::Mainland, f),
            Decision::Duplicate
        );
        // The same digits with a leading zero are another session.
        assert_eq!(
            push(
                "07",
                Start::At(20),
                Area::Mainland,
                facts(Some(&session("7", 10)))
            ),
            Decision::Accept(Effect::Start(session("07", 20)))
        );
    }

    #[test]
    fn retries_are_duplicates_whatever_the_state() {
        let live = session("a", 1);
        let f = Facts {
            already_delivered: true,
            ..facts(Some(&live))
        };
        assert_eq!(
            push("a", Start::At(1), Area::Mainland, f),
            Decision::Duplicate
        );
        assert_eq!(disconnect("a", f), Decision::Duplicate);
    }
}
