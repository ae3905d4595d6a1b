//! Several replicas sharing one truth in Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

async fn replica(redis: &RedisServer) -> Exporter {
    Exporter::start_on(free_port(), vec!["--storage.redis-url".into(), redis.url()]).await
}

/// Waits out the replicas' cache of Redis (a second) and returns their numbers, which must be
/// the same on both.
async fn agreed(a: &Exporter, b: &Exporter) -> Scrape {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut last = None;
    for _ in 0..60 {
        let (sa, sb) = (a.scrape().await, b.scrape().await);
        if sa.exporter_samples() == sb.exporter_samples() {
            return sa;
        }
        last = Some((sa.exporter_samples(), sb.exporter_samples()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replicas disagree: {last:?}");
}

async fn ok(e: &Exporter, body: Value) {
    let answer = e.post(&signed(body)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[tokio::test]
async fn a_disconnect_without_appname_finds_its_session_on_another_replica() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    let d = "paths.example.com";
    ok(&a, on_path(push(d, "s1", "q1", 1), Some("live"))).await;
    ok(&a, on_path(push(d, "s2", "q2", 1), Some("live"))).await;
    // Quoted for Redis's inline commands, which would take the key's own quotes away.
    let places = format!("'tencent_css:places:\"{d}\"'");
    assert_eq!(redis.command(&["HLEN", &places]), ":1");
    let bye = on_path(disconnect(d, "s1", "q1", 1, 1), None);
    ok(&b, bye.clone()).await;
    ok(&a, bye).await;
    let s = agreed(&a, &b).await;
    let mainland = [("domain", d), ("area", "mainland")];
    assert_eq!(s.value("tencent_css_active_streams", &mainland), 1.0);
    assert_eq!(s.callbacks("disconnect", "duplicate"), 1.0);
    // The path's count follows its sessions, and goes with the last one.
    ok(&b, on_path(disconnect(d, "s2", "q2", 1, 1), Some("live"))).await;
    assert_eq!(redis.command(&["EXISTS", &places]), ":0");
    let s = agreed(&a, &b).await;
    assert_eq!(s.value("tencent_css_active_streams", &mainland), 0.0);
}

#[tokio::test]
async fn replicas_share_sessions_retries_and_counters() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    let d = "ha.example.com";

    // Push on A, its disconnect on B.
    ok(&a, push(d, "s1", "q1", 1)).await;
    ok(&b, disconnect(d, "s1", "q1", 1, 1)).await;
    // A retry of the same push, to A then to B: counted once.
    let retry = push(d, "s2", "q2", 9);
    ok(&a, retry.clone()).await;
    ok(&b, retry.clone()).await;
    ok(&a, retry).await;
    // One stream's events alternating replicas: replaced session, older disconnect, then the
    // newer one; and a disconnect that overtakes its push.
    ok(&a, push(d, "s3", "q3a", 1)).await;
    ok(&b, push(d, "s3", "q3b", 1)).await;
    ok(&a, disconnect(d, "s3", "q3a", 1, 21)).await;
    let s = agreed(&a, &b).await;
    assert_eq!(
        s.value(
            "tencent_css_active_streams",
            &[("domain", d), ("area", "mainland")]
        ),
        1.0
    );
    ok(&b, disconnect(d, "s3", "q3b", 1, 12)).await;
    ok(&a, disconnect(d, "s4", "q4", 1, 8)).await;
    ok(&b, push(d, "s4", "q4", 1)).await;

    let s = agreed(&a, &b).await;
    let mainland = [("domain", d), ("area", "mainland")];
    let overseas = [("domain", d), ("area", "overseas")];
    assert_eq!(s.get("tencent_css_active_streams", &mainland), Some(0.0));
    assert_eq!(s.get("tencent_css_active_streams", &overseas), Some(1.0));
    assert_eq!(s.value("tencent_css_pushes_total", &mainland), 4.0);
    assert_eq!(s.value("tencent_css_pushes_total", &overseas), 1.0);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 4.0);
    assert_eq!(
        s.value(
            "tencent_css_disconnects_total",
            &[("errcode", "21"), ("reason", "operator")]
        ),
        1.0
    );
    assert_eq!(s.callbacks("push", "duplicate"), 2.0);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        9.0
    );
    assert_eq!(s.sum("tencent_css_push_duration_seconds_count", &[]), 4.0);
    assert!(
        s.get("tencent_css_last_callback_timestamp_seconds", &[])
            .unwrap()
            > 0.0
    );

    // Rejections on either replica are counted once, globally.
    assert_eq!(
        a.post(&signed_with(sample("push"), "forged")).await.status,
        401
    );
    let s = agreed(&a, &b).await;
    assert_eq!(s.callbacks("push", "bad_signature"), 1.0);
}

/// A replica whose clock was a day ahead wrote the last callback's time; once clocks are right,
/// the next callback brings it back, so the no-callbacks alert can fire again.
#[tokio::test]
async fn the_last_callback_time_comes_back_from_a_clock_that_was_ahead() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = replica(&redis).await;
    // Whole milliseconds, as the exporter keeps them.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
        / 1000.0;
    let ahead = ((now + 86_400.0) * 1000.0) as i64;
    assert_eq!(
        redis.command(&["SET", "tencent_css:last_callback_ms", &ahead.to_string()]),
        "+OK"
    );
    ok(&a, push("clock.example.com", "s1", "q1", 1)).await;
    let s = agreed(&a, &a).await;
    let last = s.value("tencent_css_last_callback_timestamp_seconds", &[]);
    assert!((now..now + 60.0).contains(&last), "{last} against {now}");
}

