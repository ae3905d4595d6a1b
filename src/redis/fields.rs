//! How the state is laid out in Redis: key names, the fields of the counters' hash, and how
//! a scrape's numbers are decoded from them.
//!
//! Keys, under `--storage.redis-prefix` (default `tencent_css:`):
//! - `session:<json [app, appname, stream_id]>`: hash `seq`, `area`, `since`, `live` (its field
//!   in the `live` hash);
//! - `places:<json app>`: hash `<appname>` → live sessions, the paths a disconnect without
//!   `appname` looks under for its session (sessions started before it was kept are not
//!   counted there);
//! - `delivered:<sequence>:<event_type>`: a delivered event, expiring one dedup window after it
//!   was delivered (a push: one window after its session ended);
//! - `live`: hash `<domain>\x1f<area>` → live streams;
//! - `counters`: hash `<metric>\x1f<labels json>[\x1fb<bucket>|\x1fsum]` → counter values;
//! - `last_callback_ms`: the last accepted callback time; `domains`: the admitted domains.

use std::collections::BTreeMap;

use crate::area::Area;
use crate::callback::{EventKind, StreamKey};
use crate::state::counters::{Count, Counters, Domain, Histogram, Series, Value};
use crate::state::View;

/// Separates the parts of a hash field; cannot occur in JSON-encoded labels.
const SEP: char = '\x1f';

/// Key names under the prefix.
pub struct Keys {
    /// `--storage.redis-prefix`, so that several exporters can share one Redis.
    pub prefix: String,
}

impl Keys {
    pub fn session(&self, stream: &StreamKey) -> String {
        let id = serde_json::to_string(&[&*stream.app, &*stream.appname, &*stream.stream_id])
            .expect("strings serialize");
        format!("{}session:{id}", self.prefix)
    }

    pub fn places(&self, app: &str) -> String {
        let app = serde_json::to_string(app).expect("strings serialize");
        format!("{}places:{app}", self.prefix)
    }

    pub fn delivered(&self, sequence: &str, kind: EventKind) -> String {
        let event_type = crate::state::DeliveryKey::new(sequence, kind).event_type();
        format!("{}delivered:{sequence}:{event_type}", self.prefix)
    }

    pub fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// The field of the `live` hash that counts the live streams of `domain` in `area`.
pub fn live_field(domain: &str, area: Area) -> String {
    format!("{domain}{SEP}{}", area.as_str())
}

/// A counter field of the `counters` hash.
pub fn field(series: &Series, part: Option<&str>) -> String {
    let labels = serde_json::to_string(&series.labels()).expect("strings serialize");
    match part {
        Some(part) => format!("{}{SEP}{labels}{SEP}{part}", series.metric()),
        None => format!("{}{SEP}{labels}", series.metric()),
    }
}

/// The hash increments of what an event counts, and the time it moves the last callback to.
pub fn increments(counts: Vec<Count>) -> (Vec<(String, i64)>, i64) {
    let mut fields = Vec::with_capacity(counts.len() + 2);
    let mut touched = 0;
    for count in counts {
        match count {
            Count::Inc(series) => fields.push((field(&series, None), 1)),
            Count::Observe(series, ms) => {
                let bucket = format!("b{}", series.bucket(ms));
                fields.push((field(&series, Some(&bucket)), 1));
                fields.push((field(&series, Some("sum")), ms as i64));
            }
            Count::Touch(at) => touched = at,
        }
    }
    (fields, touched)
}

/// The numbers of a scrape from the fields read from Redis. A field read twice (`HSCAN` may
/// return one again while Redis rehashes) keeps its later value; fields this version does not
/// know are skipped, so replicas of different versions can share one Redis.
pub fn decode(counters: Vec<(String, i64)>, live: Vec<(String, i64)>, last: Option<i64>) -> View {
    let mut c = Counters::default();
    let mut histograms: BTreeMap<Series, Histogram> = BTreeMap::new();
    for (f, n) in counters {
        let mut parts = f.split(SEP);
        let (Some(metric), Some(labels)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(series) = serde_json::from_str::<Vec<String>>(labels)
            .ok()
            .and_then(|l| Series::decode(metric, &l))
        else {
            continue;
        };
        let n = n.max(0) as u64;
        match (parts.next(), series.bounds()) {
            (None, None) => {
                let _ = c.restore(&series, Value::Count(n));
            }
            (Some(part), Some(bounds)) => {
                let h = histograms.entry(series).or_insert_with(|| Histogram {
                    counts: vec![0; bounds.len() + 1],
                    sum_ms: 0,
                });
                match part.strip_prefix('b').and_then(|b| b.parse::<usize>().ok()) {
                    Some(i) if i < h.counts.len() => h.counts[i] = n,
                    _ if part == "sum" => h.sum_ms = n,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    for (series, h) in histograms {
        let _ = c.restore(&series, Value::Histogram(h));
    }
    c.last_callback_ms = last.unwrap_or(0);
    let live: BTreeMap<(Domain, Area), u64> = live
        .into_iter()
        .filter_map(|(f, n)| {
            // The area is last: a domain may hold the separator itself.
            let (domain, area) = f.rsplit_once(SEP)?;
            Some((
                (Domain::from(domain), Area::from_label(area)?),
                n.max(0) as u64,
            ))
        })
        .collect();
    View { live, counters: c }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::counters::PUSH_DURATION_BOUNDS_MS;

    #[test]
    fn a_field_read_twice_keeps_its_later_value_and_unknown_fields_are_skipped() {
        let pushes = Series::Pushes("a.example.com".into(), Area::Mainland);
        let duration = Series::PushDuration("a.example.com".into(), Area::Mainland);
        let counters = vec![
            (field(&pushes, None), 3),
            (field(&duration, Some("b1")), 2),
            (field(&duration, Some("sum")), 40_000),
            (format!("from_a_later_version{SEP}[]"), 7),
            ("no separator".to_owned(), 1),
            (field(&duration, Some("b99")), 5),
            // Returned again by a later `HSCAN` step, after more callbacks.
            (field(&pushes, None), 4),
        ];
        let live = vec![
            (format!("a.example.com{SEP}mainland"), 2),
            (format!("a.example.com{SEP}nowhere"), 9),
            (live_field(&format!("odd{SEP}domain"), Area::Overseas), 1),
        ];
        let view = decode(counters, live, Some(1_700_000_000_000));

        let c = &view.counters;
        assert_eq!(c.value(&pushes), Value::Count(4));
        let mut counts = vec![0; PUSH_DURATION_BOUNDS_MS.len() + 1];
        counts[1] = 2;
        assert_eq!(
            c.value(&duration),
            Value::Histogram(Histogram {
                counts,
                sum_ms: 40_000
            })
        );
        assert_eq!(c.last_callback_ms, 1_700_000_000_000);
        assert_eq!(
            view.live.into_iter().collect::<Vec<_>>(),
            [
                (("a.example.com".into(), Area::Mainland), 2),
                (
                    (format!("odd{SEP}domain").as_str().into(), Area::Overseas),
                    1
                )
            ]
        );
    }
}
