//! The management API, for the product's backend: app events and workflows, and per user
//! their connections, which workflows are on (Paragon's `POST/DELETE …/workflows/{id}`), and
//! their runs. JSON in and out; errors are `{"error": "…"}`. Documented in docs/api.md.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use super::state::{ApiError, AppState};
use crate::catalog::app_events::{self, AppEventChanges};
use crate::catalog::connections::{self, NewConnection};
use crate::catalog::subscriptions;
use crate::catalog::workflow_files;
use crate::catalog::workflows::{self, NewWorkflow, StepDefinition, WorkflowChanges};
use crate::config::rate_limit::RateLimit;
use crate::core::payload_check::Mode;
use crate::core::provider::Provider;
use crate::observe::errors::report;
use crate::pipeline::run_steps;
use crate::pipeline::runs::{self, RunFilter, RunStatus};
use crate::store::db::StoreError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/app-events",
            get(list_app_events).post(create_app_event),
        )
        .route(
            "/v1/app-events/{event}",
            get(get_app_event)
                .patch(update_app_event)
                .delete(delete_app_event),
        )
        .route("/v1/workflows", get(list_workflows).post(create_workflow))
        .route("/v1/workflows/apply", post(apply_workflows))
        .route("/v1/workflows/export", get(export_workflows))
        .route(
            "/v1/workflows/{id}",
            get(get_workflow)
                .patch(update_workflow)
                .delete(delete_workflow),
        )
        .route(
            "/v1/users/{user}/connections",
            get(list_connections).post(create_connection),
        )
        .route(
            "/v1/users/{user}/connections/{id}",
            axum::routing::put(replace_connection).delete(delete_connection),
        )
        .route("/v1/users/{user}/workflows", get(user_workflows))
        .route(
            "/v1/users/{user}/workflows/{id}",
            post(enable_workflow).delete(disable_workflow),
        )
        .route("/v1/users/{user}/runs", get(user_runs))
        .route("/v1/users/{user}/runs/{id}", get(user_run))
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(message) => ApiError::new(StatusCode::NOT_FOUND, message),
            StoreError::Conflict(message) => ApiError::new(StatusCode::CONFLICT, message),
            StoreError::Invalid(message) => ApiError::bad_request(message),
            StoreError::Db(err) => {
                tracing::warn!(error = %report(&err), "management API: database error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unavailable",
                )
            }
            StoreError::Vault(err) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
            }
        }
    }
}

/// The JSON body, or a 400 (413 when too large) saying what is wrong with it.
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|rejection| {
        let status = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, rejection.body_text())
    })
}

/// Path parameters; a segment that cannot be read (not UTF-8, say) is a JSON 400 like every
/// other error, not axum's plain-text one.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// The query string; one that does not fit (a repeated or mistyped parameter) is a JSON 400.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

fn uuid(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no {what} {text:?}")))
}

fn created(value: impl serde::Serialize) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

type Answer = Result<Response, ApiError>;

// App events.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEventBody {
    name: String,
    schema: Value,
    #[serde(default)]
    payload_check: Mode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEventPatch {
    name: Option<String>,
    schema: Option<Value>,
    payload_check: Option<Mode>,
    #[serde(default)]
    remove_aliases: Vec<String>,
}

async fn list_app_events(State(state): State<AppState>) -> Answer {
    Ok(Json(app_events::list(&state.pool).await?).into_response())
}

async fn create_app_event(
    State(state): State<AppState>,
    body: Result<Json<AppEventBody>, JsonRejection>,
) -> Answer {
    let body = json_body(body)?;
    Ok(created(
        app_events::create(&state.pool, &body.name, &body.schema, body.payload_check).await?,
    ))
}

async fn get_app_event(State(state): State<AppState>, ApiPath(event): ApiPath<String>) -> Answer {
    Ok(Json(app_events::get(&state.pool, &event).await?).into_response())
}

async fn update_app_event(
    State(state): State<AppState>,
    ApiPath(event): ApiPath<String>,
    body: Result<Json<AppEventPatch>, JsonRejection>,
) -> Answer {
    let body = json_body(body)?;
    let changes = AppEventChanges {
        name: body.name,
        schema: body.schema,
        payload_check: body.payload_check,
        remove_aliases: body.remove_aliases,
    };
    if changes.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to update: give name, schema, payload_check and/or remove_aliases",
        ));
    }
    Ok(Json(app_events::update(&state.pool, &event, &changes).await?).into_response())
}

