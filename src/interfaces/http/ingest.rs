//! HTTP ingest: `POST /v1/events` and `POST /v1/events/batch`, for backends that would
//! rather not hold a broker connection. An event is answered `201` only once the broker has
//! confirmed it: never for one that is not durably queued. Like Paragon's, the answer does
//! not depend on whether any workflow runs, and payloads are not checked against the app
//! event's example (that is the worker's job, when an app event asks for it).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::state::{ApiError, AppState, body};
use crate::core::event::{self, Limits, MessageMeta};
use crate::observe::metrics::label;
use crate::transport::publish::NewEvent;

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
    let parsed = event::parse(body, &meta, limits)
        .map_err(|invalid| ApiError::bad_request(format!("invalid event: {invalid}")))?;
    let id = match parsed.id_source {
        event::IdSource::Body => Some(parsed.id),
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

pub(super) async fn one(
    State(state): State<AppState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = async {
        let raw = body(raw)?;
        let event = event_from(&raw, content_type(&headers), state.limits)?;
        Ok::<_, ApiError>(state.ingest.publish(&event).await?)
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
pub(super) async fn batch(
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
                Ok(event) => ingest.publish(event).await.map_err(ApiError::from),
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
