//! What a load run measured: each connection's tally, the exporter's memory and descriptors,
//! and the summary printed and written as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::config::LoadArgs;

/// What one connection measured.
#[derive(Default)]
pub(super) struct Tally {
    /// Latency of each answered request, in microseconds.
    pub(super) latencies_us: Vec<u32>,
    /// Answered requests by HTTP status.
    pub(super) statuses: BTreeMap<u16, u64>,
    /// Pushes sent, answered or not.
    pub(super) pushes: u64,
    /// Disconnects sent, answered or not.
    pub(super) disconnects: u64,
    /// Requests that got no answer: connection failures and timeouts.
    pub(super) errors: u64,
    /// The first of those failures, to show what went wrong.
    pub(super) first_error: Option<String>,
    /// Requests sent over a millisecond after their scheduled time because every connection
    /// was busy.
    pub(super) late: u64,
    /// With `--latency-log`: each answered request's send time (microseconds since the run's
    /// start) and latency (microseconds).
    pub(super) timeline: Vec<(u64, u32)>,
}

impl Tally {
    pub(super) fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.timeline.extend(other.timeline);
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
pub(super) struct Rss {
    /// RSS at the first sample, before the load, in KiB.
    pub(super) start_kib: u64,
    /// Largest RSS sampled, in KiB.
    pub(super) max_kib: u64,
    /// RSS at the last sample, in KiB.
    pub(super) end_kib: u64,
}

/// Resident memory of a process, from `/proc/PID/status`.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process has used so far (user and system), in seconds: this process's from
/// `getrusage` (to the microsecond), another's from `/proc/PID/stat` (to the clock tick).
#[cfg(unix)]
pub(super) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let Some(pid) = pid else {
        // SAFETY: an all-zero rusage is a valid value, and getrusage only writes into it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage for the call's duration.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        return Some(seconds(usage.ru_utime) + seconds(usage.ru_stime));
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf only reads a system setting; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| cpu_ticks(&stat).map(|t| t as f64 / ticks as f64))?
}

/// User plus system time in clock ticks, from the text of `/proc/PID/stat`.
#[cfg(unix)]
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces and parentheses of its own: the fields
    // are counted from after its last one, where field 3 (`state`) comes first.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Not measured where there is neither `getrusage` nor `/proc`.
#[cfg(not(unix))]
pub(super) fn cpu_seconds(_pid: Option<u32>) -> Option<f64> {
    None
}

/// CPU used over a run, in cores (CPU seconds over the run's seconds): the load generator's
/// own, to tell when it, not the target, sets the rate; and the exporter's, with `--pid`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Cpu {
    /// This process.
    pub(super) generator: f64,
    /// The `--pid` process; `None` without `--pid` or if unreadable.
    pub(super) exporter: Option<f64>,
    /// Cores of the machine: with the generator and the exporter on one machine, the two
    /// together near this many mean the machine, not the exporter, set the rate.
    pub(super) machine: usize,
}

/// What the run used of the machine: the exporter's memory and descriptors, and CPU.
#[derive(Default)]
pub(super) struct Usage {
    /// The exporter's resident memory over the run; `None` without `--pid`.
    pub(super) rss: Option<Rss>,
    /// The exporter's open file descriptors at the end; `None` without `--pid` or if unreadable.
    pub(super) fds: Option<usize>,
    /// CPU used over the run; `None` where it cannot be read.
    pub(super) cpu: Option<Cpu>,
}

