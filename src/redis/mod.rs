//! Redis as the shared truth of several replicas behind a load balancer.
//!
//! A push may land on one replica and its disconnect on another, a retry on either: so the
//! live sessions, the delivered-event keys and every counter live in Redis, and each event is
//! one atomic transition there. The transition is decided by the very same truth rules as the
//! local ledger ([`crate::state::rules`]), with optimistic concurrency: read the facts, decide,
//! then apply with a Lua script that first checks the facts are still true (otherwise read
//! again). A 200 is only sent once Redis acknowledged the script.
//!
//! `fields` (a module of its own) lays out the keys and fields; this module reads and writes them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

use crate::area::Area;
use crate::callback::{Event, EventKind, Outcome, StreamKey};
use crate::ledger::{now_ms, Outage, Unrecorded};
use crate::metrics::{CommitStats, Frame, ViewSource};
use crate::state::counters::{tally, Domain, Series};
use crate::state::rules::{self, Decision, Effect, Facts, Sequence, Session};
use crate::state::{View, OTHER_DOMAIN};

mod fields;

use fields::{decode, field, increments, live_field, Keys};

/// How long a scrape may show numbers old by.
const VIEW_MAX_AGE: Duration = Duration::from_secs(1);
/// How often Redis is probed: a fault is found, and cleared, without waiting for traffic.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Fields of a hash asked for by one `HSCAN` step: about 60 µs of Redis's time, so
/// that a callback's commands wait for at most that behind a step of a scrape's read. Steps of
/// 1,000 fields (0.6 ms each) put the callbacks' p99 at 5-18 ms while scraped, against 3-6 ms
/// with these, for the same total time in Redis and 10 times the round trips.
const SCAN_COUNT: usize = 100;
/// Transitions retried after a concurrent change of the same stream, before giving up (503).
const MAX_ATTEMPTS: usize = 16;

/// Applies one accepted event if the facts it was decided on still hold. Returns 1 when applied,
/// 0 when another replica changed the stream in between (the caller decides again).
///
/// The last callback's time is the newest of the replicas' (their clocks differ by a little),
/// unless it is over a minute ahead of this replica's clock: a clock set back since (it would
/// otherwise stay ahead for as long as the clock had been, and the no-callbacks alert with it).
///
/// A session that ends (or is replaced) has its push key set again for a whole window, as the
/// local ledger remembers it from the session's end: while the session was live its push was
/// known from the session itself, and the key set at the push may have expired since, after
/// which a retried push would be counted again.
///
/// The stream's `appname` has its live sessions counted in its app's `places` hash, so that a
/// disconnect without `appname` can find its session under the others (see [`fields`]).
const APPLY: &str = r#"
local session, delivered, disconnect, live, counters, last = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ended_push, places = KEYS[7], KEYS[8]
local current = redis.call('HGET', session, 'seq') or ''
if current ~= ARGV[1] then return 0 end
if redis.call('EXISTS', delivered) == 1 then return 0 end
if tostring(redis.call('EXISTS', disconnect)) ~= ARGV[2] then return 0 end
redis.call('SET', delivered, '1', 'PX', ARGV[3])
local n = tonumber(ARGV[9])
local appname = ARGV[11 + 2 * n]
local effect = ARGV[4]
if effect ~= 'keep' then
  if current ~= '' then
    redis.call('HINCRBY', live, redis.call('HGET', session, 'live'), -1)
    redis.call('SET', ended_push, '1', 'PX', ARGV[3])
  end
  if effect == 'start' then
    redis.call('HSET', session, 'seq', ARGV[5], 'area', ARGV[6], 'since', ARGV[7], 'live', ARGV[8])
    redis.call('HINCRBY', live, ARGV[8], 1)
    if current == '' then redis.call('HINCRBY', places, appname, 1) end
  else
    redis.call('DEL', session)
    if redis.call('HINCRBY', places, appname, -1) <= 0 then redis.call('HDEL', places, appname) end
  end
end
for i = 1, n do
  redis.call('HINCRBY', counters, ARGV[8 + 2 * i], ARGV[9 + 2 * i])
end
local now = tonumber(ARGV[10 + 2 * n])
local before = tonumber(redis.call('GET', last) or '0')
if now > before or now < before - 60000 then redis.call('SET', last, now) end
return 1
"#;

/// Admits a domain under the cap: 1 if it has (or now has) series of its own, 0 if over the cap.
const ADMIT: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