#[tokio::test]
async fn replicas_share_the_domain_cap() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let start = |redis: &RedisServer| {
        Exporter::start_on(
            free_port(),
            vec![
                "--storage.redis-url".into(),
                redis.url(),
                "--metrics.max-domains".into(),
                "2".into(),
            ],
        )
    };
    let (a, b) = (start(&redis).await, start(&redis).await);
    ok(&a, push("one.example.com", "s", "1", 1)).await;
    ok(&b, push("two.example.com", "s", "2", 1)).await;
    ok(&a, push("three.example.com", "s", "3", 1)).await;
    ok(&b, push("four.example.com", "s", "4", 1)).await;
    let s = agreed(&a, &b).await;
    assert_eq!(
        s.value("tencent_css_pushes_total", &[("domain", "_other")]),
        2.0
    );
    assert_eq!(s.get("tencent_css_domains_overflow_total", &[]), Some(2.0));
}

/// The sessions of the fault tests: a push and (for most) a disconnect each.
fn events(n: usize) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for i in 0..n {
        let domain = format!("d{}.example.com", i % 3);
        let (stream, seq) = (format!("s{i}"), format!("{}", 5_000_000 + i));
        let set_id = if i % 2 == 0 { 1 } else { 50 };
        out.push((
            domain.clone(),
            "push".to_string(),
            push(&domain, &stream, &seq, set_id),
        ));
        if i % 5 != 0 {
            let code = [1, 12, 18, 21][i % 4];
            out.push((
                domain.clone(),
                code.to_string(),
                disconnect(&domain, &stream, &seq, set_id, code),
            ));
        }
    }
    out
}

