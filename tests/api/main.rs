//! Black-box tests of the exporter: HTTP against the real server on port 0, the real binary
//! where a process matters.

mod callbacks;
mod dashboards;
mod durability;
mod helpers;
mod hostile;
mod load;
mod metrics;
mod properties;
mod replicas;
mod startup;
mod truth_rules;
