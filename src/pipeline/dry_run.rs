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
use crate::integrations::{Action, Integrations, PreparedRequest, StepOutput};
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
    /// The one step's action.
    action: Action,
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

/// What every dry run starts from: the workflow compiled, the made-up event, the connection.
struct Setup {
    workflow: Workflow,
    compiled: CompiledWorkflow,
    app_event: AppEvent,
    connection: Connection,
    choice: ConnectionChoice,
    example_payload: bool,
    differences: Vec<Difference>,
    event: Event,
}

async fn setup(
    pool: &deadpool_postgres::Pool,
    keyring: &Keyring,
    spec: &Spec,
) -> Result<Setup, TestError> {
    let workflow = workflows::get(pool, spec.workflow).await?;
    let compiled = CompiledWorkflow::compile(
        workflow.id,
        workflow.name.clone(),
        workflow.provider,
        workflow.condition.as_deref(),
        &workflow.steps,
    )
    .map_err(|e| TestError::Invalid(format!("workflow {} cannot run: {e}", workflow.id)))?;
    let app_event = app_events::get(pool, &workflow.app_event_id.to_string()).await?;
    let (connection, choice) = choose_connection(pool, keyring, &workflow, spec).await?;
    let example_payload = spec.payload.is_none();
    let payload = payload_object(spec.payload.as_ref().unwrap_or(&app_event.schema))?;
    let differences = Shape::infer(&app_event.schema).differences(&payload);
    let event = made_up_event(&app_event.name, &connection.user_id, payload);
    Ok(Setup {
        workflow,
        compiled,
        app_event,
        connection,
        choice,
        example_payload,
        differences,
        event,
    })
}

/// Whether the workflow is one step without conditions, which [`prepare`] shows; else
/// [`chain`] does.
pub async fn is_one_step(pool: &deadpool_postgres::Pool, id: Uuid) -> Result<bool, TestError> {
    let workflow = workflows::get(pool, id).await?;
    Ok(workflow.condition.is_none()
        && matches!(workflow.steps.as_slice(), [only] if only.condition.is_none() && only.for_each.is_none()))
}

/// Renders a one-step workflow for a made-up event; sends nothing.
pub async fn prepare(
    pool: &deadpool_postgres::Pool,
    keyring: &Keyring,
    integrations: &Integrations,
    spec: &Spec,
) -> Result<WorkflowTest, TestError> {
    let Setup {
        workflow,
        compiled,
        app_event,
        connection,
        choice,
        example_payload,
        differences,
        event,
    } = setup(pool, keyring, spec).await?;
    let Some(step) = compiled.one_step() else {
        return Err(TestError::Invalid(format!(
            "workflow {:?} has several steps or conditions: its dry run shows each step",
            workflow.name
        )));
    };
    let action = step.action.clone();
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
        action,
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
                &self.action,
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
        shown_request(&self.request)
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
            "event": event_json(&self.event),
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

/// A request as shown: headers with secrets masked.
fn shown_request(request: &PreparedRequest) -> Value {
    let headers: Vec<Value> = request
        .headers
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value.masked()}))
        .collect();
    json!({
        "method": request.method.as_str(),
        "url": request.url,
        "headers": headers,
        "body": request.body,
    })
}

/// A request as text: the request line, headers with secrets masked, the body.
fn request_text(request: &PreparedRequest) -> Vec<String> {
    let mut lines = vec![format!("{} {}", request.method, request.url)];
    for (name, value) in &request.headers {
        lines.push(format!("{name}: {}", value.masked()));
    }
    if let Some(body) = &request.body {
        lines.push(serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string()));
    }
    lines
}

/// How much of a chain's dry run is really sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// Every step rendered, nothing sent: later steps render without earlier outputs.
    Nothing,
    /// Read-only steps (query, search, HTTP GET) sent, so later steps render with their
    /// real outputs; writes shown, not sent.
    Reads,
    /// Every step sent once, in order, as a run would (no retry, nothing recorded).
    Everything,
}

/// One step (or `for_each` element) of a chain's dry run.
#[derive(Debug, Clone, Serialize)]
pub struct StepShown {
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    /// `rendered` (shown, not sent), `sent`, `skipped` (its condition does not hold),
    /// `unknown` (it cannot be rendered without the output of a step not sent), `failed`
    /// (it could not be rendered or sent), `not_run` (an earlier step failed).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(skip)]
    request_lines: Vec<String>,
}

impl StepShown {
    fn new(step: &str, item: Option<usize>, outcome: &'static str) -> StepShown {
        StepShown {
            step: step.to_owned(),
            item,
            outcome,
            note: None,
            request: None,
            output: None,
            failure: None,
            request_lines: Vec::new(),
        }
    }

    fn note(mut self, note: impl Into<String>) -> StepShown {
        self.note = Some(note.into());
        self
    }
}

