//! `appevents serve`: the HTTP side. Ingest (`POST /v1/events`, `POST /v1/events/batch`)
//! for backends that would rather not hold a broker connection, the management API (`api`),
//! and the ops endpoints. Every `/v1` route needs a bearer key from `server.api_keys`.
//!
//! An event is answered `201` only once the broker has confirmed it: never for one that is not
//! durably queued. Like Paragon's, the answer does not depend on whether any workflow runs,
//! and payloads are not checked against the app event's example (that is the worker's job,
//! when an app event asks for it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, oneshot};

use crate::broker::Recovery;
use crate::config::Settings;
use crate::envelope::{self, Limits, MessageMeta};
use crate::metrics::{Metrics, label};
use crate::ops::{self, Health, OpsState};
use crate::publish::{EventPublisher, NewEvent, PublishFailure};
use crate::vault::Keyring;
use crate::{api, db};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub ingest: Arc<Ingest>,
    pub pool: Pool,
    pub keyring: Arc<Keyring>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_batch: usize,
    keys: Arc<[[u8; 32]]>,
}

/// An error answer: `{"error": "…"}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

/// The request body, or the JSON error for a body that could not be read (413 when over
/// `server.max_body_bytes`).
pub fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "request body is too large")
        } else {
            ApiError::new(status, rejection.body_text())
        }
    })
}

/// The broker connection behind ingest: made on first use, made again after a failure, and
/// not retried more than once a second while the broker is down (callers get 503 at once).
pub struct Ingest {
    settings: Settings,
    current: Mutex<Option<Arc<EventPublisher>>>,
    last_failure: Mutex<Option<Instant>>,
}

impl Ingest {
    pub fn new(settings: Settings) -> Ingest {
        Ingest {
            settings,
            current: Mutex::new(None),
            last_failure: Mutex::new(None),
        }
    }

    async fn publisher(&self) -> Result<Arc<EventPublisher>, ApiError> {
        let mut current = self.current.lock().await;
        if let Some(publisher) = current.as_ref().filter(|p| p.is_connected()) {
            return Ok(publisher.clone());
        }
        let mut last_failure = self.last_failure.lock().await;
        if last_failure.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Err(unavailable("the broker is unavailable"));
        }
        let connect = EventPublisher::connect(&self.settings, Recovery::None);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(publisher)) => {
                *last_failure = None;
                let publisher = Arc::new(publisher);
                *current = Some(publisher.clone());
                Ok(publisher)
            }
            Ok(Err(err)) => {
                *last_failure = Some(Instant::now());
                Err(unavailable(&format!("the broker is unavailable: {err}")))
            }
            Err(_) => {
                *last_failure = Some(Instant::now());
                Err(unavailable("the broker did not answer within 5s"))
            }
        }
    }

    /// Publishes one event and waits for the broker's confirm.
    pub async fn publish(&self, event: &NewEvent) -> Result<String, ApiError> {
        let publisher = self.publisher().await?;
        match publisher.publish(event).await {
            Ok(id) => Ok(id),
            Err(PublishFailure::Invalid(invalid)) => {
                Err(ApiError::bad_request(format!("invalid event: {invalid}")))
            }
            Err(PublishFailure::Broker(err)) => {
                // Forget the connection: the next request makes a new one.
                self.current.lock().await.take();
                Err(unavailable(&format!(
                    "the broker did not take the event: {err}"
                )))
            }
        }
    }

    pub async fn is_connected(&self) -> bool {
        self.current
            .lock()
            .await
            .as_ref()
            .is_some_and(|p| p.is_connected())
    }
}