/// What the metrics must say once every event is recorded exactly once.
fn check_exact(s: &Scrape, n: usize) {
    let all = events(n);
    let pushes = all.iter().filter(|e| e.1 == "push").count() as f64;
    let disconnects = all.len() as f64 - pushes;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), pushes);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), disconnects);
    assert_eq!(
        s.sum("tencent_css_active_streams", &[]),
        pushes - disconnects
    );
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        all.len() as f64
    );
    for domain in ["d0.example.com", "d1.example.com", "d2.example.com"] {
        let p = all
            .iter()
            .filter(|e| e.0 == domain && e.1 == "push")
            .count() as f64;
        assert_eq!(
            s.sum("tencent_css_pushes_total", &[("domain", domain)]),
            p,
            "{domain}"
        );
        for code in ["1", "12", "18", "21"] {
            let d = all.iter().filter(|e| e.0 == domain && e.1 == code).count() as f64;
            assert_eq!(
                s.sum(
                    "tencent_css_disconnects_total",
                    &[("domain", domain), ("errcode", code)]
                ),
                d,
                "{domain} {code}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_nothing_acknowledged() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (mut a, b) = (replica(&redis).await, replica(&redis).await);
    const N: usize = 1500;
    let events = Arc::new(events(N));
    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(Mutex::new(0usize));
    let mut workers = Vec::new();
    for w in 0..12 {
        let (ca, cb) = (a.client.clone(), b.client.clone());
        let (events, next, retried) = (events.clone(), next.clone(), retried.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((_, _, body)) = events.get(i) else { return };
                // Half the workers go through A, which dies: like a load balancer, they then
                // send Tencent's retry to B.
                let first = if w % 2 == 0 { &ca } else { &cb };
                let first_ok = matches!(first.try_post(&signed(body.clone())).await, Ok(r) if r.status == 200);
                if !first_ok {
                    *retried.lock().unwrap() += 1;
                    loop {
                        if matches!(cb.try_post(&signed(body.clone())).await, Ok(r) if r.status == 200) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    eventually(Duration::from_secs(60), "traffic", || async {
        next.load(Ordering::SeqCst) > events.len() / 3
    })
    .await;
    a.crash();
    for w in workers {
        w.await.unwrap();
    }
    assert!(*retried.lock().unwrap() > 0, "the kill hit no request");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = b.scrape().await;
    check_exact(&s, N);
    // Events A recorded but could not answer were recognised when retried on B.
    let duplicates = s.sum("tencent_css_callbacks_total", &[("outcome", "duplicate")]);
    assert!(duplicates <= *retried.lock().unwrap() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_503_then_both_replicas_recover() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    const N: usize = 40;
    let events = events(N);
    let (before, after) = events.split_at(events.len() / 2);
    for (i, (_, _, body)) in before.iter().enumerate() {
        ok(if i % 2 == 0 { &a } else { &b }, body.clone()).await;
    }

    redis.stop();
    for (i, (_, _, body)) in after.iter().enumerate().take(4) {
        let r = if i % 2 == 0 { &a } else { &b };
        let answer = r.post(&signed(body.clone())).await;
        assert_eq!(answer.status, 503, "{}", answer.body);
    }
    for r in [&a, &b] {
        let ready = r.ready().await;
        assert_eq!(ready.status, 503);
        assert!(ready.body.contains("redis"), "{}", ready.body);
        let s = r.scrape().await;
        assert_eq!(s.value("tencent_css_exporter_storage_ready", &[]), 0.0);
        // Each replica sent two of the four callbacks into the outage.
        assert_eq!(
            s.value("tencent_css_exporter_storage_commit_failures_total", &[]),
            2.0
        );
    }

    redis.restart().await;
    for r in [&a, &b] {
        eventually(
            Duration::from_secs(15),
            "readiness after redis is back",
            || async { r.ready().await.status == 200 },
        )
        .await;
    }
    // Tencent retries what got 503, and sends the rest.
    for (i, (_, _, body)) in after.iter().enumerate() {
        ok(if i % 2 == 0 { &b } else { &a }, body.clone()).await;
    }
    let s = agreed(&a, &b).await;
    check_exact(&s, N);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "error")]),
        4.0
    );
    assert_eq!(s.value("tencent_css_exporter_storage_ready", &[]), 1.0);
    // Every callback a replica recorded is a transaction of its own in Redis: one commit each.
    for r in [&a, &b] {
        let s = r.scrape().await;
        let commits = s.value("tencent_css_exporter_storage_commits_total", &[]);
        let failures = s.value("tencent_css_exporter_storage_commit_failures_total", &[]);
        assert_eq!(
            s.value(
                "tencent_css_exporter_storage_committed_callbacks_total",
                &[]
            ),
            commits - failures
        );
        assert!(commits - failures >= N as f64 / 2.0, "{commits} commits");
        assert_eq!(
            s.value(
                "tencent_css_exporter_storage_commit_duration_seconds_count",
                &[]
            ),
            commits
        );
    }
}

/// A replica that serves no callback still finds Redis gone (not ready) and back (ready), and
/// the first callback after Redis restarted is recorded, not refused over a connection that
/// broke while idle.
#[tokio::test]
async fn an_idle_replica_finds_redis_gone_and_back_by_itself() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let a = replica(&redis).await;
    let events = events(2);
    ok(&a, events[0].2.clone()).await;

    redis.stop();
    eventually(
        Duration::from_secs(20),
        "not ready while redis is down",
        || async { a.ready().await.status == 503 },
    )
    .await;
    redis.restart().await;
    eventually(
        Duration::from_secs(20),
        "ready once redis is back",
        || async { a.ready().await.status == 200 },
    )
    .await;
    ok(&a, events[1].2.clone()).await;
}

/// A replica started shortly before Redis goes away serves the numbers it read at its start,
/// not zeros, which Prometheus would take for counter resets.
#[tokio::test]
async fn a_new_replica_serves_what_redis_held_when_it_started() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let a = replica(&redis).await;
    let events = events(3);
    for (_, _, body) in &events {
        ok(&a, body.clone()).await;
    }
    let b = replica(&redis).await;
    redis.stop();
    let s = b.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 3.0);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        events.len() as f64
    );
}

