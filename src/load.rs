//! `load`: drives a running exporter with correctly signed callbacks and measures it.
//!
//! Every request is a new event, so nothing is a duplicate: stream `k` is pushed under a session
//! of its own and then disconnected (`--push-only` leaves it live), spread over `--domains` push
//! domains, both areas and a mix of disconnect codes. Session sequences are scattered 64-bit
//! numbers like Tencent's, not in arrival order, so the store's indexes see realistic inserts.
//! Each of `--concurrency` connections is kept alive and sends one request at a time.
//!
//! Without `--rate` every connection sends its next request as soon as the previous one is
//! answered (closed loop): the rate reached is the exporter's maximum. With `--rate` requests are
//! sent on a fixed schedule whatever the answers take (open loop); a request that goes out late
//! because every connection was busy has its latency counted from when it was due, so a stall of
//! the exporter shows in the percentiles instead of slowing the load down. (A disconnect is due
//! no earlier than the answer to its push, which it always follows.)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use tokio::net::TcpStream;

use crate::config::LoadArgs;
use crate::signature::sign;

/// `push_duration` of the disconnects, in milliseconds: spread over the histogram's buckets.
const PUSH_DURATIONS_MS: [i64; 12] = [
    5_000,
    20_000,
    45_000,
    240_000,
    720_000,
    1_500_000,
    3_000_000,
    5_400_000,
    10_800_000,
    21_600_000,
    43_200_000,
    108_000_000,
];

