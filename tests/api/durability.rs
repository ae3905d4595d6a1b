//! Durability of the SQLite store: crashes, restarts and storage faults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

fn db_args(dir: &tempfile::TempDir) -> Vec<String> {
    vec![
        "--storage.path".into(),
        dir.path().join("state/exporter.db").display().to_string(),
    ]
}

/// One push session of the crash test and what became of its callbacks.
struct Session {
    domain: String,
    area: &'static str,
    errcode: Option<i64>,
    push: Value,
    disconnect: Option<Value>,
}

fn sessions(n: usize) -> Vec<Session> {
    (0..n)
        .map(|i| {
            let domain = format!("d{}.example.com", i % 4);
            let (set_id, area) = if i % 3 == 0 {
                (9, "overseas")
            } else {
                (2, "mainland")
            };
            let (stream, seq) = (format!("stream{i}"), format!("{}", 9_000_000 + i));
            let errcode = match i % 4 {
                0 => None,
                1 => Some(1),
                2 => Some(12),
                _ => Some(18),
            };
            Session {
                push: push(&domain, &stream, &seq, set_id),
                disconnect: errcode.map(|e| disconnect(&domain, &stream, &seq, set_id, e)),
                domain,
                area,
                errcode,
            }
        })
        .collect()
}

/// What the metrics must say if exactly the events marked `true` were recorded.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    live: BTreeMap<(String, String), f64>,
    pushes: BTreeMap<(String, String), f64>,
    disconnects: BTreeMap<(String, String, String), f64>,
}

fn expected(sessions: &[Session], recorded: &[(bool, bool)]) -> Expected {
    let mut e = Expected::default();
    for (s, (pushed, disconnected)) in sessions.iter().zip(recorded) {
        let da = (s.domain.clone(), s.area.to_string());
        if *pushed {
            *e.pushes.entry(da.clone()).or_default() += 1.0;
        }
        if *pushed && !disconnected {
            *e.live.entry(da.clone()).or_default() += 1.0;
        }
        if *disconnected {
            let code = s.errcode.unwrap().to_string();
            *e.disconnects.entry((da.0, da.1, code)).or_default() += 1.0;
        }
    }
    e
}

