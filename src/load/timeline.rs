//! `--latency-log`: every answered request, when it was sent and how long it took.
//!
//! The summary's percentiles are over the whole run. Whether something that happens now and
//! then (a scrape of `/metrics`, a checkpoint) slows the callbacks down is told by comparing the
//! requests sent while it happened with those sent at other moments of the same run, which the
//! machine's own hiccups then hit alike. The first line places the run on the machine's
//! monotonic clock, which other programs (Python's `time.monotonic()`, say) read too, so that
//! their events can be laid beside the requests.

use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Seconds on `CLOCK_MONOTONIC`, the clock `std::time::Instant` reads on Linux; `None` where it
/// cannot be read.
#[cfg(unix)]
pub(super) fn monotonic_seconds() -> Option<f64> {
    // SAFETY: an all-zero timespec is a valid value, and clock_gettime only writes into it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (read == 0).then(|| now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

#[cfg(not(unix))]
pub(super) fn monotonic_seconds() -> Option<f64> {
    None
}

/// Writes `requests` (send time since the start and latency, both in microseconds) in the order
/// they were sent, after a first line giving the run's start on the monotonic clock (`-` where
/// it could not be read).
pub(super) fn write(
    path: &Path,
    start_monotonic: Option<f64>,
    mut requests: Vec<(u64, u32)>,
) -> io::Result<()> {
    requests.sort_unstable();
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    match start_monotonic {
        Some(start) => writeln!(out, "# start_monotonic_seconds {start:.6}")?,
        None => writeln!(out, "# start_monotonic_seconds -")?,
    }
    for (sent_us, latency_us) in requests {
        writeln!(out, "{sent_us} {latency_us}")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_written_in_the_order_they_were_sent_after_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latencies");
        write(&path, Some(12.5), vec![(300, 7), (100, 9), (200, 8)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# start_monotonic_seconds 12.500000\n100 9\n200 8\n300 7\n"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_monotonic_clock_advances_with_instants() {
        let before = monotonic_seconds().unwrap();
        let instant = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let elapsed = instant.elapsed().as_secs_f64();
        let after = monotonic_seconds().unwrap();
        assert!(after - before >= elapsed, "{before} {after} {elapsed}");
        assert!(after - before < elapsed + 1.0, "{before} {after} {elapsed}");
    }
}
