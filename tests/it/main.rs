//! Integration tests: one binary (one link step) with a module per area. Every test has its
//! own database, exchange and queues, so they run in parallel.

mod support;

mod api;
mod app_events;
mod cli;
mod end_to_end;
mod examples;
mod faults;
mod hostile;
mod ingest;
mod operations;
mod retries;
mod security;
mod shutdown;
