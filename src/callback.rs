//! The callback wire format: a lenient JSON body turned into a typed [`Callback`].
//!
//! Tencent's documentation and its real payloads disagree on types (`t` and `push_duration` as
//! strings, numbers as strings in general), leave fields empty and add undocumented ones. So
//! every field is read leniently: a number may come as a JSON string, a string as a number, and a
//! value that cannot be read is treated as absent. Only what accounting needs is required.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;

use crate::area::Area;

/// `event_type` of a push-started callback.
pub const EVENT_PUSH: i64 = 1;
/// `event_type` of a push-disconnected callback.
pub const EVENT_DISCONNECT: i64 = 0;

/// The `event` label of `tencent_css_callbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Push,
    Disconnect,
    /// Any other valid `event_type` (recording, screenshot, moderation, ...).
    Other,
    /// The body did not tell which event it was.
    Unknown,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::Push,
        EventKind::Disconnect,
        EventKind::Other,
        EventKind::Unknown,
    ];

    pub fn from_event_type(event_type: Option<i64>) -> Self {
        match event_type {
            Some(EVENT_PUSH) => EventKind::Push,
            Some(EVENT_DISCONNECT) => EventKind::Disconnect,
            Some(_) => EventKind::Other,
            None => EventKind::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::Disconnect => "disconnect",
            EventKind::Other => "other",
            EventKind::Unknown => "unknown",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == label)
    }
}

/// The `outcome` label of `tencent_css_callbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A push or disconnect recorded (200).
    Accepted,
    /// A retry of an event already recorded (200, changes nothing).
    Duplicate,
    /// A valid event of another type (200, not recorded).
    Ignored,
    /// Missing or wrong `sign` (401).
    BadSignature,
    /// `t` outside the accepted window (401).
    Expired,
    /// Not JSON or lacking a required field (400, 405, 413).
    Malformed,
    /// Could not be recorded: storage failure (503, Tencent retries).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::Ignored,
        Outcome::BadSignature,
        Outcome::Expired,
        Outcome::Malformed,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::BadSignature => "bad_signature",
            Outcome::Expired => "expired",
            Outcome::Malformed => "malformed",
            Outcome::Error => "error",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == label)
    }
}

/// A stream, as the truth rules identify it. Compact because a million of them may be live:
/// the state shares one `app` and `appname` string between all streams that have it.
///
/// Ordered by `app`, `appname`, then `stream_id`, byte by byte (as SQLite's `BINARY` collation
/// orders the stored sessions' key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// Push domain (`app`); also the `domain` label.
    pub app: Arc<str>,
    /// Push path (`appname`), often `live`; empty when Tencent leaves it out.
    pub appname: Arc<str>,
    pub stream_id: Box<str>,
}

impl Ord for StreamKey {
    /// Shared strings are equal without reading them (`Arc`'s `==` does the same): most keys
    /// compared in an ordered map share their `app` and `appname` with their neighbours, and
    /// reading both strings was most of an insert's cost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        fn shared(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
            if Arc::ptr_eq(a, b) {
                std::cmp::Ordering::Equal
            } else {
                a.cmp(b)
            }
        }
        shared(&self.app, &other.app)
            .then_with(|| shared(&self.appname, &other.appname))
            .then_with(|| self.stream_id.cmp(&other.stream_id))
    }
}

impl PartialOrd for StreamKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.app, self.appname, self.stream_id)
    }
}

/// What a push and a disconnect have in common.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub stream: StreamKey,
    /// One id per push session, shared by the push and its disconnect.
    pub sequence: String,
    /// When the event happened (unix seconds), if Tencent said.
    pub event_time: Option<i64>,
    pub area: Area,
}

/// A typed callback event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(StreamEvent),
    Disconnect {
        session: StreamEvent,
        /// Raw `errcode`; classified by [`crate::errcode::ErrCode`].
        errcode: i64,
        /// How long the push lasted, in milliseconds, when Tencent said.
        push_duration_ms: Option<i64>,
    },
    /// A valid event we acknowledge and ignore.
    Other {
        event_type: i64,
    },
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Push(_) => EventKind::Push,
            Event::Disconnect { .. } => EventKind::Disconnect,
            Event::Other { .. } => EventKind::Other,
        }
    }

    /// The stream fields, for push and disconnect.
    pub fn stream_event(&self) -> Option<&StreamEvent> {
        match self {
            Event::Push(s) | Event::Disconnect { session: s, .. } => Some(s),
            Event::Other { .. } => None,
        }
    }
}

