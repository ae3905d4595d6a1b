//! Writing batches to the SQLite store at its defaults: what one group commit costs the ledger.
//!
//! Batches of 64 and of 8 streams' events, made by the real truth rules:
//! `short_sessions` pushes a new stream and disconnects the one pushed 1,000 events earlier
//! (sessions that end within the fold lag), `long_sessions` only pushes (every session stays
//! live and is folded into the sessions table).

use std::cell::{Cell, RefCell};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tencent_css_exporter::callback::Event;
use tencent_css_exporter::state::{Change, Limits, Truth};
use tencent_css_exporter::store::{SqliteStore, Store, SyncMode};

mod support;
use support::{disconnect, push, NOW_MS};

/// Streams a batch brings: the load generator's 64 connections at the maximum rate, and a few at
/// a moderate rate, where each commit's fixed cost dominates.
const BATCHES: [u64; 2] = [64, 8];
/// How far behind its push a short session's disconnect comes, in events.
const SHORT_SESSION: u64 = 1_000;

/// `per_stream`: events each stream number brings (for the throughput figure).
fn bench(
    c: &mut Criterion,
    name: &str,
    batch: u64,
    per_stream: u64,
    events: impl Fn(u64) -> Vec<Event>,
) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let store = SqliteStore::open(dir.path().join("bench.db"), SyncMode::Normal).expect("open");
    let store = RefCell::new(store);
    let truth = RefCell::new(Truth::new(Limits {
        dedup_window_ms: 60_000,
        max_domains: 100_000,
    }));
    let next = Cell::new(0_u64);
    let mut group = c.benchmark_group("sqlite_write");
    group.throughput(Throughput::Elements(batch * per_stream));
    group.bench_function(format!("{name}/{batch}"), |b| {
        b.iter_batched(
            || {
                // Applying the events is the ledger's work, not the store's: done outside.
                let mut t = truth.borrow_mut();
                let now = NOW_MS + next.get() as i64;
                let changes: Vec<Change> = (0..batch)
                    .flat_map(|_| {
                        let k = next.get();
                        next.set(k + 1);
                        events(k)
                    })
                    .map(|e| t.apply(&e, now))
                    .collect();
                (t.commit_of(&changes), now)
            },
            |(commit, now)| store.borrow_mut().write(&commit, now).expect("write"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    for batch in BATCHES {
        bench(c, "short_sessions", batch, 2, |k| {
            let mut events = vec![push(k)];
            if k >= SHORT_SESSION {
                events.push(disconnect(k - SHORT_SESSION));
            }
            events
        });
    }
    bench(c, "long_sessions", BATCHES[0], 1, |k| vec![push(k)]);
}

criterion_group!(benches, store);
criterion_main!(benches);
