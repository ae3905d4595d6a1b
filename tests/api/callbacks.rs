//! Every answer of the callback endpoint, and what each one counts.

use serde_json::{json, Value};

use crate::helpers::*;

const CALLBACKS: &str = "tencent_css_callbacks_total";

async fn outcome(app: &TestApp, event: &str, outcome: &str) -> f64 {
    app.scrape()
        .await
        .value(CALLBACKS, &[("event", event), ("outcome", outcome)])
}

#[tokio::test]
async fn accepted_push_answers_code_0() {
    let app = spawn_app().await;
    let answer = app.post(&signed(sample("push"))).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, r#"{"code":0}"#);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    assert_eq!(outcome(&app, "push", "accepted").await, 1.0);
}

#[tokio::test]
async fn body_is_json_whatever_the_content_type() {
    let app = spawn_app().await;
    let body = signed(sample("push")).to_string().into_bytes();
    assert_eq!(app.post_raw(body, "text/plain").await.status, 200);
    let body = signed(sample("disconnect")).to_string().into_bytes();
    assert_eq!(
        app.post_raw(body, "application/x-www-form-urlencoded")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn retries_are_acknowledged_and_counted_once() {
    let app = spawn_app().await;
    let push = signed(sample("push"));
    for _ in 0..3 {
        assert_eq!(app.post(&push).await.status, 200);
    }
    // A retry may carry a fresh t and sign: still the same event.
    assert_eq!(app.post(&signed(sample("push"))).await.status, 200);
    let s = app.scrape().await;
    assert_eq!(
        s.value(CALLBACKS, &[("event", "push"), ("outcome", "accepted")]),
        1.0
    );
    assert_eq!(
        s.value(CALLBACKS, &[("event", "push"), ("outcome", "duplicate")]),
        3.0
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 1.0);
}

#[tokio::test]
async fn other_event_types_are_acknowledged_and_ignored() {
    let app = spawn_app().await;
    for event_type in [100, 200, 314, 321, 999] {
        let body = signed(json!({"event_type": event_type, "stream_id": "x"}));
        let answer = app.post(&body).await;
        assert_eq!(
            answer.status, 200,
            "event_type {event_type}: {}",
            answer.body
        );
        assert_eq!(answer.body, r#"{"code":0}"#);
    }
    let s = app.scrape().await;
    assert_eq!(
        s.value(CALLBACKS, &[("event", "other"), ("outcome", "ignored")]),
        5.0
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 0.0);
}

#[tokio::test]
async fn string_typed_numbers_are_accepted() {
    let app = spawn_app().await;
    let mut push = sample("push");
    for field in ["event_type", "set_id", "appid", "event_time"] {
        push[field] = json!(push[field].to_string());
    }
    push["event_time"] = json!(now().to_string());
    let mut push = signed(push);
    push["t"] = json!(push["t"].to_string());
    let answer = app.post(&push).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let s = app.scrape().await;
    assert_eq!(
        s.value(
            "tencent_css_pushes_total",
            &[("domain", "test.domain.com"), ("area", "mainland")]
        ),
        1.0
    );
}

#[tokio::test]
async fn not_json_is_400_malformed() {
    let app = spawn_app().await;
    for body in [&b"not json"[..], b"", b"[]", b"{\"event_type\": 1,"] {
        let answer = app.post_raw(body.to_vec(), "application/json").await;
        assert_eq!(answer.status, 400, "{:?}", String::from_utf8_lossy(body));
    }
    assert_eq!(outcome(&app, "unknown", "malformed").await, 4.0);
}

/// A field the exporter reads given twice: which one counts would be a guess. Unknown fields may
/// repeat.
#[tokio::test]
async fn a_field_given_twice_is_400_malformed() {
    let app = spawn_app().await;
    let body = signed(sample("push")).to_string();
    let twice = body.replacen('{', "{\"set_id\":9,", 1);
    let answer = app.post_raw(twice.into_bytes(), "application/json").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let unknown_twice = body.replacen('{', "{\"idc_id\":1,\"idc_id\":2,", 1);
    let answer = app
        .post_raw(unknown_twice.into_bytes(), "application/json")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(outcome(&app, "unknown", "malformed").await, 1.0);
    assert_eq!(app.scrape().await.sum("tencent_css_pushes_total", &[]), 1.0);
}

/// A signed callback's fields in an array, in the order the parser declares them: serde would
/// read a struct from it, but no Tencent body is an array.
#[tokio::test]
async fn an_array_of_the_fields_is_400_malformed() {
    let app = spawn_app().await;
    let body = signed(sample("push"));
    let read = &crate::properties::FIELDS[..8];
    let array: Vec<Value> = read.iter().map(|f| body[*f].clone()).collect();
    let answer = app.post(&Value::from(array)).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(outcome(&app, "unknown", "malformed").await, 1.0);
    assert_eq!(app.scrape().await.sum("tencent_css_pushes_total", &[]), 0.0);
}

#[tokio::test]
async fn missing_required_fields_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    for field in ["app", "stream_id", "sequence", "t", "event_type"] {
        let mut body = signed(sample("push"));
        body.as_object_mut().unwrap().remove(field);
        if field == "stream_id" {
            body.as_object_mut().unwrap().remove("channel_id");
        }
        let answer = app.post(&body).await;
        assert_eq!(answer.status, 400, "without {field}: {}", answer.body);
        assert!(answer.body.contains(field), "{}", answer.body);
    }
    let s = app.scrape().await;
    assert_eq!(
        s.value(CALLBACKS, &[("event", "push"), ("outcome", "malformed")]),
        4.0
    );
    assert_eq!(
        s.value(CALLBACKS, &[("event", "unknown"), ("outcome", "malformed")]),
        1.0
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 0.0);
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 0.0);
}

#[tokio::test]
async fn an_app_longer_than_a_domain_name_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    let longest = format!("{}.example.com", "a".repeat(253 - ".example.com".len()));
    for (domain, status) in [(longest.clone() + "x", 400), (longest.clone(), 200)] {
        let answer = app.post(&signed(push(&domain, "s1", "q1", 1))).await;
        assert_eq!(answer.status, status, "{}", answer.body);
    }
    let answer = app
        .post(&signed(disconnect(&"é".repeat(127), "s1", "q1", 1, 1)))
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("254 bytes"), "{}", answer.body);
    let s = app.scrape().await;
    assert_eq!(s.callbacks("push", "malformed"), 1.0);
    assert_eq!(s.callbacks("disconnect", "malformed"), 1.0);
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(
        s.value("tencent_css_active_streams", &[("domain", &longest)]),
        1.0
    );
}

