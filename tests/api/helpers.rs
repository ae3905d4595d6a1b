//! Shared test harness: the exporter in process (`spawn_app`) or as the real binary
//! (`Exporter::start`), signed sample callbacks, and a small `/metrics` reader.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{json, Value};
use tencent_css_exporter::config::Cli;
use tencent_css_exporter::signature::{sign, Keys};
use tencent_css_exporter::Listeners;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The callback key every test signs with.
pub const KEY: &str = "t3stKey0001";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A sample payload from `tests/samples/` (as Tencent documents it).
pub fn sample(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/samples/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Re-signs a body with `key` and a `t` ten minutes ahead, as Tencent does.
pub fn signed_with(mut body: Value, key: &str) -> Value {
    let t = now() + 600;
    body["t"] = json!(t);
    body["sign"] = json!(sign(key, t));
    body
}

pub fn signed(body: Value) -> Value {
    signed_with(body, KEY)
}

/// A push of `stream` under session `sequence` in `domain`, pushed from `set_id`.
pub fn push(domain: &str, stream: &str, sequence: &str, set_id: i64) -> Value {
    let mut body = sample("push");
    body["app"] = json!(domain);
    body["stream_id"] = json!(stream);
    body["channel_id"] = json!(stream);
    body["sequence"] = json!(sequence);
    body["set_id"] = json!(set_id);
    body["event_time"] = json!(now());
    body
}

/// The disconnect of that session, with `errcode` and a push duration in milliseconds.
pub fn disconnect(domain: &str, stream: &str, sequence: &str, set_id: i64, errcode: i64) -> Value {
    let mut body = sample("disconnect");
    body["app"] = json!(domain);
    body["stream_id"] = json!(stream);
    body["channel_id"] = json!(stream);
    body["sequence"] = json!(sequence);
    body["set_id"] = json!(set_id);
    body["errcode"] = json!(errcode);
    body["event_time"] = json!(now());
    body
}

/// `body` pushed to (or disconnected from) `appname`; `None`: without one.
pub fn on_path(mut body: Value, appname: Option<&str>) -> Value {
    match appname {
        Some(appname) => body["appname"] = json!(appname),
        None => {
            body.as_object_mut().unwrap().remove("appname");
        }
    }
    body
}

/// One sample line of the text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parsed `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample line");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label pair");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                Sample {
                    name: name.to_string(),
                    labels,
                    value: value.parse().expect("sample value"),
                }
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of the series `name` whose labels include all of `labels`; panics if several.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} is ambiguous: {found:?}"
        );
        found.first().map(|s| s.value)
    }

    /// Like `get`, but 0 when the series does not exist.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over every series of `name` whose labels include `labels`.
    /// `tencent_css_callbacks_total` of one event type and outcome.
    pub fn callbacks(&self, event: &str, outcome: &str) -> f64 {
        self.value(
            "tencent_css_callbacks_total",
            &[("event", event), ("outcome", outcome)],
        )
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Every sample of the exporter's event metrics (`tencent_css_*`), for comparing two scrapes:
    /// what survives a restart and what every replica shows alike. The metrics of the process
    /// itself (`tencent_css_exporter_*`: its storage writes, its connections) are left out:
    /// they start anew with it.
    pub fn exporter_samples(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| {
                s.name.starts_with("tencent_css_") && !s.name.starts_with("tencent_css_exporter_")
            })
            .map(|s| (format!("{}{:?}", s.name, s.labels), s.value))
            .collect()
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    pub body: String,
}

fn content_type_of(response: &reqwest::Response) -> Option<String> {
    let value = response.headers().get(reqwest::header::CONTENT_TYPE)?;
    value.to_str().ok().map(str::to_owned)
}

/// Talks to an exporter at a callback address and a metrics address.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub callback_url: String,
    pub metrics_base: String,
}

