//! `simulate`: plays a small live platform against a running exporter.
//!
//! Streams push, run for a while, disconnect with a realistic mix of causes and reconnect under
//! a new session; a few callbacks are delivered twice as Tencent's retries would be. Everything
//! is signed like Tencent signs it.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};

use crate::config::SimulateArgs;
use crate::ledger::now_secs as now;
use crate::signature::sign;

const DOMAINS: [&str; 3] = [
    "push.live-a.example.com",
    "push.live-b.example.com",
    "push.games.example.net",
];

/// One simulated stream and its current push session.
struct Stream {
    /// Push domain (`app`), one of [`DOMAINS`].
    domain: &'static str,
    /// Stream name, with the run's id in it so that runs do not share streams.
    stream_id: String,
    /// Sent as `set_id`: every third stream is pushed outside the mainland.
    set_id: i64,
    /// Id of the current push session; a new one at each reconnect.
    sequence: u64,
    /// When the current push started (unix seconds), for its disconnect's `push_duration`.
    since: i64,
}

/// What was sent and how the exporter answered.
#[derive(Default)]
struct Tally {
    /// Callbacks sent, by what they were (push, disconnect and its errcode, retry).
    sent: BTreeMap<String, u64>,
    /// Answers received, by HTTP status.
    statuses: BTreeMap<u16, u64>,
    /// Callbacks that got no answer (connection error or timeout).
    failures: u64,
}

pub async fn run(args: SimulateArgs) -> Result<(), String> {
    let key = args.keys.signing_key()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let mut rng = rand::rng();
    let run_id: u32 = rng.random();
    let mut next_sequence = u64::from(run_id) << 24;
    let mut tally = Tally::default();
    let send = |body: Value| {
        let (client, key, target) = (client.clone(), key.clone(), args.target.clone());
        async move { post(&client, &target, key.as_deref(), body).await }
    };

    let mut streams: Vec<Stream> = (0..args.streams)
        .map(|i| {
            next_sequence += 1;
            Stream {
                domain: DOMAINS[i % DOMAINS.len()],
                stream_id: format!("sim_{run_id:08x}_{i}"),
                set_id: if i % 3 == 2 { 8 } else { 1 + (i as i64 % 6) },
                sequence: next_sequence,
                since: now(),
            }
        })
        .collect();
    for s in &streams {
        tally.record("push", send(body(s, 1, None)).await);
    }

    let deadline = tokio::time::Instant::now() + args.duration;
    let pause = Duration::from_millis(200);
    while tokio::time::Instant::now() + pause < deadline && !streams.is_empty() {
        tokio::time::sleep(pause).await;
        let i = rng.random_range(0..streams.len());
        let errcode = crate::errcode::TRAFFIC_MIX
            .choose_weighted(&mut rng, |(_, w)| *w)
            .map(|(c, _)| *c)
            .unwrap_or(1);
        let disconnect = body(&streams[i], 0, Some(errcode));
        tally.record(
            &format!("disconnect errcode={errcode}"),
            send(disconnect.clone()).await,
        );
        if rng.random_ratio(1, 10) {
            // A retry of the same event: must be acknowledged and counted once.
            tally.record("retried disconnect", send(disconnect).await);
        }
        next_sequence += 1;
        streams[i].sequence = next_sequence;
        streams[i].since = now();
        tally.record("push", send(body(&streams[i], 1, None)).await);
    }

    println!("sent to {}:", args.target);
    for (what, n) in &tally.sent {
        println!("  {n:>6}  {what}");
    }
    println!("answers:");
    for (status, n) in &tally.statuses {
        println!("  {n:>6}  HTTP {status}");
    }
    if tally.failures > 0 {
        println!("  {:>6}  no answer", tally.failures);
    }
    println!("{} streams left live", streams.len());
    if tally.failures > 0 || tally.statuses.keys().any(|s| *s != 200) {
        return Err("some callbacks were not accepted (see above)".into());
    }
    Ok(())
}

impl Tally {
    fn record(&mut self, what: &str, answer: Result<u16, String>) {
        *self.sent.entry(what.to_owned()).or_default() += 1;
        match answer {
            Ok(status) => *self.statuses.entry(status).or_default() += 1,
            Err(e) => {
                if self.failures == 0 {
                    eprintln!("callback failed: {e}");
                }
                self.failures += 1;
            }
        }
    }
}

fn body(s: &Stream, event_type: i64, errcode: Option<i64>) -> Value {
    let now = now();
    let mut body = json!({
        "app": s.domain,
        "appid": 12345678,
        "appname": "live",
        "channel_id": s.stream_id,
        "stream_id": s.stream_id,
        "event_type": event_type,
        "event_time": now,
        "sequence": s.sequence.to_string(),
        "set_id": s.set_id,
        "node": "100.121.160.92",
        "user_ip": "119.29.94.245",
        "stream_param": "",
        "errcode": errcode.unwrap_or(0),
        "errmsg": if errcode.is_some() { "simulated disconnect" } else { "ok" },
    });
    if errcode.is_some() {
        body["push_duration"] = json!(((now - s.since).max(0) * 1000).to_string());
    }
    body
}

async fn post(
    client: &reqwest::Client,
    target: &str,
    key: Option<&str>,
    mut body: Value,
) -> Result<u16, String> {
    let t = now() + 600;
    body["t"] = json!(t);
    if let Some(key) = key {
        body["sign"] = json!(sign(key, t));
    }
    let response = client
        .post(target)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}
