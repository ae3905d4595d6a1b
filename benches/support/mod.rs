//! The events the benches feed the state and the store: stream `k` of 100 push domains, both
//! areas, its own session with a scattered sequence (as Tencent's are: the store sees them in no
//! order), and a mix of disconnect codes.

use tencent_css_exporter::area::Area;
use tencent_css_exporter::callback::{Event, StreamEvent, StreamKey};

/// The benches' clock: time moves on from here as they need.
pub const NOW_MS: i64 = 1_700_000_000_000;

pub fn stream_event(k: u64) -> StreamEvent {
    StreamEvent {
        stream: StreamKey {
            app: format!("push{}.example.com", k % 100).into(),
            appname: "live".into(),
            stream_id: format!("stream_{k}").into(),
        },
        sequence: k.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_string(),
        event_time: Some(NOW_MS / 1000),
        area: if k.is_multiple_of(2) {
            Area::Mainland
        } else {
            Area::Overseas
        },
    }
}

pub fn push(k: u64) -> Event {
    Event::Push(stream_event(k))
}

pub fn disconnect(k: u64) -> Event {
    Event::Disconnect {
        session: stream_event(k),
        errcode: [1, 3, 21, 14][(k % 4) as usize],
        push_duration_ms: Some(128_581),
    }
}
