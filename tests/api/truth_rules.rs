//! The truth rules for live streams, through the HTTP interface.

use serde_json::json;

use crate::helpers::*;

const ACTIVE: &str = "tencent_css_active_streams";
const D: &str = "live.example.com";

async fn accept(app: &TestApp, body: serde_json::Value) {
    let answer = app.post(&signed(body)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

async fn live(app: &TestApp) -> f64 {
    app.scrape().await.sum(ACTIVE, &[])
}

#[tokio::test]
async fn push_then_disconnect_of_the_sample_session() {
    let app = spawn_app().await;
    accept(&app, sample("push")).await;
    assert_eq!(live(&app).await, 1.0);
    accept(&app, sample("disconnect")).await;
    let s = app.scrape().await;
    // The series stays, at 0.
    assert_eq!(
        s.get(
            ACTIVE,
            &[("domain", "test.domain.com"), ("area", "mainland")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn push_arriving_after_its_own_disconnect_does_not_go_live() {
    let app = spawn_app().await;
    accept(&app, disconnect(D, "s1", "seq-1", 1, 1)).await;
    accept(&app, push(D, "s1", "seq-1", 1)).await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 0.0);
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 1.0);
}

#[tokio::test]
async fn new_session_replaces_one_that_never_disconnected() {
    let app = spawn_app().await;
    accept(&app, push(D, "s1", "seq-1", 1)).await;
    accept(&app, push(D, "s1", "seq-2", 1)).await;
    assert_eq!(live(&app).await, 1.0, "the stream is counted once");
    accept(&app, disconnect(D, "s1", "seq-2", 1, 1)).await;
    assert_eq!(live(&app).await, 0.0);
}

#[tokio::test]
async fn disconnect_of_an_older_session_does_not_end_the_newer_one() {
    let app = spawn_app().await;
    accept(&app, push(D, "s1", "seq-1", 1)).await;
    accept(&app, push(D, "s1", "seq-2", 1)).await;
    accept(&app, disconnect(D, "s1", "seq-1", 1, 21)).await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 1.0);
    assert_eq!(
        s.value(
            "tencent_css_disconnects_total",
            &[("errcode", "21"), ("reason", "operator")]
        ),
        1.0
    );
}

#[tokio::test]
async fn late_push_of_an_older_session_does_not_replace_the_live_one() {
    let app = spawn_app().await;
    let mut newer = push(D, "s1", "seq-2", 1);
    newer["event_time"] = json!(now());
    let mut older = push(D, "s1", "seq-1", 1);
    older["event_time"] = json!(now() - 30);
    accept(&app, newer).await;
    accept(&app, older).await;
    accept(&app, disconnect(D, "s1", "seq-1", 1, 1)).await;
    assert_eq!(live(&app).await, 1.0, "seq-2 is still live");
    accept(&app, disconnect(D, "s1", "seq-2", 1, 1)).await;
    assert_eq!(live(&app).await, 0.0);
}

#[tokio::test]
async fn retried_disconnect_is_counted_once() {
    let app = spawn_app().await;
    accept(&app, push(D, "s1", "seq-1", 1)).await;
    let bye = disconnect(D, "s1", "seq-1", 1, 12);
    for _ in 0..3 {
        accept(&app, bye.clone()).await;
    }
    let s = app.scrape().await;
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 1.0);
    assert_eq!(s.callbacks("disconnect", "duplicate"), 2.0);
    assert_eq!(s.sum("tencent_css_push_duration_seconds_count", &[]), 1.0);
}

#[tokio::test]
async fn retried_push_is_a_duplicate_while_live_and_after_its_disconnect() {
    let app = spawn_app().await;
    let hello = push(D, "s1", "seq-1", 1);
    accept(&app, hello.clone()).await;
    accept(&app, hello.clone()).await;
    assert_eq!(live(&app).await, 1.0);
    accept(&app, disconnect(D, "s1", "seq-1", 1, 1)).await;
    accept(&app, hello).await;
    let s = app.scrape().await;
    assert_eq!(
        s.sum(ACTIVE, &[]),
        0.0,
        "a late retry does not revive the stream"
    );
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.callbacks("push", "duplicate"), 2.0);
}

#[tokio::test]
async fn without_a_dedup_window_the_live_session_still_knows_its_push() {
    let app = spawn_app_with(AppOptions {
        args: vec![
            "--storage.path".into(),
            ":memory:".into(),
            "--callback.dedup-window".into(),
            "0s".into(),
        ],
        ..Default::default()
    })
    .await;
    let hello = push(D, "s1", "seq-1", 1);
    accept(&app, hello.clone()).await;
    accept(&app, hello).await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 1.0);
    assert_eq!(s.sum("tencent_css_pushes_total", &[]), 1.0);
    assert_eq!(s.callbacks("push", "duplicate"), 1.0);
}

