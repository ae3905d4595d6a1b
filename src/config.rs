//! Command-line flags and environment variables. The `///` docs here are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::signature::Keys;
use crate::store::SyncMode;

/// Environment variable holding the callback key(s), comma-separated. Keys are never taken as a
/// flag value: they would show in `ps` and in shell history.
pub const KEY_ENV: &str = "CSS_CALLBACK_KEY";

const KEY_HELP: &str = "Callback keys:
  CSS_CALLBACK_KEY   the callback key of the Tencent callback template; several keys
                     separated by commas are all accepted (key rotation). Keys are never
                     accepted on the command line and never logged.";

#[derive(Debug, Parser)]
#[command(
    name = "tencent-css-exporter",
    version,
    args_conflicts_with_subcommands = true,
    about = "Prometheus exporter for Tencent Cloud CSS: receives verified push/disconnect \
             callbacks and serves exact live-stream metrics.",
    after_help = KEY_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send correctly signed push and disconnect callbacks to a running exporter, so the
    /// dashboard fills and a deployment can be checked end to end.
    Simulate(SimulateArgs),
    /// Drive a running exporter with many correctly signed, unique callbacks and report the
    /// request rate, latency percentiles and refused requests (capacity planning, benchmarks).
    Load(LoadArgs),
}

/// How the exporter serves.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address for the callback path, /metrics, /healthz, /readyz and the landing page.
    #[arg(
        long = "web.listen-address",
        env = "CSS_EXPORTER_LISTEN_ADDRESS",
        default_value = "0.0.0.0:9877"
    )]
    pub listen_address: SocketAddr,

    /// Separate address for /metrics, /healthz and /readyz; when set they are no longer served
    /// on the (public) callback address.
    #[arg(long = "web.metrics-address", env = "CSS_EXPORTER_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,

    /// Path Tencent posts callbacks to; put it in the callback template's URL.
    #[arg(
        long = "web.callback-path",
        env = "CSS_EXPORTER_CALLBACK_PATH",
        default_value = "/callback",
        value_parser = parse_path
    )]
    pub callback_path: String,

    /// Path of the metrics page, as in other exporters (for a reverse proxy that serves
    /// several under one host, say).
    #[arg(
        long = "web.telemetry-path",
        env = "CSS_EXPORTER_TELEMETRY_PATH",
        default_value = "/metrics",
        value_parser = parse_telemetry_path
    )]
    pub telemetry_path: String,

    /// Deadline for a client to send a request's headers; slower connections are closed.
    #[arg(long = "web.read-header-timeout", env = "CSS_EXPORTER_READ_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Deadline for a whole callback request, body included (answered 408 past it); how long
    /// an answer may wait for its client to take any of it (then the connection is dropped);
    /// and how long in-flight requests may take to finish at shutdown.
    #[arg(long = "web.request-timeout", env = "CSS_EXPORTER_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most connections served at once per listener; more wait in the accept queue, and the
    /// served ones make room for them (idle ones close, busy ones after an answer).
    #[arg(
        long = "web.max-connections",
        env = "CSS_EXPORTER_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_connections: usize,

    #[command(flatten)]
    pub keys: KeySource,

    /// Accept callbacks without checking their sign (only when the Tencent template has no key).
    /// From the environment: true, 1, yes or on (false, 0, no or off).
    #[arg(
        long = "callback.insecure-skip-verify",
        env = "CSS_EXPORTER_INSECURE_SKIP_VERIFY",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure_skip_verify: bool,

    /// How far a callback's `t` may be in the past (our clock ahead of Tencent's) before it is
    /// refused as expired.
    #[arg(long = "callback.clock-skew", env = "CSS_EXPORTER_CLOCK_SKEW", default_value = "60s", value_parser = parse_duration)]
    pub clock_skew: Duration,

    /// How far a callback's `t` may be in the future before it is refused (Tencent sets t to
    /// event time + 10 minutes).
    #[arg(long = "callback.max-validity", env = "CSS_EXPORTER_MAX_VALIDITY", default_value = "15m", value_parser = parse_duration)]
    pub max_validity: Duration,

    /// How long a recorded event is remembered to recognise Tencent's retries (which come for
    /// about 12 minutes).
    #[arg(long = "callback.dedup-window", env = "CSS_EXPORTER_DEDUP_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub dedup_window: Duration,

    /// Most push domains with series of their own; events of further domains are counted under
    /// domain="_other" (and in tencent_css_domains_overflow_total), so a leaked key or a
    /// misconfiguration cannot flood Prometheus with series.
    #[arg(long = "metrics.max-domains", env = "CSS_EXPORTER_MAX_DOMAINS", default_value_t = crate::ledger::DEFAULT_MAX_DOMAINS)]
    pub max_domains: usize,

    /// SQLite database holding the state; its folder is created. `:memory:` keeps the state in
    /// memory only (lost at exit).
    #[arg(
        long = "storage.path",
        env = "CSS_EXPORTER_STORAGE_PATH",
        default_value = "data/exporter.db"
    )]
    pub storage_path: String,

    /// Redis holding the state instead of SQLite, shared by several replicas behind a load
    /// balancer: redis://host:port/db, redis://:password@host:port/db, or rediss:// for TLS.
    #[arg(long = "storage.redis-url", env = "CSS_EXPORTER_REDIS_URL", value_parser = parse_redis_url)]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key, so several exporters can share one Redis.
    #[arg(
        long = "storage.redis-prefix",
        env = "CSS_EXPORTER_REDIS_PREFIX",
        default_value = "tencent_css:"
    )]
    pub redis_prefix: String,

    /// `normal` survives a crash of the process; `full` also survives power loss (fsync on
    /// every commit).
    #[arg(
        long = "storage.sync",
        env = "CSS_EXPORTER_STORAGE_SYNC",
        value_enum,
        default_value = "normal"
    )]
    pub storage_sync: SyncMode,

    /// Log level: error, warn, info, debug or trace (or a tracing filter directive, such as
    /// `info,tencent_css_exporter::redis=debug`).
    #[arg(
        long = "log.level",
        env = "CSS_EXPORTER_LOG_LEVEL",
        default_value = "info",
        value_parser = parse_log_level
    )]
    pub log_level: String,

    /// Log format.
    #[arg(
        long = "log.format",
        env = "CSS_EXPORTER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where callback keys come from, besides `CSS_CALLBACK_KEY`.
