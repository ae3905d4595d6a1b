//! What the logs hold that the tables do not yet, kept in memory: the session changes not folded
//! into `sessions`, swept into it in key order, and the counters of `series_log`.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use rusqlite::{params, Connection};

use super::rows::encode_logged;
use crate::callback::StreamKey;
use crate::state::counters::{Series, Value};
use crate::state::rules::Session;
use crate::state::{FastMap, FastSet};

/// Age, in `series_log` rows, from which a counter's newest value is written again, so that the
/// rows before it can go.
pub(super) const SERIES_ROWS: i64 = 256;
/// Counters a batch writes again, at most: half as many as it changes, and at least this many.
/// Writing again every counter older than [`SERIES_ROWS`] cost a batch N / 256 values more
/// with N counters: with 1,000 domains (about 24,000 counters) 94 values a batch, and a commit
/// took 159 µs instead of 97 µs at 18,456 callbacks/s. Capped, a batch's write grows
/// with what it changed, and the log holds about three values a counter, so the rows to read
/// at start stay proportional to the counters, however many there are.
pub(super) const REWRITE_MIN: usize = 8;

/// The session changes not folded into `sessions`, in memory so that folding needs no reads.
#[derive(Debug, Default, Clone)]
pub(super) struct Unfolded {
    /// The newest unfolded change of each stream, in the order of `sessions`' primary key, so
    /// that a fold sweeps the table's pages in order (see [`Unfolded::sweep`]).
    pub(super) pending: BTreeMap<StreamKey, Pending>,
    /// Log rows not deleted yet, oldest first, with how many of their changes are in `pending`.
    /// The oldest rows with none left are done: their changes are folded or superseded.
    rows: VecDeque<(i64, usize)>,
    /// Where the next sweep starts: just after this stream.
    cursor: Option<StreamKey>,
    /// The `app` and `appname` strings of the keys in `pending`, shared so that those keys
    /// compare by pointer (the state forgets its own copy with a domain's last live stream);
    /// strings no key holds any more leave at each trim.
    pub(super) names: Names,
    /// Number of the next change, to tell a change's age in changes.
    next: u64,
    /// What `series_log` holds.
    pub(super) series: SeriesLog,
    /// Batches written since the connection was opened, to trim the logs every few.
    writes: u64,
    /// The newest row done but still in the log, to delete at the next trim.
    pub(super) folded_through: Option<i64>,
}

/// A stream's newest unfolded change.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// The log row holding it.
    row: i64,
    /// Its number (see [`Unfolded::next`]).
    number: u64,
    /// The session it set; `None`: ended.
    pub(super) session: Option<Session>,
}

/// What `series_log` holds, in memory so that a batch knows which counters to write again.
#[derive(Debug, Default, Clone)]
pub(super) struct SeriesLog {
    /// Newest value of every counter in the log, with the row that holds it.
    pub(super) latest: FastMap<Series, (Value, i64)>,
    /// Counters by the row they were last written in, oldest first. An entry whose row is not
    /// the counter's latest any more is stale and skipped.
    order: VecDeque<(Series, i64)>,
    /// Id of the newest row.
    pub(super) last_row: i64,
    /// Each counter's number in `series_names`.
    pub(super) ids: FastMap<Series, i64>,
}

