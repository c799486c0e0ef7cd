//! The ops endpoints every long-running process serves: `/metrics` (Prometheus),
//! `/healthz` (the process is alive) and `/readyz` (broker and database reachable, with the
//! reason when not).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deadpool_postgres::Pool;
use serde_json::json;

use crate::metrics::Metrics;

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

#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<OpsState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<OpsState>) -> Response {
    match state.health.check().await {
        Ok(()) => axum::Json(json!({"ready": true})).into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "problems": problems})),
        )
            .into_response(),
    }
}

/// Accepted connections with Nagle's algorithm off: a response written in two pieces must
/// not wait for the client's delayed acknowledgement (tens of milliseconds).
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set");
        }
    })
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(no_delay(listener), router)
        .with_graceful_shutdown(shutdown)
        .await
}