#[tokio::test]
async fn bad_or_missing_sign_is_401() {
    let app = spawn_app().await;
    let wrong_key = signed_with(sample("push"), "not-the-key");
    let mut no_sign = signed(sample("push"));
    no_sign.as_object_mut().unwrap().remove("sign");
    let mut empty_sign = signed(sample("push"));
    empty_sign["sign"] = json!("");
    let mut other_t = signed(sample("push"));
    other_t["t"] = json!(other_t["t"].as_i64().unwrap() + 1);
    for body in [wrong_key, no_sign, empty_sign, other_t] {
        let answer = app.post(&body).await;
        assert_eq!(answer.status, 401, "{body}");
    }
    let s = app.scrape().await;
    assert_eq!(
        s.value(
            CALLBACKS,
            &[("event", "push"), ("outcome", "bad_signature")]
        ),
        4.0
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 0.0);
}

#[tokio::test]
async fn sign_is_compared_case_insensitively() {
    let app = spawn_app().await;
    let mut body = signed(sample("push"));
    body["sign"] = json!(body["sign"].as_str().unwrap().to_uppercase());
    assert_eq!(app.post(&body).await.status, 200);
}

fn with_t(mut body: serde_json::Value, t: i64) -> serde_json::Value {
    body["t"] = json!(t);
    body["sign"] = json!(tencent_css_exporter::signature::sign(KEY, t));
    body
}

#[tokio::test]
async fn expired_and_future_t_are_401() {
    let app = spawn_app().await;
    // Default window: 60 s of skew behind, 15 min ahead.
    let expired = with_t(sample("push"), now() - 120);
    let future = with_t(sample("push"), now() + 3600);
    assert_eq!(app.post(&expired).await.status, 401);
    assert_eq!(app.post(&future).await.status, 401);
    let s = app.scrape().await;
    assert_eq!(
        s.value(CALLBACKS, &[("event", "push"), ("outcome", "expired")]),
        2.0
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 0.0);
    // Just inside the window both ways.
    assert_eq!(
        app.post(&with_t(sample("push"), now() - 30)).await.status,
        200
    );
    let mut other = sample("push");
    other["sequence"] = json!("2");
    assert_eq!(app.post(&with_t(other, now() + 800)).await.status, 200);
}

