//! Slow and abusive clients, and the cap on domain cardinality.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

fn args(extra: &[&str]) -> Vec<String> {
    ["--storage.path", ":memory:"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// The exporter in memory with `flags`.
async fn app_with(flags: &[&str]) -> TestApp {
    spawn_app_with(AppOptions {
        args: args(flags),
        ..Default::default()
    })
    .await
}

/// The exporter in memory with `slots` connection slots and header deadlines a minute away:
/// whatever frees a slot in the test is the cap's own doing.
async fn at_the_cap(slots: &str) -> TestApp {
    app_with(&[
        "--web.max-connections",
        slots,
        "--web.read-header-timeout",
        "60s",
    ])
    .await
}

/// Reads until the peer closes the connection (whatever it answered before); false on timeout.
async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slowloris: the head of a request trickled a byte every 100 ms, forever. Resolves to how long
/// it went on before the server closed the connection, `None` if it was still open after 30 s.
async fn slowloris(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<Option<Duration>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::spawn(async move {
        let started = Instant::now();
        for byte in b"POST /callback HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*byte]).await.is_err() {
                return Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_delay_a_real_callback_and_get_closed() {
    let app = app_with(&[
        "--web.read-header-timeout",
        "3s",
        "--web.request-timeout",
        "4s",
    ])
    .await;
    let addr = app.callback_addr;
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut no_body = bodiless_requests(addr, 150).await;
    let mut trickle = Vec::new();
    for _ in 0..150 {
        trickle.push(slowloris(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 450 abusive connections are open; a real callback is still served at once.
    let started = Instant::now();
    let answer = app.post(&signed(sample("push"))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the real callback waited {:?}, as long as the slow clients' deadlines",
        started.elapsed()
    );

    // And every abusive connection is closed by the server.
    for s in idle.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "idle connection left open"
        );
    }
    for s in no_body.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "bodiless request left open"
        );
    }
    for t in trickle {
        let closed_after = t.await.unwrap().expect("trickling connection left open");
        assert!(closed_after < Duration::from_secs(10), "{closed_after:?}");
    }
    let s = app.scrape().await;
    // Bodiless requests are answered 408 and counted as malformed callbacks.
    assert_eq!(s.callbacks("unknown", "malformed"), 150.0);
}

/// Connections that sent the head of a callback and never its body: each holds a slot, busy,
/// until the request timeout answers it 408.
async fn bodiless_requests(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut hogs = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
            .await
            .unwrap();
        hogs.push(s);
    }
    hogs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_queues_new_connections_until_a_slot_frees() {
    let app = app_with(&["--web.max-connections", "20", "--web.request-timeout", "1s"]).await;
    let mut hogs = bodiless_requests(app.callback_addr, 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // All slots are taken by requests in progress: the callback waits in the accept queue until
    // they hit their request deadline (or, as late, the second of grace of a body), then it is
    // served.
    let fresh = Client {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        ..app.client.clone()
    };
    let started = Instant::now();
    let answer = fresh.post(&signed(sample("push"))).await;
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "served at once: the cap did not hold ({:?})",
        started.elapsed()
    );
    for s in hogs.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
}

/// The head of a callback request with a body of `len` bytes, on a keep-alive connection.
fn callback_head(len: usize) -> String {
    format!(
        "POST /callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// One keep-alive exchange: writes a callback, reads the answer; its status and whether the
/// server said it closes the connection.
async fn exchange(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<(u16, bool)> {
    let head = callback_head(body.len());
    stream.write_all(&[head.as_bytes(), body].concat()).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if got.len() >= end + 4 + length {
            let status = head[9..12].parse().unwrap();
            return Ok((status, head.contains("\r\nconnection: close")));
        }
    }
}

/// A new connection's callback, past the cap: answered 200 within 10 s (the test's header
/// deadlines are a minute away), or the test fails with `held`, what held the slots. Returns
/// how long it waited.
async fn served_at_the_cap(addr: std::net::SocketAddr, body: &[u8], held: &str) -> Duration {
    let started = Instant::now();
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange(&mut waiting, body))
        .await
        .unwrap_or_else(|_| panic!("a waiting connection was not served while {held}"));
    assert_eq!(answer.unwrap().0, 200);
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_busy_connections_take_turns_with_waiting_ones() {
    let app = at_the_cap("2").await;
    let addr = app.callback_addr;
    let body = serde_json::to_vec(&signed(sample("push"))).unwrap();
    // Two clients that never pause hold both slots, each connecting again when told to close.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (stop, body) = (stop.clone(), body.clone());
            tokio::spawn(async move {
                let mut closed = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    loop {
                        let (status, close) = exchange(&mut s, &body).await.unwrap();
                        assert_eq!(status, 200);
                        if close {
                            closed += 1;
                            break;
                        }
                        if stop.load(Ordering::Relaxed) {
                            return closed;
                        }
                    }
                }
                closed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = app.scrape().await.callbacks("push", "duplicate");

    // A third client waits in the accept queue; it is served while the two keep sending.
    let waited = served_at_the_cap(addr, &body, "busy ones held every slot").await;
    let after = app.scrape().await.callbacks("push", "duplicate");
    stop.store(true, Ordering::Relaxed);
    let mut closed = 0;
    for b in busy {
        closed += b.await.unwrap();
    }
    assert!(
        after > before,
        "the busy connections were not sending meanwhile"
    );
    assert!(closed >= 1, "no busy connection was asked to close");
    let s = app.scrape().await;
    let callback = [("listener", "callback")];
    assert!(
        s.value(
            "tencent_css_exporter_http_connection_waits_total",
            &callback
        ) >= 1.0
    );
    let busy = [("listener", "callback"), ("reason", "busy")];
    assert!(s.value("tencent_css_exporter_http_connections_evicted_total", &busy) >= closed as f64);
    // Below the cap nothing is closed: with the busy clients gone, a connection stays open.
    let mut alone = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        assert_eq!(exchange(&mut alone, &body).await.unwrap(), (200, false));
    }
    eprintln!("served after {waited:?}; busy connections closed {closed} times");
}

/// A callback request whose body is half sent: a connection busy with a request in progress.
/// Returns the connection and the rest of the body.
pub(crate) async fn half_sent(addr: std::net::SocketAddr, body: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = callback_head(body.len());
    let (first, rest) = body.split_at(body.len() / 2);
    stream
        .write_all(&[head.as_bytes(), first].concat())
        .await
        .unwrap();
    (stream, rest.to_vec())
}

/// Sends the rest of a [`half_sent`] request and reads the status line of its answer.
async fn finish(stream: &mut TcpStream, rest: &[u8]) -> String {
    stream.write_all(rest).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.contains(&b'\n') {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the request in progress was cut off");
        answer.extend_from_slice(&buf[..n]);
    }
    let line = answer.split(|b| *b == b'\n').next().unwrap();
    String::from_utf8_lossy(line).trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_idle_connections_give_up_their_slots() {
    let app = at_the_cap("4").await;
    let addr = app.callback_addr;
    let body = serde_json::to_vec(&signed(sample("push"))).unwrap();
    // A keep-alive client between two callbacks, two connections that never sent a byte, and
    // one request in progress (its body is on the way): every slot is taken.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut kept, &body).await.unwrap(), (200, false));
    let mut silent = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    let (mut slow, rest) = half_sent(addr, &body).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let waited = served_at_the_cap(addr, &body, "idle ones held the slots").await;
    // The idle connections were closed to make room for it...
    assert!(closed_within(&mut kept, Duration::from_secs(2)).await);
    for s in silent.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(2)).await);
    }
    // ...and the request in progress was not: its callback is answered.
    assert_eq!(finish(&mut slow, &rest).await, "HTTP/1.1 200 OK");
    let s = app.scrape().await;
    let callback = [("listener", "callback")];
    let idle = [("listener", "callback"), ("reason", "idle")];
    assert!(s.value("tencent_css_exporter_http_connections_evicted_total", &idle) >= 3.0);
    assert!(
        s.value(
            "tencent_css_exporter_http_connection_waits_total",
            &callback
        ) >= 1.0
    );
    assert_eq!(
        s.get("tencent_css_exporter_http_connections_limit", &callback),
        Some(4.0)
    );
    // The scrape's own connection, and at most the slow one's.
    let open = s.value("tencent_css_exporter_http_connections", &callback);
    assert!((1.0..=2.0).contains(&open), "{open} connections");
    eprintln!("served after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_slowloris_connections_give_up_their_slots() {
    let app = at_the_cap("3").await;
    let mut trickle = Vec::new();
    for _ in 0..3 {
        trickle.push(slowloris(app.callback_addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = serde_json::to_vec(&signed(sample("push"))).unwrap();
    let waited = served_at_the_cap(app.callback_addr, &body, "slowloris ones held the slots").await;
    // One gave its slot up (the others may keep theirs: one was needed). Its client finds out
    // at its next writes, a tenth of a second apart.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !trickle.iter().any(|t| t.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closed = 0;
    for t in trickle {
        if t.is_finished() {
            closed += t.await.unwrap().is_some() as usize;
        } else {
            t.abort();
        }
    }
    assert!(closed >= 1, "no slowloris connection was closed");
    let dropped = [("listener", "callback"), ("reason", "slowloris")];
    let s = app.scrape().await;
    assert!(
        s.value(
            "tencent_css_exporter_http_connections_evicted_total",
            &dropped
        ) >= 1.0
    );
    eprintln!("served after {waited:?}; {closed} slowloris connections closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_slow_bodies_give_up_their_slots() {
    // A request timeout far away: only making room can free the slots in time.
    let app = app_with(&["--web.max-connections", "3", "--web.request-timeout", "60s"]).await;
    let mut slow = bodiless_requests(app.callback_addr, 3).await;
    // Past the grace of a body (1 s), and still trickling it.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for s in slow.iter_mut() {
            let _ = s.write_all(b" ").await;
        }
    }
    let body = serde_json::to_vec(&signed(sample("push"))).unwrap();
    let waited = served_at_the_cap(app.callback_addr, &body, "slow bodies held the slots").await;
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    let mut closed = 0;
    for s in slow.iter_mut() {
        closed += closed_within(s, Duration::from_millis(500)).await as usize;
    }
    assert!(closed >= 1, "no slow body was dropped");
    let s = app.scrape().await;
    let dropped = [("listener", "callback"), ("reason", "slow_body")];
    assert!(
        s.value(
            "tencent_css_exporter_http_connections_evicted_total",
            &dropped
        ) >= 1.0
    );
    // Dropped, not answered: nothing was counted for them.
    assert_eq!(s.callbacks("unknown", "malformed"), 0.0);
    eprintln!("served after {waited:?}; {closed} slow bodies dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_cap_a_slow_body_is_answered_at_its_deadline() {
    let app = app_with(&["--web.max-connections", "3", "--web.request-timeout", "2s"]).await;
    let mut slow = bodiless_requests(app.callback_addr, 1).await;
    let started = Instant::now();
    let mut answer = String::new();
    let mut buf = [0u8; 1024];
    while let Ok(Ok(n @ 1..)) =
        tokio::time::timeout(Duration::from_secs(10), slow[0].read(&mut buf)).await
    {
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let s = app.scrape().await;
    assert_eq!(s.callbacks("unknown", "malformed"), 1.0);
    assert_eq!(
        s.value(
            "tencent_css_exporter_http_connections_evicted_total",
            &[("reason", "slow_body")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_request_in_flight_and_closes_idle_connections() {
    let app = app_with(&[]).await;
    let addr = app.callback_addr;
    let body = serde_json::to_vec(&signed(sample("push"))).unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut idle, &body).await.unwrap(), (200, false));
    let other = serde_json::to_vec(&signed(push("d.example.com", "s2", "q2", 1))).unwrap();
    let (mut slow, rest) = half_sent(addr, &other).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stopping = tokio::spawn(app.stop());
    assert!(closed_within(&mut idle, Duration::from_secs(2)).await);
    assert!(!stopping.is_finished(), "stopped with a request in flight");
    assert_eq!(finish(&mut slow, &rest).await, "HTTP/1.1 200 OK");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the exporter stops once its requests are answered")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn domains_past_the_cap_are_counted_under_other() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("exporter.db").display().to_string();
    let flags = ["--metrics.max-domains", "3", "--storage.path", &db];
    let app = spawn_app_with(AppOptions {
        args: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await;
    for i in 0..6 {
        let domain = format!("d{i}.example.com");
        let answer = app
            .post(&signed(push(&domain, "s", &format!("q{i}"), 1)))
            .await;
        assert_eq!(
            answer.status, 200,
            "events beyond the cap are still recorded"
        );
    }
    let bye = signed(disconnect("d5.example.com", "s", "q5", 1, 8));
    assert_eq!(app.post(&bye).await.status, 200);
    let s = app.scrape().await;
    let domains: std::collections::BTreeSet<_> = s
        .matching("tencent_css_pushes_total", &[])
        .map(|x| x.labels["domain"].clone())
        .collect();
    assert_eq!(
        domains.into_iter().collect::<Vec<_>>(),
        [
            "_other",
            "d0.example.com",
            "d1.example.com",
            "d2.example.com"
        ]
    );
    let other = [("domain", "_other"), ("area", "mainland")];
    assert_eq!(s.value("tencent_css_pushes_total", &other), 3.0);
    assert_eq!(s.value("tencent_css_active_streams", &other), 2.0);
    assert_eq!(
        s.value(
            "tencent_css_disconnects_total",
            &[("domain", "_other"), ("errcode", "8")]
        ),
        1.0
    );
    assert_eq!(s.get("tencent_css_domains_overflow_total", &[]), Some(4.0));
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 5.0);

    // After a restart the same labels hold, and an admitted domain keeps its own series.
    app.stop().await.unwrap();
    let app = spawn_app_with(AppOptions {
        args: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        app.post(&signed(disconnect("d4.example.com", "s", "q4", 1, 1)))
            .await
            .status,
        200
    );
    assert_eq!(
        app.post(&signed(push("d1.example.com", "t", "q9", 1)))
            .await
            .status,
        200
    );
    let s = app.scrape().await;
    assert_eq!(s.value("tencent_css_active_streams", &other), 1.0);
    assert_eq!(
        s.value("tencent_css_pushes_total", &[("domain", "d1.example.com")]),
        2.0
    );
    assert_eq!(s.get("tencent_css_domains_overflow_total", &[]), Some(5.0));
}

#[tokio::test]
async fn any_connection_cap_is_taken_without_a_panic() {
    // Past the semaphore's own maximum this panicked at start; it is capped (0 is refused as
    // a flag, `startup::refuses_values_that_could_only_fail_later`).
    let app = app_with(&["--web.max-connections", "18446744073709551615"]).await;
    assert_eq!(app.post(&signed(sample("push"))).await.status, 200);
    let limit = app.scrape().await.get(
        "tencent_css_exporter_http_connections_limit",
        &[("listener", "callback")],
    );
    assert_eq!(limit, Some(f64::from(u32::MAX)));
    app.stop().await.unwrap();
}

/// A page size well over what the kernel may buffer on the server's side of a connection
/// (`tcp_wmem`'s maximum, 4 MiB by default), so that part of the page is still the exporter's
/// while its client does not read.
fn beyond_send_buffer() -> usize {
    let max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    (max * 3 / 2).max(6_000_000)
}

/// Sends `GET /metrics` (plain) on a connection whose receive buffer is small, so that a large
/// page stays on the server's side until it is read.
async fn scrape_with_small_buffer(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// Reads an answer's head: its `Content-Length`, and the bytes of body read with it.
async fn answer_head(stream: &mut TcpStream) -> (usize, usize) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head of its answer");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length");
            return (length, got.len() - end - 4);
        }
    }
}

/// Reads the rest of an answer at `bytes_per_second` until the server closes the connection
/// or `length` bytes are in; returns the bytes read.
async fn read_at(
    stream: &mut TcpStream,
    mut read: usize,
    length: usize,
    bytes_per_second: f64,
) -> usize {
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    while read < length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
        let due = started + Duration::from_secs_f64(read as f64 / bytes_per_second);
        tokio::time::sleep_until(due).await;
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_scrape_still_reading_its_page_keeps_its_slot() {
    let app = at_the_cap("1").await;
    fill_page(&app, beyond_send_buffer()).await;
    let mut scrape = scrape_with_small_buffer(app.callback_addr).await;
    let (length, read) = answer_head(&mut scrape).await;
    // While its page is sent (over about 3 s), a callback waits for the slot.
    let callback = tokio::spawn({
        let addr = app.callback_addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let body = signed(sample("push")).to_string();
            exchange(&mut s, body.as_bytes()).await.unwrap().0
        }
    });
    let read = read_at(&mut scrape, read, length, 2_000_000.0).await;
    assert_eq!(read, length, "the page was cut off");
    drop(scrape);
    assert_eq!(callback.await.unwrap(), 200);
    let s = app.scrape().await;
    let evicted = |reason| {
        s.value(
            "tencent_css_exporter_http_connections_evicted_total",
            &[("listener", "callback"), ("reason", reason)],
        )
    };
    assert_eq!(evicted("slowloris"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_nothing_of_its_answer_loses_its_connection() {
    let app = app_with(&["--web.request-timeout", "2s"]).await;
    fill_page(&app, beyond_send_buffer()).await;
    let mut scrape = scrape_with_small_buffer(app.callback_addr).await;
    // It reads nothing for well past the write timeout: its page waits, then the connection
    // is dropped, and the client gets what the kernel still held, not the page.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (length, read) = answer_head(&mut scrape).await;
    let read = read_at(&mut scrape, read, length, 1e9).await;
    assert!(
        read < length,
        "the whole page of {length} bytes waited for the client"
    );
}
