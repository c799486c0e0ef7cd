//! Postgres: the connection pool, database creation and the embedded migrations.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::observe::errors::report;
use secrecy::ExposeSecret;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Any key works as long as every appevents process uses the same one.
const MIGRATION_LOCK: i64 = 0x6170_7065_7665_6e74; // "appevent"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("database unavailable: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// The server answered that the database in the URL does not exist.
    #[error("{message}: run `appevents migrate` to create it")]
    Missing { message: String },
    #[error("database pool: {0}")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error("database TLS: {0}")]
    Tls(String),
    #[error("stopped while waiting for the database")]
    Stopped,
}

impl DbError {
    /// A failed connection attempt, with a missing database told apart.
    fn connecting(err: tokio_postgres::Error) -> DbError {
        match err.as_db_error() {
            Some(db) if *db.code() == SqlState::INVALID_CATALOG_NAME => DbError::Missing {
                message: db.message().to_owned(),
            },
            _ => DbError::Connect(err),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    /// The pool's backend errors are failed connection attempts.
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(err) => DbError::connecting(err),
            other => DbError::Pool(other),
        }
    }
}

pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))
}

/// How to reach Postgres: in plain text, or over TLS when the URL says `sslmode=require`.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(MakeRustlsConnect),
}

/// The transport for `settings`: TLS only when asked for, so a local database needs nothing.
pub fn transport(settings: &DatabaseSettings) -> Result<Transport, DbError> {
    let config = pg_config(settings.url.expose_secret())?;
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(Transport::Plain);
    }
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots; an unreadable one is skipped rather than refusing them all.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !settings.tls_ca_file.is_empty() {
        let certs = CertificateDer::pem_file_iter(&settings.tls_ca_file).map_err(|e| {
            DbError::Tls(format!(
                "database.tls_ca_file {}: {e}",
                settings.tls_ca_file
            ))
        })?;
        for cert in certs {
            let cert = cert.map_err(|e| DbError::Tls(format!("database.tls_ca_file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| DbError::Tls(format!("database.tls_ca_file: {e}")))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DbError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Transport::Tls(MakeRustlsConnect::new(tls)))
}

/// Builds the pool. Connections are made lazily, so this succeeds while the database is down;
/// each use then fails and the caller backs off.
pub fn pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    build_pool(
        pg_config(settings.url.expose_secret())?,
        settings,
        settings.pool_size,
    )
}

/// The run statements' pools: claims and records (`runs::claim`, `runs::record`). Each is one
/// statement over many runs that reaches every row through its key, and must do so whatever
/// the planner believes of the tables' sizes. A worker prepares its statements once, when a
/// new database's runs (or a day's new partition) may still be empty and unanalysed; a plan
/// made then, a scan of the whole table, would stay cached while the table grows. So these
/// sessions plan once for all parameters and never scan a table whole: a key is always looked
/// up through its index, and no batch pays for planning again.
const RUN_STATEMENT_OPTIONS: &str =
    "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_mergejoin=off";

/// A small pool for run claims, whose sessions also commit without waiting for the write-ahead
/// log to reach the disk: a claim must be visible to every worker at once, which it is, but
/// need not survive a Postgres crash, because the outcome is recorded durably (an upsert)
/// before any message is acknowledged. It halves the disk flushes on the hot path.
pub fn claims_pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    run_statement_pool(settings, "-c synchronous_commit=off", 4)
}

/// A small pool for recording runs' outcomes, durably.
pub fn records_pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    run_statement_pool(settings, "", 2)
}

fn run_statement_pool(
    settings: &DatabaseSettings,
    extra: &str,
    size: usize,
) -> Result<Pool, DbError> {
    let mut config = pg_config(settings.url.expose_secret())?;
    let options = [
        config.get_options().unwrap_or_default(),
        RUN_STATEMENT_OPTIONS,
        extra,
    ]
    .into_iter()
    .filter(|o| !o.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    config.options(&options);
    build_pool(config, settings, size)
}

/// A pool of `size` connections of its own, for what must not queue behind the main pool
/// (the worker's liveness renewals).
pub fn own_pool(settings: &DatabaseSettings, size: usize) -> Result<Pool, DbError> {
    build_pool(pg_config(settings.url.expose_secret())?, settings, size)
}

fn build_pool(
    config: tokio_postgres::Config,
    settings: &DatabaseSettings,
    size: usize,
) -> Result<Pool, DbError> {
    // Fast recycling skips a round trip per checkout; a broken connection is detected on use
    // and the pool replaces it.
    let recycling = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match transport(settings)? {
        Transport::Plain => Manager::from_config(config, NoTls, recycling),
        Transport::Tls(tls) => Manager::from_config(config, tls, recycling),
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(settings.wait_timeout),
            create: Some(settings.wait_timeout),
            recycle: Some(settings.wait_timeout),
        })
        .build()
        .map_err(|e| DbError::Url(e.to_string()))
}

/// One dedicated connection, outside the pool (migrations, database creation).
pub async fn connect(settings: &DatabaseSettings) -> Result<Client, DbError> {
    connect_to(
        &pg_config(settings.url.expose_secret())?,
        &transport(settings)?,
    )
    .await
}

async fn connect_to(
    config: &tokio_postgres::Config,
    transport: &Transport,
) -> Result<Client, DbError> {
    let client = match transport {
        Transport::Plain => {
            let (client, connection) = config.connect(NoTls).await.map_err(DbError::connecting)?;
            tokio::spawn(drive(connection));
            client
        }
        Transport::Tls(tls) => {
            let (client, connection) = config
                .connect(tls.clone())
                .await
                .map_err(DbError::connecting)?;
            tokio::spawn(drive(connection));
            client
        }
    };
    Ok(client)
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(err) = connection.await {
        tracing::warn!(error = %report(&err), "database connection closed");
    }
}

/// Creates the database named in the URL when it does not exist yet, so a fresh machine
/// needs no manual step. Safe when several processes race to do it.
pub async fn ensure_database(settings: &DatabaseSettings) -> Result<bool, DbError> {
    let config = pg_config(settings.url.expose_secret())?;
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let transport = transport(settings)?;
    match connect_to(&config, &transport).await {
        Ok(_) => return Ok(false),
        Err(DbError::Missing { .. }) => {}
        Err(err) => return Err(err),
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect_to(&admin, &transport).await?;
    let sql = format!("create database \"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(true),
        Err(err) if err.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(false),
        Err(err) => Err(DbError::Query(err)),
    }
}

/// Applies the embedded migrations. A session advisory lock serialises workers that start
/// together: the first migrates, the others wait and then find nothing to do.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<String>, DbError> {
    let mut client = connect(settings).await?;
    client
        .execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    let applied = report?
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    Ok(applied)
}

/// Applies migrations, waiting for the database if it is not up yet (no crash loop when
/// workers start before Postgres). Gives up only on a failed migration or on `stop`.
pub async fn migrate_when_ready(
    settings: &DatabaseSettings,
    stop: &CancellationToken,
) -> Result<(), DbError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match migrate(settings).await {
            Ok(applied) => {
                for name in applied {
                    tracing::info!(migration = %name, "migration applied");
                }
                return Ok(());
            }
            Err(DbError::Migration(err)) => return Err(DbError::Migration(err)),
            Err(err) => {
                tracing::warn!(error = %report(&err), retry_in = ?delay, "database not ready; waiting")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(DbError::Stopped),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Errors of the catalog operations (app events, connections, workflows, subscriptions),
/// shaped for the CLI's messages and the API's statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Vault(#[from] crate::store::vault::VaultError),
}

impl StoreError {
    /// Whether the database was unavailable (unreachable, restarting, out of connections,
    /// or a transaction lost a race), so the same operation may succeed later. Anything else
    /// (a refused write, bad data, a missing key) fails again however often it is retried.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(err) => err.is_unavailable(),
            StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Invalid(_)
            | StoreError::Vault(_) => false,
        }
    }
}

