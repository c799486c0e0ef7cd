//! Watching the process: how errors read, logs, Prometheus metrics, and the health readiness reads.

pub mod errors;
pub mod health;
pub(crate) mod logs;
pub mod metrics;
