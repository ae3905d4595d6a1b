//! The truth rules applied to the state: a push that starts a new live stream, and the
//! disconnect that ends it.

use std::cell::{Cell, RefCell};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tencent_css_exporter::state::{Limits, Truth};

mod support;
use support::{disconnect, push, NOW_MS};

/// Streams already live when measuring: a busy platform.
const LIVE: u64 = 10_000;
/// A short dedup window, purged as the benchmark goes, so the remembered keys stay bounded
/// however many iterations criterion runs.
const DEDUP_WINDOW_MS: i64 = 60_000;

/// A state with `LIVE` live streams; returns it with the next unused stream number.
fn populated() -> (Truth, u64) {
    let mut truth = Truth::new(Limits {
        dedup_window_ms: DEDUP_WINDOW_MS,
        max_domains: 100_000,
    });
    for k in 0..LIVE {
        truth.apply(&push(k), NOW_MS);
    }
    (truth, LIVE)
}

fn state(c: &mut Criterion) {
    let mut group = c.benchmark_group("truth_apply");
    group.throughput(Throughput::Elements(1));

    // Every iteration a new stream (with its own session) starts while the oldest live one ends
    // outside the measurement, so the live set stays at `LIVE`. Time moves on 1 ms an event, so
    // delivered keys expire after 60,000 events and are purged as the ledger does.
    let (truth, next) = populated();
    let truth = RefCell::new(truth);
    let next = Cell::new(next);
    let clock = |k: u64| NOW_MS + k as i64;
    // The next stream number; expired keys are purged every 10,000 as the ledger does.
    let advance = || {
        let k = next.get();
        next.set(k + 1);
        if k % 10_000 == 0 {
            truth.borrow_mut().purge(clock(k));
        }
        k
    };
    group.bench_function("push_new_stream", |b| {
        b.iter_batched(
            || {
                let k = advance();
                truth.borrow_mut().apply(&disconnect(k - LIVE), clock(k));
                (push(k), clock(k))
            },
            |(event, now)| black_box(truth.borrow_mut().apply(&event, now)),
            BatchSize::SmallInput,
        )
    });

    // The disconnect of a live session (pushed outside the measurement).
    group.bench_function("disconnect_live_stream", |b| {
        b.iter_batched(
            || {
                let k = advance();
                truth.borrow_mut().apply(&push(k), clock(k));
                (disconnect(k), clock(k))
            },
            |(event, now)| black_box(truth.borrow_mut().apply(&event, now)),
            BatchSize::SmallInput,
        )
    });

    // What the ledger does per batch besides applying: the commit of 1,000 changes.
    group.throughput(Throughput::Elements(1000));
    group.bench_function("commit_of_1000_changes", |b| {
        b.iter_batched(
            || {
                let mut t = truth.borrow_mut();
                let start = next.get();
                next.set(start + 500);
                t.purge(clock(start));
                (start..start + 500)
                    .flat_map(|k| {
                        [
                            t.apply(&push(k), clock(k)),
                            t.apply(&disconnect(k), clock(k)),
                        ]
                    })
                    .collect::<Vec<_>>()
            },
            |changes| black_box(truth.borrow().commit_of(&changes)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, state);
criterion_main!(benches);
