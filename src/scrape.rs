//! Scrapes: `/metrics` pages are written one at a time, on a thread of their own, and every
//! scrape that arrives while a page is being written is answered with the next one.
//!
//! A page with 1,000 domains is 5 MB and a few milliseconds of CPU. Written for each scrape on
//! the blocking pool, as many pages were written at once as clients scraped: 32 clients
//! scraping back to back took the exporter from 37 to about 400 MiB of RSS. Here at most one
//! page is written at a time however many scrape, each page is shared by the scrapes that
//! waited for it, and the same 32 clients peaked at about 70 MiB with twice as many scrapes
//! answered (`scripts/perf.py scrapers`).
//!
//! A scrape never gets a page older than itself: the thread takes every scrape waiting, then
//! copies the state, so the page holds every callback answered before the scrape was asked.
//!
//! The copy is made on that thread, at the exporter's priority, since it holds the lock the
//! ledger's writer waits on; the page is then written and compressed on a second thread at idle
//! priority (`SCHED_IDLE`), so that a scrape takes the CPU the callbacks leave, not theirs: a
//! callback's thread that wakes takes the core from it at once. Should the writer get no CPU
//! for 250 ms (`FALLBACK_AFTER`: the exporter's own threads, or other work in its scheduling
//! group, keep every core busy), the first thread writes the page itself, at the exporter's
//! priority, so that Prometheus still gets it in time.
//!
//! Prometheus asks for gzip (`Accept-Encoding: gzip`) unless its scrape config says
//! `enable_compression: false`. A page is compressed once, by the thread that wrote it, if any
//! of its scrapes asked, and the compressed copy is shared like the page: compressing on the
//! runtime's workers would stall the callbacks there for as long. Level 1, in pieces on several threads
//! ([`crate::gzip`]): the 5-MB page of 1,000 domains becomes 0.33 MB in 1.4 to 14 ms of CPU;
//! higher levels shrink it by a third more at 4 to 9 times the CPU.

use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderValue;
use tokio::sync::oneshot;

use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::gzip;
use crate::metrics::{Copied, Metrics};

/// How a scrape wants its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The text format as written.
    Identity,
    /// Compressed with gzip (`Content-Encoding: gzip`).
    Gzip,
}

impl Encoding {
    /// Gzip if the `Accept-Encoding` headers of a request accept it (`gzip`, `x-gzip` or `*`
    /// with a non-zero weight), otherwise the page as written, which every client accepts.
    pub fn accepted<'a>(accept_encoding: impl IntoIterator<Item = &'a HeaderValue>) -> Encoding {
        // The weight given to gzip by name, and to any coding (`*`).
        let (mut gzip, mut any) = (None, None);
        let values = accept_encoding.into_iter().filter_map(|v| v.to_str().ok());
        for element in values.flat_map(|v| v.split(',')) {
            let mut parts = element.split(';');
            let coding = parts.next().unwrap_or("").trim();
            // RFC 9110: a weight from 0 to 1, 1 when absent; one that does not parse is ignored
            // along with its coding.
            let weight = match parts.find_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim().eq_ignore_ascii_case("q").then(|| value.trim())
            }) {
                None => 1.0,
                Some(q) => match q.parse::<f32>() {
                    Ok(q) if (0.0..=1.0).contains(&q) => q,
                    _ => continue,
                },
            };
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(weight);
            } else if coding == "*" {
                any = Some(weight);
            }
        }
        match gzip.or(any) {
            Some(weight) if weight > 0.0 => Encoding::Gzip,
            _ => Encoding::Identity,
        }
    }
}

/// A written page, in the encoding its scrape gets.
#[derive(Debug, Clone)]
pub struct Page {
    pub body: Bytes,
    /// `Gzip` only if the scrape asked for it and the page could be compressed.
    pub encoding: Encoding,
}

/// A scrape waiting for its page.
struct Scrape {
    /// Whether the scrape accepts gzip: such scrapes share one compressed copy of the page.
    encoding: Encoding,
    /// Where the page goes; dropped unanswered if writing it panicked.
    page: oneshot::Sender<Page>,
}

