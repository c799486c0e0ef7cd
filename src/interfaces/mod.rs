//! How people and programs reach appevents: the command line, the HTTP API (ingest and
//! management), the Connect Portal's pages, and the ops endpoints every long-running process
//! serves. A later operator console is another page group under `http`, beside the portal.

pub mod cli;
pub mod http;
pub(crate) mod ops;
pub mod worker;