fn observed(s: &Scrape) -> Expected {
    let pick = |name: &str| {
        s.matching(name, &[])
            .filter(|x| x.value != 0.0)
            .map(|x| (x.labels.clone(), x.value))
            .collect::<Vec<_>>()
    };
    let da = |l: &BTreeMap<String, String>| (l["domain"].clone(), l["area"].clone());
    Expected {
        live: pick("tencent_css_active_streams")
            .into_iter()
            .map(|(l, v)| (da(&l), v))
            .collect(),
        pushes: pick("tencent_css_pushes_total")
            .into_iter()
            .map(|(l, v)| (da(&l), v))
            .collect(),
        disconnects: pick("tencent_css_disconnects_total")
            .into_iter()
            .map(|(l, v)| {
                (
                    (l["domain"].clone(), l["area"].clone(), l["errcode"].clone()),
                    v,
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut exporter = Exporter::start_on(free_port(), db_args(&dir)).await;
    let sessions = Arc::new(sessions(2000));
    // Per session: (push answer, disconnect answer): Some(true) = 200, Some(false) = no 200.
    let answers = Arc::new(Mutex::new(vec![
        (None::<bool>, None::<bool>);
        sessions.len()
    ]));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, sessions, answers, next) = (
            exporter.client.clone(),
            sessions.clone(),
            answers.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(s) = sessions.get(i) else { return };
                let ok = matches!(client.try_post(&signed(s.push.clone())).await, Ok(a) if a.status == 200);
                answers.lock().unwrap()[i].0 = Some(ok);
                if let Some(d) = &s.disconnect {
                    let ok = matches!(client.try_post(&signed(d.clone())).await, Ok(a) if a.status == 200);
                    answers.lock().unwrap()[i].1 = Some(ok);
                }
            }
        }));
    }
    // Kill it mid-stream: once a good part of the sessions went through, with requests in flight.
    eventually(Duration::from_secs(60), "traffic", || async {
        next.load(std::sync::atomic::Ordering::SeqCst) > 600
    })
    .await;
    exporter.crash();
    for w in workers {
        w.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let acked: Vec<(bool, bool)> = answers
        .iter()
        .map(|(p, d)| (*p == Some(true), *d == Some(true)))
        .collect();
    let sent: Vec<(bool, bool)> = answers
        .iter()
        .map(|(p, d)| (p.is_some(), d.is_some()))
        .collect();
    let n_acked = acked
        .iter()
        .map(|(p, d)| *p as usize + *d as usize)
        .sum::<usize>();
    let n_unanswered = answers
        .iter()
        .map(|(p, d)| (*p == Some(false)) as usize + (*d == Some(false)) as usize)
        .sum::<usize>();
    assert!(
        n_acked > 500,
        "too little traffic before the kill: {n_acked}"
    );
    assert!(n_unanswered > 0, "the kill hit no request in flight");

    let mut exporter = Exporter::start_on(exporter.port, exporter.args.clone()).await;
    let s = exporter.scrape().await;
    let got = observed(&s);
    let floor = expected(&sessions, &acked);
    // Unanswered callbacks may or may not have been committed before the kill; acknowledged ones
    // must all be there.
    for (key, n) in &floor.pushes {
        let have = got.pushes.get(key).copied().unwrap_or(0.0);
        assert!(have >= *n, "pushes {key:?}: {have} < acknowledged {n}");
    }
    for (key, n) in &floor.disconnects {
        let have = got.disconnects.get(key).copied().unwrap_or(0.0);
        assert!(have >= *n, "disconnects {key:?}: {have} < acknowledged {n}");
    }
    let accepted_before = s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]);
    assert!(accepted_before >= n_acked as f64);
    assert!(accepted_before <= (n_acked + n_unanswered) as f64);

    // Tencent retries what got no 200: each is then recorded exactly once.
    for (s, (p, d)) in sessions.iter().zip(&answers) {
        if *p == Some(false) {
            assert_eq!(exporter.post(&signed(s.push.clone())).await.status, 200);
        }
        if *d == Some(false) {
            let body = s.disconnect.clone().unwrap();
            assert_eq!(exporter.post(&signed(body)).await.status, 200);
        }
    }
    let s = exporter.scrape().await;
    assert_eq!(observed(&s), expected(&sessions, &sent));
    let n_sent = sent
        .iter()
        .map(|(p, d)| *p as usize + *d as usize)
        .sum::<usize>();
    assert_eq!(n_sent, n_acked + n_unanswered);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        n_sent as f64,
        "every event recorded exactly once"
    );
    // The retries of events committed just before the kill were recognised as duplicates.
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "duplicate")]),
        accepted_before - n_acked as f64
    );
    exporter.terminate();
}

#[tokio::test]
async fn sigterm_restart_keeps_every_metric() {
    let dir = tempfile::tempdir().unwrap();
    let mut exporter = Exporter::start_on(free_port(), db_args(&dir)).await;
    let d = "restart.example.com";
    for (i, code) in [1, 8, 12, 18, 21].into_iter().enumerate() {
        let (stream, seq) = (format!("s{i}"), format!("q{i}"));
        assert_eq!(
            exporter
                .post(&signed(push(d, &stream, &seq, 1 + i as i64 * 40)))
                .await
                .status,
            200
        );
        assert_eq!(
            exporter
                .post(&signed(disconnect(d, &stream, &seq, 1, code)))
                .await
                .status,
            200
        );
    }
    for i in 0..3 {
        let body = signed(push(d, &format!("live{i}"), &format!("L{i}"), 9));
        assert_eq!(exporter.post(&body).await.status, 200);
        assert_eq!(exporter.post(&body).await.status, 200, "duplicate");
    }
    assert_eq!(
        exporter
            .post(&signed_with(sample("push"), "forged"))
            .await
            .status,
        401
    );
    assert_eq!(
        exporter
            .post(&signed(serde_json::json!({"event_type": 100})))
            .await
            .status,
        200
    );
    assert_eq!(
        exporter
            .post_raw(b"garbage".to_vec(), "text/plain")
            .await
            .status,
        400
    );
    let before = exporter.scrape().await;
    assert_eq!(before.sum("tencent_css_active_streams", &[]), 3.0);

    assert_eq!(exporter.terminate().code(), Some(0));
    let mut exporter = Exporter::start_on(exporter.port, exporter.args.clone()).await;
    let after = exporter.scrape().await;
    assert_eq!(before.exporter_samples(), after.exporter_samples());

    // And the state goes on from there: a retry from before the restart is still a duplicate.
    let retry = signed(push(d, "live0", "L0", 9));
    assert_eq!(exporter.post(&retry).await.status, 200);
    let s = exporter.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 8.0);
    assert_eq!(s.callbacks("push", "duplicate"), 4.0);
    exporter.terminate();
}