/// An outage of Redis is logged when it begins and when it ends, with the callbacks it
/// refused; not once for each of them.
#[tokio::test]
async fn an_outage_of_redis_is_logged_once_not_for_each_refused_callback() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("exporter.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let args = vec!["--storage.redis-url".into(), redis.url()];
    let a = Exporter::start_logging_to(free_port(), args, log.into()).await;
    let events = events(3);
    ok(&a, events[0].2.clone()).await;

    redis.stop();
    // A push and its disconnect.
    for (_, _, body) in &events[1..3] {
        let answer = a.post(&signed(body.clone())).await;
        assert_eq!(answer.status, 503, "{}", answer.body);
    }
    redis.restart().await;
    eventually(
        Duration::from_secs(20),
        "ready once redis is back",
        || async { a.ready().await.status == 200 },
    )
    .await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    // The cause may change once (a broken connection, then a refused one).
    assert!(assert_outage_logged(&log, "redis", 2) >= 1, "{log}");
}

/// A callback whose transition outlives its request (Redis hung past `--web.request-timeout`)
/// is answered 503 and still ends: its failure is counted and the replica is not ready, as
/// when Redis answers with an error.
#[tokio::test]
async fn a_callback_given_up_at_its_deadline_is_still_counted_as_an_error() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let args = vec![
        "--storage.redis-url".into(),
        redis.url(),
        "--web.request-timeout".into(),
        "1s".into(),
    ];
    let a = Exporter::start_on(free_port(), args).await;
    let (_, _, push) = events(1).remove(0);
    redis.pause();
    let answer = a.post(&signed(push.clone())).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    eventually(
        Duration::from_secs(20),
        "not ready while redis hangs",
        || async { a.ready().await.status == 503 },
    )
    .await;
    redis.resume();
    eventually(Duration::from_secs(20), "the error counted", || async {
        a.ready().await.status == 200 && {
            let s = a.scrape().await;
            s.callbacks("push", "error") == 1.0
        }
    })
    .await;
    // Tencent's retry is recorded.
    ok(&a, push).await;
}

/// A session that outlives the dedup window: its push key, set at the push, has expired by the
/// time it ends, and is set again then, so a retry of the push after the disconnect is still a
/// duplicate (as with the local store), not a second push.
#[tokio::test]
async fn a_push_is_remembered_for_a_window_after_its_session_ends() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let replica = Exporter::start_on(
        free_port(),
        vec![
            "--storage.redis-url".into(),
            redis.url(),
            "--callback.dedup-window".into(),
            "1s".into(),
        ],
    )
    .await;
    let d = "long.example.com";
    let hello = push(d, "s1", "q1", 1);
    ok(&replica, hello.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ok(&replica, disconnect(d, "s1", "q1", 1, 1)).await;
    ok(&replica, hello).await;

    // Past the replica's one-second cache of the numbers.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = replica.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.callbacks("push", "duplicate"), 1.0);
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 0.0);
}