/// Open file descriptors of a process, from `/proc/PID/fd`.
pub(super) fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// The figures of a run.
pub(super) struct Summary {
    /// The URL the callbacks went to.
    pub(super) target: String,
    /// Connections used (`--concurrency`).
    pub(super) concurrency: usize,
    /// Scheduled requests per second (`--rate`); `None` for a closed loop.
    pub(super) rate: Option<f64>,
    /// How long the run took; the throughput is over it.
    pub(super) elapsed: Duration,
    /// Requests sent, answered or not.
    pub(super) requests: u64,
    /// Pushes sent.
    pub(super) pushes: u64,
    /// Disconnects sent.
    pub(super) disconnects: u64,
    /// Requests answered 200.
    pub(super) ok: u64,
    /// Other answers, by HTTP status; any fails the run.
    pub(super) non_200: BTreeMap<u16, u64>,
    /// Requests with no answer; any fails the run.
    pub(super) errors: u64,
    /// The first of those failures.
    pub(super) first_error: Option<String>,
    /// Requests sent over a millisecond late because every connection was busy.
    pub(super) late: u64,
    /// Requests due within an open-loop run that were not sent by its end.
    pub(super) unsent: u64,
    /// p50, p99, p99.9 and max, in microseconds.
    pub(super) latency_us: Option<[u32; 4]>,
    /// Mean latency, in microseconds; 0 when nothing was answered.
    pub(super) mean_us: f64,
    /// Slowest and fastest progress interval, requests/s.
    pub(super) interval_rates: Option<(f64, f64)>,
    /// The exporter's resident memory over the run; `None` without `--pid`.
    pub(super) rss: Option<Rss>,
    /// The exporter's open file descriptors at the end; `None` without `--pid` or if unreadable.
    pub(super) fds: Option<usize>,
    /// The exporter's process id (`--pid`), shown with its figures.
    pub(super) pid: Option<u32>,
    /// CPU used over the run; `None` where it cannot be read.
    pub(super) cpu: Option<Cpu>,
}

impl Summary {
    pub(super) fn new(
        args: &LoadArgs,
        mut tally: Tally,
        unsent: u64,
        elapsed: Duration,
        Usage { rss, fds, cpu }: Usage,
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
            unsent,
            latency_us,
            mean_us,
            interval_rates,
            rss,
            fds,
            pid: args.pid,
            cpu,
        }
    }

    pub(super) fn failed(&self) -> bool {
        self.errors > 0 || !self.non_200.is_empty()
    }

    pub(super) fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(super) fn print(&self) {
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
        if self.unsent > 0 {
            println!(
                "  NOT SENT: {} requests due within the run, still waiting for a free connection at its end: the target did not keep up with --rate (the latencies above are of the requests sent)",
                self.unsent
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
        if let Some(cpu) = self.cpu {
            let exporter = match (self.pid, cpu.exporter) {
                (Some(pid), Some(cores)) => format!(", exporter (pid {pid}) {cores:.2}"),
                _ => String::new(),
            };
            println!(
                "CPU over the run (cores): load generator {:.2}{exporter}, of {} on this machine",
                cpu.generator, cpu.machine
            );
        }
    }

    pub(super) fn json(&self) -> serde_json::Value {
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
            "unsent": self.unsent,
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
            "cpu": self.cpu.map(|c| json!({
                "load_generator_cores": c.generator,
                "exporter_cores": c.exporter,
                "machine_cores": c.machine,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;

    #[test]
    #[cfg(unix)]
    fn cpu_time_is_read_after_the_command_name_whatever_it_holds() {
        // Fields 14 and 15 (utime, stime) of `/proc/PID/stat`, after a name with ") " in it.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(1290));
        assert_eq!(cpu_ticks("4242 (a) S 1"), None);
        let own = cpu_seconds(Some(std::process::id()));
        assert!(own.is_some_and(|s| s >= 0.0), "{own:?}");
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
            latency_log: None,
            keys: KeySource { key_file: None },
        };
        let tally = Tally {
            latencies_us: (1..=1000).rev().collect(),
            statuses: BTreeMap::from([(200, 999), (503, 1)]),
            pushes: 500,
            disconnects: 500,
            ..Tally::default()
        };
        let s = Summary::new(
            &args,
            tally,
            0,
            Duration::from_secs(1),
            Usage::default(),
            &[],
        );
        assert_eq!(s.latency_us, Some([500, 990, 999, 1000]));
        assert_eq!(s.ok, 999);
        assert!(s.failed());
        assert_eq!(s.json()["non_200"], 1);
    }
}