impl SeriesLog {
    /// Appends a batch's counter values to `series_log` as one row, with the few idle counters
    /// it writes again (see [`SeriesLog::next_row`]), numbering new counters in `series_names`;
    /// when `trim`, deletes the rows that hold no counter's newest value any more.
    pub(super) fn append(
        &mut self,
        conn: &Connection,
        batch: &[(Series, Value)],
        trim: bool,
    ) -> rusqlite::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let row = self.last_row + 1;
        let again = self.next_row(batch, row);
        let mut values = String::with_capacity(32 * (batch.len() + 1));
        values.push('[');
        for series in batch.iter().map(|(s, _)| s).chain(&again) {
            let id = match self.ids.get(series) {
                Some(id) => *id,
                None => {
                    let labels =
                        serde_json::to_string(&series.labels()).expect("strings serialize");
                    conn.prepare_cached(
                        "INSERT INTO series_names (metric, labels) VALUES (?1, ?2)",
                    )?
                    .execute(params![series.metric(), labels])?;
                    let id = conn.last_insert_rowid();
                    self.ids.insert(series.clone(), id);
                    id
                }
            };
            if values.len() > 1 {
                values.push(',');
            }
            encode_logged(&mut values, id, &self.latest[series].0);
        }
        values.push(']');
        conn.prepare_cached("INSERT INTO series_log (id, batch) VALUES (?1, ?2)")?
            .execute(params![row, values])?;
        if trim {
            conn.prepare_cached("DELETE FROM series_log WHERE id < ?1")?
                .execute([self.oldest_row().unwrap_or(row)])?;
        }
        self.last_row = row;
        Ok(())
    }

    pub(super) fn record(&mut self, series: Series, value: Value, row: i64) {
        self.order.push_back((series.clone(), row));
        self.latest.insert(series, (value, row));
    }

    /// The oldest row that holds a counter's newest value: the rows before it hold none.
    fn oldest_row(&mut self) -> Option<i64> {
        while let Some((series, at)) = self.order.front() {
            if self.latest.get(series).map(|(_, r)| r) == Some(at) {
                return Some(*at);
            }
            self.order.pop_front();
        }
        None
    }

    /// Records the batch's values as row `row`; returns the counters to write again in it:
    /// the oldest of those whose newest value is [`SERIES_ROWS`] rows old, up to
    /// [`REWRITE_MIN`] or half the batch.
    fn next_row(&mut self, batch: &[(Series, Value)], row: i64) -> Vec<Series> {
        for (series, value) in batch {
            self.record(series.clone(), value.clone(), row);
        }
        let most = REWRITE_MIN.max(batch.len() / 2);
        let mut again = Vec::new();
        while again.len() < most {
            match self.oldest_row() {
                Some(at) if at <= row - SERIES_ROWS => {}
                _ => break,
            }
            let (series, _) = self.order.pop_front().expect("just seen");
            if let Some(latest) = self.latest.get_mut(&series) {
                latest.1 = row;
            }
            self.order.push_back((series.clone(), row));
            again.push(series);
        }
        again
    }
}

impl Unfolded {
    /// Counts a batch written; tells whether this one also trims the heads of the logs, as
    /// every `trim_every`-th does.
    pub(super) fn count_write(&mut self, trim_every: u64) -> bool {
        self.writes += 1;
        self.writes.is_multiple_of(trim_every)
    }

    /// Appends a batch's session changes to `session_log` as one row, folds what is due
    /// (see [`Unfolded::fold`]) and, when `trim`, deletes the rows done with.
    pub(super) fn log_sessions(
        &mut self,
        conn: &Connection,
        sessions: &[(StreamKey, Option<Session>)],
        lag: usize,
        trim: bool,
    ) -> rusqlite::Result<()> {
        if !sessions.is_empty() {
            let changes: Vec<_> = sessions
                .iter()
                .map(|(stream, session)| {
                    let (sequence, area, since) = match session {
                        Some(s) => (
                            Some(s.sequence.to_string()),
                            Some(s.area.as_str()),
                            Some(s.since),
                        ),
                        None => (None, None, None),
                    };
                    (
                        &*stream.app,
                        &*stream.appname,
                        &*stream.stream_id,
                        sequence,
                        area,
                        since,
                    )
                })
                .collect();
            let changes = serde_json::to_string(&changes).expect("changes serialize");
            conn.prepare_cached("INSERT INTO session_log (changes) VALUES (?1)")?
                .execute([changes])?;
            let row = conn.last_insert_rowid();
            for (stream, session) in sessions {
                self.push(row, stream, session.clone());
            }
        }
        self.fold(conn, sessions.len(), lag)?;
        if trim {
            self.names.retain(|name| Arc::strong_count(name) > 1);
            if let Some(last) = self.folded_through.take() {
                conn.prepare_cached("DELETE FROM session_log WHERE id <= ?1")?
                    .execute([last])?;
            }
        }
        Ok(())
    }

    pub(super) fn push(&mut self, row: i64, stream: &StreamKey, session: Option<Session>) {
        let number = self.next;
        self.next += 1;
        match self.rows.back_mut() {
            Some((last, count)) if *last == row => *count += 1,
            _ => self.rows.push_back((row, 1)),
        }
        let change = Pending {
            row,
            number,
            session,
        };
        let stream = StreamKey {
            app: intern(&mut self.names, &stream.app),
            appname: intern(&mut self.names, &stream.appname),
            stream_id: stream.stream_id.clone(),
        };
        if let Some(superseded) = self.pending.insert(stream, change) {
            self.resolved(superseded.row);
        }
    }

