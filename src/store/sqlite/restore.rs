//! What start reads back: the logs into their [`Unfolded`] memory, the delivered keys, the
//! counters of schema 1's table, and the folded sessions, in chunks on a thread of their own.

use std::collections::HashMap;

use rusqlite::types::Type;
use rusqlite::Connection;

use super::rows::unknown_series;
use super::rows::{decode_name, decode_series, decode_value, logged_change, session, stream_key};
use super::rows::{LoggedChange, LoggedValue};
use super::unfolded::{Names, Unfolded};
use crate::callback::{EventKind, StreamKey};
use crate::state::counters::{Series, Value};
use crate::state::rules::Session;
use crate::state::{DeliveryKey, FastSet};

/// Stored sessions sent at a time by [`read_sessions`], and chunks it may read ahead.
pub(super) const SESSION_CHUNK: usize = 8192;
pub(super) const SESSION_CHUNKS: usize = 8;

/// Sends the sessions of `sessions` whose streams have no pending change, in chunks; stops
/// early if nobody listens any more.
pub(super) fn read_sessions(
    conn: &Connection,
    pending: &FastSet<StreamKey>,
    chunks: &std::sync::mpsc::SyncSender<Result<Vec<(StreamKey, Session)>, String>>,
) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare("SELECT app, appname, stream_id, sequence, area, since FROM sessions")?;
    let mut rows = stmt.query([])?;
    let mut names = Names::default();
    let mut chunk = Vec::with_capacity(SESSION_CHUNK);
    while let Some(r) = rows.next()? {
        let stream = stream_key(r, &mut names)?;
        if pending.contains(&stream) {
            continue;
        }
        if let Some(session) = session(r)? {
            chunk.push((stream, session));
        }
        if chunk.len() == SESSION_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(SESSION_CHUNK));
            if chunks.send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    let _ = chunks.send(Ok(chunk));
    Ok(())
}

pub(super) fn read_unfolded(conn: &Connection) -> rusqlite::Result<Unfolded> {
    let mut unfolded = Unfolded::default();
    // Parsed here rather than with `json_each`, which took five times as long.
    let mut stmt = conn.prepare("SELECT id, changes FROM session_log ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let bad = |e: String| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, e.into());
        let changes: Vec<LoggedChange> =
            serde_json::from_str(r.get_ref(1)?.as_str()?).map_err(|e| bad(e.to_string()))?;
        for change in changes {
            let (stream, session) = logged_change(change).map_err(bad)?;
            unfolded.push(id, &stream, session);
        }
    }
    let mut stmt = conn.prepare("SELECT id, metric, labels FROM series_names")?;
    let mut rows = stmt.query([])?;
    let mut names = HashMap::new();
    while let Some(r) = rows.next()? {
        let (id, metric, labels): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let series = decode_name(&metric, &labels)?;
        unfolded.series.ids.insert(series.clone(), id);
        names.insert(id, series);
    }
    let mut stmt = conn.prepare("SELECT id, batch FROM series_log ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row: i64 = r.get(0)?;
        let batch: Vec<LoggedValue> = serde_json::from_str(r.get_ref(1)?.as_str()?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, Box::new(e)))?;
        for logged in batch {
            let (id, value, sum_ms, buckets) = match logged {
                LoggedValue::Plain(id, value) => (id, value, None, None),
                LoggedValue::Histogram(id, count, sum_ms, buckets) => {
                    (id, count, Some(sum_ms), Some(buckets))
                }
            };
            let series = names.get(&id).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    Type::Text,
                    format!("counter {id} of the log has no name").into(),
                )
            })?;
            let value = decode_value(series, value, sum_ms, buckets.as_deref())
                .ok_or_else(|| unknown_series(series.metric(), &format!("{id}")))?;
            unfolded.series.record(series.clone(), value, row);
        }
        unfolded.series.last_row = row;
    }
    Ok(unfolded)
}

/// The delivered-event keys of `delivered`, oldest batch first, with their expiry.
pub(super) fn read_delivered(conn: &Connection) -> rusqlite::Result<Vec<(DeliveryKey, i64)>> {
    let mut delivered = Vec::new();
    let mut stmt = conn.prepare("SELECT keys FROM delivered ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let keys: Vec<(String, i64, i64)> = serde_json::from_str(r.get_ref(0)?.as_str()?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e)))?;
        delivered.extend(keys.into_iter().map(|(sequence, event_type, expires)| {
            let kind = EventKind::from_event_type(Some(event_type));
            (DeliveryKey::new(&sequence, kind), expires)
        }));
    }
    Ok(delivered)
}

/// The counters of the `series` table (what a schema-1 database held).
pub(super) fn read_series_table(conn: &Connection) -> rusqlite::Result<Vec<(Series, Value)>> {
    let mut stmt = conn.prepare("SELECT metric, labels, value, sum_ms, buckets FROM series")?;
    let mut rows = stmt.query([])?;
    let mut series = Vec::new();
    while let Some(r) = rows.next()? {
        series.push(decode_series((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        ))?);
    }
    Ok(series)
}
