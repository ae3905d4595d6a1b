//! How sessions, areas and counters are written in and read from rows and their JSON columns;
//! anything stored that this release does not recognise is a conversion error, never a guess.

use rusqlite::types::Type;
use rusqlite::Row;

use super::unfolded::{intern, Names};
use crate::area::Area;
use crate::callback::StreamKey;
use crate::state::counters::{Histogram, Series, Value};
use crate::state::rules::{Sequence, Session};

/// A counter as a `series_log` row holds it: its number in `series_names` and value, and for a
/// histogram the sum of milliseconds and the buckets.
#[derive(serde::Deserialize)]
#[serde(untagged)]
pub(super) enum LoggedValue {
    Plain(i64, i64),
    Histogram(i64, i64, i64, String),
}

/// A stored area; an unknown one is an error, never a guess.
pub(super) fn area_of(text: &str) -> Result<Area, String> {
    Area::from_label(text).ok_or_else(|| format!("unknown area {text:?}"))
}

/// An `area` column (see [`area_of`]).
pub(super) fn area(r: &Row, idx: usize) -> rusqlite::Result<Area> {
    area_of(r.get_ref(idx)?.as_str()?)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e.into()))
}

/// A stream key from columns 0-2.
pub(super) fn stream_key(r: &Row, names: &mut Names) -> rusqlite::Result<StreamKey> {
    Ok(StreamKey {
        app: intern(names, r.get_ref(0)?.as_str()?),
        appname: intern(names, r.get_ref(1)?.as_str()?),
        stream_id: r.get_ref(2)?.as_str()?.into(),
    })
}

/// A session from columns 3 (sequence), 4 (area) and 5 (since); `None` if the sequence is NULL.
pub(super) fn session(r: &Row) -> rusqlite::Result<Option<Session>> {
    let Some(sequence) = r.get_ref(3)?.as_str_or_null()? else {
        return Ok(None);
    };
    Ok(Some(Session {
        sequence: Sequence::from(sequence),
        area: area(r, 4)?,
        since: r.get(5)?,
    }))
}

/// A change of a `session_log` row, as [`SESSION_LOG`](super::schema::SESSION_LOG) describes it.
pub(super) type LoggedChange = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
);

pub(super) fn logged_change(change: LoggedChange) -> Result<(StreamKey, Option<Session>), String> {
    let (app, appname, stream_id, sequence, area, since) = change;
    // Shared once pending (see `Unfolded::names`).
    let stream = StreamKey {
        app: app.into(),
        appname: appname.into(),
        stream_id: stream_id.into(),
    };
    let session = match (sequence, area, since) {
        (None, _, _) => None,
        (Some(sequence), Some(area), Some(since)) => Some(Session {
            sequence: Sequence::from(sequence.as_str()),
            area: area_of(&area)?,
            since,
        }),
        _ => return Err(format!("the session of {stream} lacks its area or start")),
    };
    Ok((stream, session))
}

pub(super) fn encode_value(value: &Value) -> (i64, Option<i64>, Option<String>) {
    match value {
        Value::Count(n) => (i64::try_from(*n).unwrap_or(i64::MAX), None, None),
        Value::TimestampMs(ms) => (*ms, None, None),
        Value::Histogram(h) => {
            let buckets = h
                .counts
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            (clamp(h.count()), Some(clamp(h.sum_ms)), Some(buckets))
        }
    }
}

/// A counter's entry of a `series_log` row, as JSON: `[id,value]`, or `[id,count,sum,"b,b"]`.
pub(super) fn encode_logged(out: &mut String, id: i64, value: &Value) {
    let (value, sum_ms, buckets) = encode_value(value);
    out.push('[');
    out.push_str(itoa::Buffer::new().format(id));
    out.push(',');
    out.push_str(itoa::Buffer::new().format(value));
    if let (Some(sum_ms), Some(buckets)) = (sum_ms, buckets) {
        out.push(',');
        out.push_str(itoa::Buffer::new().format(sum_ms));
        // Digits and commas only: no escaping needed.
        out.push_str(",\"");
        out.push_str(&buckets);
        out.push('"');
    }
    out.push(']');
}

pub(super) fn unknown_series(metric: &str, labels: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        1,
        Type::Text,
        format!("unknown series or value: {metric}{labels}").into(),
    )
}

/// A counter from its metric and JSON labels; an unknown one is a conversion error, never a
/// guess.
pub(super) fn decode_name(metric: &str, labels: &str) -> rusqlite::Result<Series> {
    serde_json::from_str::<Vec<String>>(labels)
        .ok()
        .and_then(|l| Series::decode(metric, &l))
        .ok_or_else(|| unknown_series(metric, labels))
}

/// A counter and its value from the columns of `series`.
pub(super) fn decode_series(
    (metric, labels, value, sum_ms, buckets): (String, String, i64, Option<i64>, Option<String>),
) -> rusqlite::Result<(Series, Value)> {
    let series = decode_name(&metric, &labels)?;
    let value = decode_value(&series, value, sum_ms, buckets.as_deref())
        .ok_or_else(|| unknown_series(&metric, &labels))?;
    Ok((series, value))
}

pub(super) fn decode_value(
    series: &Series,
    value: i64,
    sum_ms: Option<i64>,
    buckets: Option<&str>,
) -> Option<Value> {
    Some(match series {
        Series::PushDuration(..) | Series::CallbackDelay => {
            let counts = buckets?
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<u64>, _>>()
                .ok()?;
            Value::Histogram(Histogram {
                counts,
                sum_ms: u64::try_from(sum_ms?).ok()?,
            })
        }
        Series::LastCallback => Value::TimestampMs(value),
        _ => Value::Count(u64::try_from(value).ok()?),
    })
}
