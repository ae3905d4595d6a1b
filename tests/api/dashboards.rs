//! The Grafana dashboard and the Prometheus alert rules in `dashboards/`.
//!
//! They are checked the way a user would meet them: the files are well formed and documented,
//! every PromQL expression parses and names only metrics that a running exporter really serves,
//! `promtool` accepts the rules, their unit tests and the example configuration, and a real
//! Prometheus scraping a running exporter that receives callbacks has data for every dashboard
//! query and fires the bad-signature alert.
//!
//! The tests that run `promtool` or `prometheus` (Debian package `prometheus`) skip with a
//! message when the program is not installed, and fail when `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{AggregateExpr, Expr, LabelModifier, VectorSelector};
use serde_json::{json, Value};

use crate::helpers::free_port;

const DASHBOARD: &str = "dashboards/grafana/tencent-css-overview.json";
const ALERTS: &str = "dashboards/prometheus/alerts.yml";
const ALERTS_TEST: &str = "dashboards/prometheus/alerts_test.yml";
const PROMETHEUS_CONFIG: &str = "dashboards/prometheus/prometheus.yml";
/// Where the runbook is: the dashboards fragment, or the README it is merged into.
const RUNBOOK_FILES: [&str; 2] = ["README.md", "dashboards/DASHBOARDS.md"];

/// The scrape job the alert rules expect.
const JOB: &str = "tencent-css-exporter";
/// The alert that must fire within a minute of bad-signature callbacks.
const SIGNATURE_ALERT: &str = "TencentCSSCallbacksRejected";
/// Labels Prometheus adds to every scraped series, which the rule unit tests may set.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "pod"];
/// Metric names that Prometheus makes up itself rather than scraping them.
const SYNTHESISED: [&str; 1] = ["up"];
/// The callback key the exporter under test is started with.
const KEY: &str = "dashboard-test-key";
/// How every dashboard panel and target must name its data source.
const DATASOURCE: &str = "${datasource}";

// ------------------------------------------------------------------------------------------
// The files
// ------------------------------------------------------------------------------------------

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

fn yaml(relative: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every panel, including those inside collapsed rows, rows themselves left out.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"]
        .as_array()
        .expect("dashboard has panels")
    {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

fn variables(dashboard: &Value) -> &Vec<Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("dashboard has templating.list")
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    variables(dashboard)
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("dashboard has no `{name}` variable"))
}

/// The query text of a query variable: a plain string, or `{"query": ...}` as Grafana 10
/// writes it.
fn variable_query(var: &Value) -> &str {
    var["query"]
        .as_str()
        .or_else(|| var["query"]["query"].as_str())
        .unwrap_or_else(|| panic!("variable {} has no query", var["name"]))
}

/// Alert rules as (name, rule) pairs.
fn alert_rules() -> Vec<(String, serde_yaml::Value)> {
    let rules = yaml(ALERTS);
    let mut out = Vec::new();
    for group in rules["groups"]
        .as_sequence()
        .expect("alerts.yml has groups")
    {
        for rule in group["rules"].as_sequence().expect("every group has rules") {
            let name = rule["alert"]
                .as_str()
                .expect("every rule in alerts.yml is an alerting rule")
                .to_owned();
            out.push((name, rule.clone()));
        }
    }
    assert!(!out.is_empty(), "alerts.yml has no rules");
    out
}

/// Every `input_series` of the rule unit tests.
fn rule_test_series() -> Vec<String> {
    let tests = yaml(ALERTS_TEST);
    let series: Vec<String> = tests["tests"]
        .as_sequence()
        .expect("alerts_test.yml has tests")
        .iter()
        .flat_map(|t| t["input_series"].as_sequence().cloned().unwrap_or_default())
        .map(|s| s["series"].as_str().expect("a series").to_owned())
        .collect();
    assert!(!series.is_empty(), "alerts_test.yml has no input series");
    series
}

/// Only the rules about the scrape itself (`up`) may select the scrape job: every other one
/// works under any job name, so renaming the job leaves nothing silent but what the README says.
#[test]
fn only_the_rules_on_up_select_the_scrape_job() {
    let values = builtins();
    for (name, rule) in alert_rules() {
        let query = Query {
            origin: name.clone(),
            expr: rule["expr"]
                .as_str()
                .expect("every rule has an expr")
                .to_owned(),
        };
        let expr = parse(&query, &values).unwrap();
        for vs in selectors(&expr) {
            let on_up = metric_name(vs).as_deref() == Some("up");
            let by_job = matchers(vs).any(|m| m.name == "job");
            assert!(
                on_up || !by_job,
                "{name} selects job on {:?}: it would go silent under another job name",
                metric_name(vs)
            );
            assert!(!on_up || name.starts_with("TencentCSSExporter"), "{name}");
        }
    }
}

/// A PromQL expression and where it comes from, for messages.
struct Query {
    origin: String,
    expr: String,
}

