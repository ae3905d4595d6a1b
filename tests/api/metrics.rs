//! `/metrics` and the other read-only endpoints.

use std::collections::BTreeMap;

use crate::helpers::*;

#[tokio::test]
async fn every_metric_and_label_after_the_sample_session() {
    let app = spawn_app().await;
    let mut push = sample("push");
    push["event_time"] = serde_json::json!(now() - 2);
    assert_eq!(app.post(&signed(push)).await.status, 200);
    let mid = app.scrape().await;
    assert_eq!(
        mid.value(
            "tencent_css_active_streams",
            &[("domain", "test.domain.com"), ("area", "mainland")]
        ),
        1.0
    );
    assert_eq!(app.post(&signed(sample("disconnect"))).await.status, 200);
    let s = app.scrape().await;
    let dm = [("domain", "test.domain.com"), ("area", "mainland")];

    assert_eq!(s.get("tencent_css_active_streams", &dm), Some(0.0));
    assert_eq!(s.get("tencent_css_pushes_total", &dm), Some(1.0));
    assert_eq!(
        s.get(
            "tencent_css_disconnects_total",
            &[dm[0], dm[1], ("errcode", "1"), ("reason", "client_stop")]
        ),
        Some(1.0)
    );
    // push_duration "128581" ms lands in the 5m bucket, not the 1m one.
    let bucket = |le| {
        s.get(
            "tencent_css_push_duration_seconds_bucket",
            &[dm[0], dm[1], ("le", le)],
        )
    };
    assert_eq!(bucket("60"), Some(0.0));
    assert_eq!(bucket("300"), Some(1.0));
    assert_eq!(bucket("86400"), Some(1.0));
    assert_eq!(bucket("+Inf"), Some(1.0));
    assert_eq!(
        s.get("tencent_css_push_duration_seconds_sum", &dm),
        Some(128.581)
    );
    assert_eq!(
        s.get("tencent_css_push_duration_seconds_count", &dm),
        Some(1.0)
    );
    let les: Vec<_> = s
        .matching("tencent_css_push_duration_seconds_bucket", &dm)
        .map(|b| b.labels["le"].clone())
        .collect();
    assert_eq!(
        les,
        [
            "10", "30", "60", "300", "900", "1800", "3600", "7200", "14400", "28800", "86400",
            "+Inf"
        ]
    );

    for event in ["push", "disconnect"] {
        assert_eq!(
            s.get(
                "tencent_css_callbacks_total",
                &[("event", event), ("outcome", "accepted")]
            ),
            Some(1.0)
        );
    }
    // The push's event_time was 2 s ago; the sample disconnect's, from 2018, is not believed
    // (more than a day old) and not observed.
    assert_eq!(
        s.get("tencent_css_callback_delay_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        s.get("tencent_css_callback_delay_seconds_bucket", &[("le", "1")]),
        Some(0.0)
    );
    assert_eq!(
        s.get("tencent_css_callback_delay_seconds_bucket", &[("le", "5")]),
        Some(1.0)
    );
    let last = s
        .get("tencent_css_last_callback_timestamp_seconds", &[])
        .unwrap();
    assert!((last - now() as f64).abs() < 5.0, "{last}");
    assert_eq!(
        s.get(
            "tencent_css_exporter_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(s.get("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(s.get("process_start_time_seconds", &[]).is_some());
    // Not in whole seconds, so that its rate shows a lightly loaded exporter.
    let cpu = s.get("process_cpu_seconds_total", &[]).unwrap();
    assert!(cpu > 0.0 && cpu.fract() != 0.0, "{cpu}");

    // Types and help are declared, and no stream id, IP or free text is a label.
    for (family, kind) in [
        ("tencent_css_active_streams", "gauge"),
        ("tencent_css_pushes_total", "counter"),
        ("tencent_css_disconnects_total", "counter"),
        ("tencent_css_push_duration_seconds", "histogram"),
        ("tencent_css_callbacks_total", "counter"),
        ("tencent_css_callback_delay_seconds", "histogram"),
        ("tencent_css_last_callback_timestamp_seconds", "gauge"),
        ("tencent_css_exporter_build_info", "gauge"),
    ] {
        assert!(
            s.text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family}"
        );
        assert!(s.text.contains(&format!("# HELP {family} ")), "{family}");
    }
    for leak in [
        "test_stream",
        "119.29.94.245",
        "100.121.160.92",
        "6674468118806626493",
        "stopped",
    ] {
        assert!(!s.text.contains(leak), "{leak} leaked into /metrics");
    }
}

#[tokio::test]
async fn errcodes_are_classified_and_bounded() {
    let app = spawn_app().await;
    for (i, code) in [8, 13, 7, 24, 18, 19, 22, 100_000].into_iter().enumerate() {
        let body = disconnect("d.example", "s", &format!("q{i}"), 9, code);
        assert_eq!(app.post(&signed(body)).await.status, 200);
    }
    let s = app.scrape().await;
    let count = |code, reason| {
        s.value(
            "tencent_css_disconnects_total",
            &[("area", "overseas"), ("errcode", code), ("reason", reason)],
        )
    };
    assert_eq!(count("8", "no_data"), 1.0);
    assert_eq!(count("13", "network"), 1.0);
    assert_eq!(count("7", "protocol"), 1.0);
    assert_eq!(count("24", "internal"), 1.0);
    assert_eq!(count("18", "rejected"), 1.0);
    assert_eq!(count("19", "rejected"), 1.0);
    assert_eq!(count("22", "unknown"), 1.0);
    assert_eq!(count("other", "unknown"), 1.0);
}

#[tokio::test]
async fn a_fractional_push_duration_is_observed_rounded_to_the_millisecond() {
    let app = spawn_app().await;
    for (i, duration) in [
        serde_json::json!("1500.5"),
        serde_json::json!(29999.6),
        serde_json::json!("-0.4"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = disconnect("d.example", "s", &format!("q{i}"), 1, 1);
        body["push_duration"] = duration;
        assert_eq!(app.post(&signed(body)).await.status, 200);
    }
    let s = app.scrape().await;
    let dm = [("domain", "d.example"), ("area", "mainland")];
    // Three disconnects; a negative duration is none, the two fractions are observed.
    assert_eq!(
        s.value(
            "tencent_css_disconnects_total",
            &[dm[0], dm[1], ("errcode", "1")]
        ),
        3.0
    );
    assert_eq!(s.value("tencent_css_push_duration_seconds_count", &dm), 2.0);
    assert_eq!(
        s.value("tencent_css_push_duration_seconds_sum", &dm),
        31.501
    );
    // 29999.6 ms is 30,000 ms, which the 30 s bucket takes (upper bounds are inclusive).
    let bucket = |le| {
        s.value(
            "tencent_css_push_duration_seconds_bucket",
            &[dm[0], dm[1], ("le", le)],
        )
    };
    assert_eq!(bucket("10"), 1.0);
    assert_eq!(bucket("30"), 2.0);
}

#[tokio::test]
async fn callback_outcomes_exist_at_zero_from_the_start() {
    let app = spawn_app().await;
    let s = app.scrape().await;
    for outcome in [
        "accepted",
        "duplicate",
        "bad_signature",
        "expired",
        "malformed",
        "error",
    ] {
        assert_eq!(
            s.get(
                "tencent_css_callbacks_total",
                &[("event", "push"), ("outcome", outcome)]
            ),
            Some(0.0),
            "{outcome}"
        );
    }
    assert_eq!(
        s.get("tencent_css_last_callback_timestamp_seconds", &[]),
        Some(0.0)
    );
}

#[tokio::test]
async fn metrics_can_move_to_a_separate_listener() {
    let app = spawn_app_with(AppOptions {
        separate_metrics: true,
        ..Default::default()
    })
    .await;
    assert_ne!(app.callback_addr, app.metrics_addr);
    assert_eq!(app.post(&signed(sample("push"))).await.status, 200);
    let s = app.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    // Each listener has its slots: the scrape takes one of the metrics listener's.
    for listener in ["callback", "metrics"] {
        let limit = s.get(
            "tencent_css_exporter_http_connections_limit",
            &[("listener", listener)],
        );
        assert_eq!(limit, Some(1024.0), "{listener}");
    }
    let scraping = [("listener", "metrics")];
    assert!(s.value("tencent_css_exporter_http_connections", &scraping) >= 1.0);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let public = app
            .get(&format!("http://{}{path}", app.callback_addr))
            .await;
        assert_eq!(
            public.status, 404,
            "{path} must not be on the callback listener"
        );
        let private = app.get(&format!("http://{}{path}", app.metrics_addr)).await;
        assert_eq!(private.status, 200, "{path}");
    }
    let callback_on_metrics = app
        .http
        .post(format!("http://{}/callback", app.metrics_addr))
        .body(signed(sample("push")).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(callback_on_metrics.status().as_u16(), 404);
}

#[tokio::test]
async fn metrics_can_move_to_another_path() {
    let path = "/css/metrics";
    let app = spawn_app_with(AppOptions {
        args: vec![
            "--storage.path".into(),
            ":memory:".into(),
            "--web.telemetry-path".into(),
            path.into(),
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(app.post(&signed(sample("push"))).await.status, 200);
    let page = app.get(&format!("{}{path}", app.metrics_base)).await;
    assert_eq!(page.status, 200);
    let s = Scrape::parse(page.body);
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    let old = app.get(&format!("{}/metrics", app.metrics_base)).await;
    assert_eq!(old.status, 404);
    let landing = app.get(&format!("{}/", app.metrics_base)).await;
    assert!(
        landing.body.contains(&format!("href=\"{path}\"")),
        "{}",
        landing.body
    );
}

#[tokio::test]
async fn landing_health_and_readiness() {
    let app = spawn_app().await;
    let landing = app.get(&format!("http://{}/", app.callback_addr)).await;
    assert_eq!(landing.status, 200);
    for link in ["/metrics", "/healthz", "/readyz", "/callback"] {
        assert!(landing.body.contains(link), "landing page lacks {link}");
    }
    assert_eq!(
        app.get(&format!("http://{}/healthz", app.callback_addr))
            .await
            .status,
        200
    );
    assert_eq!(app.ready().await.status, 200);
}

#[tokio::test]
async fn simulate_moves_the_metrics_of_a_running_exporter() {
    let app = spawn_app().await;
    let url = app.callback_url.as_str();
    let stdout = subcommand(&[
        "simulate",
        "--target",
        url,
        "--streams",
        "6",
        "--duration",
        "3s",
    ])
    .await;
    assert!(stdout.contains("push"), "{stdout}");
    let s = app.scrape().await;
    let pushes = s.sum("tencent_css_pushes_total", &[]);
    let disconnects = s.sum("tencent_css_disconnects_total", &[]);
    assert!(pushes >= 6.0, "{pushes}");
    assert!(disconnects >= 1.0, "{disconnects}");
    // Every stream is pushed again after each disconnect: all 6 are live at the end.
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 6.0);
    assert_eq!(pushes - disconnects, 6.0);
    assert!(
        s.matching("tencent_css_active_streams", &[("area", "overseas")])
            .count()
            > 0
    );
    assert_eq!(
        s.sum(
            "tencent_css_callbacks_total",
            &[("outcome", "bad_signature")]
        ),
        0.0
    );
}

#[tokio::test]
async fn storage_metrics_count_the_commits_and_the_callbacks_they_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir
        .path()
        .join("exporter.db")
        .to_string_lossy()
        .into_owned();
    let app = spawn_app_with(AppOptions {
        args: vec!["--storage.path".into(), db.clone()],
        ..Default::default()
    })
    .await;
    let before = app.scrape().await;
    assert_eq!(
        before.get("tencent_css_exporter_storage_ready", &[]),
        Some(1.0)
    );
    assert_eq!(
        before.get("tencent_css_exporter_storage_commits_total", &[]),
        Some(0.0)
    );

    // 32 pushes at once (batched as they come), a retry, and a forged callback: every one of
    // them is written by some commit, the forged one as a count.
    let pushes: Vec<_> = (0..32)
        .map(|i| {
            signed(push(
                "store.example.com",
                &format!("s{i}"),
                &format!("q{i}"),
                1,
            ))
        })
        .collect();
    let mut posts = tokio::task::JoinSet::new();
    for p in pushes.clone() {
        let client = app.client.clone();
        posts.spawn(async move { client.post(&p).await.status });
    }
    while let Some(status) = posts.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(app.post(&pushes[0]).await.status, 200);
    let mut forged = pushes[1].clone();
    forged["sign"] = serde_json::json!("0123456789abcdef0123456789abcdef");
    assert_eq!(app.post(&forged).await.status, 401);

    let s = app.scrape().await;
    assert_eq!(s.callbacks("push", "duplicate"), 1.0);
    assert_eq!(
        s.value(
            "tencent_css_exporter_storage_committed_callbacks_total",
            &[]
        ),
        34.0
    );
    let commits = s.value("tencent_css_exporter_storage_commits_total", &[]);
    assert!((3.0..=34.0).contains(&commits), "{commits} commits");
    assert_eq!(
        s.value("tencent_css_exporter_storage_commit_failures_total", &[]),
        0.0
    );
    assert_eq!(
        s.value(
            "tencent_css_exporter_storage_commit_duration_seconds_count",
            &[]
        ),
        commits
    );
    assert_eq!(
        s.value(
            "tencent_css_exporter_storage_commit_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        commits
    );
    assert!(
        s.value(
            "tencent_css_exporter_storage_commit_duration_seconds_sum",
            &[]
        ) > 0.0
    );
    // The WAL as it is on disk (it keeps its size when it starts over), and no checkpoint failed.
    let wal = std::fs::metadata(format!("{db}-wal")).unwrap().len() as f64;
    assert!(wal > 0.0);
    assert_eq!(s.value("tencent_css_exporter_storage_wal_bytes", &[]), wal);
    assert!(s
        .get(
            "tencent_css_exporter_storage_checkpoint_failures_total",
            &[]
        )
        .is_some());
    app.stop().await.unwrap();
}

/// A scrape copies the state a piece at a time, letting the recording of callbacks go on
/// between two pieces. Pages taken while 8 senders push and disconnect streams of 300 domains
/// (a state of over a thousand series, several pieces) each list a series once, never lose
/// one an earlier page had nor move a counter back, and never show a (domain, area) with more
/// disconnects than pushes or more pushes and disconnects than accepted callbacks, as the state
/// never has; the page after the senders are done has every count exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_taken_while_callbacks_are_recorded_are_whole() {
    const SENDERS: usize = 8;
    const DOMAINS: usize = 300;
    let app = spawn_app().await;
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..SENDERS {
        let client = app.client.clone();
        senders.spawn(async move {
            for d in (sender..DOMAINS).step_by(SENDERS) {
                let (domain, set_id) = (format!("d{d:03}.example"), 1 + d as i64 % 2 * 100);
                let (stream, sequence) = (format!("s{d}"), format!("q{d}"));
                let pushed = signed(push(&domain, &stream, &sequence, set_id));
                assert_eq!(client.post(&pushed).await.status, 200);
                let ended = disconnect(&domain, &stream, &sequence, set_id, 1 + d as i64 % 3);
                assert_eq!(client.post(&signed(ended)).await.status, 200);
            }
        });
    }
    let by_domain = |s: &Scrape, name: &str| {
        let mut sums = BTreeMap::<(String, String), f64>::new();
        for sample in s.matching(name, &[]) {
            let key = (
                sample.labels["domain"].clone(),
                sample.labels["area"].clone(),
            );
            *sums.entry(key).or_default() += sample.value;
        }
        sums
    };
    let mut before = BTreeMap::<String, f64>::new();
    let mut pages = 0;
    loop {
        let done = senders.is_empty();
        let page = app.scrape().await;
        pages += 1;
        let series = page.exporter_samples();
        let event_samples = page.samples.iter().filter(|s| {
            s.name.starts_with("tencent_css_") && !s.name.starts_with("tencent_css_exporter_")
        });
        assert_eq!(event_samples.count(), series.len(), "a series twice");
        for (name, was) in &before {
            let counter = name.contains("_total") || name.contains("_bucket");
            match series.get(name) {
                None => panic!("{name} gone from page {pages}"),
                Some(now) if counter => assert!(now >= was, "{name} went back: {was} -> {now}"),
                Some(_) => {}
            }
        }
        let pushes = by_domain(&page, "tencent_css_pushes_total");
        for (key, disconnects) in by_domain(&page, "tencent_css_disconnects_total") {
            let pushed = pushes.get(&key).copied().unwrap_or(0.0);
            assert!(disconnects <= pushed, "{key:?}: {disconnects} > {pushed}");
        }
        let counted = page.sum("tencent_css_pushes_total", &[])
            + page.sum("tencent_css_disconnects_total", &[]);
        let accepted =
            page.callbacks("push", "accepted") + page.callbacks("disconnect", "accepted");
        assert!(
            counted <= accepted,
            "{counted} counted, {accepted} accepted"
        );
        before = series;
        if done {
            assert_eq!(pushes.len(), DOMAINS);
            assert!(pushes.values().all(|n| *n == 1.0));
            assert_eq!(
                page.sum("tencent_css_disconnects_total", &[]),
                DOMAINS as f64
            );
            assert_eq!(page.sum("tencent_css_active_streams", &[]), 0.0);
            assert_eq!(accepted, 2.0 * DOMAINS as f64);
            break;
        }
        while let Some(sent) = senders.try_join_next() {
            sent.unwrap();
        }
    }
    assert!(
        pages > 2,
        "only {pages} pages taken while the callbacks were sent"
    );
    app.stop().await.unwrap();
}

/// `/metrics` with the given `Accept-Encoding` (none if `None`): the `Content-Encoding` and
/// `Vary` headers of the answer, and its body as sent.
async fn metrics_encoded(app: &TestApp, accept: Option<&str>) -> (Option<String>, String, Vec<u8>) {
    let mut request = app.http.get(format!("{}/metrics", app.metrics_base));
    if let Some(accept) = accept {
        request = request.header("accept-encoding", accept);
    }
    let response = request.send().await.expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let (encoding, vary) = (header("content-encoding"), header("vary"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("text/plain; version=0.0.4")
    );
    let body = response.bytes().await.unwrap().to_vec();
    (encoding, vary.unwrap_or_default(), body)
}

#[tokio::test]
async fn metrics_are_gzipped_when_the_scraper_accepts_it() {
    use std::io::Read;
    let app = spawn_app().await;
    for i in 0..50 {
        let body = disconnect(&format!("d{i}.example"), "s", &format!("q{i}"), 9, 1);
        assert_eq!(app.post(&signed(body)).await.status, 200);
    }
    // As Prometheus asks, unless its scrape config says `enable_compression: false`.
    let (encoding, vary, gzipped) = metrics_encoded(&app, Some("gzip")).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(vary, "accept-encoding");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_string(&mut text)
        .expect("a gzip stream");
    assert!(
        gzipped.len() * 4 < text.len(),
        "{} bytes for {} of text",
        gzipped.len(),
        text.len()
    );
    let unzipped = Scrape::parse(text);

    for accept in [None, Some("gzip;q=0"), Some("identity"), Some("br")] {
        let (encoding, vary, plain) = metrics_encoded(&app, accept).await;
        assert_eq!(encoding, None, "Accept-Encoding: {accept:?}");
        assert_eq!(vary, "accept-encoding");
        let plain = Scrape::parse(String::from_utf8(plain).expect("plain text"));
        assert_eq!(plain.exporter_samples(), unzipped.exporter_samples());
    }
    assert_eq!(
        unzipped.sum("tencent_css_disconnects_total", &[("errcode", "1")]),
        50.0
    );
}

#[tokio::test]
async fn a_page_of_megabytes_is_one_gzip_stream_of_the_page() {
    use std::io::Read;
    // Pages over 2 MiB are compressed in pieces on several threads: the pieces must make one
    // gzip member, which readers that stop after the first member (as this one does) read
    // whole, CRC and size checked.
    let app = spawn_app().await;
    let domains = fill_page(&app, 2_500_000).await;
    let (encoding, _, gzipped) = metrics_encoded(&app, Some("gzip")).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_string(&mut text)
        .expect("one gzip member");
    let (_, _, plain) = metrics_encoded(&app, None).await;
    let plain = Scrape::parse(String::from_utf8(plain).expect("plain text"));
    let unzipped = Scrape::parse(text);
    assert_eq!(plain.exporter_samples(), unzipped.exporter_samples());
    assert_eq!(
        unzipped.sum("tencent_css_disconnects_total", &[("errcode", "1")]),
        domains as f64
    );
}

/// A thread of a process, as `/proc/PID/task/TID` shows it.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct Thread {
    tid: u32,
    name: String,
    nice: i64,
    /// The scheduling policy: 0 `SCHED_OTHER`, 5 `SCHED_IDLE`.
    policy: u32,
}

/// Each thread of process `pid`.
#[cfg(target_os = "linux")]
fn threads(pid: u32) -> Vec<Thread> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let tid = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
        // A thread that ended since the directory was listed (an idle blocking thread) is gone.
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        // After the name in parentheses (which may hold spaces): state is field 3, nice 19,
        // policy 41.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        threads.push(Thread {
            tid,
            name: name.trim_end().to_owned(),
            nice: fields[19 - 3].parse().unwrap(),
            policy: fields[41 - 3].parse().unwrap(),
        });
    }
    threads
}

