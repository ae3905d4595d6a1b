//! `load`: drives a running exporter with correctly signed callbacks and measures it.
//!
//! Every request is a new event, so nothing is a duplicate: stream `k` is pushed under a session
//! of its own and then disconnected (`--push-only` leaves it live), spread over `--domains` push
//! domains, both areas and a mix of disconnect codes. Session sequences are scattered 64-bit
//! numbers like Tencent's, not in arrival order, so the store's indexes see realistic inserts.
//! Each of `--concurrency` connections is kept alive and sends one request at a time.
//!
//! Without `--rate` every connection sends its next request as soon as the previous one is
//! answered (closed loop): the rate reached is the exporter's maximum. With `--rate` requests are
//! sent on a fixed schedule whatever the answers take (open loop); a request that goes out late
//! because every connection was busy has its latency counted from when it was due, so a stall of
//! the exporter shows in the percentiles instead of slowing the load down. (A disconnect is due
//! no earlier than the answer to its push, which it always follows.)
//!
//! Layout: the plan, the bodies and the workers are here; `client` is the HTTP/1.1 client,
//! `report` what a run measured and how it is printed, `timeline` the `--latency-log` file.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::LoadArgs;
use crate::signature::sign;
use client::{Connection, Target};
use report::{cpu_seconds, open_fds, rss_kib, Cpu, Rss, Summary, Tally, Usage};

mod client;
mod report;
mod timeline;

/// `push_duration` of the disconnects, in milliseconds: spread over the histogram's buckets.
const PUSH_DURATIONS_MS: [i64; 12] = [
    5_000,
    20_000,
    45_000,
    240_000,
    720_000,
    1_500_000,
    3_000_000,
    5_400_000,
    10_800_000,
    21_600_000,
    43_200_000,
    108_000_000,
];

/// What every connection shares.
struct Plan {
    /// Where the callbacks are posted.
    target: Target,
    /// Key the callbacks are signed with; `None` sends them without `sign`.
    key: Option<String>,
    /// Push domains the streams are spread over (`--domains`).
    domains: u64,
    /// Requests per stream: 2 (push, disconnect) or 1 (push only).
    per_stream: u64,
    /// Stop after this many requests.
    limit: Option<u64>,
    /// Stop claiming work at this instant.
    end: Instant,
    /// Seconds between two scheduled requests (open loop).
    interval: Option<f64>,
    /// When the run began: the open loop's schedule and the progress lines count from it.
    start: Instant,
    /// Added to the stream number, then scattered by [`mix`] (a bijection, so still unique), to
    /// make the session `sequence`; random per run.
    sequence_base: u64,
    /// Random per run, in every stream id: runs against one exporter do not share streams.
    run_id: u32,
    /// Next stream to claim.
    next_stream: AtomicU64,
    /// Requests answered or failed so far (for progress, and what was not sent).
    done: AtomicU64,
    /// Whether each request's send time and latency are kept (`--latency-log`): they cost 16
    /// bytes a request, which a long run at a high rate should not pay for nothing.
    timeline: bool,
}

impl Plan {
    /// When request `index` is due on the open loop's schedule; `None` when it does not fall
    /// within the run (at or past its end, or past what the clock can count: `--rate 1e-300`).
    fn due(&self, interval: f64, index: u64) -> Option<Instant> {
        Duration::try_from_secs_f64(index as f64 * interval)
            .ok()
            .and_then(|after| self.start.checked_add(after))
            .filter(|due| *due < self.end)
    }

    /// How many requests fall due within the run on the open loop's schedule (`None` in a closed
    /// loop): the first `n` indexes, as `due` is monotonic.
    fn due_in_run(&self) -> Option<u64> {
        let interval = self.interval?;
        let window = (self.end - self.start).as_secs_f64();
        // A bound past the last due index (float rounding moves it by one at most); the cast
        // saturates for rates beyond counting.
        let mut past = ((window / interval).ceil() as u64).saturating_add(2);
        if let Some(limit) = self.limit {
            past = past.min(limit);
        }
        let mut due = 0;
        while due < past {
            let mid = due + (past - due) / 2;
            if self.due(interval, mid).is_some() {
                due = mid + 1;
            } else {
                past = mid;
            }
        }
        Some(due)
    }
}

