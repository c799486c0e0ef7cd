//! Postgres (the pool, migrations, TLS), the run history's partitions and retention, the
//! vault that seals secrets before they reach it, and the browser sessions of the pages.

pub mod db;
pub mod history;
pub mod sessions;
pub mod vault;