#[derive(Debug, Clone, Args)]
pub struct KeySource {
    /// File with callback keys, one a line (blank lines and `#` comments skipped); combined with
    /// CSS_CALLBACK_KEY.
    #[arg(long = "callback.key-file", env = "CSS_EXPORTER_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl KeySource {
    /// Every configured key: `CSS_CALLBACK_KEY` and the key file.
    pub fn load(&self) -> Result<Keys, String> {
        let mut keys = std::env::var(KEY_ENV)
            .map(|v| Keys::from_list(&v))
            .unwrap_or_default();
        if let Some(path) = &self.key_file {
            let from_file = Keys::from_file(path)
                .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
            if from_file.is_empty() {
                return Err(format!("key file {} holds no key", path.display()));
            }
            keys.extend(from_file);
        }
        Ok(keys)
    }

    /// The key a client subcommand (`simulate`, `load`) signs with: the first configured one,
    /// or none, said on stderr, for an exporter that skips verification.
    pub fn signing_key(&self) -> Result<Option<String>, String> {
        let key = self.load()?.first().map(str::to_owned);
        if key.is_none() {
            eprintln!(
                "no {KEY_ENV} set: sending unsigned callbacks (accepted only by an exporter running with --callback.insecure-skip-verify)"
            );
        }
        Ok(key)
    }
}

/// `tencent-css-exporter simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Callback URL of the exporter, e.g. http://127.0.0.1:9877/callback.
    #[arg(long)]
    pub target: String,

    /// Number of streams to push.
    #[arg(long, default_value_t = 20)]
    pub streams: usize,

    /// How long to keep streams pushing, reconnecting and disconnecting.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    #[command(flatten)]
    pub keys: KeySource,
}

/// `tencent-css-exporter load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Callback URL of the exporter, e.g. http://127.0.0.1:9877/callback.
    #[arg(long)]
    pub target: String,

    /// Requests in flight at once, each on its own keep-alive connection.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,

    /// How long to send for.
    #[arg(long, default_value = "30s", value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Duration,

    /// Send this many requests, then stop (instead of --duration).
    #[arg(long)]
    pub requests: Option<u64>,

    /// Send this many requests a second on a fixed schedule, whatever the answers take (open
    /// loop); latency then counts from when each request was due. Without it each connection
    /// sends as soon as its previous request is answered (closed loop: the maximum rate).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Push domains to spread the streams over.
    #[arg(long, default_value_t = 100)]
    pub domains: usize,

    /// Only push: every request starts a new live stream and none is disconnected.
    #[arg(long)]
    pub push_only: bool,

    /// Process id of the exporter, to sample its resident memory (RSS) and open files.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Print the request rate this often while running (0s: never).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub progress: Duration,

    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Also write each answered request to this file, one line each: when it was sent and its
    /// latency (`SENT_US LATENCY_US`, in microseconds, the send time counted from the run's
    /// start, which the first line gives on the machine's monotonic clock). With it the latency
    /// of requests sent while something else happened, such as a scrape, can be told from the
    /// rest.
    #[arg(long, value_name = "PATH")]
    pub latency_log: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub keys: KeySource,
}

