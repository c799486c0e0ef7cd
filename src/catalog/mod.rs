//! What an integration engineer manages, in Postgres: app events (with aliases kept on
//! rename), workflows, connections (secrets sealed by the vault) and subscriptions; and how
//! an end user connects an account through OAuth (`connect`, with the authorizations in
//! flight in `authorizations`); workflows as files (`workflow_files`: apply and export).

pub mod app_events;
pub mod authorizations;
pub mod connect;
pub mod connections;
pub mod subscriptions;
pub mod workflow_files;
pub mod workflows;