/// The stream's session (`seq`, `area`, `since`), whether the event was delivered, and whether
/// its session's disconnect was.
type StoredFacts = ((Option<String>, Option<String>, Option<i64>), bool, bool);

/// Records events in Redis.
pub struct RedisLedger {
    /// The callbacks' connection: transitions, domain admission, kept counts and probes.
    conn: ConnectionManager,
    /// The scrapes' own connection: with many domains the counters' hash is a reply of
    /// megabytes, which on `conn` would hold up the callbacks' commands queued behind it.
    reads: ConnectionManager,
    /// Names of the keys, under the configured prefix.
    keys: Keys,
    /// [`APPLY`], run by its hash; loaded into Redis when Redis lacks it.
    apply: Script,
    /// [`ADMIT`], run by its hash like `apply`.
    admit: Script,
    /// How long a delivered event is remembered (the TTL of its key), in milliseconds.
    dedup_window_ms: i64,
    /// Most domains with series of their own (`--metrics.max-domains`); others count as `_other`.
    max_domains: usize,
    /// Domains known to be admitted; admission never ends, so remembering it is safe.
    admitted: Mutex<HashSet<Domain>>,
    /// Why Redis is failing, while it is.
    fault: Mutex<Option<String>>,
    /// The outage under way, logged when it ends.
    outage: Mutex<Option<Outage>>,
    /// Counts made while Redis was unreachable (errors, rejections), added once it is back.
    pending: Mutex<HashMap<String, i64>>,
    /// Held by a probe, which takes the kept counts out while it adds them: so that the one at
    /// shutdown does not find them gone while the once-a-second one is adding them.
    probing: tokio::sync::Mutex<()>,
    /// The numbers last read from Redis, and when.
    view: Mutex<(Option<Instant>, View)>,
    /// When the last read of Redis ended, whether it succeeded or not; held while reading, so
    /// that scrapes arriving together share one read (or its failure, when Redis hangs)
    /// instead of each making their own.
    reading: tokio::sync::Mutex<Option<Instant>>,
    /// Every recorded callback's transaction is timed and counted here, for `/metrics`.
    stats: CommitStats,
}