async fn delete_app_event(
    State(state): State<AppState>,
    ApiPath(event): ApiPath<String>,
) -> Answer {
    app_events::delete(&state.pool, &event).await?;
    Ok(no_content())
}

// Workflows.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowBody {
    name: String,
    event: String,
    provider: Provider,
    /// A one-step workflow's step; or `steps`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    mapping: Option<Value>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    steps: Vec<StepDefinition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowPatch {
    name: Option<String>,
    event: Option<String>,
    action: Option<String>,
    options: Option<Value>,
    mapping: Option<Value>,
    /// `null` removes the condition.
    #[serde(default, deserialize_with = "present")]
    when: Option<Option<String>>,
    steps: Option<Vec<StepDefinition>>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct WorkflowQuery {
    event: Option<String>,
}

async fn list_workflows(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WorkflowQuery>,
) -> Answer {
    Ok(Json(workflows::list(&state.pool, query.event.as_deref(), None).await?).into_response())
}

async fn create_workflow(
    State(state): State<AppState>,
    body: Result<Json<WorkflowBody>, JsonRejection>,
) -> Answer {
    let body = json_body(body)?;
    let new = NewWorkflow {
        name: body.name,
        event: body.event,
        provider: body.provider,
        action: body.action,
        options: body.options.unwrap_or_else(|| json!({})),
        mapping: body.mapping.unwrap_or_else(|| json!({})),
        when: body.when,
        steps: body.steps,
    };
    Ok(created(workflows::create(&state.pool, &new).await?))
}

async fn get_workflow(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Answer {
    let id = uuid(&id, "workflow")?;
    Ok(Json(workflows::get(&state.pool, id).await?).into_response())
}

async fn update_workflow(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<WorkflowPatch>, JsonRejection>,
) -> Answer {
    let id = uuid(&id, "workflow")?;
    let body = json_body(body)?;
    let changes = WorkflowChanges {
        name: body.name,
        event: body.event,
        action: body.action,
        options: body.options,
        mapping: body.mapping,
        when: body.when,
        steps: body.steps,
    };
    if changes.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to update: give name, event, action, options, mapping, when and/or steps",
        ));
    }
    Ok(Json(workflows::update(&state.pool, id, &changes).await?).into_response())
}

async fn delete_workflow(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Answer {
    let id = uuid(&id, "workflow")?;
    workflows::delete(&state.pool, id).await?;
    Ok(no_content())
}

// Workflows as files: the documents `workflow apply` reads, one or an array, as JSON.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn apply_workflows(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ApplyQuery>,
    body: Result<Json<Value>, JsonRejection>,
) -> Answer {
    let documents = match json_body(body)? {
        Value::Array(documents) => documents,
        document => vec![document],
    };
    let mut read = Vec::with_capacity(documents.len());
    let mut refused = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        match workflow_files::read(&format!("document {}", index + 1), document) {
            Ok(document) => read.push(document),
            Err(message) => refused.push(message),
        }
    }
    if !refused.is_empty() {
        return Err(ApiError::bad_request(refused.join("; ")));
    }
    let outcomes = workflow_files::apply(&state.pool, read, query.dry_run).await?;
    Ok(Json(json!({"dry_run": query.dry_run, "workflows": outcomes})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    key: Option<String>,
}

async fn export_workflows(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Answer {
    Ok(Json(workflow_files::export(&state.pool, query.key.as_deref()).await?).into_response())
}

// A user's connections.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionBody {
    provider: Provider,
    base_url: String,
    #[serde(default)]
    settings: Option<Value>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
    /// The account's own rate limit, "100/10s"; absent or null for the provider's default.
    #[serde(default)]
    rate_limit: Option<String>,
}

impl ConnectionBody {
    /// The body's rate limit, refused before anything is stored when it is bad.
    fn rate_limit(&self) -> Result<Option<RateLimit>, StoreError> {
        self.rate_limit
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| StoreError::Invalid(format!("rate_limit: {e}")))
    }

    fn into_new(self, user: String) -> NewConnection {
        NewConnection {
            user_id: user,
            provider: self.provider,
            base_url: self.base_url,
            settings: self.settings.unwrap_or_else(|| json!({})),
            access_token: self.access_token.map(SecretString::from),
            refresh_token: self.refresh_token.map(SecretString::from),
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret: self.client_secret.map(SecretString::from),
        }
    }
}