/// On a busy machine a scrape must take the CPU the callbacks leave: the thread writing and
/// compressing pages runs at idle priority. The thread copying the state does not, since the
/// ledger's writer waits on the lock it holds.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn pages_are_written_at_a_lower_priority_than_callbacks_are_answered() {
    let exporter = Exporter::start(&["--storage.path", ":memory:"]).await;
    let body = signed(push("nice.example.com", "s1", "seq-1", 1));
    assert_eq!(exporter.post(&body).await.status, 200);
    let page = exporter.scrape().await;
    assert_eq!(page.sum("tencent_css_active_streams", &[]), 1.0);
    let gzipped = exporter
        .client
        .http
        .get(format!("{}/metrics", exporter.client.metrics_base))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.status(), 200);
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");

    let pid = exporter.child.id();
    let threads = threads(pid);
    let own = threads.iter().find(|t| t.tid == pid).unwrap();
    let writer: Vec<_> = threads
        .iter()
        .filter(|t| t.name == "metrics-write")
        .collect();
    assert_eq!(writer.len(), 1, "{threads:?}");
    assert_eq!(writer[0].policy, 5, "SCHED_IDLE: {threads:?}");
    for t in threads.iter().filter(|t| t.name != "metrics-write") {
        assert_eq!(
            (t.nice, t.policy),
            (own.nice, 0),
            "{} runs at the exporter's priority: {threads:?}",
            t.name
        );
    }
    assert!(threads.iter().any(|t| t.name == "metrics"), "{threads:?}");
    assert!(
        threads.iter().any(|t| t.name.starts_with("tokio-rt")),
        "{threads:?}"
    );
}