/// A workflow of several steps (or with conditions) rendered step by step.
#[derive(Debug, Clone)]
pub struct ChainTest {
    pub workflow: Workflow,
    pub app_event: AppEvent,
    pub event: Event,
    pub example_payload: bool,
    pub choice: ConnectionChoice,
    pub sending: Sending,
    /// The workflow's condition and what it gave (`Err`: it could not be evaluated).
    pub condition: Option<(String, Result<bool, String>)>,
    pub steps: Vec<StepShown>,
}

/// Renders every step of a workflow for a made-up event, sending what `sending` says.
pub async fn chain(
    pool: &deadpool_postgres::Pool,
    keyring: &Keyring,
    integrations: &Integrations,
    spec: &Spec,
    sending: Sending,
) -> Result<ChainTest, TestError> {
    let setup = setup(pool, keyring, spec).await?;
    if sending != Sending::Nothing && matches!(setup.choice, ConnectionChoice::Placeholder { .. }) {
        return Err(TestError::Invalid(
            "--send and --send-reads need a real connection: give --user with a subscription to this workflow, or --connection".into(),
        ));
    }
    let event = &setup.event;
    let condition = setup
        .compiled
        .condition
        .as_ref()
        .map(|c| (c.source().to_owned(), c.evaluate(&Scope::event(event))));
    let mut shown = Vec::new();
    if matches!(condition, None | Some((_, Ok(true)))) {
        run_steps(&setup, integrations, sending, &mut shown).await;
    }
    Ok(ChainTest {
        workflow: setup.workflow,
        app_event: setup.app_event,
        event: setup.event,
        example_payload: setup.example_payload,
        choice: setup.choice,
        sending,
        condition,
        steps: shown,
    })
}

async fn run_steps(
    setup: &Setup,
    integrations: &Integrations,
    sending: Sending,
    shown: &mut Vec<StepShown>,
) {
    let mut outputs = Map::new();
    let mut stopped = false;
    // Some earlier step's output is unknown (rendered, not sent).
    let mut unknown = false;
    for step in &setup.compiled.steps {
        if stopped {
            shown.push(StepShown::new(&step.name, None, "not_run").note("an earlier step failed"));
            continue;
        }
        let scope = Scope {
            event: &setup.event,
            steps: Some(&outputs),
            item: None,
        };
        let items: Vec<Option<(usize, Value)>> = match &step.for_each {
            None => vec![None],
            Some(reference) => match reference.lookup(&scope) {
                Some(Value::Array(items)) if items.len() <= workflows::MAX_FOR_EACH => {
                    items.into_iter().enumerate().map(Some).collect()
                }
                None | Some(Value::Null) => Vec::new(),
                Some(other) => {
                    let why = match other {
                        Value::Array(items) => format!(
                            "for_each {} has {} elements, more than {}",
                            reference.as_str(),
                            items.len(),
                            workflows::MAX_FOR_EACH
                        ),
                        _ => format!("for_each {} is not an array", reference.as_str()),
                    };
                    shown.push(StepShown::new(&step.name, None, "failed").note(why));
                    stopped = true;
                    continue;
                }
            },
        };
        let mut element_outputs = Vec::new();
        let mut known = true;
        for element in &items {
            let scope = Scope {
                item: element.as_ref().map(|(_, item)| item),
                ..scope
            };
            let index = element.as_ref().map(|(i, _)| *i);
            let (one, output) =
                show_step(setup, integrations, sending, step, &scope, index, unknown).await;
            known &= output.is_some() || one.outcome == "skipped";
            if one.outcome == "failed" && step.on_error == workflows::OnError::Fail {
                stopped = true;
            }
            element_outputs.push(output.unwrap_or(Value::Null));
            shown.push(one);
            if stopped {
                break;
            }
        }
        unknown |= !known;
        if known {
            let output = match &step.for_each {
                None => element_outputs.pop().unwrap_or(Value::Null),
                Some(_) => Value::Array(element_outputs),
            };
            outputs.insert(step.name.clone(), output);
        }
    }
}

