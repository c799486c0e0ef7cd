//! What an integration engineer manages, in Postgres: app events (with aliases kept on
//! rename), workflows, connections (secrets sealed by the vault) and subscriptions; and how
//! an end user connects an account through OAuth (`connect`, with the authorizations in
//! flight in `authorizations`).

pub mod app_events;
pub mod authorizations;
pub mod connect;
pub mod connections;
pub mod subscriptions;
pub mod workflows;