/// A parsed callback: its authentication fields and its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub t: i64,
    pub sign: Option<String>,
    pub event: Event,
}

/// Why a body is not a usable callback (answered 400, counted `malformed`).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not a JSON object: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("{kind} callback lacks `{field}`", kind = .kind.as_str())]
    Missing {
        kind: EventKind,
        field: &'static str,
        /// What the body names of its stream (`app/appname/stream_id`, a missing part empty)
        /// and its `sequence`, for the log line: the callback can be found in Tencent's records.
        stream: Option<String>,
        sequence: Option<String>,
    },
    #[error("{kind} callback has an `app` of {len} bytes: a push domain has at most {MAX_APP_BYTES}", kind = .kind.as_str())]
    AppTooLong {
        kind: EventKind,
        len: usize,
        /// For the log line, as in [`ParseError::Missing`]; the `app` itself is left out.
        sequence: Option<String>,
    },
}

impl ParseError {
    /// The event the body announced, for the `event` label.
    pub fn kind(&self) -> EventKind {
        match self {
            ParseError::NotJson(_) => EventKind::Unknown,
            ParseError::Missing { kind, .. } | ParseError::AppTooLong { kind, .. } => *kind,
        }
    }
}

/// The longest `app` accepted: a push domain is a DNS name, at most 253 bytes. It becomes the
/// `domain` label of some 20 series: one of 60 KB (a body may have 64 KiB) made a scrape's page
/// 1.2 MB longer, for good.
pub const MAX_APP_BYTES: usize = 253;

/// The fields we read; everything else in the body is ignored.
#[derive(Deserialize)]
struct Wire {
    /// Which event: 1 push started, 0 push disconnected, anything else one we only acknowledge.
    #[serde(default, deserialize_with = "int")]
    event_type: Option<i64>,
    /// Expiry of `sign`, in unix seconds (by default the event time plus 600 s); a string in the
    /// legacy docs.
    #[serde(default, deserialize_with = "int")]
    t: Option<i64>,
    /// MD5 of the template's callback key followed by `t` in decimal, as 32 hex characters; absent
    /// when no key is set.
    #[serde(default, deserialize_with = "text")]
    sign: Option<String>,
    /// Push domain, e.g. `test.domain.com`.
    #[serde(default, deserialize_with = "text")]
    app: Option<String>,
    /// Push path, e.g. `live`; may be absent or empty.
    #[serde(default, deserialize_with = "text")]
    appname: Option<String>,
    /// Stream name.
    #[serde(default, deserialize_with = "text")]
    stream_id: Option<String>,
    /// The same value as `stream_id`, under its older name; used when `stream_id` is missing.
    #[serde(default, deserialize_with = "text")]
    channel_id: Option<String>,
    /// Push session id, shared by the push and its disconnect: retries are recognised by it.
    #[serde(default, deserialize_with = "text")]
    sequence: Option<String>,
    /// When the event happened, in unix seconds.
    #[serde(default, deserialize_with = "int")]
    event_time: Option<i64>,
    /// Cause of a disconnect (0 on a push), classified by [`crate::errcode::ErrCode`].
    #[serde(default, deserialize_with = "code")]
    errcode: Option<i64>,
    /// Where the stream was pushed: 1-6 the Chinese mainland, 7-200 outside it.
    #[serde(default, deserialize_with = "int")]
    set_id: Option<i64>,
    /// How long the push lasted, in milliseconds; disconnects only, sent as a string (`"128581"`).
    #[serde(default, deserialize_with = "millis")]
    push_duration: Option<i64>,
}

