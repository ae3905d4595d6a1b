//! The text exposition format's pieces: label sets, sample lines, histogram series, and numbers
//! written byte for byte as the `prometheus` crate's `TextEncoder` writes them (converted to
//! `f64` and formatted), without going through `f64` where the result is the same.

use std::fmt::Write as _;

use crate::area::Area;

/// `{domain="…",area="…"` into `labels`.
pub(super) fn domain_area(labels: &mut String, domain: &str, area: Area) {
    labels.clear();
    labels.push_str("{domain=\"");
    push_escaped(labels, domain, true);
    labels.push_str("\",area=\"");
    labels.push_str(area.as_str());
    labels.push('"');
}

/// A sample whose value is a count (counters, and the gauge of live streams):
/// `name{labels} value`. `labels` lacks its closing brace, or is empty.
pub(super) fn counter_line(out: &mut String, name: &str, labels: &str, n: u64) {
    out.push_str(name);
    out.push_str(labels);
    out.push_str(if labels.is_empty() { " " } else { "} " });
    push_count(out, n);
    out.push('\n');
}

/// The fixed text of a histogram family's samples, made once a page.
pub(super) struct HistogramText {
    /// `<name>_bucket`, the metric name of the bucket lines.
    bucket: String,
    /// `<name>_sum`.
    sum: String,
    /// `<name>_count`.
    count: String,
    /// `,le="…"} ` per bound and last `+Inf` (`{le="…"} ` when the series have no labels),
    /// with the bounds written as the `prometheus` crate writes `ms as f64 / 1000.0`.
    les: Vec<String>,
    /// What follows the labels of `_sum` and `_count`.
    close: &'static str,
}

impl HistogramText {
    pub(super) fn new(name: &str, bounds_ms: &[u64], labelled: bool) -> Self {
        let open = if labelled { "," } else { "{" };
        let les = bounds_ms
            .iter()
            .map(|b| (*b as f64 / 1000.0).to_string())
            .chain(std::iter::once("+Inf".to_owned()))
            .map(|le| format!("{open}le=\"{le}\"}} "))
            .collect();
        HistogramText {
            bucket: format!("{name}_bucket"),
            sum: format!("{name}_sum"),
            count: format!("{name}_count"),
            les,
            close: if labelled { "} " } else { " " },
        }
    }

    /// One series: cumulative `_bucket`s, `+Inf`, `_sum` (seconds) and `_count`. `labels` lacks
    /// its closing brace, or is empty; `counts` are non-cumulative, the last one above every
    /// bound; missing ones count as 0.
    pub(super) fn write(&self, out: &mut String, labels: &str, counts: &[u64], sum_ms: u64) {
        let (bounds, inf) = self.les.split_at(self.les.len() - 1);
        let mut cumulative = 0;
        for (le, n) in bounds
            .iter()
            .zip(counts.iter().chain(std::iter::repeat(&0)))
        {
            cumulative += n;
            out.push_str(&self.bucket);
            out.push_str(labels);
            out.push_str(le);
            push_count(out, cumulative);
            out.push('\n');
        }
        let count = counts.iter().sum();
        out.push_str(&self.bucket);
        out.push_str(labels);
        out.push_str(&inf[0]);
        push_count(out, count);
        out.push('\n');
        out.push_str(&self.sum);
        out.push_str(labels);
        out.push_str(self.close);
        push_seconds(out, sum_ms);
        out.push('\n');
        out.push_str(&self.count);
        out.push_str(labels);
        out.push_str(self.close);
        push_count(out, count);
        out.push('\n');
    }
}

/// Largest integer below which every `u64` is exactly an `f64`.
const EXACT_F64: u64 = 1 << 53;

/// A count as the `prometheus` crate writes it: converted to `f64`, then formatted (which for
/// integers below 2^53 is their decimal digits).
fn push_count(out: &mut String, n: u64) {
    if n <= EXACT_F64 {
        push_decimal(out, n);
    } else {
        let _ = write!(out, "{}", n as f64);
    }
}

/// Milliseconds as seconds, as the `prometheus` crate writes `ms as f64 / 1000.0`.
///
/// Below 10^15 ms that is the exact decimal `ms / 1000` without trailing zeros: `ms as f64` is
/// exact, the division rounds to the nearest `f64`, and a decimal of at most 15 significant
/// digits is the only such decimal that rounds to its `f64`, so it is the shortest one, which
/// `f64`'s `Display` prints. Beyond that the float is formatted.
pub(super) fn push_seconds<T: Into<i128>>(out: &mut String, ms: T) {
    let ms: i128 = ms.into();
    match u64::try_from(ms) {
        Ok(ms) if ms < 1_000_000_000_000_000 => {
            push_decimal(out, ms / 1000);
            let frac = ms % 1000;
            if frac != 0 {
                out.push('.');
                let digits = [frac / 100, frac / 10 % 10, frac % 10];
                let mut digits = digits.as_slice();
                while let [rest @ .., 0] = digits {
                    digits = rest;
                }
                for d in digits {
                    out.push(char::from(b'0' + *d as u8));
                }
            }
        }
        _ => {
            let _ = write!(out, "{}", ms as f64 / 1000.0);
        }
    }
}

/// The decimal digits of `n`.
fn push_decimal(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `value` escaped as in the text format: `\` and newline always, `"` in label values.
pub(super) fn push_escaped(out: &mut String, value: &str, quote: bool) {
    let special = |b: u8| b == b'\\' || b == b'\n' || (quote && b == b'"');
    if !value.bytes().any(special) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seconds(ms: i64) -> String {
        let mut out = String::new();
        push_seconds(&mut out, ms);
        out
    }

    fn count(n: u64) -> String {
        let mut out = String::new();
        push_count(&mut out, n);
        out
    }

    #[test]
    fn numbers_are_written_as_f64_display_writes_them() {
        for ms in [
            0,
            1,
            10,
            100,
            999,
            1_000,
            1_001,
            1_010,
            1_100,
            128_581,
            999_999_999_999_999,
        ] {
            assert_eq!(seconds(ms), (ms as f64 / 1000.0).to_string(), "{ms}");
        }
        assert_eq!(seconds(1_500), "1.5");
        assert_eq!(seconds(-1_500), "-1.5");
        for n in [
            0,
            1,
            9,
            10,
            u64::from(u32::MAX),
            EXACT_F64 - 1,
            EXACT_F64,
            EXACT_F64 + 1,
            u64::MAX,
        ] {
            assert_eq!(count(n), (n as f64).to_string(), "{n}");
        }
    }

    proptest! {
        #[test]
        fn seconds_are_written_as_f64_display_writes_them(
            ms in prop_oneof![0..1_000_000_000_000_000_i64, any::<i64>()]
        ) {
            prop_assert_eq!(seconds(ms), (ms as f64 / 1000.0).to_string());
        }

        #[test]
        fn large_sums_are_written_as_f64_display_writes_them(ms in any::<u64>()) {
            let mut out = String::new();
            push_seconds(&mut out, ms);
            prop_assert_eq!(out, (ms as f64 / 1000.0).to_string());
        }

        #[test]
        fn counts_are_written_as_f64_display_writes_them(
            n in prop_oneof![0..=EXACT_F64 * 2, any::<u64>()]
        ) {
            prop_assert_eq!(count(n), (n as f64).to_string());
        }
    }
}
