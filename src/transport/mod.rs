//! RabbitMQ: connections, coalesced acknowledgements, the topology every process declares, the headers appevents adds
//! and the routing they carry, confirmed publishing, events published from the command line
//! and HTTP ingest, and the dead-letter queue.

pub mod acks;
pub mod broker;
pub mod dead_letter;
pub mod headers;
pub mod publish;
pub mod publisher;
pub(crate) mod routing;
pub mod topology;
