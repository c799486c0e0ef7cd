//! appevents: App Events published to RabbitMQ become records in each user's Salesforce,
//! HubSpot or HTTP endpoint, reliably.
//!
//! # Layout
//!
//! Folders are layers, lowest first; a module imports only from its own layer or the ones
//! below (`tests/architecture.rs` keeps it so, and finds any import cycle):
//!
//! - [`config`]: layered settings.
//! - [`observe`]: logs, Prometheus metrics, the health readiness reads.
//! - [`core`]: the domain, free of I/O: the event contract ([`core::event`]), step
//!   failures and their kinds, providers, a connection's credentials, field mappings, payload
//!   checks.
//! - [`store`]: Postgres (pool, migrations, TLS) and the vault that seals secrets.
//! - [`transport`]: RabbitMQ: connections, the topology, our headers and the routing they
//!   carry, confirmed publishing, events published by the CLI and ingest, dead letters.
//! - [`integrations`]: the steps (Salesforce, HubSpot, generic HTTP), the classification of
//!   every provider response, OAuth refresh, the outbound rules.
//! - [`catalog`]: what an integration engineer manages: app events (with aliases kept on
//!   rename), workflows, connections (secrets sealed), subscriptions.
//! - [`pipeline`]: what happens to one message, in order: [`pipeline::resolve`] the
//!   workflows a user has on, claim and record [`pipeline::runs`] (coalesced by
//!   [`pipeline::batch`]), execute the step (refreshing credentials), decide the run's fate
//!   ([`pipeline::retry`]), settle it, acknowledge; the consume loop around it
//!   ([`pipeline::worker`]) and the dry run ([`pipeline::dry_run`]).
//! - [`interfaces`]: how people reach it: the command line ([`interfaces::cli`], a file per
//!   command group), the HTTP API ([`interfaces::http`]: ingest and management, a file per
//!   route group) and the ops endpoints.
//!
//! `src/main.rs` only calls [`interfaces::cli::main`].

pub mod catalog;
pub mod config;
pub mod core;
pub(crate) mod integrations;
pub mod interfaces;
pub mod observe;
pub mod pipeline;
pub mod store;
pub mod transport;