/// What every connection shares.
struct Plan {
    target: Target,
    key: Option<String>,
    domains: u64,
    /// Requests per stream: 2 (push, disconnect) or 1 (push only).
    per_stream: u64,
    /// Stop after this many requests.
    limit: Option<u64>,
    /// Stop claiming work at this instant.
    end: Instant,
    /// Seconds between two scheduled requests (open loop).
    interval: Option<f64>,
    start: Instant,
    /// Added to the stream number, then scattered by [`mix`] (a bijection, so still unique), to
    /// make the session `sequence`; random per run.
    sequence_base: u64,
    run_id: u32,
    /// Next stream to claim.
    next_stream: AtomicU64,
    /// Requests answered or failed so far (for progress).
    done: AtomicU64,
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    /// Latency of each answered request, in microseconds.
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    pushes: u64,
    disconnects: u64,
    errors: u64,
    first_error: Option<String>,
    /// Requests sent over a millisecond after their scheduled time because every connection
    /// was busy.
    late: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.pushes += other.pushes;
        self.disconnects += other.disconnects;
        self.errors += other.errors;
        self.late += other.late;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The exporter's resident memory over the run.
#[derive(Default, Clone, Copy)]
struct Rss {
    start_kib: u64,
    max_kib: u64,
    end_kib: u64,
}

/// splitmix64's finalizer: a bijection on u64 that scatters consecutive numbers.
fn mix(k: u64) -> u64 {
    let mut x = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn errcode_of(k: u64) -> i64 {
    let total: u64 = crate::errcode::TRAFFIC_MIX.iter().map(|(_, w)| w).sum();
    let mut pick = mix(k) % total;
    for (code, weight) in crate::errcode::TRAFFIC_MIX {
        if pick < weight {
            return code;
        }
        pick -= weight;
    }
    1
}

/// Builds the bodies of one connection; the sign is computed once a second, not per request.
struct Bodies {
    plan: Arc<Plan>,
    signed: Option<(i64, String)>,
}

impl Bodies {
    fn body(&mut self, k: u64, push: bool) -> String {
        let plan = &self.plan;
        let domain = k % plan.domains;
        // Each domain gets streams in both areas, over every mainland and many overseas set_ids.
        let round = k / plan.domains;
        let set_id = if round % 2 == 0 {
            1 + (round / 2) % 6
        } else {
            7 + (round / 2) % 194
        };
        let now = crate::ledger::now_secs();
        // Like Tencent: valid until ten minutes after the event.
        let t = now + 600;
        let mut body = String::with_capacity(512);
        let _ = write!(
            body,
            r#"{{"app":"push{domain}.load.example.com","appid":12345678,"appname":"live","channel_id":"load_{run:08x}_{k}","stream_id":"load_{run:08x}_{k}","event_type":{event_type},"event_time":{now},"sequence":"{sequence}","set_id":{set_id},"node":"100.121.160.92","user_ip":"119.29.94.245","stream_param":"","#,
            run = plan.run_id,
            event_type = u8::from(push),
            sequence = mix(plan.sequence_base.wrapping_add(k)),
        );
        if push {
            body.push_str(r#""errcode":0,"errmsg":"ok","#);
        } else {
            let errcode = errcode_of(k);
            let duration = PUSH_DURATIONS_MS[(mix(k) >> 32) as usize % PUSH_DURATIONS_MS.len()];
            let _ = write!(
                body,
                r#""errcode":{errcode},"errmsg":"load test disconnect","push_duration":"{duration}","#
            );
        }
        let _ = write!(body, r#""t":{t}"#);
        if let Some(key) = &plan.key {
            if self.signed.as_ref().map(|(signed_t, _)| *signed_t) != Some(t) {
                self.signed = Some((t, sign(key, t)));
            }
            let (_, signature) = self.signed.as_ref().expect("just signed");
            let _ = write!(body, r#","sign":"{signature}""#);
        }
        body.push('}');
        body
    }
}

pub async fn run(args: LoadArgs) -> Result<(), String> {
    if args.domains == 0 {
        return Err("--domains must be at least 1".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err("--rate must be a positive number of requests per second".into());
        }
    }
    let keys = args.keys.load()?;
    let key = keys.first().map(str::to_owned);
    if key.is_none() {
        eprintln!(
            "no {} set: sending unsigned callbacks (accepted only by an exporter running with --callback.insecure-skip-verify)",
            crate::config::KEY_ENV
        );
    }
    let target = Target::parse(&args.target).await?;

    let mut rng = rand::rng();
    let run_id: u32 = rng.random();
    let start = Instant::now();
    let plan = Arc::new(Plan {
        target,
        key,
        domains: args.domains as u64,
        per_stream: if args.push_only { 1 } else { 2 },
        limit: args.requests,
        end: match args.requests {
            Some(_) => start + Duration::from_secs(365 * 24 * 3600),
            None => start + args.duration,
        },
        interval: args.rate.map(|r| 1.0 / r),
        start,
        sequence_base: u64::from(rng.random::<u32>()) << 32,
        run_id,
        next_stream: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });

    let rss = Arc::new(Mutex::new(None::<Rss>));
    let sampler = args.pid.map(|pid| {
        let rss = rss.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(kib) = rss_kib(pid) else { continue };
                let mut r = rss.lock().expect("rss lock");
                let r = r.get_or_insert(Rss {
                    start_kib: kib,
                    ..Rss::default()
                });
                r.max_kib = r.max_kib.max(kib);
                r.end_kib = kib;
            }
        })
    });
    // Wait for the first sample, so the start figure is from before the load.
    if let Some(pid) = args.pid {
        if rss_kib(pid).is_none() {
            return Err(format!("cannot read /proc/{pid}/status"));
        }
        while rss.lock().expect("rss lock").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let intervals = Arc::new(Mutex::new(Vec::<f64>::new()));
    let progress = (!args.progress.is_zero()).then(|| {
        let (plan, rss, intervals, every) =
            (plan.clone(), rss.clone(), intervals.clone(), args.progress);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let mut last = 0;
            loop {
                tick.tick().await;
                let done = plan.done.load(Ordering::Relaxed);
                let rate = (done - last) as f64 / every.as_secs_f64();
                last = done;
                intervals.lock().expect("intervals lock").push(rate);
                let mem = match *rss.lock().expect("rss lock") {
                    Some(r) => format!(", exporter RSS {:.1} MiB", r.end_kib as f64 / 1024.0),
                    None => String::new(),
                };
                eprintln!(
                    "{:>6.0} s  {done:>10} requests  {rate:>9.0} requests/s{mem}",
                    plan.start.elapsed().as_secs_f64()
                );
            }
        })
    });

    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(plan.clone())))
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        tally.merge(
            w.await
                .map_err(|e| format!("a connection task failed: {e}"))?,
        );
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(s) = sampler {
        s.abort();
    }
    let fds = args.pid.and_then(open_fds);
    let rss = *rss.lock().expect("rss lock");
    let intervals = intervals.lock().expect("intervals lock").clone();

    let summary = Summary::new(&args, tally, elapsed, rss, fds, &intervals);
    if args.json {
        println!("{}", summary.json());
    } else {
        summary.print();
    }
    if summary.failed() {
        return Err("some callbacks were not answered 200 (see above)".into());
    }
    Ok(())
}

