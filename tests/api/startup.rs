//! The binary's configuration: keys, refusal to start, help, signals.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The environment of a start that has its callback key.
const WITH_KEY: [(&str, &str); 1] = [("CSS_CALLBACK_KEY", KEY)];

/// Runs the binary with `env` and `args` on a port of its own and an in-memory store; it must
/// refuse to start with a usage error (2, not a panic's 101). Returns what it printed.
fn refused(env: &[(&str, &str)], args: &[&str]) -> String {
    let output = binary()
        .envs(env.iter().copied())
        .args(["--web.listen-address", "127.0.0.1:0"])
        .args(["--storage.path", ":memory:"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    stderr
}

#[test]
fn refuses_to_start_without_a_key() {
    let stderr = refused(&[], &[]);
    assert!(stderr.contains("CSS_CALLBACK_KEY"), "{stderr}");
}

#[test]
fn an_empty_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# no keys yet\n\n").unwrap();
    let output = binary()
        .args(["--storage.path", ":memory:", "--callback.key-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn refuses_metrics_and_callbacks_on_one_path() {
    let same = [
        "--web.callback-path",
        "/hook",
        "--web.telemetry-path",
        "/hook",
    ];
    let stderr = refused(&WITH_KEY, &same);
    assert!(stderr.contains("--web.telemetry-path"), "{stderr}");
}

/// The metrics and health pages take their paths on the address they are served on only.
#[tokio::test]
async fn a_callback_path_is_free_where_the_metrics_are_not_served() {
    for path in ["/metrics", "/healthz"] {
        let stderr = refused(&WITH_KEY, &["--web.callback-path", path]);
        assert!(stderr.contains(path), "{stderr}");
    }
    let (callback, metrics) = (free_port(), free_port());
    let mut child = binary()
        .env("CSS_CALLBACK_KEY", KEY)
        .args(["--web.listen-address", &format!("127.0.0.1:{callback}")])
        .args(["--web.metrics-address", &format!("127.0.0.1:{metrics}")])
        .args(["--web.callback-path", "/metrics"])
        .args(["--storage.path", ":memory:"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut client = Client::new(
        format!("127.0.0.1:{callback}").parse().unwrap(),
        format!("127.0.0.1:{metrics}").parse().unwrap(),
    );
    client.callback_url = format!("http://127.0.0.1:{callback}/metrics");
    client.wait_healthy(|| child.try_wait().unwrap()).await;
    assert_eq!(client.post(&signed(sample("push"))).await.status, 200);
    assert_eq!(
        client.scrape().await.sum("tencent_css_pushes_total", &[]),
        1.0
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `NAME=` (as templates write for "no value") leaves a setting at its default.
#[tokio::test]
async fn an_empty_setting_in_the_environment_is_its_default() {
    let port = free_port();
    let mut child = binary()
        .env("CSS_CALLBACK_KEY", KEY)
        .env("CSS_EXPORTER_LISTEN_ADDRESS", format!("127.0.0.1:{port}"))
        .args(["--storage.path", ":memory:"])
        .envs(
            [
                "METRICS_ADDRESS",
                "LOG_LEVEL",
                "CLOCK_SKEW",
                "INSECURE_SKIP_VERIFY",
            ]
            .map(|name| (format!("CSS_EXPORTER_{name}"), "")),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = Client::new(addr, addr);
    client.wait_healthy(|| child.try_wait().unwrap()).await;
    assert_eq!(client.post(&signed(sample("push"))).await.status, 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn refuses_a_log_level_that_would_silence_every_line() {
    let stderr = refused(&WITH_KEY, &["--log.level", "warning"]);
    assert!(stderr.contains("not a level"), "{stderr}");
}

#[test]
fn refuses_a_path_the_router_would_read_as_a_capture() {
    for path in ["/:x", "/{x}", "/*x"] {
        refused(&WITH_KEY, &["--web.callback-path", path]);
    }
}

#[test]
fn refuses_values_that_could_only_fail_later() {
    for args in [
        ["--web.max-connections", "0"],
        ["--storage.redis-url", "http://redis.example.com"],
        ["--storage.redis-url", ""],
    ] {
        let stderr = refused(&WITH_KEY, &args);
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}

#[test]
fn insecure_skip_verify_reads_the_usual_words_from_the_environment() {
    const FLAG: &str = "CSS_EXPORTER_INSECURE_SKIP_VERIFY";
    for word in ["1", "yes", "on", "true"] {
        let mut child = binary()
            .env(FLAG, word)
            .args(["--web.listen-address", "127.0.0.1:0"])
            .args(["--storage.path", ":memory:"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::io::BufReader::new(child.stderr.take().unwrap());
        let serving = std::io::BufRead::lines(log)
            .map_while(Result::ok)
            .any(|line| line.contains("accepting unsigned callbacks"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(serving, "{FLAG}={word}");
    }
    for word in ["0", "no", "off", "false"] {
        let stderr = refused(&[(FLAG, word)], &[]);
        assert!(stderr.contains("no callback key"), "{word}: {stderr}");
    }
    let stderr = refused(&[(FLAG, "maybe")], &[]);
    assert!(
        stderr.contains("--callback.insecure-skip-verify"),
        "{stderr}"
    );
}

#[test]
fn help_explains_every_flag_and_version_prints() {
    let help = binary().arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--web.listen-address",
        "--web.metrics-address",
        "--web.callback-path",
        "--web.telemetry-path",
        "--callback.key-file",
        "--callback.insecure-skip-verify",
        "--callback.clock-skew",
        "--callback.max-validity",
        "--callback.dedup-window",
        "--storage.path",
        "--storage.sync",
        "--log.level",
        "--log.format",
        "CSS_CALLBACK_KEY",
        "CSS_EXPORTER_LISTEN_ADDRESS",
        "CSS_EXPORTER_METRICS_ADDRESS",
        "CSS_EXPORTER_CALLBACK_PATH",
        "CSS_EXPORTER_TELEMETRY_PATH",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let version = binary().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn key_file_keys_verify_and_are_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# rotation\nfileKeyA\nfileKeyB\n").unwrap();
    let port = free_port();
    let log = dir.path().join("log");
    let child = binary()
        .args([
            "--storage.path",
            ":memory:",
            "--log.level",
            "debug",
            "--log.format",
            "json",
        ])
        .arg("--web.listen-address")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--callback.key-file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = Client::new(addr, addr);
    let mut exporter = Exporter {
        child,
        client,
        port,
        args: vec![],
    };
    eventually(std::time::Duration::from_secs(20), "readiness", || async {
        exporter
            .http
            .get(format!("{}/readyz", exporter.metrics_base))
            .send()
            .await
            .is_ok()
    })
    .await;
    let body = signed_with(sample("push"), "fileKeyB");
    let sign = body["sign"].as_str().unwrap().to_string();
    assert_eq!(exporter.post(&body).await.status, 200);
    assert_eq!(
        exporter
            .post(&signed_with(sample("push"), "bogus"))
            .await
            .status,
        401
    );
    assert!(exporter.terminate().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("callback refused"), "{log}");
    for secret in ["fileKeyA", "fileKeyB", sign.as_str()] {
        assert!(!log.contains(secret), "{secret} was logged");
    }
    // JSON log lines.
    assert!(log.lines().all(|l| l.starts_with('{')), "{log}");
}

#[tokio::test]
async fn a_dedup_window_shorter_than_tencent_retries_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let args = [
        "--storage.path",
        ":memory:",
        "--callback.dedup-window",
        "5m",
    ];
    let log_file = Stdio::from(std::fs::File::create(&log).unwrap());
    let mut exporter =
        Exporter::start_logging_to(free_port(), args.map(String::from).to_vec(), log_file).await;
    assert!(exporter.terminate().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let warned = |what: &str| {
        log.lines().any(|l| {
            l.contains("WARN") && l.contains("--callback.dedup-window 5m") && l.contains(what)
        })
    };
    assert!(warned("Tencent retries"), "{log}");
    assert!(warned("--callback.max-validity"), "{log}");
}

/// A refused callback's log line names what the body tells of its stream and sequence, also
/// when a field is missing: the operator can find it in Tencent's records.
#[tokio::test]
async fn a_refused_callback_is_logged_with_its_stream_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let log_file = Stdio::from(std::fs::File::create(&log).unwrap());
    let args = vec!["--storage.path".into(), ":memory:".into()];
    let mut exporter = Exporter::start_logging_to(free_port(), args, log_file).await;
    let mut no_app = push("d.example.com", "s-no-app", "q-no-app", 1);
    no_app.as_object_mut().unwrap().remove("app");
    assert_eq!(exporter.post(&signed(no_app)).await.status, 400);
    let forged = signed_with(push("d.example.com", "s-forged", "q-forged", 1), "bogus");
    assert_eq!(exporter.post(&forged).await.status, 401);
    assert!(exporter.terminate().success());

    let log = std::fs::read_to_string(&log).unwrap();
    let line = |sequence: &str| {
        log.lines()
            .find(|l| l.contains("callback refused") && l.contains(sequence))
            .unwrap_or_else(|| panic!("no line for {sequence}:\n{log}"))
            .to_string()
    };
    let no_app = line("sequence=\"q-no-app\"");
    assert!(no_app.contains("lacks `app`"), "{no_app}");
    assert!(no_app.contains("stream=\"/live/s-no-app\""), "{no_app}");
    let forged = line("sequence=\"q-forged\"");
    assert!(
        forged.contains("stream=\"d.example.com/live/s-forged\""),
        "{forged}"
    );
}

#[tokio::test]
async fn sigterm_finishes_and_exits_0() {
    let mut exporter = Exporter::start(&["--storage.path", ":memory:"]).await;
    assert_eq!(exporter.post(&signed(sample("push"))).await.status, 200);
    let status = exporter.terminate();
    assert_eq!(status.code(), Some(0));
}

/// A second SIGTERM while a request in flight holds the shutdown up ends the process at once,
/// with status 1, and what was answered 200 before is there at the next start.
#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("exporter.db").display().to_string();
    let args = ["--storage.path", &db, "--web.request-timeout", "60s"];
    let mut exporter = Exporter::start(&args).await;
    assert_eq!(exporter.post(&signed(sample("push"))).await.status, 200);
    let body = serde_json::to_vec(&signed(push("d.example.com", "s2", "q2", 1))).unwrap();
    let addr = format!("127.0.0.1:{}", exporter.port).parse().unwrap();
    let _in_flight = crate::hostile::half_sent(addr, &body).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    exporter.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        exporter.child.try_wait().unwrap().is_none(),
        "stopped with a request in flight"
    );
    let started = Instant::now();
    // Waits for the exit at most half of the request timeout, which the first one waits for.
    assert_eq!(exporter.terminate().code(), Some(1));
    eprintln!("stopped {:?} after the second SIGTERM", started.elapsed());

    let again = Exporter::start(&args).await;
    let s = again.scrape().await;
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(
        s.sum("tencent_css_callbacks_total", &[("outcome", "accepted")]),
        1.0
    );
}

/// A SIGTERM while a large database is being loaded ends the process without reading the rest:
/// it is stopped, and reading on made it exit seconds later, deaf to a second signal.
#[tokio::test]
async fn sigterm_while_loading_exits_without_finishing_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("exporter.db").display().to_string();
    let args = ["--storage.path", db.as_str()];
    let mut exporter = Exporter::start(&args).await;
    assert!(exporter.terminate().success());
    // 300,000 live streams: loading them takes seconds in a debug build.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
             INSERT INTO sessions SELECT 'big.example.com', 'live', 's' || i, i, 'mainland', 1
             FROM n;",
        )
        .unwrap();

    let log = dir.path().join("log");
    let mut child = binary()
        .env("CSS_CALLBACK_KEY", KEY)
        .args(["--web.listen-address", "127.0.0.1:0", "--storage.path", &db])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("stopped while starting"), "{log}");
    assert!(!log.contains("state loaded"), "{log}");

    // The database is whole: the next start loads it.
    let mut again = Exporter::start(&args).await;
    let s = again.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 300_000.0);
    assert!(again.terminate().success());
}

#[test]
fn sigterm_while_starting_exits_0() {
    // Nothing listens there: the exporter waits for Redis (up to 30 s) before serving.
    let port = free_port();
    let mut child = binary()
        .env("CSS_CALLBACK_KEY", KEY)
        .args(["--web.listen-address", "127.0.0.1:0"])
        .arg("--storage.redis-url")
        .arg(format!("redis://127.0.0.1:{port}/0"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()))
        .map_while(Result::ok);
    assert!(log.any(|line| line.contains("waiting for redis")));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = log.collect();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("shutdown signal received")),
        "{rest:?}"
    );
}