/// A body read as an object only: serde reads a struct from an array too, field by field in
/// declaration order, which no Tencent body is.
struct Object(Wire);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Object;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Object, A::Error> {
                Wire::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Parses a callback body.
pub fn parse(body: &[u8]) -> Result<Callback, ParseError> {
    let Object(wire) = serde_json::from_slice(body)?;
    let kind = EventKind::from_event_type(wire.event_type);
    // Built only for a body that lacks a field: naming its stream allocates.
    let missing = |wire: &Wire, field| {
        let stream_id = wire.stream_id.as_ref().or(wire.channel_id.as_ref());
        let part = |p: Option<&String>| p.cloned().unwrap_or_default();
        ParseError::Missing {
            kind,
            field,
            stream: (wire.app.is_some() || stream_id.is_some()).then(|| {
                format!(
                    "{}/{}/{}",
                    part(wire.app.as_ref()),
                    part(wire.appname.as_ref()),
                    part(stream_id)
                )
            }),
            sequence: wire.sequence.clone(),
        }
    };
    let Some(event_type) = wire.event_type else {
        return Err(missing(&wire, "event_type"));
    };
    let Some(t) = wire.t else {
        return Err(missing(&wire, "t"));
    };
    let event = match kind {
        EventKind::Push | EventKind::Disconnect => {
            let named = wire.stream_id.is_some() || wire.channel_id.is_some();
            for (field, given) in [
                ("app", wire.app.is_some()),
                ("stream_id", named),
                ("sequence", wire.sequence.is_some()),
            ] {
                if !given {
                    return Err(missing(&wire, field));
                }
            }
            let len = wire.app.as_ref().map_or(0, String::len);
            if len > MAX_APP_BYTES {
                return Err(ParseError::AppTooLong {
                    kind,
                    len,
                    sequence: wire.sequence,
                });
            }
            // Each is there, as checked above.
            let session = StreamEvent {
                stream: StreamKey {
                    app: wire.app.unwrap_or_default().into(),
                    appname: wire.appname.unwrap_or_default().into(),
                    // `channel_id` carries the same value; older payloads may have only one.
                    stream_id: wire
                        .stream_id
                        .or(wire.channel_id)
                        .unwrap_or_default()
                        .into(),
                },
                sequence: wire.sequence.unwrap_or_default(),
                event_time: wire.event_time,
                area: Area::from_set_id(wire.set_id),
            };
            if kind == EventKind::Push {
                Event::Push(session)
            } else {
                Event::Disconnect {
                    session,
                    errcode: wire.errcode.unwrap_or(0),
                    push_duration_ms: wire.push_duration.filter(|d| *d >= 0),
                }
            }
        }
        EventKind::Other | EventKind::Unknown => Event::Other { event_type },
    };
    Ok(Callback {
        t,
        sign: wire.sign,
        event,
    })
}

/// Reads an integer sent as a JSON number or a decimal string; anything else counts as absent.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(Lenient(scalar_to_int))
}

/// Reads a non-empty string sent as a JSON string or a number; anything else counts as absent.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Lenient(scalar_to_text))
}

/// Reads a disconnect code like [`int`], except that a number which is no code (beyond `i64`, or
/// with a fraction) is kept as out of every code's range, so it is labelled `other` rather than
/// taken for an absent code (`0`).
fn code<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(Lenient(scalar_to_code))
}

/// Reads an amount of milliseconds like [`int`], except that a fraction is rounded to the
/// nearest millisecond rather than taken for an absent value: a disconnect with
/// `"push_duration": "1500.5"` lasted 1.5 s, and leaving it out would put the push-duration
/// histogram's count below the disconnects'.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(Lenient(scalar_to_millis))
}

fn scalar_to_int(v: Scalar<'_>) -> Option<i64> {
    match v {
        Scalar::Int(i) => Some(i),
        Scalar::Float(f) => whole(f),
        // The same number whether it comes as a JSON number or as a string: `"7.0"` as `7.0`.
        Scalar::Str(s) => {
            let s = s.trim();
            s.parse().ok().or_else(|| whole(s.parse().ok()?))
        }
    }
}