/// Every `targets[].expr` of the dashboard.
fn panel_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                origin: format!("panel {} target {}", panel["title"], target["refId"]),
                expr: target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {} has a target without expr", panel["title"]))
                    .to_owned(),
            });
        }
    }
    out
}

/// The PromQL inside the dashboard's query variables: the series selector of
/// `label_values(selector, label)`, or the expression of `query_result(expr)`.
fn variable_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for var in variables(dashboard).iter().filter(|v| v["type"] == "query") {
        let query = variable_query(var).trim();
        let origin = format!("variable {}", var["name"]);
        let expr = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
        {
            match args.rsplit_once(',') {
                Some((selector, _label)) => selector.trim(),
                None => continue, // label_values(label): no metric
            }
        } else if let Some(expr) = query
            .strip_prefix("query_result(")
            .and_then(|rest| rest.strip_suffix(')'))
        {
            expr.trim()
        } else {
            panic!("{origin}: unsupported variable query {query:?}");
        };
        out.push(Query {
            origin,
            expr: expr.to_owned(),
        });
    }
    out
}

fn rule_queries() -> Vec<Query> {
    alert_rules()
        .into_iter()
        .map(|(name, rule)| Query {
            origin: format!("alert {name}"),
            expr: rule["expr"]
                .as_str()
                .expect("every rule has expr")
                .to_owned(),
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// PromQL
// ------------------------------------------------------------------------------------------

/// Grafana's built-in variables, with values that a Prometheus query can take.
const GRAFANA_BUILTINS: [(&str, &str); 5] = [
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
];

/// Replaces `$name`, `${name}` and `[[name]]`; longer names first so that `$__range_s` is not
/// read as `$__range` followed by `_s`.
fn substitute(expr: &str, values: &[(String, String)]) -> String {
    let mut values: Vec<_> = values.iter().collect();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

fn builtins() -> Vec<(String, String)> {
    GRAFANA_BUILTINS
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The built-ins plus every dashboard variable at "All" (or its default for text boxes): what a
/// user sees on first opening the dashboard.
fn all_values(dashboard: &Value) -> Vec<(String, String)> {
    let mut values = builtins();
    for var in variables(dashboard) {
        let name = var["name"]
            .as_str()
            .expect("variables have names")
            .to_owned();
        let value = match var["type"].as_str() {
            Some("datasource") => continue,
            Some("query" | "custom") if var["includeAll"] == true => var["allValue"]
                .as_str()
                .expect("variables with includeAll have an allValue")
                .to_owned(),
            _ => var["current"]["value"]
                .as_str()
                .or_else(|| var["query"].as_str())
                .unwrap_or_else(|| panic!("variable {name} has no value to use"))
                .to_owned(),
        };
        values.push((name, value));
    }
    values
}

fn parse(query: &Query, values: &[(String, String)]) -> Result<Expr, String> {
    let expr = substitute(&query.expr, values);
    promql_parser::parser::parse(&expr)
        .map_err(|e| format!("{}: does not parse: {e}\n{expr}", query.origin))
}

/// Calls `f` on `expr` and every expression below it.
fn walk<'a>(expr: &'a Expr, f: &mut dyn FnMut(&'a Expr)) {
    f(expr);
    match expr {
        Expr::Aggregate(a) => {
            walk(&a.expr, f);
            if let Some(param) = &a.param {
                walk(param, f);
            }
        }
        Expr::Unary(u) => walk(&u.expr, f),
        Expr::Binary(b) => {
            walk(&b.lhs, f);
            walk(&b.rhs, f);
        }
        Expr::Paren(p) => walk(&p.expr, f),
        Expr::Subquery(s) => walk(&s.expr, f),
        Expr::Call(c) => c.args.args.iter().for_each(|arg| walk(arg, f)),
        _ => {}
    }
}

fn selectors(expr: &Expr) -> Vec<&VectorSelector> {
    let mut out = Vec::new();
    walk(expr, &mut |e| match e {
        Expr::VectorSelector(vs) => out.push(vs),
        Expr::MatrixSelector(ms) => out.push(&ms.vs),
        _ => {}
    });
    out
}

fn matchers(vs: &VectorSelector) -> impl Iterator<Item = &Matcher> {
    vs.matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten())
}

/// The metric name a selector selects, if it names exactly one.
fn metric_name(vs: &VectorSelector) -> Option<String> {
    vs.name.clone().or_else(|| {
        matchers(vs)
            .find(|m| m.name == "__name__" && m.op == MatchOp::Equal)
            .map(|m| m.value.clone())
    })
}

/// `max without (instance, pod) (...)`: one value per series that all replicas export alike.
fn is_replica_dedup(a: &AggregateExpr) -> bool {
    a.op.to_string() == "max"
        && matches!(&a.modifier, Some(LabelModifier::Exclude(labels))
            if ["instance", "pod"].iter().all(|l| labels.labels.iter().any(|x| x == l)))
}

/// Selectors of the exporter's own metrics below `expr` that are still one series per replica:
/// not under a `max without (instance, pod)`.
fn per_replica(expr: &Expr) -> Vec<String> {
    match expr {
        Expr::Aggregate(a) if is_replica_dedup(a) => Vec::new(),
        Expr::Aggregate(a) => per_replica(&a.expr),
        Expr::Unary(u) => per_replica(&u.expr),
        Expr::Paren(p) => per_replica(&p.expr),
        Expr::Subquery(s) => per_replica(&s.expr),
        Expr::Binary(b) => {
            let mut out = per_replica(&b.lhs);
            out.extend(per_replica(&b.rhs));
            out
        }
        Expr::Call(c) => c.args.args.iter().flat_map(|a| per_replica(a)).collect(),
        Expr::VectorSelector(vs) => exporter_metric(vs),
        Expr::MatrixSelector(ms) => exporter_metric(&ms.vs),
        _ => Vec::new(),
    }
}

fn exporter_metric(vs: &VectorSelector) -> Vec<String> {
    metric_name(vs)
        .filter(|n| n.starts_with("tencent_css_"))
        .into_iter()
        .collect()
}

/// Problems with sums that would add up the identical series of several replicas.
fn double_counting(query: &Query, expr: &Expr) -> Vec<String> {
    let mut problems = Vec::new();
    walk(expr, &mut |e| {
        if let Expr::Aggregate(a) = e {
            if a.op.to_string() == "sum" {
                let raw = per_replica(&a.expr);
                if !raw.is_empty() {
                    problems.push(format!(
                        "{}: sums {raw:?} without `max without (instance, pod)` first, so \
                         several replicas would be counted several times",
                        query.origin
                    ));
                }
            }
        }
    });
    problems
}

/// The `[range]` parts of an expression as written.
fn ranges(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find('[') {
        let Some(len) = rest[start..].find(']') else {
            break;
        };
        out.push(&rest[start + 1..start + len]);
        rest = &rest[start + len + 1..];
    }
    out
}

// ------------------------------------------------------------------------------------------
// Programs
// ------------------------------------------------------------------------------------------

/// A program from PATH. Missing, it fails the test on CI and skips it elsewhere.
fn program(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "`{name}` is not installed but CI=true requires this test to run: \
                 install the Debian package `prometheus` (it brings prometheus and promtool)"
            );
        }
        eprintln!(
            "skipping: `{name}` is not installed (Debian package `prometheus`); \
             with CI=true this test fails instead"
        );
    }
    found
}

fn promtool(args: &[&str]) {
    let Some(promtool) = program("promtool") else {
        return;
    };
    let output = Command::new(&promtool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A child process that is killed when the test ends, however it ends.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Process {
        let log_file = File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process { name, child, log }
    }

    /// Panics with the process log if it has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("process status") {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

/// Polls `url` until it answers 200.
async fn wait_ready(client: &reqwest::Client, process: &mut Process, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        process.assert_running();
        if let Ok(response) = client.get(url).send().await {
            if response.status() == 200 {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "{} never answered 200 on {url}:\n{}",
                process.name,
                process.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The exporter binary on a free port with in-memory storage.
struct Exporter {
    process: Process,
    addr: String,
    _dir: tempfile::TempDir,
}

async fn start_exporter(client: &reqwest::Client) -> Exporter {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = format!("127.0.0.1:{}", free_port());
    // A file, as by default: the SQLite store serves metrics of its own.
    let db = dir.path().join("exporter.db");
    let mut process = Process::spawn(
        "tencent-css-exporter",
        Command::new(env!("CARGO_BIN_EXE_tencent-css-exporter"))
            .env("CSS_CALLBACK_KEY", KEY)
            .args(["--web.listen-address", &addr, "--storage.path"])
            .arg(&db),
        dir.path().join("exporter.log"),
    );
    wait_ready(client, &mut process, &format!("http://{addr}/readyz")).await;
    Exporter {
        process,
        addr,
        _dir: dir,
    }
}

// ------------------------------------------------------------------------------------------
// Callbacks
// ------------------------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// MD5(key + t) in lowercase hex, as Tencent Cloud signs callbacks.
fn sign(key: &str, t: i64) -> String {
    hex::encode(Md5::digest(format!("{key}{t}").as_bytes()))
}

struct Stream<'a> {
    domain: &'a str,
    set_id: i64,
    id: String,
    sequence: String,
}

/// A signed push (`event_type` 1) or disconnect (0) callback body.
fn event(stream: &Stream, event_type: i64, errcode: i64, push_duration_ms: Option<u64>) -> Value {
    let t = now() + 300;
    let mut body = json!({
        "app": stream.domain,
        "appid": 12345678,
        "appname": "live",
        "channel_id": stream.id,
        "errcode": errcode,
        "errmsg": if errcode == 0 { "ok" } else { "disconnected" },
        "event_time": if event_type == 1 { now() - 2 } else { now() },
        "event_type": event_type,
        "set_id": stream.set_id,
        "node": "100.121.160.92",
        "sequence": stream.sequence,
        "stream_id": stream.id,
        "stream_param": "stream_param=test",
        "user_ip": "119.29.94.245",
        "sign": sign(KEY, t),
        "t": t,
    });
    if let Some(ms) = push_duration_ms {
        body["push_duration"] = json!(ms.to_string());
    }
    body
}

async fn post(client: &reqwest::Client, addr: &str, body: String) -> (u16, String) {
    let response = client
        .post(format!("http://{addr}/callback"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("callback request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn expect_status(
    client: &reqwest::Client,
    addr: &str,
    body: String,
    expected: &[u16],
    what: &str,
) {
    let (status, text) = post(client, addr, body).await;
    assert!(
        expected.contains(&status),
        "{what}: expected HTTP {expected:?}, got {status}: {text}"
    );
}

/// One round of traffic that gives every dashboard panel something to show: pushes on two
/// domains in both areas, a resent push (duplicate), normal and abnormal disconnects (errcodes 1,
/// 8, 12, 18) with durations, an event type the exporter ignores, a bad signature, an expired
/// `t` and a body that is not JSON. Two streams per round stay live, one in each area.
async fn send_round(client: &reqwest::Client, addr: &str, round: u32) {
    let stream = |domain, set_id, n: u32| Stream {
        domain,
        set_id,
        id: format!("dash_{round}_{n}"),
        sequence: format!(
            "{}",
            7_000_000_000_000_000_000u64 + u64::from(round) * 100 + u64::from(n)
        ),
    };
    let ok = [200];
    let mainland = "test.domain.com";
    let overseas = "overseas.domain.com";

    // Ends normally (client_stop), its push is resent once.
    let a = stream(mainland, 2, 1);
    let push_a = event(&a, 1, 0, None).to_string();
    expect_status(client, addr, push_a.clone(), &ok, "push").await;
    expect_status(client, addr, push_a, &ok, "resent push").await;
    // Stay live, one in each area.
    let b = stream(mainland, 3, 2);
    expect_status(client, addr, event(&b, 1, 0, None).to_string(), &ok, "push").await;
    let f = stream(overseas, 7, 9);
    expect_status(client, addr, event(&f, 1, 0, None).to_string(), &ok, "push").await;
    // End abnormally: no_data (8), network (12), rejected (18).
    let c = stream(overseas, 100, 3);
    expect_status(client, addr, event(&c, 1, 0, None).to_string(), &ok, "push").await;
    let d = stream(overseas, 150, 4);
    expect_status(client, addr, event(&d, 1, 0, None).to_string(), &ok, "push").await;
    let e = stream(mainland, 5, 5);
    expect_status(client, addr, event(&e, 1, 0, None).to_string(), &ok, "push").await;

    expect_status(
        client,
        addr,
        event(&a, 0, 1, Some(128_581)).to_string(),
        &ok,
        "disconnect 1",
    )
    .await;
    expect_status(
        client,
        addr,
        event(&c, 0, 8, Some(3_600_000)).to_string(),
        &ok,
        "disconnect 8",
    )
    .await;
    expect_status(
        client,
        addr,
        event(&d, 0, 12, Some(45_000)).to_string(),
        &ok,
        "disconnect 12",
    )
    .await;
    expect_status(
        client,
        addr,
        event(&e, 0, 18, Some(5_000)).to_string(),
        &ok,
        "disconnect 18",
    )
    .await;

    // A recording-style event the exporter answers but does not count.
    let other = event(&stream(mainland, 2, 6), 100, 0, None);
    expect_status(client, addr, other.to_string(), &ok, "event_type 100").await;

    // Rejected: a forged sign, and a correctly signed but old t.
    let mut forged = event(&stream(mainland, 2, 7), 1, 0, None);
    forged["sign"] = json!("0123456789abcdef0123456789abcdef");
    expect_status(client, addr, forged.to_string(), &[401], "bad sign").await;
    let mut expired = event(&stream(mainland, 2, 8), 1, 0, None);
    let old = now() - 3600;
    expired["t"] = json!(old);
    expired["sign"] = json!(sign(KEY, old));
    expect_status(client, addr, expired.to_string(), &[401], "expired t").await;
    // Not JSON at all.
    let (status, text) = post(client, addr, "{not json".to_owned()).await;
    assert!(
        (400..500).contains(&status),
        "body that is not JSON: got {status}: {text}"
    );
}

// ------------------------------------------------------------------------------------------
// The exposition format
// ------------------------------------------------------------------------------------------

/// What `/metrics` says: the label names of every series name, and the metric families.
struct Exposition {
    /// Series name (as queried: `x_bucket`, `x_sum`, ...) to the label names seen on it.
    series: BTreeMap<String, BTreeSet<String>>,
    /// `# TYPE` family name to its type.
    families: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut families = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    panic!("bad TYPE line: {line}")
                };
                families.insert(name.to_owned(), kind.to_owned());
                // A family's series names exist even before it has a sample.
                let names: &[&str] = match kind {
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["", "_sum", "_count"],
                    _ => &[""],
                };
                for suffix in names {
                    series.entry(format!("{name}{suffix}")).or_default();
                }
            } else if !line.starts_with('#') {
                let (name, labels) = sample_labels(line);
                series.entry(name).or_default().extend(labels);
            }
        }
        Exposition { series, families }
    }
}

/// The name and label names of one sample line, `name{a="x",b="y"} value`.
fn sample_labels(line: &str) -> (String, Vec<String>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..end].to_owned();
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars();
        loop {
            let label: String = chars.by_ref().take_while(|c| *c != '=').collect();
            let label = label.trim_start_matches(',').trim();
            if label.is_empty() || label.starts_with('}') {
                break;
            }
            labels.push(label.to_owned());
            assert_eq!(chars.next(), Some('"'), "label value quoted in {line}");
            let mut escaped = false;
            for c in chars.by_ref() {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    _ => escaped = false,
                }
            }
        }
    }
    (name, labels)
}

// ------------------------------------------------------------------------------------------
// Prometheus
// ------------------------------------------------------------------------------------------

/// Percent-encodes a query string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn api(client: &reqwest::Client, base: &str, path: &str) -> Value {
    let response = client
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {path}: HTTP {status}, not JSON ({e}): {text}"));
    assert_eq!(
        body["status"], "success",
        "GET {path}: HTTP {status}: {text}"
    );
    body["data"].clone()
}

