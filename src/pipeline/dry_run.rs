//! Testing a workflow without publishing anything: `appevents workflow test`.
//!
//! An event is made up from the app event's example payload (or a given one) for a user, the
//! workflow's mapping is rendered for it, and the step is built by
//! [`Integrations::prepare`], the function the worker's step calls: the request shown is the
//! one the worker would send, with secrets masked. Nothing is sent unless asked; then it
//! goes through [`Integrations::execute`], the worker's own step, once: no retry, no token
//! refresh, no run recorded.

use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::catalog::app_events::{self, AppEvent};
use crate::catalog::connections;
use crate::catalog::subscriptions;
use crate::catalog::workflows::{self, CompiledWorkflow, Workflow};
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::event::{Event, IdSource};
use crate::core::failure::Failure;
use crate::core::mapping::Scope;
use crate::core::payload_check::{self, Difference, Shape};
use crate::integrations::{Integrations, PreparedRequest, StepOutput};
use crate::store::db::StoreError;
use crate::store::vault::Keyring;

/// What a placeholder connection's base URL shows as.
pub const PLACEHOLDER_BASE_URL: &str = "https://{connection base URL}";
/// The user of the made-up event when none is given.
pub const PLACEHOLDER_USER: &str = "test-user";

/// What to test.
#[derive(Debug, Clone)]
pub struct Spec {
    pub workflow: Uuid,
    pub user: Option<String>,
    pub connection: Option<Uuid>,
    /// Instead of the app event's example payload.
    pub payload: Option<Value>,
}

/// Where the connection came from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum ConnectionChoice {
    /// The one the user's subscription to the workflow is bound to.
    Subscription { id: Uuid },
    /// `--connection`.
    Given { id: Uuid },
    /// None: a stand-in without credentials, so the request can still be shown.
    Placeholder { why: String },
}

/// A rendered workflow: the made-up event and the request the worker would send for it.
#[derive(Debug, Clone)]
pub struct WorkflowTest {
    pub workflow: Workflow,
    pub app_event: AppEvent,
    pub event: Event,
    /// Whether the payload is the app event's example.
    pub example_payload: bool,
    /// Whether the event's user is [`PLACEHOLDER_USER`] (none was given).
    pub placeholder_user: bool,
    /// How the payload differs from the example (whatever the app event's check mode).
    pub differences: Vec<Difference>,
    pub choice: ConnectionChoice,
    pub request: PreparedRequest,
    compiled: CompiledWorkflow,
    connection: Connection,
    body: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    /// The worker would fail the run before sending anything.
    #[error("the step cannot be built for this event: {}", .0.summary())]
    Step(Failure),
}

/// Renders the workflow for a made-up event; sends nothing.
pub async fn prepare(
    pool: &deadpool_postgres::Pool,
    keyring: &Keyring,
    integrations: &Integrations,
    spec: &Spec,
) -> Result<WorkflowTest, TestError> {
    let workflow = workflows::get(pool, spec.workflow).await?;
    let compiled = CompiledWorkflow::compile(
        workflow.id,
        workflow.name.clone(),
        workflow.provider,
        workflow.condition.as_deref(),
        &workflow.steps,
    )
    .map_err(|e| TestError::Invalid(format!("workflow {} cannot run: {e}", workflow.id)))?;
    if !compiled.is_one_step() {
        return Err(TestError::Invalid(format!(
            "workflow test shows one-step workflows without conditions; {:?} has {} steps{}",
            workflow.name,
            workflow.steps.len(),
            if workflow.condition.is_some() {
                " and a condition"
            } else {
                ""
            }
        )));
    }
    let app_event = app_events::get(pool, &workflow.app_event_id.to_string()).await?;
    let (connection, choice) = choose_connection(pool, keyring, &workflow, spec).await?;
    let example_payload = spec.payload.is_none();
    let payload = payload_object(spec.payload.as_ref().unwrap_or(&app_event.schema))?;
    let differences = Shape::infer(&app_event.schema).differences(&payload);
    let event = made_up_event(&app_event.name, &connection.user_id, payload);
    let step = compiled.first();
    let body = step.mapping.render(&event);
    let request = integrations
        .prepare(
            &step.action,
            &connection,
            body.clone(),
            &Scope::event(&event),
        )
        .map_err(TestError::Step)?;
    Ok(WorkflowTest {
        workflow,
        app_event,
        event,
        example_payload,
        placeholder_user: spec.user.is_none() && spec.connection.is_none(),
        differences,
        choice,
        request,
        compiled,
        connection,
        body,
    })
}

/// The connection per the spec: `--connection`, else the user's subscription, else a
/// placeholder carrying the user (or [`PLACEHOLDER_USER`]).
async fn choose_connection(
    pool: &deadpool_postgres::Pool,
    keyring: &Keyring,
    workflow: &Workflow,
    spec: &Spec,
) -> Result<(Connection, ConnectionChoice), TestError> {
    if let Some(id) = spec.connection {
        let connection = connections::get(pool, keyring, id).await?;
        if connection.provider != workflow.provider {
            return Err(TestError::Invalid(format!(
                "connection {id} is a {} connection; workflow {:?} needs {}",
                connection.provider, workflow.name, workflow.provider
            )));
        }
        return Ok((connection, ConnectionChoice::Given { id }));
    }
    let Some(user) = &spec.user else {
        let why = "no --user or --connection given".to_owned();
        return Ok((
            placeholder(workflow, PLACEHOLDER_USER),
            ConnectionChoice::Placeholder { why },
        ));
    };
    match subscriptions::connection_of(pool, user, workflow.id).await? {
        Some(id) => Ok((
            connections::get(pool, keyring, id).await?,
            ConnectionChoice::Subscription { id },
        )),
        None => Ok((
            placeholder(workflow, user),
            ConnectionChoice::Placeholder {
                why: format!("user {user} has not switched this workflow on"),
            },
        )),
    }
}

