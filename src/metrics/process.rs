//! The process metrics of the `prometheus` crate, with the CPU time to the microsecond.
//!
//! The crate keeps `process_cpu_seconds_total` as an integer counter of whole seconds, so a
//! `rate()` over a dashboard's interval shows a lightly loaded exporter at 0, then in jumps of
//! a second. The other process metrics are taken from it as they are.

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};

const CPU_SECONDS: &str = "process_cpu_seconds_total";

/// The crate's process metrics, with `process_cpu_seconds_total` to the microsecond.
pub(super) struct ProcessMetrics(ProcessCollector);

impl ProcessMetrics {
    pub(super) fn for_self() -> Self {
        ProcessMetrics(ProcessCollector::for_self())
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = cpu_seconds() {
            let cpu = families.iter_mut().filter(|f| f.name() == CPU_SECONDS);
            for metric in cpu.flat_map(|f| f.mut_metric().iter_mut()) {
                let mut counter = Counter::default();
                counter.set_value(seconds);
                metric.set_counter(counter);
            }
        }
        families
    }
}

/// User and system CPU time of the whole process (every thread, ended ones too) so far.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value; getrusage
    // only writes into the struct it is given, and RUSAGE_SELF is always a valid target.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}
