//! The `load` subcommand against a running exporter: what it reports is what the exporter
//! recorded.

use serde_json::Value;

use crate::helpers::*;

/// Runs `load` against `app` with `args` and returns its `--json` summary.
async fn load(app: &TestApp, args: &[&str]) -> Value {
    let url = app.callback_url.as_str();
    let base = ["load", "--target", url, "--json", "--progress", "0s"];
    let stdout = subcommand(&[&base[..], args].concat()).await;
    serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap()
}

#[tokio::test]
async fn load_sends_signed_unique_sessions_over_domains_and_areas() {
    let app = spawn_app().await;
    let summary = load(
        &app,
        &["--requests", "240", "--concurrency", "4", "--domains", "3"],
    )
    .await;
    assert_eq!(summary["requests"], 240);
    assert_eq!(summary["ok"], 240);
    assert_eq!(summary["non_200"], 0);
    assert_eq!(summary["errors"], 0);
    assert!(summary["latency_ms"]["p99"].as_f64().unwrap() > 0.0);

    let s = app.scrape().await;
    // Each stream pushed, then disconnected: none counted twice, none left live.
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 120.0);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 120.0);
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 0.0);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        240.0
    );
    assert_eq!(s.sum("tencent_css_callbacks_total", &[]), 240.0);
    let domains: std::collections::BTreeSet<_> = s
        .matching("tencent_css_pushes_total", &[])
        .map(|sample| sample.labels["domain"].clone())
        .collect();
    assert_eq!(domains.len(), 3, "{domains:?}");
    for area in ["mainland", "overseas"] {
        assert!(
            s.sum("tencent_css_pushes_total", &[("area", area)]) > 0.0,
            "{area}"
        );
    }
    // A mix of disconnect codes, and push durations in the histogram.
    assert!(s.matching("tencent_css_disconnects_total", &[]).count() > 3);
    assert_eq!(s.sum("tencent_css_push_duration_seconds_count", &[]), 120.0);
}

#[tokio::test]
async fn an_open_loop_run_sends_on_schedule_and_reports_the_rate_over_the_run() {
    let app = spawn_app().await;
    let summary = load(&app, &["--rate", "20", "--duration", "1s", "--push-only"]).await;
    // Due at 0, 50, ..., 950 ms.
    assert_eq!(summary["requests"], 20);
    assert_eq!(summary["ok"], 20);
    let rate = summary["requests_per_second"].as_f64().unwrap();
    assert!((10.0..=20.0).contains(&rate), "{rate}");
    assert!(summary["seconds"].as_f64().unwrap() >= 1.0);
    assert_eq!(
        app.scrape().await.sum("tencent_css_active_streams", &[]),
        20.0
    );
}

#[tokio::test]
async fn an_open_loop_run_the_target_cannot_keep_up_with_ends_on_time_and_counts_what_it_did_not_send(
) {
    let app = spawn_app().await;
    // A billion requests due within a second: far more than two connections can send.
    let summary = load(
        &app,
        &[
            "--rate",
            "1e9",
            "--duration",
            "1s",
            "--concurrency",
            "2",
            "--push-only",
        ],
    )
    .await;
    let sent = summary["requests"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(summary["ok"].as_u64().unwrap(), sent);
    assert_eq!(summary["unsent"].as_u64().unwrap(), 1_000_000_000 - sent);
    // What was not sent was not recorded either.
    assert_eq!(
        app.scrape().await.sum("tencent_css_pushes_total", &[]),
        sent as f64
    );
}

/// `--latency-log` lists every answered request with when it was sent on the schedule, and
/// places the run on the monotonic clock that other programs read, so that what they did
/// meanwhile (scrapes) can be laid beside the requests.
#[cfg(unix)]
#[tokio::test]
async fn the_latency_log_lists_each_request_when_it_was_sent_on_the_machines_clock() {
    let monotonic = || {
        // SAFETY: an all-zero timespec is valid; clock_gettime only writes into it.
        let mut now: libc::timespec = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
            0
        );
        now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
    };
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latencies");
    let before = monotonic();
    let summary = load(
        &app,
        &[
            "--rate",
            "20",
            "--duration",
            "1s",
            "--push-only",
            "--latency-log",
            log.to_str().unwrap(),
        ],
    )
    .await;
    let after = monotonic();

    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = text.lines();
    let start: f64 = lines
        .next()
        .unwrap()
        .strip_prefix("# start_monotonic_seconds ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        before <= start && start <= after,
        "{before} {start} {after}"
    );
    let requests: Vec<(u64, u64)> = lines
        .map(|line| {
            let (sent, latency) = line.split_once(' ').unwrap();
            (sent.parse().unwrap(), latency.parse().unwrap())
        })
        .collect();
    assert_eq!(requests.len() as u64, summary["ok"].as_u64().unwrap());
    assert_eq!(requests.len(), 20);
    // Due every 50 ms from the start: none goes out before it is due, and in a run of a second
    // all went out within it.
    for (i, &(sent_us, latency_us)) in requests.iter().enumerate() {
        assert!(
            sent_us >= 50_000 * i as u64,
            "request {i} sent at {sent_us} us"
        );
        assert!(sent_us < 1_000_000, "request {i} sent at {sent_us} us");
        assert!(latency_us > 0);
    }
    let max_us = requests.iter().map(|r| r.1).max().unwrap() as f64;
    assert_eq!(
        max_us / 1000.0,
        summary["latency_ms"]["max"].as_f64().unwrap()
    );

    // A file that cannot be written fails the run, after it was sent.
    let (url, unwritable) = (app.callback_url.clone(), dir.path().join("no/such/dir"));
    let output = tokio::task::spawn_blocking(move || {
        binary()
            .env("CSS_CALLBACK_KEY", KEY)
            .args([
                "load",
                "--target",
                &url,
                "--requests",
                "2",
                "--progress",
                "0s",
            ])
            .args(["--latency-log", unwritable.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--latency-log"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The exporter's settings do not apply to the subcommands: a bad one in the environment, meant
/// for the exporter running beside, does not stop `load`; one on the command line is refused.
#[tokio::test]
async fn load_ignores_the_exporters_settings_in_the_environment() {
    let app = spawn_app().await;
    let url = app.callback_url.clone();
    let run = |args: Vec<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            binary()
                .env("CSS_CALLBACK_KEY", KEY)
                .env("CSS_EXPORTER_LISTEN_ADDRESS", "not an address")
                .env("CSS_EXPORTER_LOG_LEVEL", "warning")
                .args(&args)
                .args(["load", "--target", &url, "--requests", "10", "--json"])
                .output()
                .unwrap()
        })
    };
    let output = run(vec![]).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let s = app.scrape().await;
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        10.0
    );

    let output = run(vec!["--log.level", "debug"]).await.unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn load_reports_the_cpu_that_it_and_the_exporter_used() {
    let app = spawn_app().await;
    // The exporter of `spawn_app` runs in this test process.
    let pid = std::process::id().to_string();
    let summary = load(
        &app,
        &["--duration", "1s", "--concurrency", "4", "--pid", &pid],
    )
    .await;
    let cpu = &summary["cpu"];
    let machine = cpu["machine_cores"].as_u64().unwrap() as f64;
    assert!(machine >= 1.0, "{cpu}");
    // Cores, not seconds or clock ticks: above nothing, and at most every core of the machine.
    for who in ["load_generator_cores", "exporter_cores"] {
        let cores = cpu[who].as_f64().unwrap();
        assert!(cores > 0.0 && cores <= machine + 0.5, "{who}: {cpu}");
    }
    assert!(summary["rss_mib"]["max"].as_f64().unwrap() > 0.0);
}