fn unavailable(message: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
}

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
        ingest: Arc::new(Ingest::new(settings.clone())),
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
    let listener = tokio::net::TcpListener::bind(&settings.server.listen).await?;
    let addr = listener.local_addr()?;
    let app = router(state.clone(), settings.server.max_body_bytes).merge(ops::router(OpsState {
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
    let result = ops::serve(listener, app, shutdown).await;
    probe.abort();
    broker_status.abort();
    result?;
    Ok(())
}

/// Keeps the readiness view of the broker in step with the ingest connection.
async fn track_broker(ingest: Arc<Ingest>, health: Arc<Health>) {
    loop {
        let status = ingest.current.lock().await.as_ref().map(|p| p.status());
        health.set_broker(status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `/v1` routes behind the key check.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events", post(ingest_one))
        .route("/v1/events/batch", post(ingest_batch))
        .merge(api::routes())
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

/// Reads one event from JSON with the contract's rules; assigns an id when it has none.
fn event_from(
    body: &[u8],
    content_type: Option<&str>,
    limits: Limits,
) -> Result<NewEvent, ApiError> {
    let meta = MessageMeta {
        content_type,
        message_id: None,
    };
    let parsed = envelope::parse(body, &meta, limits)
        .map_err(|invalid| ApiError::bad_request(format!("invalid event: {invalid}")))?;
    let id = match parsed.id_source {
        envelope::IdSource::Body => Some(parsed.id),
        _ => None,
    };
    Ok(NewEvent {
        id,
        name: parsed.name,
        user_id: parsed.user_id,
        payload: Value::Object(parsed.payload),
        occurred_at: parsed.occurred_at,
    })
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

async fn ingest_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = async {
        let raw = body(raw)?;
        let event = event_from(&raw, content_type(&headers), state.limits)?;
        state.ingest.publish(&event).await
    }
    .await;
    let status = match &result {
        Ok(_) => StatusCode::CREATED,
        Err(err) => err.status,
    };
    state
        .metrics
        .ingested
        .get_or_create(&label("status", status.as_str()))
        .inc();
    let id = result?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

/// `{"events": [...]}`. Each event is checked on its own; the valid ones are published
/// together and each answered with its own status. 201 when every event was accepted, 207
/// when some were not.
async fn ingest_batch(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let batch: Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
    let Some(items) = batch.get("events").and_then(Value::as_array) else {
        return Err(ApiError::bad_request(
            "body must be an object with an `events` array",
        ));
    };
    if items.len() > state.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} events in one batch, over the limit of {}",
                items.len(),
                state.max_batch
            ),
        ));
    }
    let checked: Vec<Result<NewEvent, ApiError>> = items
        .iter()
        .map(|item| {
            let bytes =
                serde_json::to_vec(item).map_err(|e| ApiError::bad_request(e.to_string()))?;
            event_from(&bytes, None, state.limits)
        })
        .collect();
    let publishes = checked.iter().map(|event| {
        let ingest = state.ingest.clone();
        async move {
            match event {
                Ok(event) => ingest.publish(event).await,
                Err(err) => Err(ApiError::new(err.status, err.message.clone())),
            }
        }
    });
    let outcomes = futures::future::join_all(publishes).await;
    let mut accepted = 0;
    let results: Vec<Value> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| match outcome {
            Ok(id) => {
                accepted += 1;
                json!({"index": index, "status": 201, "id": id})
            }
            Err(err) => {
                json!({"index": index, "status": err.status.as_u16(), "error": err.message})
            }
        })
        .collect();
    let rejected = results.len() - accepted;
    for result in &results {
        let status = result["status"].to_string();
        state
            .metrics
            .ingested
            .get_or_create(&label("status", status))
            .inc();
    }
    let status = if rejected == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((
        status,
        Json(json!({"accepted": accepted, "rejected": rejected, "results": results})),
    )
        .into_response())
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

    #[test]
    fn an_event_without_an_id_gets_one_when_published() {
        let limits = Limits {
            max_bytes: 1024,
            max_depth: 8,
        };
        let event =
            event_from(br#"{"name":"n","user_id":"u","payload":{}}"#, None, limits).expect("valid");
        assert_eq!(event.id, None);
        let with_id = event_from(
            br#"{"id":"e1","name":"n","user_id":"u","payload":{}}"#,
            None,
            limits,
        )
        .expect("valid");
        assert_eq!(with_id.id.as_deref(), Some("e1"));
        let err = event_from(br#"{"name":"n","user_id":"u","payload":[]}"#, None, limits)
            .expect_err("invalid");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("payload"), "{}", err.message);
    }
}
