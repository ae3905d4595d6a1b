use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tencent_css_exporter::config::{Cli, Command, Config, LogFormat, KEY_ENV};
use tencent_css_exporter::{load, simulate, Listeners};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    ignore_file_size_signal();
    unset_unused_settings();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    let code = match cli.command {
        Some(Command::Simulate(args)) => match runtime.block_on(simulate::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulate: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Load(args)) => match runtime.block_on(load::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("load: {e}");
                ExitCode::FAILURE
            }
        },
        None => runtime.block_on(serve(cli.config)),
    };
    // Blocking work still running is not waited for: a database being loaded when a SIGTERM
    // came (the exporter is stopped; reading on made it exit seconds later, 1.4 s with a million
    // live streams, deaf to a second signal). What must end before the exit has ended: every
    // callback answered 200 is stored, and the ledger's thread was joined.
    runtime.shutdown_background();
    code
}

/// An empty `CSS_EXPORTER_*` variable counts as unset, as in other exporters: templates (a Helm
/// chart, a systemd unit) often write `NAME=` for "no value", which would otherwise be refused
/// as a value. With a subcommand (`load`, `simulate`) none of them applies, and none is read:
/// one meant for the exporter running beside it, and refused by the parser, would stop the
/// subcommand. Done before any thread starts.
fn unset_unused_settings() {
    let subcommand = std::env::args_os()
        .nth(1)
        .and_then(|arg| arg.into_string().ok())
        .is_some_and(|arg| Cli::command().find_subcommand(&arg).is_some());
    for (name, value) in std::env::vars_os() {
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with("CSS_EXPORTER_"));
        if ours && (subcommand || value.is_empty()) {
            std::env::remove_var(name);
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    init_logging(&config);
    if let Err(e) = config.check() {
        tracing::error!("{e}");
        return ExitCode::from(2);
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let keys = match config.keys.load() {
        Ok(keys) => keys,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let keys = match (keys.is_empty(), config.insecure_skip_verify) {
        (false, _) => Some(keys),
        (true, true) => {
            tracing::warn!(
                "no callback key: accepting unsigned callbacks (--callback.insecure-skip-verify)"
            );
            None
        }
        (true, false) => {
            tracing::error!(
                "no callback key: set {KEY_ENV} (or --callback.key-file) to the key of the Tencent callback template, or run with --callback.insecure-skip-verify"
            );
            return ExitCode::from(2);
        }
    };
    let listeners = match bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match tencent_css_exporter::run(&config, keys, listeners, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn bind(config: &Config) -> Result<Listeners, String> {
    let listen = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    Ok(Listeners {
        callback: listen(config.listen_address).await?,
        metrics: match config.metrics_address {
            Some(addr) => Some(listen(addr).await?),
            None => None,
        },
    })
}

fn init_logging(config: &Config) {
    // Checked when the flags were parsed; the fallback only serves a `Config` built otherwise.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a file on a full disk) is lost; by default
        // the subscriber reports it with `eprintln!`, which panics when stderr fails, and the
        // panic would take down the request or the batch that was logging.
        .log_internal_errors(false);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM. A second one ends the process at once, without waiting for
/// the requests in flight (up to `--web.request-timeout`): none of them has been answered, so
/// Tencent retries them, and every callback answered 200 is stored already.
async fn shutdown_signal() {
    let mut signals = Signals::listen();
    signals.next().await;
    tracing::info!("shutdown signal received; a second one stops at once");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!(
            "second shutdown signal: exiting now; requests in flight are not answered (Tencent retries them)"
        );
        std::process::exit(1);
    });
}

/// SIGINT and SIGTERM, listened to from the start so that none is missed between two waits.
struct Signals {
    /// SIGINT; `None` if it could not be listened to.
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    /// SIGTERM, as sent by systemd and Kubernetes; `None` if it could not be listened to.
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    fn listen() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    #[cfg(not(unix))]
    fn listen() -> Signals {
        Signals {}
    }

    /// Waits for the next signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                if let Some(s) = signal {
                    if s.recv().await.is_some() {
                        return;
                    }
                }
                std::future::pending().await
            }
            tokio::select! {
                () = recv(&mut self.interrupt) => {}
                () = recv(&mut self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A write beyond the file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) raises SIGXFSZ,
/// whose default action kills the process: an exporter killed that way drops every request in
/// flight. Ignored, the write fails with EFBIG instead, like a full disk, and the exporter
/// answers 503 (so Tencent retries) until writes work again.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN, before any thread is started, installs
    // no handler and has no precondition.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