impl Client {
    pub fn new(callback: SocketAddr, metrics: SocketAddr) -> Self {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            callback_url: format!("http://{callback}/callback"),
            metrics_base: format!("http://{metrics}"),
        }
    }

    /// Posts a JSON callback body.
    pub async fn post(&self, body: &Value) -> Answer {
        self.post_raw(body.to_string().into_bytes(), "application/json")
            .await
    }

    pub async fn try_post(&self, body: &Value) -> Result<Answer, reqwest::Error> {
        let response = self
            .http
            .post(&self.callback_url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        Ok(Answer {
            status: response.status().as_u16(),
            content_type: content_type_of(&response),
            body: response.text().await?,
        })
    }

    pub async fn post_raw(&self, body: Vec<u8>, content_type: &str) -> Answer {
        let response = self
            .http
            .post(&self.callback_url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("callback request");
        Answer {
            status: response.status().as_u16(),
            content_type: content_type_of(&response),
            body: response.text().await.unwrap(),
        }
    }

    pub async fn get(&self, url: &str) -> Answer {
        let response = self.http.get(url).send().await.expect("GET");
        Answer {
            status: response.status().as_u16(),
            content_type: content_type_of(&response),
            body: response.text().await.unwrap(),
        }
    }

    pub async fn scrape(&self) -> Scrape {
        let answer = self.get(&format!("{}/metrics", self.metrics_base)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        Scrape::parse(answer.body)
    }

    pub async fn ready(&self) -> Answer {
        self.get(&format!("{}/readyz", self.metrics_base)).await
    }

    /// Waits until `/healthz` answers; `exited` tells if the process behind it died meanwhile.
    pub async fn wait_healthy(&self, mut exited: impl FnMut() -> Option<std::process::ExitStatus>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = self
                .http
                .get(format!("{}/healthz", self.metrics_base))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            if let Some(status) = exited() {
                panic!("exporter exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "exporter did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The exporter running in this process on port 0.
pub struct TestApp {
    pub client: Client,
    pub callback_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tencent_css_exporter::RunError>>>,
}

impl std::ops::Deref for TestApp {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Options of `spawn_app_with`.
pub struct AppOptions {
    /// Extra command-line flags.
    pub args: Vec<String>,
    /// Callback keys; empty means `--callback.insecure-skip-verify` semantics.
    pub keys: Vec<&'static str>,
    /// Serve /metrics on its own listener.
    pub separate_metrics: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            args: vec!["--storage.path".into(), ":memory:".into()],
            keys: vec![KEY],
            separate_metrics: false,
        }
    }
}

/// Records a disconnect of a new domain at a time until the plain `/metrics` page is at least
/// `bytes` long (about 10 KB a domain); returns how many domains it took.
pub async fn fill_page(client: &Client, bytes: usize) -> usize {
    let mut domains: i64 = 0;
    while client
        .get(&format!("{}/metrics", client.metrics_base))
        .await
        .body
        .len()
        < bytes
    {
        for _ in 0..250 {
            let (domain, set_id) = (format!("d{domains}.example"), 1 + domains % 2 * 100);
            let body = disconnect(&domain, "s", &format!("q{domains}"), set_id, 1);
            assert_eq!(client.post(&signed(body)).await.status, 200);
            domains += 1;
        }
    }
    domains as usize
}

/// The exporter with its defaults, an in-memory store and [`KEY`].
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let cli = Cli::try_parse_from(
        std::iter::once("tencent-css-exporter".to_string()).chain(options.args.clone()),
    )
    .expect("valid test flags");
    let callback = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback_addr = callback.local_addr().unwrap();
    let metrics = if options.separate_metrics {
        Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
    } else {
        None
    };
    let metrics_addr = metrics
        .as_ref()
        .map(|l| l.local_addr().unwrap())
        .unwrap_or(callback_addr);
    let keys = (!options.keys.is_empty()).then(|| Keys::from_list(&options.keys.join(",")));
    let (stop, stopped) = oneshot::channel::<()>();
    let config = cli.config;
    let task = tokio::spawn(async move {
        tencent_css_exporter::run(&config, keys, Listeners { callback, metrics }, async move {
            let _ = stopped.await;
        })
        .await
    });
    let client = Client::new(callback_addr, metrics_addr);
    let app = TestApp {
        client,
        callback_addr,
        metrics_addr,
        stop: Some(stop),
        task: Some(task),
    };
    app.wait_ready().await;
    app
}

impl TestApp {
    async fn wait_ready(&self) {
        self.client.wait_healthy(|| None).await;
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), tencent_css_exporter::RunError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// The real binary.
pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tencent-css-exporter"));
    // The tests decide every setting; nothing leaks in from the environment.
    for (name, _) in std::env::vars() {
        if name.starts_with("CSS_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs a subcommand of the binary (`simulate`, `load`) with [`KEY`] off the runtime's
/// threads; it must succeed. Returns what it printed on stdout.
pub async fn subcommand(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        binary()
            .env("CSS_CALLBACK_KEY", KEY)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The exporter as a process of its own.
pub struct Exporter {
    pub child: Child,
    pub client: Client,
    pub port: u16,
    pub args: Vec<String>,
}

impl std::ops::Deref for Exporter {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Exporter {
    /// Starts the binary with [`KEY`] on a free port, plus `args`, and waits until it is ready.
    pub async fn start(args: &[&str]) -> Exporter {
        Self::start_on(free_port(), args.iter().map(|s| s.to_string()).collect()).await
    }

    pub async fn start_on(port: u16, args: Vec<String>) -> Exporter {
        Self::start_logging_to(port, args, Stdio::inherit()).await
    }

    /// [`Exporter::start_on`], with the log (stderr) going to `log`.
    pub async fn start_logging_to(port: u16, args: Vec<String>, log: Stdio) -> Exporter {
        let mut cmd = binary();
        cmd.env("CSS_CALLBACK_KEY", KEY)
            .arg("--web.listen-address")
            .arg(format!("127.0.0.1:{port}"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("start the exporter binary");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut exporter = Exporter {
            child,
            client: Client::new(addr, addr),
            port,
            args,
        };
        exporter.wait_serving().await;
        exporter
    }

    async fn wait_serving(&mut self) {
        let client = self.client.clone();
        client.wait_healthy(|| self.child.try_wait().unwrap()).await;
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no chance to flush anything.
    pub fn crash(&mut self) {
        self.signal("KILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "exporter did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an outside program is on the PATH. In CI (`CI=true`) a missing one fails the test;
/// elsewhere the test is skipped with a printed reason.
pub fn require_program(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{program} is required in CI but is not installed");
        }
        eprintln!("skipping: {program} is not installed");
    }
    found
}

/// A `redis-server` of the test's own, on a free port, with an append-only file written on
/// every command so that a restart keeps everything acknowledged.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// `None` (after printing why) when redis-server is missing outside CI.
    pub async fn start() -> Option<RedisServer> {
        if !require_program("redis-server") {
            return None;
        }
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.spawn().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (its data stays in the append-only file).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as with a
    /// hung Redis. `resume` thaws it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    /// Runs one command (an inline command: no spaces in its words) and returns the reply line.
    pub fn command(&self, words: &[&str]) -> String {
        use std::io::{BufRead, BufReader, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        conn.write_all(format!("{}\r\n", words.join(" ")).as_bytes())
            .unwrap();
        let mut reply = String::new();
        BufReader::new(conn).read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Checks the log of a storage outage that refused `refused` callbacks: no line for each of
/// them, one line when `store` ("storage", "redis") recovered that says how long the outage
/// lasted and what it refused. Returns how many times it was logged failing.
pub fn assert_outage_logged(log: &str, store: &str, refused: u64) -> usize {
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).collect::<Vec<_>>();
    assert!(lines("callback not recorded").is_empty(), "{log}");
    let recovered = lines(&format!("{store} recovered"));
    assert_eq!(recovered.len(), 1, "{log}");
    assert!(
        recovered[0].contains(&format!("refused={refused}")),
        "{log}"
    );
    assert!(recovered[0].contains("seconds="), "{log}");
    lines(&format!("{store} failing")).len()
}
