//! Postgres (the pool, migrations, TLS) and the vault that seals secrets before they reach
//! it.

pub mod db;
pub mod vault;