/// splitmix64's finalizer: a bijection on u64 that scatters consecutive numbers (the session
/// sequences of the load, and of `examples/state_memory.rs`).
pub fn mix(k: u64) -> u64 {
    let mut x = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn errcode_of(k: u64) -> i64 {
    let total: u64 = crate::errcode::TRAFFIC_MIX.iter().map(|(_, w)| w).sum();
    let mut pick = mix(k) % total;
    for (code, weight) in crate::errcode::TRAFFIC_MIX {
        if pick < weight {
            return code;
        }
        pick -= weight;
    }
    1
}

/// Builds the bodies of one connection; the sign is computed once a second, not per request.
struct Bodies {
    /// The run's settings: domains, key, sequence base and run id.
    plan: Arc<Plan>,
    /// The last `t` signed and its `sign`, reused while `t` (whole seconds) stays the same.
    signed: Option<(i64, String)>,
}

impl Bodies {
    fn body(&mut self, k: u64, push: bool) -> String {
        let plan = &self.plan;
        let domain = k % plan.domains;
        // Each domain gets streams in both areas, over every mainland and many overseas set_ids.
        let round = k / plan.domains;
        let set_id = if round.is_multiple_of(2) {
            1 + (round / 2) % 6
        } else {
            7 + (round / 2) % 194
        };
        let now = crate::ledger::now_secs();
        // Like Tencent: valid until ten minutes after the event.
        let t = now + 600;
        let mut body = String::with_capacity(512);
        let _ = write!(
            body,
            r#"{{"app":"push{domain}.load.example.com","appid":12345678,"appname":"live","channel_id":"load_{run:08x}_{k}","stream_id":"load_{run:08x}_{k}","event_type":{event_type},"event_time":{now},"sequence":"{sequence}","set_id":{set_id},"node":"100.121.160.92","user_ip":"119.29.94.245","stream_param":"","#,
            run = plan.run_id,
            event_type = u8::from(push),
            sequence = mix(plan.sequence_base.wrapping_add(k)),
        );
        if push {
            body.push_str(r#""errcode":0,"errmsg":"ok","#);
        } else {
            let errcode = errcode_of(k);
            let duration = PUSH_DURATIONS_MS[(mix(k) >> 32) as usize % PUSH_DURATIONS_MS.len()];
            let _ = write!(
                body,
                r#""errcode":{errcode},"errmsg":"load test disconnect","push_duration":"{duration}","#
            );
        }
        let _ = write!(body, r#""t":{t}"#);
        if let Some(key) = &plan.key {
            if self.signed.as_ref().map(|(signed_t, _)| *signed_t) != Some(t) {
                self.signed = Some((t, sign(key, t)));
            }
            let (_, signature) = self.signed.as_ref().expect("just signed");
            let _ = write!(body, r#","sign":"{signature}""#);
        }
        body.push('}');
        body
    }
}

pub async fn run(args: LoadArgs) -> Result<(), String> {
    if args.domains == 0 {
        return Err("--domains must be at least 1".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err("--rate must be a positive number of requests per second".into());
        }
    }
    let key = args.keys.signing_key()?;
    let target = Target::parse(&args.target).await?;

    let mut rng = rand::rng();
    let run_id: u32 = rng.random();
    let start = Instant::now();
    let start_monotonic = timeline::monotonic_seconds();
    let plan = Arc::new(Plan {
        target,
        key,
        domains: args.domains as u64,
        per_stream: if args.push_only { 1 } else { 2 },
        limit: args.requests,
        end: match args.requests {
            Some(_) => start + Duration::from_secs(365 * 24 * 3600),
            None => start + args.duration,
        },
        interval: args.rate.map(|r| 1.0 / r),
        start,
        sequence_base: u64::from(rng.random::<u32>()) << 32,
        run_id,
        next_stream: AtomicU64::new(0),
        done: AtomicU64::new(0),
        timeline: args.latency_log.is_some(),
    });

    let rss = Arc::new(Mutex::new(None::<Rss>));
    let sampler = args.pid.map(|pid| {
        let rss = rss.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(kib) = rss_kib(pid) else { continue };
                let mut r = rss.lock().expect("rss lock");
                let r = r.get_or_insert(Rss {
                    start_kib: kib,
                    ..Rss::default()
                });
                r.max_kib = r.max_kib.max(kib);
                r.end_kib = kib;
            }
        })
    });
    // Wait for the first sample, so the start figure is from before the load.
    if let Some(pid) = args.pid {
        if rss_kib(pid).is_none() {
            return Err(format!("cannot read /proc/{pid}/status"));
        }
        while rss.lock().expect("rss lock").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let intervals = Arc::new(Mutex::new(Vec::<f64>::new()));
    let progress = (!args.progress.is_zero()).then(|| {
        let (plan, rss, intervals, every) =
            (plan.clone(), rss.clone(), intervals.clone(), args.progress);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let mut last = 0;
            loop {
                tick.tick().await;
                let done = plan.done.load(Ordering::Relaxed);
                let rate = (done - last) as f64 / every.as_secs_f64();
                last = done;
                intervals.lock().expect("intervals lock").push(rate);
                let mem = match *rss.lock().expect("rss lock") {
                    Some(r) => format!(", exporter RSS {:.1} MiB", r.end_kib as f64 / 1024.0),
                    None => String::new(),
                };
                eprintln!(
                    "{:>6.0} s  {done:>10} requests  {rate:>9.0} requests/s{mem}",
                    plan.start.elapsed().as_secs_f64()
                );
            }
        })
    });

    let cpu_before = (
        cpu_seconds(None),
        args.pid.and_then(|pid| cpu_seconds(Some(pid))),
    );
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(plan.clone())))
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        tally.merge(
            w.await
                .map_err(|e| format!("a connection task failed: {e}"))?,
        );
    }
    // A run of `--duration` lasts that long even when its last request went out early (at a
    // low `--rate`, the next one would have been due past the end): the rate is over the run.
    let elapsed = match args.requests {
        Some(_) => start.elapsed(),
        None => start.elapsed().max(args.duration),
    };
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(s) = sampler {
        s.abort();
    }
    let fds = args.pid.and_then(open_fds);
    let cpu = cpu_used(cpu_before, args.pid, start.elapsed());
    let rss = *rss.lock().expect("rss lock");
    let intervals = intervals.lock().expect("intervals lock").clone();

    if let Some(path) = &args.latency_log {
        let requests = std::mem::take(&mut tally.timeline);
        timeline::write(path, start_monotonic, requests)
            .map_err(|e| format!("--latency-log {}: {e}", path.display()))?;
    }

    let unsent = plan.due_in_run().map_or(0, |due| {
        due.saturating_sub(plan.done.load(Ordering::Relaxed))
    });
    let usage = Usage { rss, fds, cpu };
    let summary = Summary::new(&args, tally, unsent, elapsed, usage, &intervals);
    if args.json {
        println!("{}", summary.json());
    } else {
        summary.print();
    }
    if summary.failed() {
        return Err("some callbacks were not answered 200 (see above)".into());
    }
    Ok(())
}