/// Runs the binary on `db` until it exits (it is expected to refuse to start).
fn start_refused(db: &std::path::Path) -> std::process::Output {
    binary()
        .env("CSS_CALLBACK_KEY", KEY)
        .args(["--web.listen-address", "127.0.0.1:0", "--storage.path"])
        .arg(db)
        .output()
        .unwrap()
}

#[tokio::test]
async fn corrupt_database_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("exporter.db");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let output = start_refused(&db);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
    // Never a silent reset: the file is untouched.
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x5a; 8192]);
}

#[tokio::test]
async fn database_of_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("exporter.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    let output = start_refused(&db);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("schema version 99"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_answers_503_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let args = db_args(&dir);
    let db = args[1].clone();
    let app = spawn_app_with(AppOptions {
        args,
        ..Default::default()
    })
    .await;
    let d = "locked.example.com";
    assert_eq!(app.post(&signed(push(d, "s", "q1", 1))).await.status, 200);

    // Another writer holds the database.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let bye = signed(disconnect(d, "s", "q1", 1, 1));
    let answer = app.post(&bye).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let ready = app.ready().await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("locked"), "{}", ready.body);
    let s = app.scrape().await;
    assert_eq!(
        s.sum("tencent_css_active_streams", &[]),
        1.0,
        "nothing changed"
    );
    assert_eq!(
        s.matching("tencent_css_disconnects_total", &[]).count(),
        0,
        "the refused event left no series behind"
    );
    assert_eq!(s.callbacks("disconnect", "error"), 1.0);
    // A retry of the push stored before the lock needs nothing stored but its count: it is
    // acknowledged all the same.
    let retry = app.post(&signed(push(d, "s", "q1", 1))).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(app.scrape().await.callbacks("push", "duplicate"), 1.0);

    blocker.execute_batch("ROLLBACK;").unwrap();
    eventually(
        Duration::from_secs(10),
        "readiness after the lock is gone",
        || async { app.ready().await.status == 200 },
    )
    .await;
    // Tencent's retry now goes through, once.
    assert_eq!(app.post(&bye).await.status, 200);
    let s = app.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 0.0);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 1.0);
    app.stop().await.unwrap();
    // The counts themselves were stored once the database was writable again.
    let conn = rusqlite::Connection::open(&db).unwrap();
    for labels in [r#"["disconnect","error"]"#, r#"["push","duplicate"]"#] {
        let stored: i64 = conn
            .query_row(
                "SELECT value FROM current_series WHERE metric = 'callbacks_total' AND labels = ?1",
                [labels],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 1, "{labels}");
    }
}

/// Runs the binary as an unprivileged user when the tests run as root, so file permissions
/// apply to it.
fn unprivileged(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    if unsafe_geteuid() == 0 {
        cmd.uid(65534).gid(65534);
    }
}

