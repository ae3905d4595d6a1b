//! What the state costs with many streams: resident memory per live stream, the time to apply
//! events and to restore a snapshot, and how long a purge of delivered keys holds the state.
//!
//! Each mode runs in a fresh process, so the resident memory it reports is the state's own (plus
//! the process's few MiB, printed first):
//!
//! ```text
//! cargo run --release --example state_memory -- live 1000000     # streams pushed, left live
//! cargo run --release --example state_memory -- churn 2000000    # sessions pushed and ended
//! cargo run --release --example state_memory -- restore 1000000  # sessions restored at start
//! cargo run --release --example state_memory -- restore 1000000 legacy  # as stored before
//! ```
//!
//! Streams are as the load generator makes them: stream ids `stream_<n>`, 100 push domains
//! `push<d>.example.com`, app name `live`, scattered 64-bit session numbers, both areas. Time
//! moves on 0.1 ms an event (10,000 events a second); the dedup window is the default hour.

use std::sync::Arc;
use std::time::Instant;

use tencent_css_exporter::area::Area;
use tencent_css_exporter::callback::{Event, EventKind, StreamEvent, StreamKey};
use tencent_css_exporter::load::mix;
use tencent_css_exporter::state::rules::{Sequence, Session};
use tencent_css_exporter::state::{DeliveryKey, Limits, Snapshot, Truth};

const NOW_MS: i64 = 1_700_000_000_000;
const WINDOW_MS: i64 = 3_600_000;
const LIMITS: Limits = Limits {
    dedup_window_ms: WINDOW_MS,
    max_domains: 10_000,
};

fn stream(k: u64) -> StreamKey {
    StreamKey {
        app: format!("push{}.example.com", k % 100).into(),
        appname: "live".into(),
        stream_id: format!("stream_{k}").into(),
    }
}

fn area(k: u64) -> Area {
    if (k / 100).is_multiple_of(2) {
        Area::Mainland
    } else {
        Area::Overseas
    }
}

fn stream_event(k: u64) -> StreamEvent {
    StreamEvent {
        stream: stream(k),
        sequence: mix(k).to_string(),
        event_time: Some(NOW_MS / 1000),
        area: area(k),
    }
}

fn clock(event: u64) -> i64 {
    NOW_MS + (event / 10) as i64
}

/// Resident and peak resident memory of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the memory now; with `per` items, also the bytes each above `base`.
fn report(what: &str, base: u64, per: u64) {
    let (rss, peak) = memory();
    print!(
        "{what}: RSS {:.1} MiB (peak {:.1} MiB)",
        mib(rss),
        mib(peak)
    );
    if per > 0 {
        print!(
            "; {:.0} bytes each above the start",
            rss.saturating_sub(base) as f64 / per as f64
        );
    }
    println!();
}

/// `n` streams pushed and left live.
fn live(n: u64) {
    let base = memory().0;
    let mut truth = Truth::new(LIMITS);
    let started = Instant::now();
    for k in 0..n {
        truth.apply(&Event::Push(stream_event(k)), clock(k));
    }
    let took = started.elapsed();
    println!(
        "{n} pushes applied in {:.2} s ({:.0} ns each); {} live, {} delivered keys",
        took.as_secs_f64(),
        took.as_nanos() as f64 / n as f64,
        truth.live_total(),
        truth.delivered_len()
    );
    report("live streams", base, n);
}