/// An integral float, where `f64` is still exact.
fn whole(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

fn scalar_to_millis(v: Scalar<'_>) -> Option<i64> {
    // A negative amount is absent however it is written; `-0.4` must not round to a real `0`.
    let rounded = |f: f64| (f >= 0.0).then(|| whole(f.round())).flatten();
    match v {
        Scalar::Int(i) => Some(i),
        Scalar::Float(f) => rounded(f),
        Scalar::Str(s) => {
            let s = s.trim();
            s.parse().ok().or_else(|| rounded(s.parse().ok()?))
        }
    }
}

fn scalar_to_code(v: Scalar<'_>) -> Option<i64> {
    if let Some(code) = scalar_to_int(v) {
        return Some(code);
    }
    let f = match v {
        Scalar::Int(i) => i as f64,
        Scalar::Float(f) => f,
        Scalar::Str(s) => s.trim().parse().ok()?,
    };
    f.is_finite()
        .then_some(if f < 0.0 { i64::MIN } else { i64::MAX })
}

fn scalar_to_text(v: Scalar<'_>) -> Option<String> {
    match v {
        Scalar::Int(i) => Some(i.to_string()),
        Scalar::Float(f) => Some(f.to_string()),
        Scalar::Str(s) => Some(s.trim()).filter(|s| !s.is_empty()).map(str::to_owned),
    }
}

#[derive(Clone, Copy)]
enum Scalar<'a> {
    Int(i64),
    Float(f64),
    Str(&'a str),
}

/// A visitor that hands scalars to a conversion and turns every other shape into `None`.
struct Lenient<F>(F);

impl<'de, T, F: for<'a> FnOnce(Scalar<'a>) -> Option<T>> Visitor<'de> for Lenient<F> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or a string")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((self.0)(Scalar::Int(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(match i64::try_from(v) {
            Ok(v) => (self.0)(Scalar::Int(v)),
            Err(_) => (self.0)(Scalar::Str(&v.to_string())),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok((self.0)(Scalar::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((self.0)(Scalar::Str(v)))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: serde_json::Value) -> Result<Callback, ParseError> {
        parse(v.to_string().as_bytes())
    }

    proptest::proptest! {
        /// Keys order as their three strings do, in turn, whether or not they share them.
        #[test]
        fn keys_order_by_app_appname_then_stream_id(
            a in proptest::collection::vec("[ab]{0,2}", 3),
            b in proptest::collection::vec("[ab]{0,2}", 3),
            share in 0..4usize,
        ) {
            let key = |v: &[String]| StreamKey {
                app: v[0].as_str().into(),
                appname: v[1].as_str().into(),
                stream_id: v[2].as_str().into(),
            };
            let x = key(&a);
            let mut y = key(&b);
            // Share the strings that are equal, as the state's keys do.
            if share & 1 == 1 && a[0] == b[0] {
                y.app = x.app.clone();
            }
            if share & 2 == 2 && a[1] == b[1] {
                y.appname = x.appname.clone();
            }
            proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            proptest::prop_assert_eq!(x == y, a == b);
        }
    }

    #[test]
    fn reads_the_documented_disconnect() {
        let cb = parse(include_bytes!("../tests/samples/disconnect.json")).unwrap();
        assert_eq!(cb.t, 1545116519);
        let Event::Disconnect {
            session,
            errcode,
            push_duration_ms,
        } = cb.event
        else {
            panic!("not a disconnect: {:?}", cb.event)
        };
        assert_eq!(
            session.stream.to_string(),
            "test.domain.com/live/test_stream"
        );
        assert_eq!(session.sequence, "6674468118806626493");
        assert_eq!(session.area, Area::Mainland);
        assert_eq!(session.event_time, Some(1545115919));
        assert_eq!(errcode, 1);
        assert_eq!(push_duration_ms, Some(128581));
    }

    #[test]
    fn numbers_as_strings_and_strings_as_numbers() {
        let cb = parse_json(json!({
            "event_type": "1", "t": " 1700000000 ", "sign": "ab",
            "app": "d.example", "stream_id": 42, "sequence": 6674468118806626493u64,
            "set_id": "9", "event_time": 1699999000.0
        }))
        .unwrap();
        let Event::Push(s) = cb.event else { panic!() };
        assert_eq!(cb.t, 1700000000);
        assert_eq!(&*s.stream.stream_id, "42");
        assert_eq!(s.sequence, "6674468118806626493");
        assert_eq!(s.area, Area::Overseas);
        assert_eq!(s.event_time, Some(1699999000));
    }

    #[test]
    fn a_number_reads_the_same_as_a_json_number_or_as_a_string() {
        for (event_type, t, set_id) in [
            (json!(1.0), json!(1700000000.0), json!(7.0)),
            (json!("1.0"), json!("1700000000.0"), json!("7.0")),
            (json!("1"), json!("1.7e9"), json!(" 7 ")),
        ] {
            let cb = parse_json(json!({
                "event_type": event_type, "t": t, "app": "d", "stream_id": "s",
                "sequence": "q", "set_id": set_id
            }))
            .unwrap();
            let Event::Push(s) = cb.event else { panic!() };
            assert_eq!(s.area, Area::Overseas);
            assert_eq!(cb.t, 1_700_000_000);
        }
        let cb = parse_json(json!({
            "event_type": 0, "t": 1, "app": "d", "stream_id": "s", "sequence": "q",
            "errcode": "12.0", "push_duration": "1500.0"
        }))
        .unwrap();
        let Event::Disconnect {
            errcode,
            push_duration_ms,
            ..
        } = cb.event
        else {
            panic!()
        };
        assert_eq!((errcode, push_duration_ms), (12, Some(1500)));
    }

    #[test]
    fn a_fractional_push_duration_is_rounded_not_absent() {
        let duration = |value: serde_json::Value| {
            let cb = parse_json(json!({
                "event_type": 0, "t": 1, "app": "d", "stream_id": "s", "sequence": "q",
                "push_duration": value
            }))
            .unwrap();
            match cb.event {
                Event::Disconnect {
                    push_duration_ms, ..
                } => push_duration_ms,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(duration(json!("1500.5")), Some(1501));
        assert_eq!(duration(json!("1500.4")), Some(1500));
        assert_eq!(duration(json!(128581.2)), Some(128581));
        assert_eq!(duration(json!(" 2.5e3 ")), Some(2500));
        assert_eq!(duration(json!("0.4")), Some(0));
        // Negative, not a number, or beyond what a float holds exactly: absent, as before.
        for absent in [
            json!("-0.4"),
            json!(-1.5),
            json!("NaN"),
            json!("inf"),
            json!(1e300),
        ] {
            assert_eq!(duration(absent.clone()), None, "{absent}");
        }
    }

    #[test]
    fn a_disconnect_code_that_is_no_code_is_out_of_range_not_absent() {
        let errcode = |code: &str| {
            let body = format!(
                r#"{{"event_type":0,"t":1,"app":"d","stream_id":"s","sequence":"q","errcode":{code}}}"#
            );
            match parse(body.as_bytes()).unwrap().event {
                Event::Disconnect { errcode, .. } => errcode,
                _ => panic!("not a disconnect"),
            }
        };
        for huge in [
            "9223372036854775808",
            "18446744073709551616",
            "100000000000000000000",
            "1e20",
            "\"9223372036854775808\"",
            "12.5",
            "\"12.5\"",
        ] {
            assert_eq!(
                crate::errcode::ErrCode::new(errcode(huge)).to_string(),
                "other",
                "{huge}"
            );
        }
        assert_eq!(errcode("-1e20"), i64::MIN);
        // Absent, or not a number at all: no code was sent.
        for absent in ["null", "\"\"", "\"abc\"", "\"NaN\"", "\"inf\"", "[12]"] {
            assert_eq!(errcode(absent), 0, "{absent}");
        }
        assert_eq!(errcode("21"), 21);
    }

    #[test]
    fn empty_or_odd_optional_fields_are_absent() {
        let cb = parse_json(json!({
            "event_type": 0, "t": 1, "app": "d", "channel_id": "s", "sequence": "q",
            "appname": "", "set_id": "", "errcode": null, "push_duration": {"x": 1},
            "width": [1, 2], "unknown_field": true
        }))
        .unwrap();
        let Event::Disconnect {
            session,
            errcode,
            push_duration_ms,
        } = cb.event
        else {
            panic!()
        };
        assert_eq!(
            &*session.stream.stream_id, "s",
            "channel_id stands in for stream_id"
        );
        assert_eq!(&*session.stream.appname, "");
        assert_eq!(session.area, Area::Unknown);
        assert_eq!(errcode, 0);
        assert_eq!(push_duration_ms, None);
        assert_eq!(cb.sign, None);
    }

    #[test]
    fn other_event_types_need_only_event_type_and_t() {
        let cb = parse_json(json!({"event_type": 100, "t": 5})).unwrap();
        assert_eq!(cb.event, Event::Other { event_type: 100 });
    }

    #[test]
    fn missing_required_fields_name_the_field_and_event() {
        let err =
            parse_json(json!({"event_type": 1, "t": 5, "app": "d", "stream_id": "s"})).unwrap_err();
        assert!(matches!(
            err,
            ParseError::Missing {
                kind: EventKind::Push,
                field: "sequence",
                stream: Some(ref stream),
                sequence: None,
            } if stream == "d//s"
        ));
        let err = parse_json(json!({"t": 5})).unwrap_err();
        assert_eq!(err.kind(), EventKind::Unknown);
        let err = parse_json(json!({"event_type": 0, "app": "d"})).unwrap_err();
        assert!(matches!(err, ParseError::Missing { field: "t", .. }));
        let err = parse_json(
            json!({"event_type": 1, "t": 1, "app": "", "stream_id": "s", "sequence": "q"}),
        )
        .unwrap_err();
        // What the body tells of its stream and sequence, for the log line.
        assert!(matches!(
            err,
            ParseError::Missing {
                kind: EventKind::Push,
                field: "app",
                stream: Some(ref stream),
                sequence: Some(ref sequence),
            } if stream == "//s" && sequence == "q"
        ));
    }

    #[test]
    fn non_json_and_non_objects_are_errors() {
        let fields_in_order = br#"[1, 1700000600, "sign", "d.example", "live", "s", "", "q"]"#;
        for body in [
            &b""[..],
            b"not json",
            b"[1,2]",
            fields_in_order,
            b"\"x\"",
            b"{\"t\":",
        ] {
            assert!(parse(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }
}