/// The longest duration a flag takes. Past it a deadline overflows the clock's arithmetic
/// (a panic at the first connection), a window no longer fits the signed seconds it is
/// compared in, and nothing of this exporter means anything over a year.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d > MAX_DURATION {
        return Err(format!("{text} is over the longest duration taken, 366d"));
    }
    Ok(d)
}

/// A level, or a filter directive. A bare word that is neither (`warning`, `err`) would be
/// read as the name of a module to log, which silences every other log line, errors included.
fn parse_log_level(text: &str) -> Result<String, String> {
    let levels = ["error", "warn", "info", "debug", "trace", "off"];
    let bare = !text.contains(['=', ',', ':', '[']);
    if bare && !levels.contains(&text.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{text}: not a level (error, warn, info, debug, trace) nor a filter directive \
             such as `info,tencent_css_exporter::redis=debug`"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| format!("{text}: {e}"))?;
    Ok(text.to_owned())
}

/// The paths served beside the metrics page, on its listener.
const HEALTH_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Which paths it may not take depends on whether the metrics are served on its address too:
/// see [`Config::check`].
fn parse_path(path: &str) -> Result<String, String> {
    served_path(path, &[])
}

fn parse_telemetry_path(path: &str) -> Result<String, String> {
    served_path(path, &HEALTH_PATHS)
}

/// A Redis URL, checked as the client will read it, so that a typo is a usage error at once
/// rather than a failure to connect.
fn parse_redis_url(url: &str) -> Result<String, String> {
    redis::Client::open(url)
        .map(|_| url.to_owned())
        .map_err(|e| e.to_string())
}

/// A literal path to serve. The router reads `{...}`, `*` and a leading `:` in a segment as
/// captures (or refuses them with a panic), and a space or `?` could never match a request,
/// so only the characters of a plain URL path are taken.
fn served_path(path: &str, reserved: &[&str]) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-._~!$&'()+,;=@%".contains(c);
    if !path.starts_with('/') || path.len() < 2 || path.contains("//") {
        return Err("must start with / and name a path".into());
    }
    if !path.chars().all(plain) {
        return Err(format!(
            "{path}: only letters, digits, / and -._~!$&'()+,;=@% are allowed"
        ));
    }
    if reserved.contains(&path) {
        return Err(format!("{path} is served by the exporter itself"));
    }
    Ok(path.to_owned())
}

impl Config {
    /// Checks what the flags cannot check one by one.
    pub fn check(&self) -> Result<(), String> {
        // On an address of their own, the metrics leave every path to the callbacks.
        if self.metrics_address.is_some() {
            return Ok(());
        }
        if self.telemetry_path == self.callback_path {
            return Err(format!(
                "--web.telemetry-path and --web.callback-path are both {} on one address",
                self.callback_path
            ));
        }
        if HEALTH_PATHS.contains(&self.callback_path.as_str()) {
            return Err(format!(
                "--web.callback-path {} is served by the exporter itself on its address",
                self.callback_path
            ));
        }
        Ok(())
    }

    /// Settings that work but give up a promise, to be logged as warnings at start: a dedup
    /// window shorter than the time Tencent retries, or than a callback stays valid, lets the
    /// same event be counted twice. Shorter windows are allowed (they save memory at high
    /// rates), but not silently.
    pub fn warnings(&self) -> Vec<String> {
        let window = humantime::format_duration(self.dedup_window);
        let mut warnings = Vec::new();
        if self.dedup_window < TENCENT_RETRIES {
            warnings.push(format!(
                "--callback.dedup-window {window} is shorter than Tencent retries a failed delivery (about {}): a retry that comes after the window is counted again",
                humantime::format_duration(TENCENT_RETRIES)
            ));
        }
        let valid = self.clock_skew.saturating_add(self.max_validity);
        if self.dedup_window < valid {
            warnings.push(format!(
                "--callback.dedup-window {window} is shorter than a callback can pass the `t` check (--callback.clock-skew + --callback.max-validity = {}): a copy of it received after the window is counted again",
                humantime::format_duration(valid)
            ));
        }
        warnings
    }
}