/// `n` sessions pushed and ended (as fast as 10,000 events a second), with a purge every 10 s of
/// event time as the ledger does; then the purges of the hour after, while the keys expire.
fn churn(n: u64) {
    let base = memory().0;
    let mut truth = Truth::new(LIMITS);
    let mut slowest = std::time::Duration::ZERO;
    let mut next_purge = clock(0) + 10_000;
    let started = Instant::now();
    for k in 0..n {
        let now = clock(2 * k);
        if now >= next_purge {
            let t = Instant::now();
            truth.purge(now);
            slowest = slowest.max(t.elapsed());
            next_purge += 10_000;
        }
        truth.apply(&Event::Push(stream_event(k)), now);
        let bye = Event::Disconnect {
            session: stream_event(k),
            errcode: 1,
            push_duration_ms: Some(60_000),
        };
        truth.apply(&bye, clock(2 * k + 1));
    }
    println!(
        "{n} sessions pushed and ended in {:.2} s; {} delivered keys; slowest purge meanwhile {:.2} ms",
        started.elapsed().as_secs_f64(),
        truth.delivered_len(),
        slowest.as_secs_f64() * 1e3
    );
    report("delivered keys", base, truth.delivered_len() as u64);
    let end = clock(2 * n);
    let (mut purges, mut purged, mut slowest) = (0, 0, std::time::Duration::ZERO);
    let mut now = end;
    while truth.delivered_len() > 0 && now < end + 2 * WINDOW_MS {
        now += 10_000;
        let t = Instant::now();
        purged += truth.purge(now);
        slowest = slowest.max(t.elapsed());
        purges += 1;
    }
    println!(
        "then {purges} purges 10 s apart forgot {purged} keys; slowest {:.2} ms",
        slowest.as_secs_f64() * 1e3
    );
    report("after the purges", base, 0);
}

/// The session rows of streams `ks`, in that order.
fn rows(snapshot: &mut Snapshot, ks: Vec<u64>) {
    for k in ks {
        snapshot.sessions.push((
            StreamKey {
                app: Arc::from(format!("push{}.example.com", k % 100)),
                appname: Arc::from("live"),
                stream_id: format!("stream_{k}").into(),
            },
            Session {
                sequence: Sequence::from(mix(k).to_string().as_str()),
                area: area(k),
                since: NOW_MS / 1000,
            },
        ));
    }
}

/// `n` live sessions and the delivered keys of `n / 2` ended ones, restored as at start; with
/// `live_pushes`, also a delivered key for the push of every live session (what releases before
/// live sessions held their own push stored).
fn restore(n: u64, live_pushes: bool) {
    let base = memory().0;
    let mut snapshot = Snapshot::default();
    snapshot.sessions.reserve(n as usize);
    // As a store reads them: ordered by stream, each row into strings of its own.
    let mut domains: Vec<u64> = (0..100.min(n)).collect();
    domains.sort_by_cached_key(|d| format!("push{d}.example.com"));
    for d in domains {
        let mut ks: Vec<u64> = (d..n).step_by(100).collect();
        ks.sort_by_cached_key(|k| k.to_string());
        rows(&mut snapshot, ks);
    }
    if live_pushes {
        for k in 0..n {
            let key = DeliveryKey::new(&mix(k).to_string(), EventKind::Push);
            snapshot.delivered.push((key, NOW_MS + WINDOW_MS / 2));
        }
    }
    for k in n..n + n / 2 {
        let sequence = mix(k).to_string();
        for kind in [EventKind::Push, EventKind::Disconnect] {
            let expires = NOW_MS + WINDOW_MS - (k - n) as i64;
            snapshot
                .delivered
                .push((DeliveryKey::new(&sequence, kind), expires));
        }
    }
    report("snapshot read", base, n);
    let started = Instant::now();
    let truth = Truth::restore(snapshot, LIMITS, NOW_MS).expect("restore");
    println!(
        "restored {} live and {} delivered keys in {:.0} ms",
        truth.live_total(),
        truth.delivered_len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    report("state restored, snapshot freed", base, n);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "live".into());
    let n: u64 = args
        .next()
        .map(|n| n.parse().expect("a number of streams"))
        .unwrap_or(1_000_000);
    let (rss, _) = memory();
    println!("process at start: RSS {:.1} MiB", mib(rss));
    match mode.as_str() {
        "live" => live(n),
        "churn" => churn(n),
        "restore" => restore(n, args.next().as_deref() == Some("legacy")),
        other => {
            eprintln!("unknown mode {other:?}: live, churn or restore");
            std::process::exit(2);
        }
    }
}
