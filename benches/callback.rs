//! One callback through the steps before the ledger: parse the body, verify `t` and `sign`,
//! classify the disconnect code.

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tencent_css_exporter::callback::{self, Event};
use tencent_css_exporter::errcode::ErrCode;
use tencent_css_exporter::signature::{sign, Keys, Verifier};

const KEY: &str = "bench-callback-key";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A push or disconnect body as Tencent sends it (about 450 bytes).
fn body(push: bool, t: i64) -> Vec<u8> {
    let (event_type, errcode, tail) = if push {
        (1, 0, String::new())
    } else {
        (
            0,
            14,
            r#""push_duration":"128581","idc_id":34,"width":0,"height":0,"#.to_owned(),
        )
    };
    format!(
        r#"{{"app":"push.example.com","appid":12345678,"appname":"live","channel_id":"stream_1","errcode":{errcode},"errmsg":"The push client actively stopped the push","event_time":{now},"event_type":{event_type},"set_id":2,"node":"100.121.160.92","sequence":"6674468118806626493","stream_id":"stream_1","stream_param":"stream_param=test","user_ip":"119.29.94.245",{tail}"sign":"{sign}","t":{t}}}"#,
        now = t - 600,
        sign = sign(KEY, t),
    )
    .into_bytes()
}

fn callback(c: &mut Criterion) {
    let t = now() + 600;
    let verifier = Verifier::new(Some(Keys::from_list(KEY)), 60, 900);
    let push = body(true, t);
    let disconnect = body(false, t);

    let mut group = c.benchmark_group("callback");
    group.throughput(Throughput::Elements(1));
    for (name, body) in [("push", &push), ("disconnect", &disconnect)] {
        group.bench_function(format!("parse_verify_classify/{name}"), |b| {
            b.iter(|| {
                let cb = callback::parse(black_box(body)).expect("valid body");
                verifier
                    .verify(cb.t, cb.sign.as_deref(), now())
                    .expect("valid sign");
                let reason = match &cb.event {
                    Event::Disconnect { errcode, .. } => Some(ErrCode::new(*errcode).reason()),
                    _ => None,
                };
                black_box((cb, reason))
            })
        });
    }
    group.bench_function("parse/disconnect", |b| {
        b.iter(|| callback::parse(black_box(&disconnect)).expect("valid body"))
    });
    let cb = callback::parse(&disconnect).expect("valid body");
    group.bench_function("verify", |b| {
        b.iter(|| verifier.verify(black_box(cb.t), black_box(cb.sign.as_deref()), now()))
    });
    group.bench_function("errcode_reason", |b| {
        b.iter(|| ErrCode::new(black_box(14)).reason())
    });
    group.finish();
}

criterion_group!(benches, callback);
criterion_main!(benches);