fn unsafe_geteuid() -> u32 {
    // `id -u` keeps the tests free of unsafe code and libc bindings.
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test]
async fn read_only_database_answers_503_until_writable_again() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let db = dir.path().join("exporter.db");
    let port = free_port();
    let start = || {
        let mut cmd = binary();
        cmd.env("CSS_CALLBACK_KEY", KEY)
            .args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--storage.path",
            ])
            .arg(&db);
        unprivileged(&mut cmd);
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        Exporter {
            child: cmd.spawn().unwrap(),
            client: Client::new(addr, addr),
            port,
            args: vec![],
        }
    };
    let wait_up = |e: &Exporter| {
        let client = e.client.clone();
        async move {
            eventually(Duration::from_secs(20), "exporter up", || async {
                client
                    .http
                    .get(format!("{}/healthz", client.metrics_base))
                    .send()
                    .await
                    .is_ok()
            })
            .await
        }
    };
    // A first run creates the database and records a live stream.
    let mut exporter = start();
    wait_up(&exporter).await;
    assert_eq!(
        exporter
            .post(&signed(push("ro.example.com", "s", "q1", 1)))
            .await
            .status,
        200
    );
    assert_eq!(exporter.terminate().code(), Some(0));

    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let mut exporter = start();
    wait_up(&exporter).await;
    // The state is readable and served...
    let s = exporter.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 1.0);
    // ...but nothing can be recorded: 503 so that Tencent retries, and not ready.
    let bye = signed(disconnect("ro.example.com", "s", "q1", 1, 1));
    let answer = exporter.post(&bye).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let ready = exporter.ready().await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("readonly"), "{}", ready.body);
    let s = exporter.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 1.0);
    assert_eq!(s.value("tencent_css_exporter_storage_ready", &[]), 0.0);
    assert!(s.value("tencent_css_exporter_storage_commit_failures_total", &[]) >= 1.0);

    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let client = exporter.client.clone();
    eventually(
        Duration::from_secs(10),
        "recovery once writable",
        || async { client.ready().await.status == 200 },
    )
    .await;
    assert_eq!(exporter.post(&bye).await.status, 200);
    let s = exporter.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 0.0);
    assert_eq!(s.value("tencent_css_exporter_storage_ready", &[]), 1.0);
    assert!(
        s.value(
            "tencent_css_exporter_storage_committed_callbacks_total",
            &[]
        ) >= 1.0
    );
    assert_eq!(exporter.terminate().code(), Some(0));
}

