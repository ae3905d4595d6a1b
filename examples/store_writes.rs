//! What one SQLite batch writes: bytes and write calls a commit (WAL frames and their share of
//! the checkpoints), and the CPU it takes. Unlike the time of `cargo bench --bench store`, the
//! bytes do not depend on how busy the machine or its disk is, so two builds compare exactly.
//!
//! ```text
//! cargo run --release --example store_writes -- 8 20000    # batches of 8 streams, 20,000 commits
//! cargo run --release --example store_writes -- 64 4000
//! ```
//!
//! Each batch pushes new streams and disconnects those pushed 1,000 streams earlier (the events
//! of `benches/support`), after a warm-up of 150,000 streams that fills the fold lag and the
//! dedup window, so the logs are trimmed as in a long run. The CPU figure includes applying the
//! events to the state.

#[path = "../benches/support/mod.rs"]
mod support;

use std::time::Instant;

use support::{disconnect, push, NOW_MS};
use tencent_css_exporter::state::{Change, Limits, Truth};
use tencent_css_exporter::store::{SqliteStore, Store, SyncMode};

/// Streams pushed before measuring.
const WARM_UP: u64 = 150_000;
/// How far behind its push a session's disconnect comes, in streams.
const SESSION: u64 = 1_000;

/// Bytes handed to `write` calls and the number of such calls, for this process so far.
fn written() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io (Linux only)");
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("wchar:"), field("syscw:"))
}

/// CPU seconds (user and system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat (Linux only)");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: store_writes STREAMS_A_BATCH COMMITS";
    let batch: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let commits: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);

    let dir = tempfile::tempdir().expect("temporary folder");
    let mut store =
        SqliteStore::open(dir.path().join("writes.db"), SyncMode::Normal).expect("open");
    let mut truth = Truth::new(Limits {
        dedup_window_ms: 60_000,
        max_domains: 100_000,
    });
    let mut next = 0_u64;
    let mut write_batch = |store: &mut SqliteStore| {
        let now = NOW_MS + next as i64;
        let mut changes: Vec<Change> = Vec::new();
        for _ in 0..batch {
            changes.push(truth.apply(&push(next), now));
            if next >= SESSION {
                changes.push(truth.apply(&disconnect(next - SESSION), now));
            }
            next += 1;
        }
        store
            .write(&truth.commit_of(&changes), now)
            .expect("write a batch");
    };
    for _ in 0..WARM_UP.div_ceil(batch) {
        write_batch(&mut store);
    }

    let (bytes, calls, cpu, started) = (written().0, written().1, cpu_seconds(), Instant::now());
    for _ in 0..commits {
        write_batch(&mut store);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (bytes, calls) = (written().0 - bytes, written().1 - calls);
    let per = |x: f64| x / commits as f64;
    println!(
        "{batch} streams a batch, {commits} commits: {:.1} KiB and {:.1} write calls a commit; \
         {:.0} µs of CPU and {:.0} µs of wall time a commit",
        per(bytes as f64) / 1024.0,
        per(calls as f64),
        per((cpu_seconds() - cpu) * 1e6),
        per(elapsed * 1e6),
    );
}
