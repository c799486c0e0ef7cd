//! appevents: App Events published to RabbitMQ become records in each user's Salesforce,
//! HubSpot or HTTP endpoint, reliably.
//!
//! # Layout
//!
//! The flow of one event, and where each part lives:
//!
//! - [`envelope`]: the publishing contract; a message body becomes an [`envelope::Event`] and
//!   its reserved headers an [`envelope::Routing`], or the precise reason they are not.
//! - [`resolve`]: which workflows the event's user has switched on for its name or one of
//!   its aliases (one indexed query, cached and invalidated by `LISTEN/NOTIFY`).
//! - [`payload_check`]: the payload compared with its app event's example payload (off,
//!   warn, reject), after resolving and before claiming.
//! - [`run`]: claiming a run before the provider call and recording its outcome after, in
//!   Postgres; what makes redelivery run a workflow once. [`batch`] coalesces the claims
//!   and records of concurrent events into one statement each.
//! - [`mapping`]: the field mapping templates that turn the event into the provider's fields.
//! - [`integrations`]: the steps (Salesforce, HubSpot, generic HTTP), OAuth refresh.
//! - [`classify`]: every step failure classified in one place (transient, rate-limited,
//!   expired or revoked credentials, permanent).
//! - [`retry`]: the retry-or-give-up decision: in-process backoff, broker retry queues, dead
//!   letters.
//! - [`dead_letter`]: what a dead letter says, and listing, replaying, purging them.
//! - [`worker`]: the consume loop and the unit of work that ties the above together.
//! - [`broker`]: RabbitMQ connections, topology, confirmed publishing, our headers.
//! - [`publish`]: publishing events (CLI and HTTP ingest) on the worker's own parser.
//! - [`server`]: `appevents serve`, HTTP ingest with API keys; [`api`] the management API.
//!
//! The catalog an integration engineer manages: [`app_event`] (with aliases kept on rename),
//! [`workflow`], [`connection`] (secrets sealed by [`vault`]), [`subscription`];
//! [`workflow_test`] renders (and on request sends) what a workflow would send for an event.
//!
//! Around them: [`config`] (layered settings), [`db`] (pool, migrations), [`telemetry`]
//! (logs), [`metrics`] and [`ops`] (Prometheus, health, readiness), [`cli`] (the binary's
//! commands), [`demo`] and [`standin`] (a stand-in CRM for the demo, the chaos run and the
//! benchmark).

pub mod api;
pub mod app_event;
pub mod batch;
pub mod broker;
pub mod classify;
pub mod cli;
pub mod config;
pub mod connection;
pub mod db;
pub mod dead_letter;
pub mod demo;
pub mod envelope;
pub mod integrations;
pub mod mapping;
pub mod metrics;
pub mod ops;
pub mod payload_check;
pub mod publish;
pub mod resolve;
pub mod retry;
pub mod run;
pub mod server;
pub mod subscription;
pub mod telemetry;
pub mod vault;
pub mod worker;
pub mod workflow;
pub mod workflow_test;