impl RedisLedger {
    /// Connects (waiting up to `connect_timeout` for Redis to answer) and starts the probe that
    /// clears a fault once Redis is back.
    pub async fn connect(
        url: &str,
        prefix: &str,
        dedup_window: Duration,
        max_domains: usize,
        connect_timeout: Duration,
    ) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(5))
            .set_number_of_retries(1);
        let deadline = Instant::now() + connect_timeout;
        let connect = || ConnectionManager::new_with_config(client.clone(), config.clone());
        let (conn, reads) = loop {
            match tokio::try_join!(connect(), connect()) {
                Ok(both) => break both,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "waiting for redis");
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                Err(e) => return Err(format!("cannot reach redis: {e}")),
            }
        };
        let ledger = Arc::new(RedisLedger {
            conn,
            reads,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            apply: Script::new(APPLY),
            admit: Script::new(ADMIT),
            dedup_window_ms: dedup_window.as_millis().min(i64::MAX as u128) as i64,
            max_domains,
            admitted: Mutex::new(HashSet::new()),
            fault: Mutex::new(None),
            outage: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            probing: tokio::sync::Mutex::new(()),
            view: Mutex::new((None, View::default())),
            reading: tokio::sync::Mutex::new(None),
            stats: CommitStats::default(),
        });
        // Read before serving, so that the first scrape has the numbers. If Redis goes away
        // before it can be read, scrapes have none until it is back.
        ledger.refresh_now().await;
        tracing::info!(prefix, "recording in redis");
        // Probed every second, not only while failing: a connection that broke while idle (Redis
        // restarted, a network cut) is otherwise found only by the next callback, which gets
        // a 503 for it, and `/readyz` says ready all the while.
        let weak = Arc::downgrade(&ledger);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(ledger) = weak.upgrade() else { return };
                ledger.probe().await;
            }
        });
        Ok(ledger)
    }

    pub fn fault(&self) -> Option<String> {
        lock(&self.fault).clone()
    }

    pub fn commit_stats(&self) -> &CommitStats {
        &self.stats
    }

    pub async fn record(&self, event: Event) -> Result<Outcome, Unrecorded> {
        let kind = event.kind();
        let started = Instant::now();
        let result = match &event {
            Event::Other { .. } => self
                .incr(vec![(
                    field(&Series::Callbacks(kind, Outcome::Ignored), None),
                    1,
                )])
                .await
                .map(|()| Outcome::Ignored),
            _ => self.transition(&event).await,
        };
        self.stats.written(started.elapsed(), 1, result.is_ok());
        match result {
            Ok(outcome) => {
                self.healthy();
                Ok(outcome)
            }
            Err(e) => {
                let message = format!("redis: {e}");
                self.failing(&message);
                Outage::refused(&mut lock(&self.outage));
                self.keep(field(&Series::Callbacks(kind, Outcome::Error), None));
                Err(Unrecorded(message))
            }
        }
    }

    /// Counts a rejected callback; kept for later if Redis is unreachable.
    pub async fn count(&self, kind: EventKind, outcome: Outcome) {
        let f = field(&Series::Callbacks(kind, outcome), None);
        if self.incr(vec![(f.clone(), 1)]).await.is_err() {
            self.keep(f);
        }
    }

    /// Reads the numbers again if the copy is older than `VIEW_MAX_AGE`; keeps the old copy
    /// while Redis is unreachable.
    pub async fn refresh(&self) {
        let fresh = || {
            lock(&self.view)
                .0
                .is_some_and(|at| at.elapsed() < VIEW_MAX_AGE)
        };
        if fresh() {
            return;
        }
        let arrived = Instant::now();
        let mut last_read = self.reading.lock().await;
        // Unless read (or tried) by the scrape this one waited for.
        if !last_read.is_some_and(|ended| ended >= arrived) {
            self.read_again().await;
            *last_read = Some(Instant::now());
        }
    }

    /// Reads the numbers again whatever the age of the copy (a scrape right after a change that
    /// must see it, as in tests).
    pub async fn refresh_now(&self) {
        let mut last_read = self.reading.lock().await;
        self.read_again().await;
        *last_read = Some(Instant::now());
    }

    /// Reads the numbers; the caller holds `reading`.
    async fn read_again(&self) {
        match self.read_view().await {
            Ok(view) => {
                let old = std::mem::replace(&mut *lock(&self.view), (Some(Instant::now()), view));
                // Tens of thousands of series take milliseconds to free: not on a runtime worker.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the metrics from redis"),
        }
    }

    /// Decides the event by the truth rules on the facts read from Redis, then applies it if
    /// the facts still hold; again if another replica got in between.
    async fn transition(&self, event: &Event) -> RedisResult<Outcome> {
        let (kind, s) = match event {
            Event::Push(s) => (EventKind::Push, s),
            Event::Disconnect { session, .. } => (EventKind::Disconnect, session),
            Event::Other { .. } => unreachable!("other events are not transitions"),
        };
        let mut conn = self.conn.clone();
        // The stream the event is about: a disconnect's may be under another `appname`.
        let mut stream = std::borrow::Cow::Borrowed(&s.stream);
        let delivered_key = self.keys.delivered(&s.sequence, kind);
        let disconnect_key = self.keys.delivered(&s.sequence, EventKind::Disconnect);
        let mut other_path_looked_up = false;
        for _ in 0..MAX_ATTEMPTS {
            let now = now_ms();
            let session_key = self.keys.session(&stream);
            let ((seq, area, since), delivered, disconnected): StoredFacts = redis::pipe()
                .hget(&session_key, &["seq", "area", "since"])
                .exists(&delivered_key)
                .exists(&disconnect_key)
                .query_async(&mut conn)
                .await?;
            // A retry is a duplicate whatever the path: not worth a round trip.
            if kind == EventKind::Disconnect
                && !other_path_looked_up
                && !delivered
                && seq.as_deref() != Some(&s.sequence)
            {
                other_path_looked_up = true;
                if let Some(other) = self.other_path(&s.stream, &s.sequence).await? {
                    stream = std::borrow::Cow::Owned(other);
                    continue;
                }
            }
            let current = seq.as_deref().map(|seq| Session {
                sequence: Sequence::from(seq),
                area: area
                    .as_deref()
                    .and_then(Area::from_label)
                    .unwrap_or(Area::Unknown),
                since: since.unwrap_or(0),
            });
            let facts = Facts {
                current: current.as_ref(),
                already_delivered: delivered,
                disconnect_seen: kind == EventKind::Push && disconnected,
            };
            let effect = match rules::decide(event, facts, now.div_euclid(1000)) {
                Some(Decision::Accept(effect)) => effect,
                _ => {
                    let duplicate = field(&Series::Callbacks(kind, Outcome::Duplicate), None);
                    self.incr(vec![(duplicate, 1)]).await?;
                    return Ok(Outcome::Duplicate);
                }
            };
            let (domain, overflow) = self.admit(&s.stream.app).await?;
            let area = rules::counted_area(event, &effect, current.as_ref());
            let (fields, touched) = increments(tally(event, domain.clone(), area, overflow, now));
            let mut invocation = self.apply.prepare_invoke();
            invocation
                .key(&session_key)
                .key(&delivered_key)
                .key(&disconnect_key)
                .key(self.keys.named("live"))
                .key(self.keys.named("counters"))
                .key(self.keys.named("last_callback_ms"))
                // The push key of the live session read above; used only if there is one.
                .key(
                    self.keys
                        .delivered(seq.as_deref().unwrap_or(""), EventKind::Push),
                )
                .key(self.keys.places(&stream.app))
                .arg(seq.as_deref().unwrap_or(""))
                .arg(if disconnected { "1" } else { "0" })
                .arg(self.dedup_window_ms.max(1));
            match &effect {
                Effect::Keep => invocation.arg("keep").arg("").arg("").arg("").arg(""),
                Effect::End => invocation.arg("end").arg("").arg("").arg("").arg(""),
                Effect::Start(new) => {
                    let live = live_field(&domain, new.area);
                    invocation
                        .arg("start")
                        .arg(new.sequence.to_string())
                        .arg(new.area.as_str())
                        .arg(new.since)
                        .arg(live)
                }
            };
            // A session that moves between areas or domain labels keeps its own `live` field,
            // so the decrement always matches the increment it was counted with.
            invocation.arg(fields.len());
            for (f, n) in &fields {
                invocation.arg(f).arg(*n);
            }
            invocation.arg(touched).arg(&*stream.appname);
            let applied: i64 = invocation.invoke_async(&mut conn).await?;
            if applied == 1 {
                return Ok(Outcome::Accepted);
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::TryAgain,
            "stream changed concurrently too many times",
        )))
    }

    /// The stream with `stream`'s `app` and stream id, under another `appname` of the app's
    /// `places`, whose live session is `sequence` (as [`crate::state::Truth`] finds it).
    async fn other_path(
        &self,
        stream: &StreamKey,
        sequence: &str,
    ) -> RedisResult<Option<StreamKey>> {
        let mut conn = self.conn.clone();
        let appnames: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.places(&stream.app))
            .query_async(&mut conn)
            .await?;
        let others: Vec<StreamKey> = appnames
            .into_iter()
            .filter(|appname| **appname != *stream.appname)
            .map(|appname| StreamKey {
                app: stream.app.clone(),
                appname: appname.into(),
                stream_id: stream.stream_id.clone(),
            })
            .collect();
        if others.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for other in &others {
            pipe.hget(self.keys.session(other), "seq");
        }
        let sequences: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        Ok(others
            .into_iter()
            .zip(sequences)
            .find_map(|(other, seq)| (seq.as_deref() == Some(sequence)).then_some(other)))
    }

    /// The `domain` label of `app` under the shared cap, and whether it overflowed.
    async fn admit(&self, app: &str) -> RedisResult<(Domain, bool)> {
        if let Some(d) = lock(&self.admitted).get(app) {
            return Ok((d.clone(), false));
        }
        let admitted: i64 = self
            .admit
            .key(self.keys.named("domains"))
            .arg(app)
            .arg(self.max_domains)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if admitted == 1 {
            let d: Domain = app.into();
            lock(&self.admitted).insert(d.clone());
            Ok((d, false))
        } else {
            Ok((OTHER_DOMAIN.into(), true))
        }
    }

    async fn incr(&self, fields: Vec<(String, i64)>) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        let counters = self.keys.named("counters");
        for (f, n) in &fields {
            pipe.hincr(&counters, f, *n).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await
    }

    /// Keeps a count for when Redis is back.
    fn keep(&self, field: String) {
        *lock(&self.pending).entry(field).or_default() += 1;
    }

    /// Adds the counts kept while Redis was away, if it is back, before the process ends.
    pub async fn close(&self) {
        // Held to the end: no probe takes the counts out after this one.
        let _probing = self.probing.lock().await;
        if !lock(&self.pending).is_empty() {
            self.probe_held().await;
        }
        let lost: i64 = lock(&self.pending).values().sum();
        if lost > 0 {
            tracing::warn!(
                callbacks = lost,
                "redis is unreachable: counts of refused and failed callbacks are lost"
            );
        }
    }

    /// Checks both connections (so that a broken one is found and reconnected before a
    /// callback or a scrape needs it) and adds the counts kept while Redis was away.
    async fn probe(&self) {
        let _probing = self.probing.lock().await;
        self.probe_held().await;
    }

    async fn probe_held(&self) {
        // The scrapes' connection only reconnects; its state is not the callbacks'.
        let _ = redis::cmd("PING")
            .query_async::<String>(&mut self.reads.clone())
            .await;
        let pending: Vec<(String, i64)> = lock(&self.pending).drain().collect();
        let result = match redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
        {
            Ok(_) if pending.is_empty() => Ok(()),
            Ok(_) => self.incr(pending.clone()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.healthy(),
            Err(e) => {
                let mut kept = lock(&self.pending);
                for (f, n) in pending {
                    *kept.entry(f).or_default() += n;
                }
                drop(kept);
                self.failing(&format!("redis: {e}"));
            }
        }
    }

    /// Reads the counters' hash and the live streams' in slices (`HSCAN`), so that neither
    /// Redis nor this runtime's worker spends a stretch of milliseconds on one reply while
    /// callbacks wait: with 1,000 domains the counters' hash has tens of thousands of fields,
    /// and one `HGETALL` held Redis for 17-19 ms (the live streams' 3,000 fields, 0.8 ms). Each
    /// field is still read whole, and every counter only grows, so a page never shows a counter
    /// going back; a histogram's `_sum` may be a callback or so apart from its buckets, and a
    /// stream that moved between two slices may be counted live under both labels or neither,
    /// for one page, as between any two reads. The decoding runs on the blocking pool.
    async fn read_view(&self) -> RedisResult<View> {
        let mut conn = self.reads.clone();
        let live = scan(&mut conn, &self.keys.named("live")).await?;
        let counters = scan(&mut conn, &self.keys.named("counters")).await?;
        let last: Option<i64> = redis::cmd("GET")
            .arg(self.keys.named("last_callback_ms"))
            .query_async(&mut conn)
            .await?;
        tokio::task::spawn_blocking(move || decode(counters, live, last))
            .await
            .map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::ClientError,
                    "decoding the counters",
                    e.to_string(),
                ))
            })
    }

    fn healthy(&self) {
        let was = lock(&self.fault).take();
        if let Some(was) = was {
            let (seconds, refused) = Outage::end(&mut lock(&self.outage));
            tracing::info!(was = %was, seconds, refused, "redis recovered");
        }
    }

    fn failing(&self, message: &str) {
        let mut fault = lock(&self.fault);
        if !fault.as_deref().is_some_and(|f| same_cause(f, message)) {
            tracing::error!(error = %message, "redis failing: callbacks are refused with 503 until it recovers");
        }
        *fault = Some(message.to_owned());
        Outage::begin(&mut lock(&self.outage));
    }
}

