//! The domain, free of I/O: what an event is, why a step fails, which providers exist,
//! what a connection holds, how a mapping renders an event, how a condition reads it, how a payload is checked, what
//! a user token says and how an OAuth authorization in flight is signed.

pub mod authorization;
pub mod condition;
pub mod connection;
pub mod event;
pub mod failure;
pub(crate) mod mapping;
pub mod payload_check;
pub mod provider;
pub mod user_token;
