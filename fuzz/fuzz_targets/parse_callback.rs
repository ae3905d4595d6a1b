//! Any bytes as a callback body: `callback::parse` never panics, what it accepts is well formed,
//! and the verifier never panics on what it parsed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tencent_css_exporter::callback::{self, Event, EventKind};
use tencent_css_exporter::signature::{sign, Keys, Verifier};

const KEY: &str = "fuzzKey0001";

fuzz_target!(|body: &[u8]| {
    let parsed = callback::parse(body);
    // Parsing is a function of the bytes alone.
    let again = callback::parse(body);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parse is not deterministic"),
    }
    let cb = match parsed {
        Ok(cb) => cb,
        Err(e) => {
            // The error names an event and renders.
            let _ = (e.kind(), e.to_string());
            return;
        }
    };
    match &cb.event {
        Event::Push(s) | Event::Disconnect { session: s, .. } => {
            let required: [&str; 3] = [&s.stream.app, &s.stream.stream_id, &s.sequence];
            for field in required {
                assert!(!field.is_empty(), "required fields are never empty");
                assert_eq!(field.trim(), field, "text fields are trimmed");
            }
            assert_eq!(s.stream.appname.trim(), &*s.stream.appname);
            assert!(
                s.stream.app.len() <= callback::MAX_APP_BYTES,
                "an app is at most a domain name long"
            );
            if let Event::Disconnect {
                push_duration_ms: Some(ms),
                ..
            } = cb.event
            {
                assert!(ms >= 0, "negative push durations are dropped");
            }
        }
        Event::Other { event_type } => {
            assert_eq!(
                EventKind::from_event_type(Some(*event_type)),
                EventKind::Other
            );
        }
    }
    let verifier = Verifier::new(Some(Keys::from_list(KEY)), 60, 900);
    let insecure = Verifier::new(None, 60, 900);
    for now in [
        cb.t,
        cb.t.wrapping_sub(30),
        0,
        1_700_000_000,
        i64::MIN,
        i64::MAX,
    ] {
        let result = verifier.verify(cb.t, cb.sign.as_deref(), now);
        let _ = insecure.verify(cb.t, cb.sign.as_deref(), now);
        // A body carrying the right sign of its own t is accepted while t is current.
        if now == cb.t
            && cb.sign.as_deref().map(|s| s.trim().to_ascii_lowercase()) == Some(sign(KEY, cb.t))
        {
            assert_eq!(result, Ok(()));
        }
    }
});