/// With many domains the counters' hash is read in slices: every series must still be read,
/// each once, and agree between a replica that wrote it and one that only reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_reads_every_counter_of_many_domains_in_slices() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (writer, reader) = (replica(&redis).await, replica(&redis).await);
    const DOMAINS: usize = 60;
    const CODES: [i64; 10] = [1, 2, 3, 4, 35, 21, 8, 20, 12, 13];
    // One push duration per errcode, each in its own bucket of the histogram.
    const SECONDS: [u64; 10] = [5, 20, 45, 120, 600, 1200, 2700, 5400, 10800, 21600];
    const BOUNDS: [&str; 10] = [
        "10", "30", "60", "300", "900", "1800", "3600", "7200", "14400", "28800",
    ];
    let mut bodies = Vec::new();
    for d in 0..DOMAINS {
        for (set_id, area) in [(1, "m"), (50, "o")] {
            for (k, code) in CODES.iter().enumerate() {
                let (domain, stream) = (format!("d{d}.example.com"), format!("s{d}{area}{k}"));
                let mut body = disconnect(&domain, &stream, &stream, set_id, *code);
                body["push_duration"] = json!((SECONDS[k] * 1000).to_string());
                bodies.push(signed(body));
            }
        }
    }
    let bodies = Arc::new(Mutex::new(bodies));
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (bodies, writer) = (bodies.clone(), writer.client.clone());
            tokio::spawn(async move {
                loop {
                    let Some(body) = bodies.lock().unwrap().pop() else {
                        return;
                    };
                    let answer = writer.post(&body).await;
                    assert_eq!(answer.status, 200, "{}", answer.body);
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }

    // The hash is well past what one `HSCAN` step returns (and past Redis's compact encoding,
    // which `HSCAN` returns whole).
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: usize = redis::cmd("HLEN")
        .arg("tencent_css:counters")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(fields > 2_500, "{fields} fields");

    let s = agreed(&writer, &reader).await;
    assert_eq!(
        s.sum("tencent_css_disconnects_total", &[]),
        (DOMAINS * 2 * CODES.len()) as f64
    );
    let total: u64 = SECONDS.iter().sum();
    for d in 0..DOMAINS {
        let domain = format!("d{d}.example.com");
        for area in ["mainland", "overseas"] {
            let at = [("domain", domain.as_str()), ("area", area)];
            for (k, code) in CODES.iter().enumerate() {
                let code = code.to_string();
                let labels = [at[0], at[1], ("errcode", code.as_str())];
                assert_eq!(s.sum("tencent_css_disconnects_total", &labels), 1.0);
                let bucket = [at[0], at[1], ("le", BOUNDS[k])];
                assert_eq!(
                    s.value("tencent_css_push_duration_seconds_bucket", &bucket),
                    (k + 1) as f64,
                    "{domain} {area} le={}",
                    BOUNDS[k]
                );
            }
            assert_eq!(
                s.value("tencent_css_push_duration_seconds_sum", &at),
                total as f64
            );
        }
    }

    // Scrapes that find the copy old at the same moment share one read of Redis.
    let one = hscans_of(&mut conn, &reader, 1).await;
    assert!(one >= 3, "{one} slices");
    assert_eq!(hscans_of(&mut conn, &reader, 8).await, one);
}

/// The live streams' hash is read in slices too: every (domain, area) with a live stream must
/// be read, each once.
#[tokio::test]
async fn a_replica_reads_every_live_count_of_many_domains_in_slices() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (writer, reader) = (replica(&redis).await, replica(&redis).await);
    const DOMAINS: usize = 120;
    let domain = |d: usize| format!("live{d}.example.com");
    for d in 0..DOMAINS {
        for (i, set_id) in [1, 50].into_iter().enumerate() {
            let sequence = (7_000_000 + 2 * d + i).to_string();
            let stream = format!("s{sequence}");
            ok(&writer, push(&domain(d), &stream, &sequence, set_id)).await;
        }
    }
    // Past what one `HSCAN` step returns, and past Redis's compact encoding (returned whole).
    let fields = redis.command(&["HLEN", "tencent_css:live"]);
    assert_eq!(fields, format!(":{}", 2 * DOMAINS));

    let s = agreed(&writer, &reader).await;
    assert_eq!(
        s.sum("tencent_css_active_streams", &[]),
        (2 * DOMAINS) as f64
    );
    for d in 0..DOMAINS {
        for area in ["mainland", "overseas"] {
            let labels = [("domain", domain(d)), ("area", area.to_string())];
            let labels = labels.each_ref().map(|(k, v)| (*k, v.as_str()));
            assert_eq!(s.value("tencent_css_active_streams", &labels), 1.0);
        }
    }
    // Read in slices, not whole: one read after the copy is old asks for no hash at once.
    assert_eq!(redis.command(&["CONFIG", "RESETSTAT"]), "+OK");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reader.scrape().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_hscan:"), "{stats}");
    assert!(!stats.contains("cmdstat_hgetall:"), "{stats}");
}

/// The `HSCAN`s Redis answered for `scrapes` scrapes sent together, once the copy is old.
async fn hscans_of(
    conn: &mut redis::aio::MultiplexedConnection,
    exporter: &Exporter,
    scrapes: usize,
) -> u64 {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let scrapes: Vec<_> = (0..scrapes)
        .map(|_| {
            let client = exporter.client.clone();
            tokio::spawn(async move { client.scrape().await })
        })
        .collect();
    for s in scrapes {
        s.await.unwrap();
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let calls = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hscan:calls="))
        .unwrap_or_else(|| panic!("no HSCAN in {stats}"));
    calls.split(',').next().unwrap().parse().unwrap()
}