/// How long Tencent keeps retrying a push or disconnect it could not deliver: 12 retries a
/// minute apart, after the first attempt and its 20-s timeout.
const TENCENT_RETRIES: Duration = Duration::from_secs(13 * 60);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["tencent-css-exporter"]).unwrap();
        let c = cli.config;
        assert_eq!(c.listen_address.to_string(), "0.0.0.0:9877");
        assert_eq!(c.callback_path, "/callback");
        assert_eq!(c.telemetry_path, "/metrics");
        assert_eq!(c.clock_skew, Duration::from_secs(60));
        assert_eq!(c.max_validity, Duration::from_secs(900));
        assert_eq!(c.dedup_window, Duration::from_secs(3600));
        assert_eq!(c.storage_path, "data/exporter.db");
        assert_eq!(c.storage_sync, SyncMode::Normal);
    }

    #[test]
    fn a_dedup_window_that_lets_an_event_count_twice_is_warned_about() {
        let warnings = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["tencent-css-exporter"], args].concat()).unwrap();
            cli.config.warnings()
        };
        assert_eq!(warnings(&[]), Vec::<String>::new());
        assert_eq!(warnings(&["--callback.dedup-window", "16m"]).len(), 0);
        // Covers the retries, not a copy valid for 16 minutes.
        let w = warnings(&["--callback.dedup-window", "15m"]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("--callback.max-validity = 16m"), "{w:?}");
        assert_eq!(warnings(&["--callback.dedup-window", "1m"]).len(), 2);
        assert_eq!(
            warnings(&[
                "--callback.dedup-window",
                "20m",
                "--callback.max-validity",
                "1d"
            ])
            .len(),
            1
        );
    }

    #[test]
    fn callback_path_cannot_shadow_the_exporter_paths() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.config.check());
        for bad in [
            "callback", "/", "/:x", "/*x", "/a/{*x}", "/a{b}", "/a b", "/a?b", "//", "/a//b", "/é",
        ] {
            assert!(parse(&["x", "--web.callback-path", bad]).is_err(), "{bad}");
        }
        // Taken by the metrics and health pages on the same address, free on their own.
        for path in ["/metrics", "/healthz", "/readyz"] {
            let same = ["x", "--web.callback-path", path];
            assert!(parse(&same).unwrap().is_err(), "{path}");
            let apart = [&same[..], &["--web.metrics-address", "127.0.0.1:9878"]].concat();
            assert_eq!(parse(&apart).ok(), Some(Ok(())), "{path}");
        }
    }

    #[test]
    fn the_telemetry_path_cannot_take_the_callback_path_on_one_address() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.config.check());
        for bad in ["/readyz", "prom", "/", "/:x", "/{x}", "/*"] {
            assert!(parse(&["x", "--web.telemetry-path", bad]).is_err(), "{bad}");
        }
        let odd_but_plain = "/css-exporter/v1.2/metrics;x=1";
        assert!(parse(&["x", "--web.telemetry-path", odd_but_plain]).is_ok());
        assert_eq!(
            parse(&["x", "--web.telemetry-path", "/prom"]).ok(),
            Some(Ok(()))
        );
        let same = [
            "x",
            "--web.telemetry-path",
            "/hook",
            "--web.callback-path",
            "/hook",
        ];
        assert!(parse(&same).unwrap().is_err());
        let apart = [&same[..], &["--web.metrics-address", "127.0.0.1:9878"]].concat();
        assert_eq!(parse(&apart).ok(), Some(Ok(())));
    }

    #[test]
    fn every_duration_is_at_most_a_year() {
        for flag in [
            "--web.read-header-timeout",
            "--web.request-timeout",
            "--callback.clock-skew",
            "--callback.max-validity",
            "--callback.dedup-window",
        ] {
            assert!(Cli::try_parse_from(["x", flag, "366d"]).is_ok(), "{flag}");
            let err = Cli::try_parse_from(["x", flag, "584542046090y"]).unwrap_err();
            assert!(err.to_string().contains("366d"), "{flag}: {err}");
        }
        for flag in ["--duration", "--progress"] {
            let load = [
                "x",
                "load",
                "--target",
                "http://127.0.0.1:9877/callback",
                flag,
            ];
            assert!(Cli::try_parse_from([&load[..], &["366d"]].concat()).is_ok());
            let err = Cli::try_parse_from([&load[..], &["367d"]].concat()).unwrap_err();
            assert!(err.to_string().contains("366d"), "{flag}: {err}");
        }
    }

    #[test]
    fn a_log_level_that_would_silence_every_line_is_refused() {
        let level = |l: &str| Cli::try_parse_from(["x", "--log.level", l]).map(|c| c.config);
        for ok in [
            "warn",
            "WARN",
            "Info",
            "off",
            "info,hyper=debug",
            "tencent_css_exporter::redis=debug",
        ] {
            assert!(level(ok).is_ok(), "{ok}");
        }
        for bad in ["warning", "err", "verbose", "info,[", "=x=y"] {
            assert!(level(bad).is_err(), "{bad}");
        }
    }
}