/// The writing thread's queue of scrapes; cloned into every handler. The thread ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Scrapes {
    /// Hands scrapes to the writing thread, which ends once every clone is dropped.
    queue: mpsc::Sender<Scrape>,
}

/// The page could not be written (the writing panicked, or the thread is gone).
#[derive(Debug, thiserror::Error)]
#[error("the /metrics page could not be written")]
pub struct Unwritten;

impl Scrapes {
    /// Starts the writing threads: `metrics` copies the state for the scrapes waiting, and
    /// `metrics-write` writes and compresses the page at idle priority; `metrics` writes it
    /// instead if `metrics-write` has not within 250 ms (`FALLBACK_AFTER`). Registers
    /// `tencent_css_exporter_metrics_pages_total`, the pages answered by each.
    pub fn start(metrics: Arc<Metrics>) -> Scrapes {
        Scrapes::start_with(metrics, FALLBACK_AFTER)
    }

    fn start_with(metrics: Arc<Metrics>, fallback_after: Duration) -> Scrapes {
        let pages = IntCounterVec::new(
            Opts::new(
                "tencent_css_exporter_metrics_pages_total",
                "/metrics pages answered, by the thread that wrote them: idle (the writer at \
                 idle priority) or fallback (the exporter's priority, after the idle writer got \
                 no CPU for a while).",
            ),
            &["writer"],
        )
        .expect("a valid metric");
        metrics.register(Box::new(pages.clone()));
        let (idle, fallback) = (
            pages.with_label_values(&["idle"]),
            pages.with_label_values(&["fallback"]),
        );
        let (queue, scrapes) = mpsc::channel::<Scrape>();
        // Room for one page: a page is handed over once the one before it was answered, so the
        // room is taken only while the writer is still on a page the fallback answered; the
        // next page is then written by the fallback too.
        let (copies, to_write) = mpsc::sync_channel::<(Copied, Arc<Job>)>(1);
        let writer = metrics.clone();
        std::thread::Builder::new()
            .name("metrics-write".into())
            .spawn(move || {
                yield_to_callbacks();
                for (copied, job) in to_write {
                    if job.answered() {
                        continue;
                    }
                    let written = write(&writer, || copied, job.wants_gzip());
                    if let Some(waiting) = job.take() {
                        answer(waiting, written, &idle);
                    }
                }
            })
            .expect("spawn the metrics writing thread");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while let Ok(first) = scrapes.recv() {
                    let waiting: Vec<_> =
                        std::iter::once(first).chain(scrapes.try_iter()).collect();
                    let copied =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| metrics.copy()));
                    let copied = match copied {
                        Ok(copied) => copied,
                        Err(_) => {
                            failed("copying the state", waiting.len());
                            continue;
                        }
                    };
                    let job = Arc::new(Job::new(waiting));
                    // The copy to write here if the writer does not answer in time.
                    let own = match copies.try_send((copied, job.clone())) {
                        Ok(()) if !job.still_waiting_after(fallback_after) => continue,
                        // A new one, still made after these scrapes came.
                        Ok(()) => None,
                        // The writer is still on a page the fallback answered (or is gone).
                        Err(TrySendError::Full((copied, _)))
                        | Err(TrySendError::Disconnected((copied, _))) => Some(copied),
                    };
                    let Some(waiting) = job.take() else { continue };
                    let gzip = waiting.iter().any(|s| s.encoding == Encoding::Gzip);
                    let written = write(&metrics, || own.unwrap_or_else(|| metrics.copy()), gzip);
                    answer(waiting, written, &fallback);
                }
            })
            .expect("spawn the metrics thread");
        Scrapes { queue }
    }

    /// A page written after this call, in `encoding` if it can be. The scrape is queued at the
    /// call, before the future is first polled.
    pub fn page(
        &self,
        encoding: Encoding,
    ) -> impl std::future::Future<Output = Result<Page, Unwritten>> {
        let (page, rx) = oneshot::channel();
        let queued = self.queue.send(Scrape { encoding, page }).is_ok();
        async move {
            if !queued {
                return Err(Unwritten);
            }
            rx.await.map_err(|_| Unwritten)
        }
    }
}

