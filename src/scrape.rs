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

use std::sync::mpsc;
use std::sync::Arc;

use axum::body::Bytes;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// The writing thread's queue of scrapes; cloned into every handler. The thread ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Scrapes {
    /// A scrape: where its page goes.
    queue: mpsc::Sender<oneshot::Sender<Bytes>>,
}

/// The page could not be written (the writing panicked, or the thread is gone).
#[derive(Debug, thiserror::Error)]
#[error("the /metrics page could not be written")]
pub struct Unwritten;

impl Scrapes {
    /// Starts the writing thread.
    pub fn start(metrics: Arc<Metrics>) -> Scrapes {
        let (queue, scrapes) = mpsc::channel::<oneshot::Sender<Bytes>>();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while let Ok(first) = scrapes.recv() {
                    let waiting: Vec<_> =
                        std::iter::once(first).chain(scrapes.try_iter()).collect();
                    // A panic fails these scrapes (their senders are dropped), not the next ones.
                    let page = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        Bytes::from(metrics.render())
                    }));
                    match page {
                        Ok(page) => {
                            for scrape in waiting {
                                let _ = scrape.send(page.clone());
                            }
                        }
                        Err(_) => tracing::error!(
                            scrapes = waiting.len(),
                            "writing a /metrics page failed; its scrapes are answered 500"
                        ),
                    }
                }
            })
            .expect("spawn the metrics thread");
        Scrapes { queue }
    }

    /// A page written after this call. The scrape is queued at the call, before the future is
    /// first polled.
    pub fn page(&self) -> impl std::future::Future<Output = Result<Bytes, Unwritten>> {
        let (tx, rx) = oneshot::channel();
        let queued = self.queue.send(tx).is_ok();
        async move {
            if !queued {
                return Err(Unwritten);
            }
            rx.await.map_err(|_| Unwritten)
        }
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
        fn fill(&self, _frame: &mut Frame) {
            let n = self.fills.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.started.lock().unwrap().send(());
            self.go.lock().unwrap().recv().unwrap();
            assert_ne!(
                n,
                self.panic_on_fill.load(Ordering::SeqCst),
                "copy {n} fails"
            );
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
            let scrapes = Scrapes::start(Arc::new(Metrics::new(gate.clone())));
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
        let first = rig.scrapes.page();
        rig.copying();
        // Five more while the first page is being written: one page for all of them, written
        // after they came.
        let more: Vec<_> = (0..5).map(|_| rig.scrapes.page()).collect();
        rig.let_go();
        let first = first.await.unwrap();
        assert!(std::str::from_utf8(&first)
            .unwrap()
            .contains("tencent_css_callbacks_total"));
        rig.copying();
        rig.let_go();
        let mut pages = Vec::new();
        for page in more {
            pages.push(page.await.unwrap());
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
        let failed = rig.scrapes.page();
        rig.copying();
        rig.let_go();
        assert!(failed.await.is_err());
        let next = rig.scrapes.page();
        rig.copying();
        rig.let_go();
        assert!(!next.await.unwrap().is_empty());
    }
}