impl ViewSource for RedisLedger {
    /// Nothing until Redis has been read once: zeros would read as counter resets.
    fn fill(&self, frame: &mut Frame) {
        let cached = lock(&self.view);
        if cached.0.is_some() {
            frame.fill(&cached.1.live, &cached.1.counters);
        }
    }
}

/// Every field of the hash `key`, [`SCAN_COUNT`] at a time. By hand rather than with the
/// crate's scan iterator, which (without its `safe_iterators` feature) would end quietly on a
/// failed step: a page with part of the counters missing would look like counters going back.
async fn scan(conn: &mut ConnectionManager, key: &str) -> RedisResult<Vec<(String, i64)>> {
    let mut fields = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, slice): (u64, Vec<(String, i64)>) = redis::cmd("HSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        fields.extend(slice);
        if next == 0 {
            return Ok(fields);
        }
        cursor = next;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether two failures have one cause, for logging a cause once: the redis crate words one
/// broken connection "broken pipe" or "Broken pipe (os error 32)" depending on where it found
/// it, and an outage's start logged the two in turn, three lines in a millisecond.
fn same_cause(a: &str, b: &str) -> bool {
    let plain = |m: &str| {
        m.split(" (os error")
            .next()
            .unwrap_or(m)
            .to_ascii_lowercase()
    };
    plain(a) == plain(b)
}

#[cfg(test)]
mod tests {
    use super::same_cause;

    #[test]
    fn a_cause_worded_two_ways_is_one_cause() {
        assert!(same_cause(
            "redis: broken pipe",
            "redis: Broken pipe (os error 32)"
        ));
        assert!(!same_cause(
            "redis: broken pipe",
            "redis: Reconnecting failed: Connection refused (os error 111)"
        ));
    }
}