async fn instant_query(client: &reqwest::Client, base: &str, expr: &str) -> Value {
    api(
        client,
        base,
        &format!("/api/v1/query?query={}", encode(expr)),
    )
    .await
}

/// The numbers of an instant query result that are neither NaN nor infinite.
fn finite_values(data: &Value) -> Vec<f64> {
    let value = |v: &Value| v[1].as_str().and_then(|s| s.parse::<f64>().ok());
    let values: Vec<Option<f64>> = match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| value(&s["value"]))
            .collect(),
        Some("scalar") => vec![value(&data["result"])],
        _ => Vec::new(),
    };
    values
        .into_iter()
        .flatten()
        .filter(|v| v.is_finite())
        .collect()
}

struct Prometheus {
    process: Process,
    base: String,
    _dir: tempfile::TempDir,
}

/// A Prometheus scraping and evaluating every second, with the real alert rules.
async fn start_prometheus(client: &reqwest::Client, binary: &Path, target: &str) -> Prometheus {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    let rules = repo_file(ALERTS);
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{target:?}]\n"
        ),
    )
    .expect("write prometheus.yml");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut process = Process::spawn(
        "prometheus",
        Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .args(["--web.listen-address", &addr]),
        dir.path().join("prometheus.log"),
    );
    let base = format!("http://{addr}");
    wait_ready(client, &mut process, &format!("{base}/-/ready")).await;
    Prometheus {
        process,
        base,
        _dir: dir,
    }
}