/// The cores used since `before` (this process's CPU seconds, and the `--pid` process's) by
/// this process and by `pid`, over `elapsed`.
fn cpu_used(
    before: (Option<f64>, Option<f64>),
    pid: Option<u32>,
    elapsed: Duration,
) -> Option<Cpu> {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let generator = (cpu_seconds(None)? - before.0?) / seconds;
    let exporter = pid
        .and_then(|pid| cpu_seconds(Some(pid)))
        .zip(before.1)
        .map(|(after, before)| (after - before) / seconds);
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(Cpu {
        generator,
        exporter,
        machine,
    })
}

/// One keep-alive connection: claims streams and sends their callbacks until the plan ends.
async fn worker(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let mut connection = Connection::new(&plan.target);
    let mut bodies = Bodies {
        plan: plan.clone(),
        signed: None,
    };
    'claim: loop {
        let k = plan.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut answered = None;
        for step in 0..plan.per_stream {
            let index = k * plan.per_stream + step;
            if plan.limit.is_some_and(|limit| index >= limit) {
                break 'claim;
            }
            let due = match plan.interval {
                Some(interval) => match plan.due(interval, index) {
                    Some(due) => Some(due),
                    None => break 'claim,
                },
                None => None,
            };
            // A disconnect cannot go out before its push is answered: it is due then at the
            // earliest, so the push's latency is not counted a second time.
            let due = due.map(|due| answered.map_or(due, |answered| due.max(answered)));
            let sent = match due {
                Some(due) if due > Instant::now() => {
                    tokio::time::sleep_until(due.into()).await;
                    // Timer lateness is ours, not the exporter's: count from the actual send.
                    Instant::now()
                }
                // Due within the run, behind schedule and still not sent at its end: the target
                // did not keep up. Such a backlog is not sent after the end (the run would last
                // as long as it takes); the summary counts it as unsent.
                Some(due) if Instant::now() >= plan.end && due.elapsed() > LATE => break 'claim,
                Some(due) => {
                    // Behind schedule: the wait for a free connection is part of the latency.
                    if due.elapsed() > LATE {
                        tally.late += 1;
                    }
                    due
                }
                None if Instant::now() >= plan.end => break 'claim,
                None => Instant::now(),
            };
            let push = step == 0;
            let body = bodies.body(k, push);
            let answer = tokio::time::timeout(TIMEOUT, connection.post(body.as_bytes())).await;
            let answer = answer.unwrap_or_else(|_| {
                connection.close();
                Err(format!("no answer within {TIMEOUT:?}"))
            });
            answered = Some(Instant::now());
            match answer {
                Ok(status) => {
                    let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    tally.latencies_us.push(us);
                    if plan.timeline {
                        let since_start = sent.saturating_duration_since(plan.start).as_micros();
                        tally.timeline.push((since_start as u64, us));
                    }
                    *tally.statuses.entry(status).or_default() += 1;
                }
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(e);
                    }
                }
            }
            if push {
                tally.pushes += 1;
            } else {
                tally.disconnects += 1;
            }
            plan.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally
}