impl DbError {
    /// See [`StoreError::is_unavailable`].
    pub fn is_unavailable(&self) -> bool {
        match self {
            // A missing database may yet be created (`appevents migrate`).
            DbError::Connect(_) | DbError::Missing { .. } | DbError::Pool(_) => true,
            DbError::Query(err) => match err.code() {
                // No SQLSTATE: the connection broke (closed, I/O error, timeout).
                None => true,
                Some(code) => is_transient_state(code),
            },
            DbError::Url(_) | DbError::Migration(_) | DbError::Tls(_) | DbError::Stopped => false,
        }
    }
}

/// Server errors that say "not now" rather than "no": connection exceptions (class 08), out
/// of resources (class 53), the server shutting down or starting up, a read-only standby
/// after a failover, serialization failures and deadlocks.
fn is_transient_state(code: &SqlState) -> bool {
    let class = code.code().get(..2);
    matches!(class, Some("08" | "53"))
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        let Some(db) = err.as_db_error() else {
            return StoreError::Db(DbError::Query(err));
        };
        let detail = db.detail().unwrap_or(db.message()).to_owned();
        match *db.code() {
            SqlState::UNIQUE_VIOLATION => StoreError::Conflict(format!("already exists: {detail}")),
            SqlState::FOREIGN_KEY_VIOLATION => StoreError::Conflict(detail),
            SqlState::CHECK_VIOLATION | SqlState::NOT_NULL_VIOLATION => {
                StoreError::Invalid(db.message().to_owned())
            }
            _ => StoreError::Db(DbError::Query(err)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        StoreError::Db(DbError::from(err))
    }
}

#[cfg(test)]
mod tests {
    use deadpool_postgres::{PoolError, TimeoutType};

    use super::*;

    #[test]
    fn only_an_unavailable_database_is_worth_retrying() {
        let unavailable = StoreError::Db(DbError::Pool(PoolError::Timeout(TimeoutType::Wait)));
        assert!(unavailable.is_unavailable(), "no pooled connection in time");

        for refused in [
            StoreError::Conflict("violates foreign key constraint".into()),
            StoreError::Invalid("bad data".into()),
            StoreError::NotFound("no such row".into()),
            StoreError::Db(DbError::Url("bad url".into())),
        ] {
            assert!(!refused.is_unavailable(), "{refused}");
        }
    }

    #[test]
    fn server_states_that_mean_not_now_are_transient() {
        for code in [
            SqlState::CONNECTION_FAILURE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ] {
            assert!(is_transient_state(&code), "{code:?}");
        }
        for code in [
            SqlState::FOREIGN_KEY_VIOLATION,
            SqlState::UNDEFINED_TABLE,
            SqlState::SYNTAX_ERROR,
        ] {
            assert!(!is_transient_state(&code), "{code:?}");
        }
    }
}