/// Polls `expr` until it has a finite value; returns the last answer on time-out.
async fn wait_for_value(
    client: &reqwest::Client,
    prometheus: &mut Prometheus,
    expr: &str,
    timeout: Duration,
) -> Result<(), Value> {
    let deadline = Instant::now() + timeout;
    loop {
        prometheus.process.assert_running();
        let data = instant_query(client, &prometheus.base, expr).await;
        if !finite_values(&data).is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(data);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------------------------------
// Tests: the files on their own
// ------------------------------------------------------------------------------------------

/// Imports through the Grafana UI and from file provisioning: no `__inputs`, the data source a
/// variable used everywhere, every panel documented and with a unit, rates on
/// `$__rate_interval`.
#[test]
fn dashboard_imports_anywhere_and_documents_every_panel() {
    let dashboard = dashboard();
    assert!(
        dashboard.get("__inputs").is_none(),
        "the dashboard must not need __inputs"
    );
    assert!(
        dashboard["id"].is_null(),
        "a dashboard to import has id null"
    );
    assert!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "dashboard uid"
    );
    assert!(
        dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard title"
    );
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion of Grafana 10 or later"
    );

    // Data source: a variable, never a fixed uid.
    let ds = variable(&dashboard, "datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let mut fixed = Vec::new();
    find_datasources(&dashboard, "", &mut fixed);
    assert!(
        fixed.is_empty(),
        "data sources not taken from ${{datasource}}: {fixed:#?}"
    );

    for name in ["domain", "area"] {
        let var = variable(&dashboard, name);
        assert_eq!(var["type"], "query", "{name}");
        assert_eq!(var["multi"], true, "{name} is multi-select");
        assert_eq!(var["includeAll"], true, "{name} has All");
        assert_eq!(var["allValue"], ".*", "{name} All matches every value");
        assert_eq!(var["datasource"]["uid"], DATASOURCE, "{name} data source");
        assert!(
            variable_query(var).starts_with("label_values(tencent_css_pushes_total"),
            "{name} values come from tencent_css_pushes_total"
        );
    }

    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    let mut areas: Vec<(String, [u64; 4])> = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        if title.is_empty() {
            problems.push(format!("a panel without title: {}", panel["id"]));
        }
        if !ids.insert(panel["id"].as_u64().unwrap_or_default()) {
            problems.push(format!("{title}: panel id {} not unique", panel["id"]));
        }
        if panel["description"]
            .as_str()
            .is_none_or(|d| d.trim().is_empty())
        {
            problems.push(format!("{title}: no description"));
        }
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{title}: no unit"));
        }
        if panel["datasource"]["uid"] != DATASOURCE {
            problems.push(format!("{title}: data source is not ${{datasource}}"));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{title}: no query"));
        }
        let mut refs = BTreeSet::new();
        for target in &targets {
            if !refs.insert(target["refId"].to_string()) {
                problems.push(format!("{title}: refId {} used twice", target["refId"]));
            }
            if target["datasource"]["uid"] != DATASOURCE {
                problems.push(format!(
                    "{title}: a target's data source is not ${{datasource}}"
                ));
            }
            let expr = target["expr"].as_str().unwrap_or_default();
            for range in ranges(expr) {
                if range != "$__rate_interval" && range != "$__range" {
                    problems.push(format!(
                        "{title}: range [{range}] instead of [$__rate_interval] (or [$__range])"
                    ));
                }
            }
        }
        let pos = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| pos[k].as_u64().unwrap_or(u64::MAX));
        if w == 0 || h == 0 || x + w > 24 {
            problems.push(format!("{title}: gridPos {pos} out of the 24-column grid"));
        }
        for (other, [ox, oy, ow, oh]) in &areas {
            if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                problems.push(format!("{title}: overlaps {other}"));
            }
        }
        areas.push((title.to_owned(), [x, y, w, h]));
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

