//! A served connection's socket, watched while it writes: an answer the client is not taking
//! keeps the connection busy (it is not idle, whatever the request's handler is doing), and
//! one it takes nothing of for the write timeout ends the connection.
//!
//! Without that a client that sends a request and never reads its answer (a page of megabytes)
//! held its slot, and the page, for as long as it kept the connection open; and at the cap, a
//! scrape still reading a large page looked idle once the page was handed to hyper, and was
//! cut off.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::Activity;

/// A served connection's stream: a blocked write marks the connection busy, and fails once the
/// client has taken nothing for the write timeout.
pub(super) struct Socket<S> {
    /// The accepted connection; reads pass straight through.
    stream: S,
    /// Told when a write blocks and when it goes on again.
    activity: Arc<Activity>,
    /// How long a write may wait for the client to take any of it.
    write_timeout: Duration,
    /// Armed while a write is blocked: when the client has taken nothing for `write_timeout`.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Socket<S> {
    pub(super) fn new(stream: S, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        Socket {
            stream,
            activity,
            write_timeout,
            stalled: None,
        }
    }

    fn watch(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let Poll::Pending = polled else {
            if self.stalled.take().is_some() {
                self.activity.write_unblocked();
            }
            return polled;
        };
        let (activity, timeout) = (&self.activity, self.write_timeout);
        let stalled = self.stalled.get_or_insert_with(|| {
            activity.write_blocked();
            Box::pin(tokio::time::sleep(timeout))
        });
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no part of its answer within the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Socket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Socket<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn socket(
        timeout_ms: u64,
    ) -> (
        Socket<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Activity>,
    ) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::new(tokio::time::Instant::now()));
        let socket = Socket::new(ours, activity.clone(), Duration::from_millis(timeout_ms));
        (socket, theirs, activity)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_does_not_take_keeps_the_connection_busy_then_times_out() {
        let (mut socket, _client, activity) = socket(2_000);
        assert!(activity.idle_for().is_some());
        let answer = vec![b'x'; 4096];
        let written =
            tokio::time::timeout(Duration::from_millis(1_500), socket.write_all(&answer)).await;
        assert!(
            written.is_err(),
            "the client reads nothing: the write waits"
        );
        assert_eq!(activity.idle_for(), None, "an answer in flight is not idle");
        let error = socket.write_all(&answer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_slowly_gets_its_whole_answer() {
        let (mut socket, mut client, activity) = socket(2_000);
        let answer = vec![b'x'; 64 * 1024];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while got.len() < 64 * 1024 {
                // Slower than the timeout in all, never for the timeout at once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = client.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        socket.write_all(&answer).await.unwrap();
        assert_eq!(reader.await.unwrap(), answer);
        // Taken whole: idle again, from the last write on.
        assert!(activity.idle_for().is_some());
    }
}
