//! `appevents serve`: the HTTP side. Ingest (`ingest`), the management API
//! (`management`), the Connect Portal's pages (`portal`), the operator console (`console`),
//! and the ops endpoints. Every `/v1` route needs a bearer key from `server.api_keys`; the
//! portal's pages a session opened with a user token, never an API key; the console's a
//! session opened with an operator key. Route groups live in their own modules; `state` is
//! what the API's share, `pages` what every page group shares.

mod console;
mod ingest;
mod management;
mod pages;
mod portal;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use self::state::{ApiError, AppState};
use crate::catalog::connect::Connector;
use crate::config::Settings;
use crate::core::event::Limits;
use crate::core::user_token::KeyRing;
use crate::interfaces::ops::{self, OpsState};
use crate::observe::health::Health;
use crate::observe::metrics::{Metrics, label};
use crate::store::db;
use crate::store::vault::Keyring;
use crate::transport::publish::SharedPublisher;

/// Runs the server until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    started: Option<oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    if settings.server.api_keys.is_empty() {
        anyhow::bail!(
            "server.api_keys is empty: set APPEVENTS__SERVER__API_KEYS (comma-separated) so the API is not open"
        );
    }
    let keyring = Arc::new(Keyring::from_settings(&settings.secrets)?);
    db::migrate(&settings.database).await?;
    let pool = db::pool(&settings.database)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(pool.clone()));
    let state = AppState {
        ingest: Arc::new(SharedPublisher::new(settings.clone())),
        pool: pool.clone(),
        keyring,
        metrics: metrics.clone(),
        limits: Limits {
            max_bytes: settings.worker.max_message_bytes,
            max_depth: settings.worker.max_json_depth,
        },
        max_batch: settings.server.max_batch,
        keys: settings
            .server
            .api_keys
            .iter()
            .map(|key| digest(key.expose_secret().as_bytes()))
            .collect(),
    };
    let portal = portal::Portal::new(
        pool.clone(),
        Arc::new(Connector::from_settings(
            &settings,
            pool.clone(),
            state.keyring.clone(),
        )?),
        Arc::new(KeyRing::from_settings(&settings.user_tokens)?),
        &settings.portal,
    );
    let console = console::Console::new(&settings, pool.clone(), state.keyring.clone())?;
    let listener = tokio::net::TcpListener::bind(&settings.server.listen).await?;
    let addr = listener.local_addr()?;
    let app = router(state.clone(), settings.server.max_body_bytes)
        .merge(portal::routes(portal))
        .merge(console::routes(console))
        .merge(ops::router(OpsState {
            metrics,
            health: health.clone(),
        }));
    // Readiness follows the ingest connection: ready when the broker took a connection.
    let probe_state = state.clone();
    let probe = tokio::spawn(async move {
        loop {
            if probe_state.ingest.publisher().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let broker_status = tokio::spawn(track_broker(state.ingest.clone(), health));
    if let Some(started) = started {
        let _ = started.send(addr);
    }
    tracing::info!(%addr, "serving the HTTP API");
    settings.warn_if_development_key();
    let result = ops::serve(listener, app, shutdown).await;
    probe.abort();
    broker_status.abort();
    result?;
    Ok(())
}

/// Keeps the readiness view of the broker in step with the ingest connection.
async fn track_broker(ingest: Arc<SharedPublisher>, health: Arc<Health>) {
    loop {
        let status = ingest.status();
        health.set_broker(status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `/v1` routes behind the key check.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events", post(ingest::one))
        .route("/v1/events/batch", post(ingest::batch))
        .merge(management::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// `Authorization: Bearer <key>` must be one of `server.api_keys`. Keys are compared as
/// SHA-256 digests in constant time, so neither their content nor their length leaks.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| digest(key.trim().as_bytes()));
    let valid = presented.is_some_and(|presented| {
        state
            .keys
            .iter()
            .fold(0u8, |found, key| found | key.ct_eq(&presented).unwrap_u8())
            == 1
    });
    if !valid {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid API key").into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        state
            .metrics
            .ingested
            .get_or_create(&label("status", "401"))
            .inc();
        return response;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_by_digest() {
        let keys = [digest(b"one"), digest(b"two")];
        let matches = |presented: &[u8]| {
            let presented = digest(presented);
            keys.iter()
                .fold(0u8, |f, k| f | k.ct_eq(&presented).unwrap_u8())
                == 1
        };
        assert!(matches(b"two"));
        assert!(!matches(b"three"));
        assert!(!matches(b""));
    }
}
