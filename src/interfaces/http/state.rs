//! What every handler of `appevents serve` shares, and how errors are answered.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Pool;
use serde_json::json;

use crate::core::event::Limits;
use crate::observe::metrics::Metrics;
use crate::store::vault::Keyring;
use crate::transport::publish::{SendError, SharedPublisher};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The broker connection events are published on.
    pub ingest: Arc<SharedPublisher>,
    pub pool: Pool,
    pub keyring: Arc<Keyring>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_batch: usize,
    /// SHA-256 digests of `server.api_keys`.
    pub keys: Arc<[[u8; 32]]>,
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

impl From<SendError> for ApiError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::Invalid(_) => ApiError::bad_request(err.to_string()),
            SendError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
            }
        }
    }
}
