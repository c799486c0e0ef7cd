//! What an integration engineer manages, in Postgres: app events (with aliases kept on
//! rename), workflows, connections (secrets sealed by the vault) and subscriptions.

pub mod app_events;
pub mod connections;
pub mod subscriptions;
pub mod workflows;