/// One keep-alive connection: claims streams and sends their callbacks until the plan ends.
async fn worker(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let mut connection = Connection::new(&plan.target);
    let mut bodies = Bodies {
        plan: plan.clone(),
        signed: None,
    };
    'claim: loop {
        let k = plan.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut answered = None;
        for step in 0..plan.per_stream {
            let index = k * plan.per_stream + step;
            if plan.limit.is_some_and(|limit| index >= limit) {
                break 'claim;
            }
            let due = plan
                .interval
                .map(|i| plan.start + Duration::from_secs_f64(index as f64 * i));
            if due.is_some_and(|due| due >= plan.end) {
                break 'claim;
            }
            // A disconnect cannot go out before its push is answered: it is due then at the
            // earliest, so the push's latency is not counted a second time.
            let due = due.map(|due| answered.map_or(due, |answered| due.max(answered)));
            let sent = match due {
                Some(due) if due > Instant::now() => {
                    tokio::time::sleep_until(due.into()).await;
                    // Timer lateness is ours, not the exporter's: count from the actual send.
                    Instant::now()
                }
                Some(due) => {
                    // Behind schedule: the wait for a free connection is part of the latency.
                    if due.elapsed() > LATE {
                        tally.late += 1;
                    }
                    due
                }
                None if Instant::now() >= plan.end => break 'claim,
                None => Instant::now(),
            };
            let push = step == 0;
            let body = bodies.body(k, push);
            let answer = tokio::time::timeout(TIMEOUT, connection.post(body.as_bytes())).await;
            let answer = answer.unwrap_or_else(|_| {
                connection.close();
                Err(format!("no answer within {TIMEOUT:?}"))
            });
            answered = Some(Instant::now());
            match answer {
                Ok(status) => {
                    let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    tally.latencies_us.push(us);
                    *tally.statuses.entry(status).or_default() += 1;
                }
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(e);
                    }
                }
            }
            if push {
                tally.pushes += 1;
            } else {
                tally.disconnects += 1;
            }
            plan.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally
}

/// How far behind its schedule a request must go out to count as sent late (the timer's
/// resolution is a millisecond).
const LATE: Duration = Duration::from_millis(1);

/// How long a request may take before it counts as an error (Tencent waits about 20 s).
const TIMEOUT: Duration = Duration::from_secs(20);

/// Where the callbacks go: an `http://` URL, resolved once.
struct Target {
    address: SocketAddr,
    /// Request line and fixed headers, up to the `Content-Length` value.
    head: String,
}

impl Target {
    async fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// targets are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let address = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {authority} has no address"))?;
        Ok(Target {
            address,
            head: format!(
                "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tencent-css-exporter-load\r\nContent-Type: application/json\r\nContent-Length: "
            ),
        })
    }
}

