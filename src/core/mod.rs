//! The domain, free of I/O: what an event is, why a step fails, which providers exist,
//! what a connection holds, how a mapping renders an event, how a payload is checked.

pub mod connection;
pub mod event;
pub mod failure;
pub(crate) mod mapping;
pub mod payload_check;
pub mod provider;
