//! What readiness looks at: the broker connection, the database, and what units of work
//! met when they used each of them.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;

/// A dependency of a worker or server process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Broker,
    Database,
}

/// What readiness looks at. The broker connection is set by whoever holds it; failures by
/// the units of work that meet them, each under its own dependency.
pub struct Health {
    pool: Pool,
    broker: Mutex<Option<lapin::ConnectionStatus>>,
    /// The last failure a unit of work met with the broker, until a call to it succeeds.
    broker_failure: Mutex<Option<String>>,
    /// The last failure a unit of work met with the database, until a call to it succeeds.
    database_failure: Mutex<Option<String>>,
}

impl Health {
    pub fn new(pool: Pool) -> Health {
        Health {
            pool,
            broker: Mutex::new(None),
            broker_failure: Mutex::new(None),
            database_failure: Mutex::new(None),
        }
    }

    pub fn set_broker(&self, status: Option<lapin::ConnectionStatus>) {
        *lock(&self.broker) = status;
    }

    fn failure(&self, dependency: Dependency) -> &Mutex<Option<String>> {
        match dependency {
            Dependency::Broker => &self.broker_failure,
            Dependency::Database => &self.database_failure,
        }
    }

    /// Records a failure to use `dependency`; true when this is news (for logging once).
    pub fn failed(&self, dependency: Dependency, reason: String) -> bool {
        lock(self.failure(dependency)).replace(reason).is_none()
    }

    /// Records a success with `dependency`; true when it ends a failure.
    pub fn recovered(&self, dependency: Dependency) -> bool {
        lock(self.failure(dependency)).take().is_some()
    }

    /// Checks both dependencies now; `Err` lists what is wrong, one line per dependency.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(problem) = self.broker_problem() {
            problems.push(format!("broker: {problem}"));
        }
        if let Some(problem) = self.database_problem().await {
            problems.push(format!("database: {problem}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The connection's state first; with it up, what a unit of work last met.
    fn broker_problem(&self) -> Option<String> {
        match &*lock(&self.broker) {
            Some(status) if status.connected() => lock(&self.broker_failure).clone(),
            Some(_) => Some("connection lost, reconnecting".to_owned()),
            None => Some("not connected".to_owned()),
        }
    }

    /// A probe first; with it answered, what a unit of work last met. A database that
    /// accepts no writes (a standby after a failover, or `default_transaction_read_only`)
    /// answers the probe but could not record a run: it is not ready.
    async fn database_problem(&self) -> Option<String> {
        let probe = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one(READ_ONLY, &[])
                .await
                .map_err(|e| e.to_string())?;
            let read_only: bool = row.try_get(0).map_err(|e| e.to_string())?;
            Ok::<bool, String>(read_only)
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(false)) => lock(&self.database_failure).clone(),
            Ok(Ok(true)) => Some(
                "read-only: the server accepts no writes (a standby, or \
                 default_transaction_read_only); point the URL at the primary"
                    .to_owned(),
            ),
            Ok(Err(err)) => Some(err),
            Err(_) => Some("no answer within 2s".to_owned()),
        }
    }
}

/// Whether this session can write: not on a standby, not read-only by default.
const READ_ONLY: &str =
    "select pg_is_in_recovery() or current_setting('transaction_read_only') = 'on'";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