fn placeholder(workflow: &Workflow, user: &str) -> Connection {
    Connection::without_credentials(user, workflow.provider, PLACEHOLDER_BASE_URL)
}

fn payload_object(payload: &Value) -> Result<Map<String, Value>, TestError> {
    match payload {
        Value::Object(map) => Ok(map.clone()),
        _ => Err(TestError::Invalid(
            "the payload must be a JSON object".into(),
        )),
    }
}

/// An event as a producer would publish it, with an id that says it is a test.
fn made_up_event(name: &str, user: &str, payload: Map<String, Value>) -> Event {
    let now = OffsetDateTime::now_utc();
    Event {
        id: format!("test-{}", Uuid::now_v7()),
        id_source: IdSource::Body,
        name: name.to_owned(),
        user_id: user.to_owned(),
        payload,
        occurred_at: now.format(&Rfc3339).ok(),
    }
}

impl WorkflowTest {
    /// Whether the connection is a real one that `send` can use.
    pub fn has_connection(&self) -> bool {
        !matches!(self.choice, ConnectionChoice::Placeholder { .. })
    }

    /// Sends the request once through the worker's step (HubSpot's 409 becomes an update,
    /// as in a run). A connection marked `needs_reauth` is refused as the worker refuses it.
    pub async fn send(&self, integrations: &Integrations) -> Result<StepOutput, Failure> {
        if self.connection.status == ConnectionStatus::NeedsReauth {
            return Err(self.connection.needs_reauth());
        }
        integrations
            .execute(
                &self.compiled.first().action,
                &self.connection,
                self.body.clone(),
                &Scope::event(&self.event),
                // A test send is a first attempt of its own.
                None,
            )
            .await
    }

    /// What the app event's payload check would do with this payload, or `None` when it
    /// matches the example.
    pub fn payload_check_note(&self) -> Option<String> {
        if self.differences.is_empty() {
            return None;
        }
        let consequence = match self.app_event.payload_check {
            payload_check::Mode::Off => "the check is off: the worker processes it",
            payload_check::Mode::Warn => {
                "the check is warn: the worker logs, counts and processes it"
            }
            payload_check::Mode::Reject => {
                "the check is reject: the worker dead-letters it and runs nothing"
            }
        };
        Some(format!(
            "{} ({consequence})",
            payload_check::reason(&self.app_event.name, &self.differences)
        ))
    }

    /// The request as shown: headers with secrets masked.
    pub fn request_json(&self) -> Value {
        let headers: Vec<Value> = self
            .request
            .headers
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value.masked()}))
            .collect();
        json!({
            "method": self.request.method.as_str(),
            "url": self.request.url,
            "headers": headers,
            "body": self.request.body,
        })
    }

    /// Everything the command prints with `--json`, before any sending.
    pub fn to_json(&self) -> Value {
        json!({
            "workflow": {
                "id": self.workflow.id,
                "name": self.workflow.name,
                "provider": self.workflow.provider,
                "action": self.workflow.action,
            },
            "app_event": self.app_event.name,
            "event": {
                "id": self.event.id,
                "name": self.event.name,
                "user_id": self.event.user_id,
                "payload": self.event.payload,
                "occurred_at": self.event.occurred_at,
            },
            "payload_source": if self.example_payload { "example" } else { "given" },
            "payload_check": {
                "mode": self.app_event.payload_check,
                "differences": self.differences.iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
            "connection": self.choice,
            "request": self.request_json(),
        })
    }

    /// The human-readable report, request included.
    pub fn to_text(&self) -> String {
        let mut lines = vec![
            format!(
                "workflow    {} ({}): {} {}, triggered by {:?}",
                self.workflow.name,
                self.workflow.id,
                self.workflow.provider,
                self.workflow.action,
                self.app_event.name
            ),
            format!(
                "event       {} for user {}{}, payload {}",
                self.event.id,
                self.event.user_id,
                if self.placeholder_user {
                    " (a placeholder)"
                } else {
                    ""
                },
                if self.example_payload {
                    "from the app event's example"
                } else {
                    "as given"
                }
            ),
            format!("connection  {}", self.connection_text()),
        ];
        if let Some(note) = self.payload_check_note() {
            lines.push(format!("note        {note}"));
        }
        lines.push(String::new());
        lines.push(format!("{} {}", self.request.method, self.request.url));
        for (name, value) in &self.request.headers {
            lines.push(format!("{name}: {}", value.masked()));
        }
        if let Some(body) = &self.request.body {
            lines.push(String::new());
            lines.push(serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string()));
        }
        lines.join("\n")
    }

    fn connection_text(&self) -> String {
        match &self.choice {
            ConnectionChoice::Subscription { id } => {
                format!("{id} ({}'s subscription)", self.connection.user_id)
            }
            ConnectionChoice::Given { id } => {
                format!("{id} (given, of user {})", self.connection.user_id)
            }
            ConnectionChoice::Placeholder { why } => {
                format!("a placeholder ({why}): base URL shown as {PLACEHOLDER_BASE_URL}, no token")
            }
        }
    }
}
