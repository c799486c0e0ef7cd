//! What readiness looks at: the broker connection, the database, and what units of work
//! met when they used them.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;

/// What readiness looks at. The broker connection is set by whoever holds it.
pub struct Health {
    pool: Pool,
    broker: Mutex<Option<lapin::ConnectionStatus>>,
    /// The last failure a unit of work met with the database, until one succeeds.
    database_failure: Mutex<Option<String>>,
}

impl Health {
    pub fn new(pool: Pool) -> Health {
        Health {
            pool,
            broker: Mutex::new(None),
            database_failure: Mutex::new(None),
        }
    }

    pub fn set_broker(&self, status: Option<lapin::ConnectionStatus>) {
        *lock(&self.broker) = status;
    }

    /// Records a database failure; true when this is news (for logging once).
    pub fn database_failed(&self, reason: String) -> bool {
        lock(&self.database_failure).replace(reason).is_none()
    }

    /// Records a database success; true when it ends a failure.
    pub fn database_ok(&self) -> bool {
        lock(&self.database_failure).take().is_some()
    }

    /// Checks both dependencies now; `Err` lists what is wrong.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        match &*lock(&self.broker) {
            Some(status) if status.connected() => {}
            Some(_) => problems.push("broker: connection lost, reconnecting".to_owned()),
            None => problems.push("broker: not connected".to_owned()),
        }
        let probe = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("select 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => problems.push(format!("database: {err}")),
            Err(_) => problems.push("database: no answer within 2s".to_owned()),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
