//! appevents: App Events published to RabbitMQ become records in each user's Salesforce,
//! HubSpot or HTTP endpoint, reliably.
//!
//! # Layout
//!
//! Folders are layers, lowest first; a module imports only from its own layer or the ones
//! below (`tests/architecture.rs` keeps it so, and finds any import cycle):
//!
//! - [`config`]: layered settings, and a rate limit as it is written (`100/10s`).
//! - [`observe`]: how an error and its causes read as one line, logs, Prometheus metrics,
//!   the health readiness reads.
//! - [`core`]: the domain, free of I/O: the event contract ([`core::event`]), step
//!   failures and their kinds, providers, a connection's credentials, field mappings, payload
//!   checks, user tokens ([`core::user_token`]) and the signed OAuth state with PKCE
//!   ([`core::authorization`]).
//! - [`store`]: Postgres (pool, migrations, TLS), the run history's daily partitions and
//!   their pruning ([`store::history`]), the vault that seals secrets, the pages' browser
//!   sessions.
//! - [`transport`]: RabbitMQ: connections, the topology, our headers and the routing they
//!   carry, confirmed publishing, events published by the CLI and ingest, dead letters.
//! - `integrations`: the steps (Salesforce, HubSpot, generic HTTP), the classification of
//!   every provider response, OAuth refresh, connecting an account (authorize URL, code
//!   exchange, identity, revoke), the outbound rules, the providers' rate-limit headers.
//! - [`catalog`]: what an integration engineer manages: app events (with aliases kept on
//!   rename), workflows (and [`catalog::workflow_files`], workflows as files: apply and
//!   export), connections (secrets sealed), subscriptions; and how an end user
//!   connects and disconnects an account ([`catalog::connect`]).
//! - [`pipeline`]: what happens to one message, in order: `resolve` the
//!   workflows its user has on, claim each of [`pipeline::runs`] (claims and records are
//!   coalesced by `batch`), execute the step (`step`, refreshing credentials with
//!   `refresh`), decide the run's fate once (`decision`, with the `retry` policy), settle
//!   the decision (`settle`: republish, record, count), acknowledge. Around each run's
//!   step, `throttle` keeps the account within its fleet-wide rate limit and a connection
//!   within its share of the worker. `work` is that unit of
//!   work, `consume` the loop around it; `dry_run` shows a workflow's request
//!   without any of it.
//! - [`interfaces`]: how people and programs reach it: the command line
//!   ([`interfaces::cli`]), the worker process ([`interfaces::worker`]: migrations, ops
//!   endpoints and the consume loop wired together), the HTTP API ([`interfaces::http`]:
//!   ingest, management and the Connect Portal's pages, a file per route group, with what
//!   every page group shares in `pages`) and the ops endpoints.
//!
//! Where new things go: a workflow's definition (steps, conditions) in `catalog`, running
//! it step by step in `pipeline`, a provider's limits and batch calls in `integrations`, and
//! pages (an operator console, beside the portal) as route groups of `interfaces::http`,
//! their templates in `templates/`.
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
