//! Postgres (the pool, migrations, TLS), the run history's partitions and retention, the
//! vault that seals secrets before they reach it, the browser sessions of the pages, and the
//! operator console's audit log.

pub mod audit;
pub mod db;
pub mod history;
pub mod sessions;
pub mod vault;