async fn list_connections(State(state): State<AppState>, ApiPath(user): ApiPath<String>) -> Answer {
    Ok(Json(connections::list(&state.pool, Some(&user)).await?).into_response())
}

async fn create_connection(
    State(state): State<AppState>,
    ApiPath(user): ApiPath<String>,
    body: Result<Json<ConnectionBody>, JsonRejection>,
) -> Answer {
    let body = json_body(body)?;
    let limit = body.rate_limit()?;
    let new = body.into_new(user);
    let id = connections::create(&state.pool, &state.keyring, &new).await?;
    if limit.is_some() {
        connections::set_rate_limit(&state.pool, id, Some(&new.user_id), limit).await?;
    }
    Ok(created(json!({"id": id})))
}

async fn replace_connection(
    State(state): State<AppState>,
    ApiPath((user, id)): ApiPath<(String, String)>,
    body: Result<Json<ConnectionBody>, JsonRejection>,
) -> Answer {
    let id = uuid(&id, "connection")?;
    let body = json_body(body)?;
    let limit = body.rate_limit()?;
    let new = body.into_new(user);
    connections::replace(&state.pool, &state.keyring, id, &new).await?;
    connections::set_rate_limit(&state.pool, id, Some(&new.user_id), limit).await?;
    Ok(Json(json!({"id": id})).into_response())
}

async fn delete_connection(
    State(state): State<AppState>,
    ApiPath((user, id)): ApiPath<(String, String)>,
) -> Answer {
    let id = uuid(&id, "connection")?;
    connections::delete(&state.pool, id, Some(&user)).await?;
    Ok(no_content())
}

// A user's workflows: which are on.

async fn user_workflows(State(state): State<AppState>, ApiPath(user): ApiPath<String>) -> Answer {
    let workflows = workflows::list(&state.pool, None, None).await?;
    let subscriptions = subscriptions::list(&state.pool, Some(&user), None).await?;
    let listed: Vec<Value> = workflows
        .into_iter()
        .map(|w| {
            let on = subscriptions.iter().find(|s| s.workflow_id == w.id);
            json!({
                "id": w.id,
                "name": w.name,
                "event": w.event,
                "provider": w.provider,
                "action": w.action,
                "enabled": on.is_some(),
                "connection_id": on.map(|s| s.connection_id),
            })
        })
        .collect();
    Ok(Json(listed).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableBody {
    connection_id: Uuid,
}

async fn enable_workflow(
    State(state): State<AppState>,
    ApiPath((user, id)): ApiPath<(String, String)>,
    body: Result<Json<EnableBody>, JsonRejection>,
) -> Answer {
    let id = uuid(&id, "workflow")?;
    let body = json_body(body)?;
    let enabled = subscriptions::create(&state.pool, &user, id, body.connection_id).await?;
    Ok(Json(enabled).into_response())
}

async fn disable_workflow(
    State(state): State<AppState>,
    ApiPath((user, id)): ApiPath<(String, String)>,
) -> Answer {
    let id = uuid(&id, "workflow")?;
    subscriptions::delete(&state.pool, &user, id).await?;
    Ok(no_content())
}

// A user's runs.

#[derive(Deserialize)]
struct RunsQuery {
    workflow: Option<Uuid>,
    status: Option<String>,
    event_id: Option<String>,
    limit: Option<i64>,
}

/// One of the user's runs with its steps; another user's run is not found.
async fn user_run(
    State(state): State<AppState>,
    ApiPath((user, id)): ApiPath<(String, String)>,
) -> Answer {
    let id = uuid(&id, "run")?;
    let shown = run_steps::show(&state.pool, id).await?;
    if shown.run.user_id != user {
        return Err(StoreError::NotFound(format!("no run {id}")).into());
    }
    Ok(Json(shown).into_response())
}

async fn user_runs(
    State(state): State<AppState>,
    ApiPath(user): ApiPath<String>,
    ApiQuery(query): ApiQuery<RunsQuery>,
) -> Answer {
    let status = query
        .status
        .as_deref()
        .map(RunStatus::parse)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let filter = RunFilter {
        user_id: Some(user),
        workflow_id: query.workflow,
        status,
        event_id: query.event_id,
        since: None,
        until: None,
        before: None,
        limit,
    };
    Ok(Json(runs::list(&state.pool, &filter).await?).into_response())
}