#[tokio::test]
async fn window_flags_change_the_window() {
    let app = spawn_app_with(AppOptions {
        args: vec![
            "--storage.path".into(),
            ":memory:".into(),
            "--callback.clock-skew".into(),
            "10m".into(),
            "--callback.max-validity".into(),
            "1h".into(),
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(
        app.post(&with_t(sample("push"), now() - 300)).await.status,
        200
    );
    let mut other = sample("push");
    other["sequence"] = json!("2");
    assert_eq!(app.post(&with_t(other, now() + 3000)).await.status, 200);
}

#[tokio::test]
async fn any_of_several_keys_verifies() {
    let app = spawn_app_with(AppOptions {
        keys: vec!["oldKey", "newKey"],
        ..Default::default()
    })
    .await;
    let mut second = sample("push");
    second["sequence"] = json!("2");
    second["stream_id"] = json!("other");
    assert_eq!(
        app.post(&signed_with(sample("push"), "oldKey"))
            .await
            .status,
        200
    );
    assert_eq!(app.post(&signed_with(second, "newKey")).await.status, 200);
    assert_eq!(
        app.post(&signed_with(sample("push"), "retiredKey"))
            .await
            .status,
        401
    );
    let s = app.scrape().await;
    assert_eq!(s.sum("tencent_css_active_streams", &[]), 2.0);
}

#[tokio::test]
async fn insecure_mode_accepts_unsigned_callbacks() {
    let app = spawn_app_with(AppOptions {
        keys: vec![],
        ..Default::default()
    })
    .await;
    let mut body = sample("push");
    body["t"] = json!(now() + 600);
    body.as_object_mut().unwrap().remove("sign");
    assert_eq!(app.post(&body).await.status, 200);
}

/// Sends `head` on a new connection and returns the status line of the first answer.
async fn first_status_line(app: &TestApp, head: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.callback_addr)
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream);
    // Not a speed limit: without an early answer the server would wait for the body.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reader.read_line(&mut line),
    )
    .await
    .expect("no answer within a minute: the server waits for the body")
    .unwrap();
    line
}

#[tokio::test]
async fn a_body_declared_over_64_kib_is_413_before_it_is_sent() {
    // A request timeout longer than the test may take: a 408 would mean the body was awaited.
    let mut options = AppOptions::default();
    options
        .args
        .extend(["--web.request-timeout".into(), "10m".into()]);
    let app = spawn_app_with(options).await;
    let head = |extra: &str| {
        format!("POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n{extra}\r\n")
    };
    let line = first_status_line(&app, &head("")).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // Nor is such a body invited.
    let line = first_status_line(&app, &head("Expect: 100-continue\r\n")).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    assert_eq!(outcome(&app, "unknown", "malformed").await, 2.0);
}

#[tokio::test]
async fn a_client_that_ends_its_side_after_its_request_still_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let body = signed(sample("push")).to_string();
    let mut stream = tokio::net::TcpStream::connect(app.callback_addr)
        .await
        .unwrap();
    let head = format!(
        "POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(outcome(&app, "push", "accepted").await, 1.0);
}

#[tokio::test]
async fn body_over_64_kib_is_413() {
    let app = spawn_app().await;
    let mut body = signed(sample("push"));
    body["padding"] = json!("x".repeat(64 * 1024));
    let answer = app.post(&body).await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    // Just under the limit is fine.
    let mut body = signed(sample("push"));
    let room = 64 * 1024 - body.to_string().len() - r#","padding":"""#.len();
    body["padding"] = json!("x".repeat(room));
    assert_eq!(body.to_string().len(), 64 * 1024);
    assert_eq!(app.post(&body).await.status, 200);
    assert_eq!(outcome(&app, "unknown", "malformed").await, 1.0);
}

#[tokio::test]
async fn other_methods_are_405() {
    let app = spawn_app().await;
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = app
            .http
            .request(method.clone(), &app.callback_url)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "POST");
    }
    assert_eq!(outcome(&app, "unknown", "malformed").await, 3.0);
}