/// One HTTP/1.1 keep-alive connection that sends one request at a time.
///
/// Deliberately minimal, so the load generator costs far less CPU than the server it measures:
/// one write and usually one read per request, no pooling, no extra tasks.
struct Connection<'a> {
    target: &'a Target,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl<'a> Connection<'a> {
    fn new(target: &'a Target) -> Self {
        Connection {
            target,
            stream: None,
            request: Vec::with_capacity(1024),
            response: Vec::with_capacity(4096),
        }
    }

    fn close(&mut self) {
        self.stream = None;
    }

    /// Posts `body` and returns the status of the answer; the connection is reopened after an
    /// error or a `Connection: close`.
    async fn post(&mut self, body: &[u8]) -> Result<u16, String> {
        let result = self.exchange(body).await;
        match &result {
            Ok((_, keep_alive)) if *keep_alive => {}
            _ => self.close(),
        }
        result.map(|(status, _)| status)
    }

    async fn exchange(&mut self, body: &[u8]) -> Result<(u16, bool), String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.target.address)
                .await
                .map_err(|e| format!("connect to {}: {e}", self.target.address))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        self.request.clear();
        self.request.extend_from_slice(self.target.head.as_bytes());
        let _ = write!(Bytes(&mut self.request), "{}\r\n\r\n", body.len());
        self.request.extend_from_slice(body);
        write_all(stream, &self.request)
            .await
            .map_err(|e| format!("send: {e}"))?;

        self.response.clear();
        let head_end = loop {
            if let Some(i) = find(&self.response, b"\r\n\r\n") {
                break i + 4;
            }
            read_more(stream, &mut self.response).await?;
        };
        let head = std::str::from_utf8(&self.response[..head_end])
            .map_err(|_| "answer head is not text".to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = status_line.starts_with("HTTP/1.1");
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }
        if chunked {
            let mut at = head_end;
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.response[at..], b"\r\n") {
                        break at + i;
                    }
                    read_more(stream, &mut self.response).await?;
                };
                let size = std::str::from_utf8(&self.response[at..line_end])
                    .ok()
                    .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                    .ok_or("bad chunk size")?;
                at = line_end + 2;
                if size == 0 {
                    // Trailers (usually none), then the empty line.
                    loop {
                        match find(&self.response[at..], b"\r\n") {
                            Some(0) => break,
                            Some(i) => at += i + 2,
                            None => read_more(stream, &mut self.response).await?,
                        }
                    }
                    break;
                }
                while self.response.len() < at + size + 2 {
                    read_more(stream, &mut self.response).await?;
                }
                at += size + 2;
            }
        } else if let Some(length) = length {
            while self.response.len() < head_end + length {
                read_more(stream, &mut self.response).await?;
            }
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            // No length: the body runs to the end of the connection.
            loop {
                match read_some(stream, &mut self.response).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
            keep_alive = false;
        }
        Ok((status, keep_alive))
    }
}

/// `write!` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    match read_some(stream, buf).await {
        Ok(0) => Err("connection closed before the answer was complete".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("receive: {e}")),
    }
}