/// Collects every `datasource` reference that is not the `${datasource}` variable (Grafana's
/// own built-in annotation source is fine).
fn find_datasources(value: &Value, path: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{path}.{key}");
                if key == "datasource" {
                    let ok = match child {
                        Value::Object(ds) => {
                            ds.get("uid").and_then(Value::as_str) == Some(DATASOURCE)
                                || ds.get("type").and_then(Value::as_str) == Some("grafana")
                        }
                        _ => false,
                    };
                    if !ok {
                        found.push(format!("{here} = {child}"));
                    }
                }
                find_datasources(child, &here, found);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                find_datasources(child, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

/// Every alert is labelled, annotated, has a runbook section and unit tests that make it fire
/// and keep it quiet.
#[test]
fn alert_rules_are_labelled_documented_and_unit_tested() {
    let runbook: String = RUNBOOK_FILES
        .iter()
        .filter_map(|f| std::fs::read_to_string(repo_file(f)).ok())
        .collect();
    let tests = yaml(ALERTS_TEST);
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"]
        .as_sequence()
        .expect("alerts_test.yml has tests")
    {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            let alerts = case["exp_alerts"].as_sequence().map(Vec::len).unwrap_or(0);
            if alerts > 0 {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }

    let mut problems = Vec::new();
    for (name, rule) in alert_rules() {
        if !name.starts_with("TencentCSS") {
            problems.push(format!("{name}: not prefixed TencentCSS"));
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        if !["critical", "warning"].contains(&severity) {
            problems.push(format!("{name}: severity {severity:?}"));
        }
        for annotation in ["summary", "description", "runbook_url"] {
            if rule["annotations"][annotation]
                .as_str()
                .is_none_or(str::is_empty)
            {
                problems.push(format!("{name}: no {annotation} annotation"));
            }
        }
        let anchor = format!("runbook-{}", name.to_lowercase());
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        if !url.ends_with(&format!("#{anchor}")) {
            problems.push(format!(
                "{name}: runbook_url {url:?} does not end in #{anchor}"
            ));
        }
        if !runbook.contains(&format!("id=\"{anchor}\""))
            || !runbook.contains(&format!("# {name}\n"))
        {
            problems.push(format!(
                "{name}: no runbook section (a heading {name} with anchor {anchor})"
            ));
        }
        if !firing.contains(&name) {
            problems.push(format!("{name}: no unit test where it fires"));
        }
        if !quiet.contains(&name) {
            problems.push(format!("{name}: no unit test where it stays quiet"));
        }
    }
    assert!(
        problems.is_empty(),
        "alert rule problems:\n{}",
        problems.join("\n")
    );
}

/// Every expression parses, and no sum adds up the identical series of several replicas.
#[test]
fn queries_parse_and_count_replicas_once() {
    let dashboard = dashboard();
    let values = builtins();
    let mut queries = panel_queries(&dashboard);
    queries.extend(variable_queries(&dashboard));
    queries.extend(rule_queries());
    let mut problems = Vec::new();
    for query in &queries {
        match parse(query, &values) {
            Ok(expr) => problems.extend(double_counting(query, &expr)),
            Err(e) => problems.push(e),
        }
    }
    assert!(
        problems.is_empty(),
        "query problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn promtool_checks_the_rules() {
    promtool(&["check", "rules", ALERTS]);
}

#[test]
fn promtool_runs_the_rule_unit_tests() {
    promtool(&["test", "rules", ALERTS_TEST]);
}

#[test]
fn promtool_checks_the_example_config() {
    promtool(&["check", "config", PROMETHEUS_CONFIG]);
}

// ------------------------------------------------------------------------------------------
// Tests with a running exporter
// ------------------------------------------------------------------------------------------

/// The metric names in the dashboard and the rules are the ones a running exporter serves (not
/// a list kept by hand), the dashboard filters every metric that has `domain` and `area` labels
/// by the `$domain` and `$area` variables, and every family the exporter serves is on the
/// dashboard.
#[tokio::test]
async fn queries_use_only_metrics_the_exporter_serves() {
    let client = client();
    let mut exporter = start_exporter(&client).await;
    send_round(&client, &exporter.addr, 1).await;
    exporter.process.assert_running();
    let text = client
        .get(format!("http://{}/metrics", exporter.addr))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let exposition = Exposition::parse(&text);

    let dashboard = dashboard();
    let values = builtins();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    // Panels must filter by the variables; variable queries and rules need not.
    let mut check = |query: &Query, panel: bool, problems: &mut Vec<String>| {
        let expr = match parse(query, &values) {
            Ok(expr) => expr,
            Err(e) => return problems.push(e),
        };
        for vs in selectors(&expr) {
            let Some(name) = metric_name(vs) else {
                problems.push(format!(
                    "{}: a selector without a metric name",
                    query.origin
                ));
                continue;
            };
            if SYNTHESISED.contains(&name.as_str()) {
                continue;
            }
            let Some(labels) = exposition.series.get(&name) else {
                problems.push(format!(
                    "{}: {name} is not served by the exporter",
                    query.origin
                ));
                continue;
            };
            if panel {
                used.insert(name.clone());
                for (label, variable) in [("domain", "$domain"), ("area", "$area")] {
                    let filtered = matchers(vs).any(|m| {
                        m.name == label && m.op.to_string() == "=~" && m.value == variable
                    });
                    if labels.contains(label) && !filtered {
                        problems.push(format!(
                            "{}: {name} is not filtered by {label}=~\"{variable}\"",
                            query.origin
                        ));
                    }
                }
            }
        }
    };
    for query in &panel_queries(&dashboard) {
        check(query, true, &mut problems);
    }
    for query in variable_queries(&dashboard).iter().chain(&rule_queries()) {
        check(query, false, &mut problems);
    }
    // The rule unit tests feed series as the exporter serves them: its names, its labels (and
    // the target's) and its bucket bounds, or they test rules against data that never comes.
    let bounds: BTreeSet<(String, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let at = l.find("le=\"")? + 4;
            let len = l[at..].find('"')?;
            Some((l[..l.find('{')?].to_owned(), l[at..at + len].to_owned()))
        })
        .collect();
    for series in rule_test_series() {
        let query = Query {
            origin: format!("{ALERTS_TEST}: {series}"),
            expr: series,
        };
        let expr = match parse(&query, &values) {
            Ok(expr) => expr,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        for vs in selectors(&expr) {
            let Some(name) = metric_name(vs) else {
                continue;
            };
            if SYNTHESISED.contains(&name.as_str()) {
                continue;
            }
            let Some(labels) = exposition.series.get(&name) else {
                problems.push(format!("{}: {name} is not served", query.origin));
                continue;
            };
            for m in matchers(vs).filter(|m| m.name != "__name__") {
                let known = labels.contains(&m.name) || TARGET_LABELS.contains(&m.name.as_str());
                if !known {
                    problems.push(format!("{}: {name} has no label {}", query.origin, m.name));
                }
                if m.name == "le" && !bounds.contains(&(name.clone(), m.value.clone())) {
                    problems.push(format!(
                        "{}: {name} has no bucket le=\"{}\"",
                        query.origin, m.value
                    ));
                }
            }
        }
    }
    for (family, kind) in &exposition.families {
        if !family.starts_with("tencent_css_") {
            continue;
        }
        let series = match kind.as_str() {
            "histogram" => vec![
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            _ => vec![family.clone()],
        };
        if !series.iter().any(|s| used.contains(s)) {
            problems.push(format!("the dashboard shows nothing of {family}"));
        }
    }
    assert!(
        exposition.families.len() > 1,
        "the exporter served no metric families:\n{text}"
    );
    assert!(
        problems.is_empty(),
        "metric problems:\n{}",
        problems.join("\n")
    );
}

/// A real Prometheus scrapes the exporter every second with the real alert rules while signed
/// callbacks (and rejected ones) arrive: every dashboard query, with every variable at "All",
/// gets a number, every rule evaluates without error, and the bad-signature alert fires.
#[tokio::test]
async fn prometheus_shows_every_panel_and_fires_the_signature_alert() {
    let Some(prometheus_binary) = program("prometheus") else {
        return;
    };
    let client = client();
    let mut exporter = start_exporter(&client).await;
    let mut prometheus = start_prometheus(&client, &prometheus_binary, &exporter.addr).await;

    // The first scrape sees every callback counter at 0, so that increase() sees the first
    // rejected callback.
    let first_scrape =
        format!("up{{job=\"{JOB}\"}} == 1 and on () count(tencent_css_callbacks_total) > 0");
    if let Err(last) = wait_for_value(
        &client,
        &mut prometheus,
        &first_scrape,
        Duration::from_secs(30),
    )
    .await
    {
        panic!(
            "Prometheus never scraped the exporter: {last}\n{}",
            prometheus.process.log_text()
        );
    }

    // Traffic every two seconds for as long as the checks run, so rates stay above zero.
    let traffic = {
        let client = client.clone();
        let addr = exporter.addr.clone();
        tokio::spawn(async move {
            for round in 1..=60 {
                send_round(&client, &addr, round).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    let dashboard = dashboard();
    let values = all_values(&dashboard);
    let mut missing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for query in panel_queries(&dashboard)
        .into_iter()
        .chain(variable_queries(&dashboard))
    {
        let expr = substitute(&query.expr, &values);
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        if let Err(last) = wait_for_value(&client, &mut prometheus, &expr, timeout).await {
            missing.push(format!(
                "{}: no value\n  {expr}\n  last answer: {last}",
                query.origin
            ));
        }
    }
    // And the panels show the traffic itself, not only zeros.
    let shown = [
        (
            "sum by (outcome) (rate(tencent_css_callbacks_total[1m])) > 0",
            "outcome",
            &[
                "accepted",
                "duplicate",
                "ignored",
                "bad_signature",
                "expired",
                "malformed",
            ][..],
        ),
        (
            "sum by (reason) (rate(tencent_css_disconnects_total[1m])) > 0",
            "reason",
            &["client_stop", "no_data", "network", "rejected"][..],
        ),
        (
            "sum by (errcode) (rate(tencent_css_disconnects_total[1m])) > 0",
            "errcode",
            &["1", "8", "12", "18"][..],
        ),
        (
            "sum by (area) (tencent_css_active_streams) > 0",
            "area",
            &["mainland", "overseas"][..],
        ),
        (
            "sum by (event) (rate(tencent_css_callbacks_total[1m])) > 0",
            "event",
            &["push", "disconnect", "other", "unknown"][..],
        ),
    ];
    for (expr, label, expected) in shown {
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        let seen =
            wait_for_label_values(&client, &prometheus, expr, label, expected, timeout).await;
        if !expected.iter().all(|v| seen.contains(*v)) {
            missing.push(format!(
                "{expr}: expected {label} {expected:?}, got {seen:?}"
            ));
        }
    }
    if traffic.is_finished() {
        panic!("sending callbacks stopped early: {:?}", traffic.await);
    }

    let firing = wait_for_alert(
        &client,
        &prometheus,
        SIGNATURE_ALERT,
        Duration::from_secs(60),
    )
    .await;

    let rules = api(&client, &prometheus.base, "/api/v1/rules").await;
    let mut unhealthy = Vec::new();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if rule["health"] == "err" {
                unhealthy.push(format!("{}: {}", rule["name"], rule["lastError"]));
            }
        }
    }
    let loaded = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["rules"].as_array().map(Vec::len).unwrap_or(0))
        .sum::<usize>();

    traffic.abort();
    exporter.process.assert_running();
    assert!(
        missing.is_empty(),
        "dashboard queries without data:\n{}",
        missing.join("\n")
    );
    assert!(
        firing,
        "{SIGNATURE_ALERT} did not fire within a minute of bad-signature callbacks"
    );
    assert!(
        unhealthy.is_empty(),
        "rules failing to evaluate:\n{}",
        unhealthy.join("\n")
    );
    assert_eq!(
        loaded,
        alert_rules().len(),
        "Prometheus loaded every rule of {ALERTS}"
    );
}

/// Polls `expr` until the values of `label` in its result include all of `expected`; returns the
/// values last seen.
async fn wait_for_label_values(
    client: &reqwest::Client,
    prometheus: &Prometheus,
    expr: &str,
    label: &str,
    expected: &[&str],
    timeout: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let data = instant_query(client, &prometheus.base, expr).await;
        let seen: BTreeSet<String> = data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["metric"][label].as_str().map(str::to_owned))
            .collect();
        if expected.iter().all(|v| seen.contains(*v)) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls `/api/v1/alerts` until `name` is firing.
async fn wait_for_alert(
    client: &reqwest::Client,
    prometheus: &Prometheus,
    name: &str,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let data = api(client, &prometheus.base, "/api/v1/alerts").await;
        let firing = data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing");
        if firing {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