/// One step for one element: its condition, its request, and when sending, its answer.
/// Returns what is shown and the step's output when it is known.
async fn show_step(
    setup: &Setup,
    integrations: &Integrations,
    sending: Sending,
    step: &workflows::CompiledStep,
    scope: &Scope<'_>,
    item: Option<usize>,
    unknown_earlier: bool,
) -> (StepShown, Option<Value>) {
    let mut note = None;
    if let Some(condition) = &step.condition {
        match condition.evaluate(scope) {
            Ok(true) => {}
            Ok(false) => {
                let note = format!("when {} does not hold", condition.source());
                return (StepShown::new(&step.name, item, "skipped").note(note), None);
            }
            // Without the outputs of steps not sent, the condition cannot be told: the step
            // is shown as it would be sent if it held.
            Err(_) if unknown_earlier => {
                note = Some(format!(
                    "when {} is not evaluated: it reads the output of a step not sent (--send-reads sends the reads)",
                    condition.source()
                ));
            }
            Err(e) => {
                return (StepShown::new(&step.name, item, "failed").note(e), None);
            }
        }
    }
    let body = step.mapping.render_in(scope);
    let request = match integrations.prepare(&step.action, &setup.connection, body.clone(), scope) {
        Ok(request) => request,
        Err(failure) if unknown_earlier => {
            let note = format!(
                "not rendered: {} (it reads the output of a step not sent; --send-reads sends the reads)",
                failure.message
            );
            return (StepShown::new(&step.name, item, "unknown").note(note), None);
        }
        Err(failure) => {
            let mut one = StepShown::new(&step.name, item, "failed");
            one.failure = Some(failure);
            return (one, None);
        }
    };
    let mut one = StepShown::new(&step.name, item, "rendered");
    one.note = note;
    one.request = Some(shown_request(&request));
    one.request_lines = request_text(&request);
    let send = match sending {
        Sending::Nothing => false,
        Sending::Reads => step.action.is_read_only(),
        Sending::Everything => true,
    };
    if !send {
        if sending == Sending::Reads {
            one.note = Some("a write: shown, not sent (--send sends it)".into());
        }
        return (one, None);
    }
    if setup.connection.status == ConnectionStatus::NeedsReauth {
        one.outcome = "failed";
        one.failure = Some(setup.connection.needs_reauth());
        return (one, None);
    }
    match integrations
        .execute(&step.action, &setup.connection, body, scope, None)
        .await
    {
        Ok(output) => {
            let value = output.output();
            one.outcome = "sent";
            one.output = Some(value.clone());
            (one, Some(value))
        }
        Err(failure) => {
            one.outcome = "failed";
            one.failure = Some(failure);
            (one, None)
        }
    }
}

impl ChainTest {
    pub fn to_json(&self) -> Value {
        json!({
            "workflow": {
                "id": self.workflow.id,
                "name": self.workflow.name,
                "provider": self.workflow.provider,
            },
            "app_event": self.app_event.name,
            "event": event_json(&self.event),
            "payload_source": if self.example_payload { "example" } else { "given" },
            "connection": self.choice,
            "sent": match self.sending {
                Sending::Nothing => "nothing",
                Sending::Reads => "reads",
                Sending::Everything => "everything",
            },
            "when": self.condition.as_ref().map(|(source, result)| match result {
                Ok(holds) => json!({"condition": source, "holds": holds}),
                Err(error) => json!({"condition": source, "error": error}),
            }),
            "steps": self.steps,
        })
    }

    pub fn to_text(&self) -> String {
        let mut lines = vec![
            format!(
                "workflow    {} ({}): {}, {} steps, triggered by {:?}",
                self.workflow.name,
                self.workflow.id,
                self.workflow.provider,
                self.workflow.steps.len(),
                self.app_event.name
            ),
            format!(
                "event       {} for user {}, payload {}",
                self.event.id,
                self.event.user_id,
                if self.example_payload {
                    "from the app event's example"
                } else {
                    "as given"
                }
            ),
        ];
        if let Some((source, result)) = &self.condition {
            lines.push(match result {
                Ok(true) => format!("when        {source}: holds"),
                Ok(false) => format!("when        {source}: does not hold, nothing would run"),
                Err(error) => format!("when        {error}: the run would be dead-lettered"),
            });
        }
        let total = self.workflow.steps.len();
        for one in &self.steps {
            let position = self
                .workflow
                .steps
                .iter()
                .position(|s| s.name == one.step)
                .map_or(0, |i| i + 1);
            let item = one.item.map(|i| format!(" [item {i}]")).unwrap_or_default();
            lines.push(String::new());
            lines.push(format!(
                "step {position}/{total} {}{item}: {}",
                one.step, one.outcome
            ));
            if let Some(note) = &one.note {
                lines.push(format!("  {note}"));
            }
            lines.extend(
                one.request_lines
                    .iter()
                    .map(|l| format!("  {}", l.replace('\n', "\n  "))),
            );
            if let Some(output) = &one.output {
                lines.push(format!("  answer: {output}"));
            }
            if let Some(failure) = &one.failure {
                lines.push(format!("  failure: {}", failure.summary()));
            }
        }
        lines.join("\n")
    }

    /// Whether a step failed (so the command exits non-zero).
    pub fn failed(&self) -> bool {
        self.steps.iter().any(|s| s.outcome == "failed")
            || matches!(self.condition, Some((_, Err(_))))
    }
}

/// The made-up event as the reports show it.
fn event_json(event: &Event) -> Value {
    json!({
        "id": event.id,
        "name": event.name,
        "user_id": event.user_id,
        "payload": event.payload,
        "occurred_at": event.occurred_at,
    })
}