/// How far behind its schedule a request must go out to count as sent late (the timer's
/// resolution is a millisecond).
const LATE: Duration = Duration::from_millis(1);

/// How long a request may take before it counts as an error (Tencent waits about 20 s).
const TIMEOUT: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callback::{self, Event};

    fn plan(domains: u64) -> Arc<Plan> {
        let start = Instant::now();
        Arc::new(Plan {
            target: Target {
                address: "127.0.0.1:9".parse().unwrap(),
                head: String::new(),
            },
            key: Some("k".into()),
            domains,
            per_stream: 2,
            limit: None,
            end: start,
            interval: None,
            start,
            sequence_base: 7 << 32,
            run_id: 0xabc,
            next_stream: AtomicU64::new(0),
            done: AtomicU64::new(0),
            timeline: false,
        })
    }

    #[test]
    fn the_schedule_counts_what_falls_due_within_the_run() {
        let due_in_run = |rate: f64, window: Duration, limit: Option<u64>| {
            let mut p = Arc::into_inner(plan(1)).unwrap();
            p.end = p.start + window;
            p.interval = Some(1.0 / rate);
            p.limit = limit;
            p.due_in_run()
        };
        let second = Duration::from_secs(1);
        // Due at 0, 50, ..., 950 ms; at 0, 333 and 667 ms (the next one at the end exactly).
        assert_eq!(due_in_run(20.0, second, None), Some(20));
        assert_eq!(due_in_run(3.0, second, None), Some(3));
        assert_eq!(due_in_run(1e9, second, None), Some(1_000_000_000));
        assert_eq!(due_in_run(1e9, second, Some(5)), Some(5));
        // The second request would be due past what the clock counts: never, and no panic.
        assert_eq!(due_in_run(1e-300, second, None), Some(1));
        assert_eq!(due_in_run(1e30, second, None), Some(u64::MAX));
        assert_eq!(plan(1).due_in_run(), None, "closed loop");
    }

    #[test]
    fn bodies_parse_verify_and_cover_domains_areas_and_errcodes() {
        let mut bodies = Bodies {
            plan: plan(3),
            signed: None,
        };
        let verifier =
            crate::signature::Verifier::new(Some(crate::signature::Keys::from_list("k")), 60, 900);
        let mut domains = std::collections::BTreeSet::new();
        let mut areas = std::collections::BTreeSet::new();
        let mut codes = std::collections::BTreeSet::new();
        let mut sequences = std::collections::BTreeSet::new();
        for k in 0..400 {
            let push = callback::parse(bodies.body(k, true).as_bytes()).unwrap();
            let disconnect = callback::parse(bodies.body(k, false).as_bytes()).unwrap();
            for c in [&push, &disconnect] {
                verifier
                    .verify(c.t, c.sign.as_deref(), crate::ledger::now_secs())
                    .unwrap();
            }
            let Event::Push(p) = push.event else {
                panic!("not a push")
            };
            let Event::Disconnect {
                session,
                errcode,
                push_duration_ms,
            } = disconnect.event
            else {
                panic!("not a disconnect")
            };
            assert_eq!(p.sequence, session.sequence);
            assert_eq!(p.stream, session.stream);
            assert!(push_duration_ms.is_some());
            assert!(sequences.insert(p.sequence));
            domains.insert(p.stream.app);
            areas.insert(p.area);
            codes.insert(errcode);
        }
        assert_eq!(domains.len(), 3);
        assert!(areas.contains(&crate::area::Area::Mainland));
        assert!(areas.contains(&crate::area::Area::Overseas));
        assert!(!areas.contains(&crate::area::Area::Unknown));
        assert!(codes.len() >= 8, "{codes:?}");
    }
}