/// A page writer at idle priority gets no CPU while the exporter's scheduling group keeps every
/// core it may use busy: the scrape is then answered by the thread that copied the state, at
/// the exporter's priority, instead of waiting until the machine is quiet.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_page_the_idle_writer_cannot_write_is_written_at_the_exporters_priority() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let exporter = Exporter::start(&["--storage.path", ":memory:"]).await;
    fill_page(&exporter.client, 2_000_000).await;
    let pages = |page: &Scrape, writer: &str| {
        page.sum(
            "tencent_css_exporter_metrics_pages_total",
            &[("writer", writer)],
        )
    };
    let before = exporter.scrape().await;
    let fallbacks = pages(&before, "fallback");

    // The exporter and a thread that never rests, on one CPU: at idle priority the writer gets
    // a few thousandths of it, while its page takes tens of milliseconds of CPU.
    let cpu = own_cpus()[0];
    let pid = exporter.child.id();
    for t in threads(pid) {
        // A thread that ended since it was listed cannot be pinned, nor does it matter.
        let _ = pin(t.tid, cpu);
    }
    /// Stops the spinning thread however the test ends.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let hog = std::thread::spawn({
        let stop = stop.0.clone();
        move || {
            pin(0, cpu).unwrap();
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        }
    });
    let during = exporter.scrape().await;
    drop(stop);
    hog.join().unwrap();

    assert_eq!(
        during.sum("tencent_css_disconnects_total", &[]),
        before.sum("tencent_css_disconnects_total", &[])
    );
    let after = exporter.scrape().await;
    assert!(
        pages(&after, "fallback") > fallbacks,
        "the page was written by the fallback: {} before, {} after",
        fallbacks,
        pages(&after, "fallback")
    );
}

/// The CPUs this process may run on.
#[cfg(target_os = "linux")]
fn own_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is the empty set; sched_getaffinity writes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a writable cpu_set_t of `size` bytes; pid 0 is this thread.
    assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
    // SAFETY: CPU_ISSET reads a set within its bounds (CPU_SETSIZE).
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Confines thread `tid` (0: the calling thread) to `cpu`.
#[cfg(target_os = "linux")]
fn pin(tid: u32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET adds one CPU within its bounds.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes for the call's duration.
    match unsafe { libc::sched_setaffinity(tid as libc::pid_t, size, &set) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}
