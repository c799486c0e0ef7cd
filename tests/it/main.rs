//! Integration tests: one binary (one link step) with a module per area. Every test has its
//! own database, exchange and queues, so they run in parallel.

mod support;

mod app_events;
mod cli;
mod end_to_end;
mod faults;
mod operations;
mod retries;
mod shutdown;
