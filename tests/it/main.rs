//! Integration tests: one binary (one link step) with a module per area. Every test has its
//! own database, exchange and queues, so they run in parallel.

// A failed expectation is the test's failure message; the workspace denies these lints in
// the product, and clippy.toml allows them only inside #[test] functions, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod actions;
mod api;
mod app_events;
mod batching;
mod cli;
mod cluster;
mod console;
mod console_browser;
mod end_to_end;
mod examples;
mod failures;
mod faults;
mod history;
mod hostile;
mod ingest;
mod logs;
mod operations;
mod portal;
mod portal_browser;
mod rate_limits;
mod readme;
mod recovery;
mod retries;
mod security;
mod settling;
mod shutdown;
mod steps;
mod workflow_files;
