//! Watching the process: logs, Prometheus metrics, and the health readiness reads.

pub mod health;
pub(crate) mod logs;
pub mod metrics;