    /// One change of `row` left `pending`; the oldest rows with none left are done.
    fn resolved(&mut self, row: i64) {
        if let Ok(i) = self.rows.binary_search_by_key(&row, |(r, _)| *r) {
            self.rows[i].1 -= 1;
        }
        while let Some((row, 0)) = self.rows.front() {
            self.folded_through = Some(*row);
            self.rows.pop_front();
        }
    }

    /// Folds pending session changes into `sessions` (see [`Unfolded::sweep`]): each batch visits
    /// twice as many pending streams as it brings changes, more while over `lag` are pending, and
    /// folds those at least `lag / 2` changes old. So a change waits between `lag / 2` and about
    /// `lag` changes, and at most about `lag` are pending. Rows whose changes are all folded or
    /// superseded are deleted from the log later, a chunk at a time
    /// ([`TRIM_EVERY`](super::TRIM_EVERY)); until then they repeat what `sessions` holds, and
    /// read again after a restart they are folded again to the same result.
    fn fold(&mut self, conn: &Connection, changes: usize, lag: usize) -> rusqlite::Result<()> {
        let visit = (2 * changes + 1).max(self.pending.len().saturating_sub(lag));
        let effective = self.sweep(visit, (lag / 2) as u64);
        if effective.is_empty() {
            return Ok(());
        }
        let mut upsert = conn.prepare_cached(
            "INSERT OR REPLACE INTO sessions (app, appname, stream_id, sequence, area, since)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut delete = conn.prepare_cached(
            "DELETE FROM sessions WHERE app = ?1 AND appname = ?2 AND stream_id = ?3",
        )?;
        for (stream, session) in effective {
            let key = (&*stream.app, &*stream.appname, &*stream.stream_id);
            match session {
                Some(s) => upsert.execute(params![
                    key.0,
                    key.1,
                    key.2,
                    s.sequence.to_string(),
                    s.area.as_str(),
                    s.since
                ])?,
                None => delete.execute(params![key.0, key.1, key.2])?,
            };
        }
        Ok(())
    }

    /// Takes the changes to fold now: of up to `visit` pending streams, from where the last
    /// sweep ended (in key order, around the end), those whose change is at least `min_age`
    /// changes old. A short session's push and disconnect usually meet in `pending` within
    /// that age and cost no write to `sessions`. The others are folded in key order, a stretch
    /// of the table at a time: with many pending changes, several of them share each page the
    /// fold writes, where taking the oldest first wrote a random page for nearly each one.
    pub(super) fn sweep(
        &mut self,
        visit: usize,
        min_age: u64,
    ) -> Vec<(StreamKey, Option<Session>)> {
        let young = self.next.saturating_sub(min_age);
        let mut due = Vec::new();
        let cursor = self.cursor.take();
        let (after, before) = match &cursor {
            Some(c) => (
                self.pending
                    .range::<StreamKey, _>((Bound::Excluded(c), Bound::Unbounded)),
                Some(self.pending.range::<StreamKey, _>(..=c)),
            ),
            None => (self.pending.range::<StreamKey, _>(..), None),
        };
        let mut last = None;
        for (stream, change) in after.chain(before.into_iter().flatten()).take(visit) {
            if change.number < young {
                due.push(stream.clone());
            }
            last = Some(stream);
        }
        self.cursor = last.cloned().or(cursor);
        due.into_iter()
            .map(|stream| {
                let change = self.pending.remove(&stream).expect("just seen");
                self.resolved(change.row);
                (stream, change.session)
            })
            .collect()
    }
}

/// The strings of `app` and `appname` read so far: a million streams of a hundred domains then
/// hold a hundred copies of each, not a million, and keys that share them compare quickly.
pub(super) type Names = FastSet<Arc<str>>;

pub(super) fn intern(names: &mut Names, text: &str) -> Arc<str> {
    match names.get(text) {
        Some(shared) => shared.clone(),
        None => {
            let shared: Arc<str> = text.into();
            names.insert(shared.clone());
            shared
        }
    }
}