/// Logs that a page could not be made (`step`: copying the state, or writing the page); its
/// scrapes' senders are dropped.
fn failed(step: &str, scrapes: usize) {
    tracing::error!(
        scrapes,
        step,
        "a /metrics page failed; its scrapes are answered 500"
    );
}

/// Puts the calling thread at idle priority (`SCHED_IDLE`); threads it starts (the gzip
/// pieces) inherit it. Writing and compressing a page of 1,000 domains is several milliseconds
/// of CPU on each of two threads. At the exporter's priority a scrape took both cores of a
/// small machine from the callbacks for that long; 10 nice steps lower, callbacks sent during a
/// scrape were still slower than those sent between two (p50 2.3 against 0.9 ms at 10,000/s),
/// as a woken thread may wait for the running one's time slice to end. An idle-priority thread
/// gives way at once, and an idle core still writes the page at full speed. On Linux the policy
/// is a thread's own, which `sched_setscheduler(0, ...)` sets for the calling thread alone. The
/// state is copied on another thread: a page writer that the scheduler leaves waiting must not
/// hold the lock the ledger's writer waits on.
#[cfg(target_os = "linux")]
fn yield_to_callbacks() {
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: `idle` is a valid sched_param for the call's duration; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not lower the priority of the thread writing /metrics pages; scrapes compete with callbacks for CPU"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn yield_to_callbacks() {}

/// How long a page may take on the idle-priority writer before the `metrics` thread writes it
/// at the exporter's priority. A page of 1,000 domains took 34 to 90 ms there on a small, slow
/// machine busy with callbacks, at 10,000/s and at the most it took (BENCHMARKS.md); a writer
/// that got no CPU for this long is starved, and Prometheus waits for its page up to its scrape
/// timeout (10 s by default).
const FALLBACK_AFTER: Duration = Duration::from_millis(250);

/// The scrapes a page answers, taken by whichever thread writes the page first: the idle
/// writer, or the `metrics` thread once it stopped waiting for it.
struct Job {
    /// The scrapes until one of the threads takes them to answer: `None` once answered.
    waiting: Mutex<Option<Vec<Scrape>>>,
    /// Signalled when `waiting` is taken.
    taken: Condvar,
}

impl Job {
    fn new(waiting: Vec<Scrape>) -> Job {
        Job {
            waiting: Mutex::new(Some(waiting)),
            taken: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Vec<Scrape>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answered(&self) -> bool {
        self.lock().is_none()
    }

    /// Whether a scrape wants the page compressed, so that the writer compresses it before it
    /// takes the scrapes.
    fn wants_gzip(&self) -> bool {
        self.lock()
            .iter()
            .flatten()
            .any(|s| s.encoding == Encoding::Gzip)
    }

    /// The scrapes, if no one took them yet.
    fn take(&self) -> Option<Vec<Scrape>> {
        let waiting = self.lock().take();
        self.taken.notify_all();
        waiting
    }

    /// Waits up to `timeout` for the scrapes to be taken; `true` if no one took them.
    fn still_waiting_after(&self, timeout: Duration) -> bool {
        let waiting = self.lock();
        let (waiting, _) = self
            .taken
            .wait_timeout_while(waiting, timeout, |w| w.is_some())
            .unwrap_or_else(|e| e.into_inner());
        waiting.is_some()
    }
}

/// A page as written and, if asked, compressed.
struct Written {
    page: Bytes,
    /// The page compressed; as written if compressing failed.
    compressed: Option<Page>,
}

/// Writes the page of the copy `copied` returns, and compresses it if `gzip`; `None` if that
/// panicked, which fails the page's scrapes, not the next ones.
fn write(metrics: &Metrics, copied: impl FnOnce() -> Copied, gzip: bool) -> Option<Written> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let page = Bytes::from(metrics.write(copied()));
        let compressed = gzip.then(|| compress(&page));
        Written { page, compressed }
    }))
    .ok()
}