/// Writes all of `buf`, trying first and waiting for the socket only when it is full.
async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends what the socket has (waiting for something); 0 at the end of the connection.
async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let filled = buf.len();
    buf.resize(filled + 4096, 0);
    let result = loop {
        stream.readable().await?;
        match stream.try_read(&mut buf[filled..]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => break other,
        }
    };
    buf.truncate(filled + *result.as_ref().unwrap_or(&0));
    result
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Resident memory of a process, from `/proc/PID/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open file descriptors of a process, from `/proc/PID/fd`.
fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// The figures of a run.
struct Summary {
    target: String,
    concurrency: usize,
    rate: Option<f64>,
    elapsed: Duration,
    requests: u64,
    pushes: u64,
    disconnects: u64,
    ok: u64,
    non_200: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    late: u64,
    /// p50, p99, p99.9 and max, in microseconds.
    latency_us: Option<[u32; 4]>,
    mean_us: f64,
    /// Slowest and fastest progress interval, requests/s.
    interval_rates: Option<(f64, f64)>,
    rss: Option<Rss>,
    fds: Option<usize>,
    pid: Option<u32>,
}

impl Summary {
    fn new(
        args: &LoadArgs,
        mut tally: Tally,
        elapsed: Duration,
        rss: Option<Rss>,
        fds: Option<usize>,
        intervals: &[f64],
    ) -> Self {
        tally.latencies_us.sort_unstable();
        let l = &tally.latencies_us;
        let at = |q: f64| l[((q * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1];
        let latency_us = (!l.is_empty()).then(|| [at(0.5), at(0.99), at(0.999), l[l.len() - 1]]);
        let mean_us = if l.is_empty() {
            0.0
        } else {
            l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len() as f64
        };
        let interval_rates = (!intervals.is_empty()).then(|| {
            intervals
                .iter()
                .fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
                    (lo.min(*r), hi.max(*r))
                })
        });
        let ok = tally.statuses.get(&200).copied().unwrap_or(0);
        tally.statuses.remove(&200);
        Summary {
            target: args.target.clone(),
            concurrency: args.concurrency,
            rate: args.rate,
            elapsed,
            requests: tally.pushes + tally.disconnects,
            pushes: tally.pushes,
            disconnects: tally.disconnects,
            ok,
            non_200: tally.statuses,
            errors: tally.errors,
            first_error: tally.first_error,
            late: tally.late,
            latency_us,
            mean_us,
            interval_rates,
            rss,
            fds,
            pid: args.pid,
        }
    }

    fn failed(&self) -> bool {
        self.errors > 0 || !self.non_200.is_empty()
    }

    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn print(&self) {
        let ms = |us: u32| f64::from(us) / 1000.0;
        let mode = match self.rate {
            Some(r) => format!("open loop at {r:.0} requests/s"),
            None => "closed loop".into(),
        };
        println!(
            "{} requests ({} pushes, {} disconnects) to {} in {:.2} s; {} connections, {mode}",
            self.requests,
            self.pushes,
            self.disconnects,
            self.target,
            self.elapsed.as_secs_f64(),
            self.concurrency
        );
        println!("throughput: {:.0} requests/s", self.per_second());
        if let Some((lo, hi)) = self.interval_rates {
            println!("  progress intervals: slowest {lo:.0}, fastest {hi:.0} requests/s");
        }
        if let Some([p50, p99, p999, max]) = self.latency_us {
            println!(
                "latency: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms (mean {:.3} ms)",
                ms(p50),
                ms(p99),
                ms(p999),
                ms(max),
                self.mean_us / 1000.0
            );
        }
        if self.rate.is_some() {
            println!(
                "  sent over 1 ms late (every connection busy): {}",
                self.late
            );
        }
        let non_200: u64 = self.non_200.values().sum();
        println!(
            "answers: {} x 200, {non_200} non-200, {} errors",
            self.ok, self.errors
        );
        for (status, n) in &self.non_200 {
            println!("  {n:>8} x HTTP {status}");
        }
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        if let (Some(pid), Some(r)) = (self.pid, self.rss) {
            let mib = |kib: u64| kib as f64 / 1024.0;
            println!(
                "exporter (pid {pid}) RSS: start {:.1} MiB, max {:.1} MiB, end {:.1} MiB; open fds at end: {}",
                mib(r.start_kib),
                mib(r.max_kib),
                mib(r.end_kib),
                self.fds.map_or("?".into(), |n| n.to_string())
            );
        }
    }

    fn json(&self) -> serde_json::Value {
        let ms = |us: u32| f64::from(us) / 1000.0;
        json!({
            "target": self.target,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "seconds": self.elapsed.as_secs_f64(),
            "requests": self.requests,
            "pushes": self.pushes,
            "disconnects": self.disconnects,
            "requests_per_second": self.per_second(),
            "slowest_interval_per_second": self.interval_rates.map(|r| r.0),
            "fastest_interval_per_second": self.interval_rates.map(|r| r.1),
            "latency_ms": self.latency_us.map(|[p50, p99, p999, max]| json!({
                "p50": ms(p50), "p99": ms(p99), "p99_9": ms(p999), "max": ms(max),
                "mean": self.mean_us / 1000.0,
            })),
            "late": self.late,
            "ok": self.ok,
            "non_200": self.non_200.values().sum::<u64>(),
            "statuses": self.non_200.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "errors": self.errors,
            "first_error": self.first_error,
            "rss_mib": self.rss.map(|r| json!({
                "start": r.start_kib as f64 / 1024.0,
                "max": r.max_kib as f64 / 1024.0,
                "end": r.end_kib as f64 / 1024.0,
            })),
            "open_fds": self.fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callback::{self, Event};
    use crate::config::KeySource;

    fn plan(domains: u64) -> Arc<Plan> {
        let start = Instant::now();
        Arc::new(Plan {
            target: Target {
                address: "127.0.0.1:9".parse().unwrap(),
                head: String::new(),
            },
            key: Some("k".into()),
            domains,
            per_stream: 2,
            limit: None,
            end: start,
            interval: None,
            start,
            sequence_base: 7 << 32,
            run_id: 0xabc,
            next_stream: AtomicU64::new(0),
            done: AtomicU64::new(0),
        })
    }

    #[test]
    fn bodies_parse_verify_and_cover_domains_areas_and_errcodes() {
        let mut bodies = Bodies {
            plan: plan(3),
            signed: None,
        };
        let verifier =
            crate::signature::Verifier::new(Some(crate::signature::Keys::from_list("k")), 60, 900);
        let mut domains = std::collections::BTreeSet::new();
        let mut areas = std::collections::BTreeSet::new();
        let mut codes = std::collections::BTreeSet::new();
        let mut sequences = std::collections::BTreeSet::new();
        for k in 0..400 {
            let push = callback::parse(bodies.body(k, true).as_bytes()).unwrap();
            let disconnect = callback::parse(bodies.body(k, false).as_bytes()).unwrap();
            for c in [&push, &disconnect] {
                verifier
                    .verify(c.t, c.sign.as_deref(), crate::ledger::now_secs())
                    .unwrap();
            }
            let Event::Push(p) = push.event else {
                panic!("not a push")
            };
            let Event::Disconnect {
                session,
                errcode,
                push_duration_ms,
            } = disconnect.event
            else {
                panic!("not a disconnect")
            };
            assert_eq!(p.sequence, session.sequence);
            assert_eq!(p.stream, session.stream);
            assert!(push_duration_ms.is_some());
            assert!(sequences.insert(p.sequence));
            domains.insert(p.stream.app);
            areas.insert(p.area);
            codes.insert(errcode);
        }
        assert_eq!(domains.len(), 3);
        assert!(areas.contains(&crate::area::Area::Mainland));
        assert!(areas.contains(&crate::area::Area::Overseas));
        assert!(!areas.contains(&crate::area::Area::Unknown));
        assert!(codes.len() >= 8, "{codes:?}");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let args = LoadArgs {
            target: "http://x/callback".into(),
            concurrency: 1,
            duration: Duration::from_secs(1),
            requests: None,
            rate: None,
            domains: 1,
            push_only: false,
            pid: None,
            progress: Duration::ZERO,
            json: false,
            keys: KeySource { key_file: None },
        };
        let tally = Tally {
            latencies_us: (1..=1000).rev().collect(),
            statuses: BTreeMap::from([(200, 999), (503, 1)]),
            pushes: 500,
            disconnects: 500,
            ..Tally::default()
        };
        let s = Summary::new(&args, tally, Duration::from_secs(1), None, None, &[]);
        assert_eq!(s.latency_us, Some([500, 990, 999, 1000]));
        assert_eq!(s.ok, 999);
        assert!(s.failed());
        assert_eq!(s.json()["non_200"], 1);
    }

    /// Serves each accepted connection the canned answers in turn, one per request.
    async fn canned(answers: Vec<&'static str>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((stream, _)) = listener.accept().await {
                let mut buf = Vec::new();
                loop {
                    // A request is complete once its body (Content-Length) is in.
                    let complete = find(&buf, b"\r\n\r\n").is_some_and(|end| {
                        let head = std::str::from_utf8(&buf[..end])
                            .unwrap()
                            .to_ascii_lowercase();
                        let length: usize = head
                            .split("content-length: ")
                            .nth(1)
                            .and_then(|v| v.split("\r\n").next()?.parse().ok())
                            .unwrap();
                        buf.len() >= end + 4 + length
                    });
                    if complete {
                        buf.clear();
                        let Some(answer) = answers.next() else { return };
                        write_all(&stream, answer.as_bytes()).await.unwrap();
                        if answer.contains("Connection: close") {
                            break;
                        }
                    } else if read_some(&stream, &mut buf).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
            }
        });
        format!("http://{address}/callback")
    }

    #[tokio::test]
    async fn client_reads_length_chunked_and_closing_answers() {
        let url = canned(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"code\":0}",
            "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"co\r\n6\r\nde\":1}\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let target = Target::parse(&url).await.unwrap();
        let mut c = Connection::new(&target);
        assert_eq!(c.post(b"{}").await, Ok(200));
        assert_eq!(c.post(b"{\"a\":1}").await, Ok(503));
        assert_eq!(c.post(b"{}").await, Ok(200));
        assert!(c.stream.is_none(), "closed as the server asked");
        assert_eq!(c.post(b"{}").await, Ok(401));
        assert!(Target::parse("https://x/callback").await.is_err());
    }
}