#[tokio::test]
async fn streams_are_app_appname_and_stream_id() {
    let app = spawn_app().await;
    accept(&app, on_path(push(D, "s1", "seq-1", 1), Some("live"))).await;
    accept(&app, on_path(push(D, "s1", "seq-2", 1), Some("backup"))).await;
    accept(&app, push("other.example.com", "s1", "seq-3", 1)).await;
    assert_eq!(live(&app).await, 3.0);
}

#[tokio::test]
async fn a_disconnect_without_appname_ends_its_session_under_the_push_path() {
    let app = spawn_app().await;
    accept(&app, on_path(push(D, "s1", "seq-1", 1), Some("live"))).await;
    accept(&app, on_path(push(D, "s1", "seq-2", 1), Some("backup"))).await;
    for (sequence, left) in [("seq-2", 1.0), ("seq-1", 0.0)] {
        accept(&app, on_path(disconnect(D, "s1", sequence, 1, 1), None)).await;
        assert_eq!(live(&app).await, left, "after the disconnect of {sequence}");
    }
    // Another path's sequence does not end a session it is not; nor another stream id's.
    accept(&app, on_path(push(D, "s1", "seq-3", 1), Some("live"))).await;
    accept(&app, on_path(disconnect(D, "s2", "seq-3", 1, 1), Some(""))).await;
    accept(
        &app,
        on_path(disconnect(D, "s1", "seq-4", 1, 1), Some("backup")),
    )
    .await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 1.0);
    assert_eq!(s.sum("tencent_css_disconnects_total", &[]), 4.0);
}

#[tokio::test]
async fn an_event_time_not_believed_counts_as_the_time_received() {
    let app = spawn_app().await;
    // In milliseconds by mistake: the session would look newer than every later one for good.
    let mut first = push(D, "s1", "seq-1", 1);
    first["event_time"] = json!(now() * 1000);
    accept(&app, first).await;
    accept(&app, push(D, "s1", "seq-2", 1)).await;
    accept(&app, disconnect(D, "s1", "seq-2", 1, 1)).await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 0.0, "seq-2 replaced seq-1 and ended");
    // 0: it would look older than every other session, and put decades into the histogram.
    let mut zero = push(D, "s2", "seq-3", 1);
    zero["event_time"] = json!(0);
    accept(&app, zero).await;
    let s = app.scrape().await;
    assert_eq!(s.sum(ACTIVE, &[]), 1.0);
    assert_eq!(
        s.value("tencent_css_callback_delay_seconds_count", &[]),
        2.0
    );
    assert!(s.value("tencent_css_callback_delay_seconds_sum", &[]) < 60.0);
}

#[tokio::test]
async fn an_ended_push_of_unknown_start_does_not_end_the_live_session() {
    let app = spawn_app().await;
    accept(&app, disconnect(D, "s1", "seq-1", 1, 1)).await;
    let mut live_one = push(D, "s1", "seq-2", 1);
    live_one["event_time"] = json!(now() - 120);
    accept(&app, live_one).await;
    // seq-1's push, delivered late and without a time: it may be older than seq-2.
    let mut late = push(D, "s1", "seq-1", 1);
    late.as_object_mut().unwrap().remove("event_time");
    accept(&app, late).await;
    assert_eq!(live(&app).await, 1.0);
    accept(&app, disconnect(D, "s1", "seq-2", 1, 1)).await;
    assert_eq!(live(&app).await, 0.0);
}

#[tokio::test]
async fn set_id_decides_the_area() {
    let app = spawn_app().await;
    for (i, set_id) in [1, 6, 7, 200, 0, 201].into_iter().enumerate() {
        accept(&app, push(D, &format!("s{i}"), &format!("seq-{i}"), set_id)).await;
    }
    let mut no_set_id = push(D, "s9", "seq-9", 1);
    no_set_id.as_object_mut().unwrap().remove("set_id");
    accept(&app, no_set_id).await;
    let s = app.scrape().await;
    assert_eq!(s.value(ACTIVE, &[("domain", D), ("area", "mainland")]), 2.0);
    assert_eq!(s.value(ACTIVE, &[("domain", D), ("area", "overseas")]), 2.0);
    assert_eq!(s.value(ACTIVE, &[("domain", D), ("area", "unknown")]), 3.0);
}
