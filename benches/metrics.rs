//! Encoding `/metrics` from a populated state: 100, 1,000 and 10,000 push domains, each with
//! live streams and counters in both areas, several disconnect codes and push-duration
//! histograms. `metrics_lock` times what a scrape does under the state's read lock (the ledger
//! waits for it), `metrics_render` a whole scrape, `metrics_gzip` compressing the page for a
//! scrape that asks for gzip: as the exporter does, in pieces on several threads
//! (`N_domains`), and as one stream on one thread (`N_domains_one_thread`), to show the
//! difference.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tencent_css_exporter::area::Area;
use tencent_css_exporter::callback::{Event, StreamEvent, StreamKey};
use tencent_css_exporter::gzip;
use tencent_css_exporter::ledger::Shared;
use tencent_css_exporter::metrics::{Frame, Metrics, ViewSource};
use tencent_css_exporter::state::{Limits, Truth};

const NOW_MS: i64 = 1_700_000_000_000;
/// Disconnect codes of each (domain, area): client stop, operator, network, no data.
const ERRCODES: [i64; 4] = [1, 21, 14, 8];
/// Streams per (domain, area) that stay live.
const LIVE_PER_AREA: u64 = 2;

/// A state with `domains` domains; in each area of each, `ERRCODES.len()` sessions pushed and
/// disconnected (one per code, with a push duration) and `LIVE_PER_AREA` live.
fn populated(domains: u64) -> Arc<Shared> {
    let mut truth = Truth::new(Limits {
        dedup_window_ms: 3_600_000,
        max_domains: 100_000,
    });
    let mut k = 0_u64;
    for d in 0..domains {
        for area in [Area::Mainland, Area::Overseas] {
            let session = |k: u64| StreamEvent {
                stream: StreamKey {
                    app: format!("push{d}.example.com").into(),
                    appname: "live".into(),
                    stream_id: format!("stream_{k}").into(),
                },
                sequence: k.to_string(),
                event_time: Some(NOW_MS / 1000 - 5),
                area,
            };
            for (i, errcode) in ERRCODES.iter().enumerate() {
                k += 1;
                truth.apply(&Event::Push(session(k)), NOW_MS);
                let ended = Event::Disconnect {
                    session: session(k),
                    errcode: *errcode,
                    push_duration_ms: Some(30_000 * (i as i64 + 1) * (i as i64 + 1)),
                };
                truth.apply(&ended, NOW_MS);
            }
            for _ in 0..LIVE_PER_AREA {
                k += 1;
                truth.apply(&Event::Push(session(k)), NOW_MS);
            }
        }
    }
    Arc::new(Shared {
        truth: parking_lot::RwLock::new(truth),
        fault: Mutex::new(None),
    })
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_render");
    group.sample_size(20);
    for domains in [100, 1_000, 10_000] {
        let metrics = Metrics::new(populated(domains));
        let bytes = metrics.render().len();
        eprintln!("{domains} domains: /metrics is {bytes} bytes");
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{domains}_domains"), |b| {
            b.iter(|| metrics.render())
        });
    }
    group.finish();
}

/// What a scrape does under the state's read lock: filling the frame it reuses from the scrape
/// before, a piece at a time (`N_domains`, all pieces), and the longest piece of it
/// (`N_domains_longest_piece`), the longest the ledger's writer waits for a scrape. Emptying
/// the frame (dropping its references to domain names) happens after the lock is released, and
/// is not timed.
fn lock(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_lock");
    group.sample_size(20);
    for domains in [1_000, 10_000] {
        let shared = populated(domains);
        let mut frame = Frame::default();
        group.bench_function(format!("{domains}_domains"), |b| {
            b.iter_custom(|iters| {
                let mut locked = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    shared.fill(&mut frame);
                    locked += start.elapsed();
                    frame.clear();
                }
                locked
            })
        });
        group.bench_function(format!("{domains}_domains_longest_piece"), |b| {
            b.iter_custom(|iters| {
                let mut longest_pieces = Duration::ZERO;
                for _ in 0..iters {
                    let mut filling = frame.filling();
                    let truth = shared.truth.read();
                    let mut longest = Duration::ZERO;
                    loop {
                        let start = Instant::now();
                        let done = filling.next(truth.live(), truth.counters());
                        longest = longest.max(start.elapsed());
                        if done {
                            break;
                        }
                    }
                    longest_pieces += longest;
                }
                frame.clear();
                longest_pieces
            })
        });
    }
    group.finish();
}

/// Compressing a page for a scrape that asks for gzip (as Prometheus does): once a page, after
/// `metrics_render`.
fn gzipped(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_gzip");
    group.sample_size(10);
    for domains in [100, 1_000, 10_000] {
        let page = Metrics::new(populated(domains)).render().into_bytes();
        let compressed = gzip::compress(&page).expect("gzip into memory").len();
        let one_thread = one_stream(&page).len();
        eprintln!(
            "{domains} domains: /metrics is {} bytes, {compressed} gzipped in pieces, \
             {one_thread} in one stream",
            page.len()
        );
        group.throughput(Throughput::Bytes(page.len() as u64));
        group.bench_function(format!("{domains}_domains"), |b| {
            b.iter(|| gzip::compress(&page))
        });
        group.bench_function(format!("{domains}_domains_one_thread"), |b| {
            b.iter(|| one_stream(&page))
        });
    }
    group.finish();
}

/// `page` as one gzip stream at the exporter's level, on this thread.
fn one_stream(page: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(page).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

criterion_group!(benches, lock, render, gzipped);
criterion_main!(benches);