#[tokio::test]
async fn expired_delivery_keys_are_purged_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = db_args(&dir);
    let db = args[1].clone();
    args.extend(["--callback.dedup-window".into(), "1s".into()]);
    let app = spawn_app_with(AppOptions {
        args,
        ..Default::default()
    })
    .await;
    let count = || {
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("SELECT count(*) FROM delivered_keys", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
    };
    let mut peak = 0;
    for wave in 0..6 {
        for i in 0..100 {
            // A session that ends leaves two keys: its push and its disconnect.
            let seq = format!("w{wave}-{i}");
            let body = signed(push("purge.example.com", &seq, &seq, 1));
            assert_eq!(app.post(&body).await.status, 200);
            let body = signed(disconnect("purge.example.com", &seq, &seq, 1, 1));
            assert_eq!(app.post(&body).await.status, 200);
        }
        peak = peak.max(count());
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // 1,200 keys went in, but never much more than the last window's worth is kept.
    assert!(peak >= 200, "the keys of a wave are stored: {peak}");
    assert!(peak <= 600, "delivered keys grew to {peak}");
    eventually(Duration::from_secs(10), "all keys purged", || async {
        count() == 0
    })
    .await;
    app.stop().await.unwrap();
}

/// Sets the exporter's soft limit on the size of the files it writes (`prlimit`, util-linux).
fn limit_file_size(exporter: &Exporter, limit: &str) {
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(exporter.child.id().to_string())
        .arg(format!("--fsize={limit}:"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --fsize={limit}:");
}

/// A full disk, as near as a test can make one without a filesystem of its own: a file-size
/// limit of 0 makes every write of the database fail (EFBIG, and SIGXFSZ, which must not kill
/// the exporter), and every write of its log, a file on the same disk. Nothing is answered 200
/// meanwhile, and everything answered 200 survives a crash once writes work again.
#[tokio::test]
async fn failing_writes_answer_503_then_recover_and_lose_nothing() {
    if !require_program("prlimit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("exporter.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut exporter = Exporter::start_logging_to(free_port(), db_args(&dir), log.into()).await;
    let d = "full.example.com";
    assert_eq!(
        exporter.post(&signed(push(d, "s1", "q1", 1))).await.status,
        200
    );

    limit_file_size(&exporter, "0");
    let bye = signed(disconnect(d, "s1", "q1", 1, 1));
    let hello = signed(push(d, "s2", "q2", 1));
    for body in [&bye, &hello] {
        let answer = exporter.post(body).await;
        assert_eq!(answer.status, 503, "{}", answer.body);
    }
    assert!(
        exporter.child.try_wait().unwrap().is_none(),
        "the exporter survives writes refused by the filesystem"
    );
    assert_eq!(exporter.ready().await.status, 503);
    let s = exporter.scrape().await;
    assert_eq!(
        s.sum("tencent_css_active_streams", &[]),
        1.0,
        "nothing changed"
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.callbacks("disconnect", "error"), 1.0);
    assert_eq!(s.callbacks("push", "error"), 1.0);

    limit_file_size(&exporter, "unlimited");
    let client = exporter.client.clone();
    eventually(
        Duration::from_secs(10),
        "readiness once writes work again",
        || async { client.ready().await.status == 200 },
    )
    .await;
    // Tencent's retries go through, once each.
    for body in [&bye, &hello] {
        assert_eq!(exporter.post(body).await.status, 200);
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    // Lines written while the file could not grow are lost; the one at recovery is not.
    assert_outage_logged(&log, "storage", 2);
    let before = exporter.scrape().await;
    assert_eq!(before.sum("tencent_css_active_streams", &[]), 1.0);
    assert_eq!(before.sum("tencent_css_pushes_total", &[]), 2.0);
    assert_eq!(before.sum("tencent_css_disconnects_total", &[]), 1.0);

    exporter.crash();
    let exporter = Exporter::start_on(exporter.port, exporter.args.clone()).await;
    let after = exporter.scrape().await;
    assert_eq!(before.exporter_samples(), after.exporter_samples());
}

/// An outage is logged when it begins, with its cause, and when it ends, with how long it
/// lasted and the callbacks it refused; not once for each of them (thousands a second at a mass
/// reconnect).
#[tokio::test]
async fn an_outage_is_logged_once_not_for_each_refused_callback() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("exporter.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let args = db_args(&dir);
    let db = args[1].clone();
    let exporter = Exporter::start_logging_to(free_port(), args, log.into()).await;
    let d = "outage.example.com";
    assert_eq!(
        exporter.post(&signed(push(d, "s0", "q0", 1))).await.status,
        200
    );

    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    for i in 1..=3 {
        let body = signed(push(d, &format!("s{i}"), &format!("q{i}"), 1));
        assert_eq!(exporter.post(&body).await.status, 503);
    }
    blocker.execute_batch("ROLLBACK;").unwrap();
    let client = exporter.client.clone();
    eventually(
        Duration::from_secs(10),
        "readiness after the lock is gone",
        || async { client.ready().await.status == 200 },
    )
    .await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(assert_outage_logged(&log, "storage", 3), 1, "{log}");
}

#[tokio::test]
async fn a_second_exporter_on_the_same_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Exporter::start_on(free_port(), db_args(&dir)).await;
    let body = signed(push("lock.example.com", "s", "q1", 1));
    assert_eq!(first.post(&body).await.status, 200);

    // It would write its counters over the first one's: it must not start at all.
    let db = dir.path().join("state/exporter.db");
    let output = start_refused(&db);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another exporter"), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");

    // The first one goes on, and once it has stopped (even killed) the database is free.
    let other = signed(push("lock.example.com", "s2", "q2", 1));
    assert_eq!(first.post(&other).await.status, 200);
    first.crash();
    let mut second = Exporter::start_on(free_port(), db_args(&dir)).await;
    let s = second.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 2.0);
    second.terminate();
}