/// `page` compressed; the page as written if that fails, which is still an answer.
fn compress(page: &Bytes) -> Page {
    // Caught here, not with the page's writing: a page that cannot be compressed is still an
    // answer as written.
    let compressed = std::panic::catch_unwind(|| gzip::compress(page))
        .unwrap_or_else(|_| Err(std::io::Error::other("compressing panicked")));
    match compressed {
        Ok(compressed) => Page {
            body: Bytes::from(compressed),
            encoding: Encoding::Gzip,
        },
        Err(e) => {
            // Not expected of a write into memory.
            tracing::error!(error = %e, "compressing a /metrics page failed; sent uncompressed");
            Page {
                body: page.clone(),
                encoding: Encoding::Identity,
            }
        }
    }
}

/// Sends each scrape the page in the encoding it asked for, and counts the page on `pages`
/// first, so that a scrape that has its page sees it counted; drops the scrapes (answered 500)
/// if the page could not be written.
fn answer(waiting: Vec<Scrape>, written: Option<Written>, pages: &IntCounter) {
    let Some(written) = written else {
        return failed("writing the page", waiting.len());
    };
    pages.inc();
    let identity = Page {
        body: written.page,
        encoding: Encoding::Identity,
    };
    for scrape in waiting {
        let page = match (&written.compressed, scrape.encoding) {
            (Some(compressed), Encoding::Gzip) => compressed.clone(),
            _ => identity.clone(),
        };
        let _ = scrape.page.send(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Frame, ViewSource};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A state whose copy waits until it is let go, and counts the copies.
    struct Gate {
        fills: AtomicUsize,
        started: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
        panic_on_fill: AtomicUsize,
    }

    impl ViewSource for Gate {
        /// An empty state's numbers, once let go.
        fn fill(&self, frame: &mut Frame) {
            let n = self.fills.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.started.lock().unwrap().send(());
            self.go.lock().unwrap().recv().unwrap();
            assert_ne!(
                n,
                self.panic_on_fill.load(Ordering::SeqCst),
                "copy {n} fails"
            );
            frame.fill(&Default::default(), &Default::default());
        }
    }

    /// The writing thread over a [`Gate`] whose copy number `panic_on_fill` panics (0: none).
    struct Rig {
        gate: Arc<Gate>,
        scrapes: Scrapes,
        started: mpsc::Receiver<()>,
        go: mpsc::Sender<()>,
    }

    impl Rig {
        fn new(panic_on_fill: usize) -> Rig {
            let (started_tx, started) = mpsc::channel();
            let (go, go_rx) = mpsc::channel();
            let gate = Arc::new(Gate {
                fills: AtomicUsize::new(0),
                started: Mutex::new(started_tx),
                go: Mutex::new(go_rx),
                panic_on_fill: AtomicUsize::new(panic_on_fill),
            });
            // Never written by the fallback: its copy would wait for a `let_go` of its own.
            let scrapes = Scrapes::start_with(
                Arc::new(Metrics::new(gate.clone())),
                Duration::from_secs(3600),
            );
            Rig {
                gate,
                scrapes,
                started,
                go,
            }
        }

        /// Waits until a copy of the state has begun.
        fn copying(&self) {
            self.started.recv().unwrap();
        }

        /// Lets the copy that has begun finish.
        fn let_go(&self) {
            self.go.send(()).unwrap();
        }
    }

    #[tokio::test]
    async fn scrapes_waiting_for_a_page_share_the_next_one() {
        let rig = Rig::new(0);
        let first = rig.scrapes.page(Encoding::Identity);
        rig.copying();
        // Five more while the first page is being written: one page for all of them, written
        // after they came.
        let more: Vec<_> = (0..5)
            .map(|_| rig.scrapes.page(Encoding::Identity))
            .collect();
        rig.let_go();
        let first = first.await.unwrap().body;
        assert!(std::str::from_utf8(&first)
            .unwrap()
            .contains("tencent_css_callbacks_total"));
        rig.copying();
        rig.let_go();
        let mut pages = Vec::new();
        for page in more {
            pages.push(page.await.unwrap().body);
        }
        for page in &pages {
            assert_eq!(page.as_ptr(), pages[0].as_ptr(), "one page, shared");
        }
        assert_ne!(pages[0].as_ptr(), first.as_ptr());
        assert_eq!(rig.gate.fills.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_page_that_fails_fails_its_scrapes_only() {
        let rig = Rig::new(1);
        let failed = rig.scrapes.page(Encoding::Identity);
        rig.copying();
        rig.let_go();
        assert!(failed.await.is_err());
        let next = rig.scrapes.page(Encoding::Identity);
        rig.copying();
        rig.let_go();
        assert!(!next.await.unwrap().body.is_empty());
    }

    #[tokio::test]
    async fn a_page_is_compressed_once_for_the_scrapes_that_ask_and_decompresses_to_itself() {
        use std::io::Read;
        let rig = Rig::new(0);
        let first = rig.scrapes.page(Encoding::Identity);
        rig.copying();
        // Waiting for the next page together: two want gzip, one the page as written.
        let gzip = [
            rig.scrapes.page(Encoding::Gzip),
            rig.scrapes.page(Encoding::Gzip),
        ];
        let identity = rig.scrapes.page(Encoding::Identity);
        rig.let_go();
        first.await.unwrap();
        rig.copying();
        rig.let_go();
        let identity = identity.await.unwrap();
        assert_eq!(identity.encoding, Encoding::Identity);
        let [a, b] = gzip;
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!((a.encoding, b.encoding), (Encoding::Gzip, Encoding::Gzip));
        assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "compressed once, shared");
        assert!(
            a.body.len() * 4 < identity.body.len(),
            "{} bytes compressed",
            a.body.len()
        );
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&a.body[..])
            .read_to_end(&mut text)
            .unwrap();
        assert_eq!(text, identity.body, "the page the other scrape got");
        assert_eq!(rig.gate.fills.load(Ordering::SeqCst), 2);
    }

    /// Whichever thread writes a page, each scrape gets it once and the page is counted once
    /// (a fallback that does not wait races the idle writer for every page).
    #[tokio::test]
    async fn a_page_raced_by_the_fallback_is_answered_and_counted_once() {
        let rig = Rig::new(0);
        let metrics = Arc::new(Metrics::new(rig.gate.clone()));
        let scrapes = Scrapes::start_with(metrics.clone(), Duration::ZERO);
        // Every copy may go ahead: a page raced costs two.
        for _ in 0..40 {
            rig.let_go();
        }
        for round in 1..=10 {
            let pages = [
                scrapes.page(Encoding::Gzip),
                scrapes.page(Encoding::Identity),
            ];
            for page in pages {
                let page = page.await.unwrap();
                assert!(!page.body.is_empty());
            }
            let text = metrics.render();
            let count = |writer: &str| {
                let line =
                    format!("tencent_css_exporter_metrics_pages_total{{writer=\"{writer}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(line.as_str()))
                    .map_or(0, |v| v.parse::<u64>().unwrap())
            };
            // Both scrapes of a round came before its page, or one round has two pages.
            let (idle, fallback) = (count("idle"), count("fallback"));
            assert!(
                (round..=2 * round).contains(&(idle + fallback)),
                "round {round}: {idle} idle, {fallback} fallback"
            );
        }
    }

    fn accepted(values: &[&str]) -> Encoding {
        let values: Vec<_> = values
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        Encoding::accepted(&values)
    }

    #[test]
    fn gzip_is_sent_only_where_accept_encoding_accepts_it() {
        use Encoding::{Gzip, Identity};
        let cases: &[(&[&str], Encoding)] = &[
            // What Prometheus sends, and other clients.
            (&["gzip"], Gzip),
            (&["gzip, deflate, br"], Gzip),
            (&["br;q=1.0, GZIP;q=0.5"], Gzip),
            (&["deflate", "x-gzip"], Gzip),
            (&["*"], Gzip),
            (&["identity;q=1, *;q=0.1"], Gzip),
            // Without the header, or refusing gzip.
            (&[], Identity),
            (&[""], Identity),
            (&["identity"], Identity),
            (&["br, deflate"], Identity),
            (&["gzip;q=0"], Identity),
            (&["gzip; q=0.000, *"], Identity),
            (&["*;q=0"], Identity),
            // A weight that does not parse drops its coding.
            (&["gzip;q=high"], Identity),
            (&["gzip;q=2"], Identity),
            (&["gzip;q=1;q"], Gzip),
        ];
        for (values, expected) in cases {
            assert_eq!(accepted(values), *expected, "Accept-Encoding: {values:?}");
        }
    }
}
