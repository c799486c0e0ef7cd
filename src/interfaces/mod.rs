//! How people and programs reach appevents: the command line, the HTTP API (ingest and
//! management) and the ops endpoints every long-running process serves. A later operator
//! console or connect portal is another route group under `http`.

pub mod cli;
pub mod http;
pub(crate) mod ops;
pub mod worker;
