//! Runs: the history with the CLI's filters (user, workflow, status, event id, time range),
//! newest first, a page at a time by keyset (the last run shown is where the next page
//! starts: no OFFSET, so page 500 costs what page 1 does); a run's page with its event, its
//! steps, attempts and timings; and a retry button for a dead run.
//!
//! A run's steps: a workflow of several steps records each in `run_steps`; a one-step
//! workflow records its step's outcome on the run itself. [`steps_of`] turns either into the
//! list of steps the page shows.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::dead_letters::FilterForm;
use super::{
    Chrome, Console, Operator, Refusal, broker_connection, html, topology, truncate, when,
};
use crate::catalog::workflows::{self, Workflow};
use crate::core::failure::Failure;
use crate::interfaces::cli::runs::parse_time;
use crate::pipeline::replay;
use crate::pipeline::run_steps::{self, RunWithSteps, StepRecord};
use crate::pipeline::runs::{self, Run, RunFilter, RunStatus};
use crate::store::audit::{self, Action};

/// Runs on a page.
const PAGE: i64 = 50;
/// Characters of an error message shown in the list.
const ERROR_SHOWN: usize = 160;

/// The filters as typed.
#[derive(Debug, Clone, Default)]
pub struct RunsForm {
    pub user: String,
    pub workflow: String,
    pub status: String,
    pub event_id: String,
    pub since: String,
    pub until: String,
}

impl RunsForm {
    fn from_map(map: &HashMap<String, String>) -> RunsForm {
        let field = |name: &str| {
            map.get(name)
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        RunsForm {
            user: field("user"),
            workflow: field("workflow"),
            status: field("status"),
            event_id: field("event_id"),
            since: field("since"),
            until: field("until"),
        }
    }

    /// The filter, or what is wrong with a value.
    fn parse(&self, before: Option<&str>) -> Result<RunFilter, String> {
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let time = |name: &str, value: &str| {
            text(value)
                .map(|v| parse_time(&v).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        Ok(RunFilter {
            user_id: text(&self.user),
            workflow_id: text(&self.workflow)
                .map(|v| {
                    Uuid::parse_str(&v).map_err(|_| format!("workflow {v:?} is not a workflow id"))
                })
                .transpose()?,
            status: text(&self.status)
                .map(|v| RunStatus::parse(&v))
                .transpose()?,
            event_id: text(&self.event_id),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            before: before.map(parse_cursor).transpose()?,
            limit: PAGE,
        })
    }

    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("user", &self.user),
            ("workflow", &self.workflow),
            ("status", &self.status),
            ("event_id", &self.event_id),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if !value.is_empty() {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

/// A page boundary: the creation time (Unix nanoseconds) and id of the last run shown.
fn cursor(run: &Run) -> String {
    format!("{}_{}", run.created_at.unix_timestamp_nanos(), run.id)
}

fn parse_cursor(text: &str) -> Result<(OffsetDateTime, Uuid), String> {
    let invalid = || format!("{text:?} is not a page of this list: start again from the first");
    let (nanos, id) = text.split_once('_').ok_or_else(invalid)?;
    let nanos: i128 = nanos.parse().map_err(|_| invalid())?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| invalid())?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

/// An option of a select: its value, its label, whether it is chosen.
pub struct Choice {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// A run in the list.
pub struct RunRow {
    pub id: Uuid,
    pub created: String,
    pub user: String,
    pub workflow: String,
    pub event_name: String,
    pub event_id: String,
    pub status: &'static str,
    pub attempts: i32,
    pub outcome: String,
}

fn failure_of(run: &Run) -> Option<Failure> {
    run.last_error
        .as_ref()
        .and_then(|e| serde_json::from_value::<Failure>(e.clone()).ok())
}

impl RunRow {
    fn of(run: &Run) -> RunRow {
        let outcome = match (&run.provider_id, failure_of(run)) {
            (_, Some(failure)) if run.status != RunStatus::Succeeded => {
                truncate(&failure.summary(), ERROR_SHOWN).0
            }
            (Some(id), _) => id.clone(),
            _ => String::new(),
        };
        RunRow {
            id: run.id,
            created: when(run.created_at),
            user: run.user_id.clone(),
            workflow: run.workflow.clone(),
            event_name: run.event_name.clone(),
            event_id: run.event_id.clone(),
            status: run.status.as_str(),
            attempts: run.attempts,
            outcome,
        }
    }
}

#[derive(Template)]
#[template(path = "console/runs.html")]
struct ListPage {
    chrome: Chrome,
    form: RunsForm,
    workflows: Vec<Choice>,
    statuses: Vec<Choice>,
    error: Option<String>,
    runs: Vec<RunRow>,
    /// The next page's link, when there may be one.
    older: Option<String>,
    paged: bool,
    first: String,
}

pub(super) async fn list(
    State(console): State<Console>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let form = RunsForm::from_map(&query);
    let workflows = workflows::list(&console.pool, None, None).await?;
    let before = query
        .get("before")
        .map(String::as_str)
        .filter(|b| !b.is_empty());
    let workflows = workflows
        .into_iter()
        .map(|w| Choice {
            selected: form.workflow == w.id.to_string(),
            value: w.id.to_string(),
            label: w.name,
        })
        .collect();
    let statuses = ["running", "succeeded", "retrying", "dead"]
        .into_iter()
        .map(|s| Choice {
            selected: form.status == s,
            value: s.to_owned(),
            label: s.to_owned(),
        })
        .collect();
    let mut page = ListPage {
        chrome: Chrome::of(&operator, "runs"),
        workflows,
        statuses,
        error: None,
        runs: Vec::new(),
        older: None,
        paged: before.is_some(),
        first: format!("/console/runs?{}", form.query()),
        form,
    };
    let filter = match page.form.parse(before) {
        Ok(filter) => filter,
        Err(error) => {
            page.error = Some(error);
            return Ok(html(StatusCode::BAD_REQUEST, page));
        }
    };
    let found = runs::list(&console.pool, &filter).await?;
    if found.len() as i64 == PAGE
        && let Some(last) = found.last()
    {
        let mut query = page.form.query();
        if !query.is_empty() {
            query.push('&');
        }
        page.older = Some(format!("/console/runs?{query}before={}", cursor(last)));
    }
    page.runs = found.iter().map(RunRow::of).collect();
    Ok(html(StatusCode::OK, page))
}

/// One step of a run as the page shows it.
pub struct StepView {
    pub name: String,
    /// What was asked of the provider: for a recorded step its method, URL and body (never a
    /// header: they carry the credentials); for a one-step workflow, provider, action and
    /// connection (its run row keeps no request).
    pub request: String,
    /// The provider's id for what it made, when it succeeded.
    pub provider_id: Option<String>,
    /// A recorded step's output (what later steps read), cut to [`OUTPUT_SHOWN`].
    pub output: Option<String>,
    pub error: Option<Failure>,
    pub status: &'static str,
    pub attempts: i32,
    pub started: String,
    pub finished: Option<String>,
    pub took: Option<String>,
}

/// Characters of a step's request or output shown on a run's page.
const OUTPUT_SHOWN: usize = 2_000;

/// The steps of a run: those recorded in `run_steps` for a workflow of several steps, else
/// the one step a one-step workflow records on the run itself.
pub fn steps_of(run: &Run, workflow: Option<&Workflow>, recorded: &[StepRecord]) -> Vec<StepView> {
    if !recorded.is_empty() {
        return recorded.iter().map(StepView::recorded).collect();
    }
    let request = match workflow {
        Some(w) => format!(
            "{} {} with connection {}",
            w.provider,
            w.action,
            run.connection_id
                .map_or_else(|| "none".to_owned(), |id| id.to_string())
        ),
        None => "the workflow was deleted".to_owned(),
    };
    vec![StepView {
        name: workflow.map_or_else(|| "step".to_owned(), |w| w.action.clone()),
        request,
        provider_id: run.provider_id.clone(),
        output: None,
        error: failure_of(run),
        status: run.status.as_str(),
        attempts: run.attempts,
        started: when(run.created_at),
        finished: run.finished_at.map(when),
        took: run.finished_at.map(|at| {
            let took = at - run.created_at;
            format!("{:.3} s", took.as_seconds_f64())
        }),
    }]
}

impl StepView {
    fn recorded(step: &StepRecord) -> StepView {
        let shown = |value: &serde_json::Value| truncate(&value.to_string(), OUTPUT_SHOWN).0;
        let request = step.request.as_ref().map_or_else(String::new, |r| {
            match (
                r.get("method").and_then(|m| m.as_str()),
                r.get("url").and_then(|u| u.as_str()),
            ) {
                (Some(method), Some(url)) => match r.get("body") {
                    Some(body) if !body.is_null() => format!("{method} {url} {}", shown(body)),
                    _ => format!("{method} {url}"),
                },
                _ => shown(r),
            }
        });
        StepView {
            name: match step.item {
                Some(item) => format!("{} [{item}]", step.step),
                None => step.step.clone(),
            },
            request,
            provider_id: None,
            output: step.output.as_ref().map(shown),
            error: step
                .error
                .as_ref()
                .and_then(|e| serde_json::from_value::<Failure>(e.clone()).ok()),
            status: step.status.as_str(),
            attempts: step.attempts,
            started: when(step.started_at),
            finished: Some(when(step.finished_at)),
            took: Some(format!(
                "{:.3} s",
                (step.finished_at - step.started_at).as_seconds_f64()
            )),
        }
    }
}

#[derive(Template)]
#[template(path = "console/run.html")]
struct RunPage {
    chrome: Chrome,
    run: Run,
    status: &'static str,
    created: String,
    updated: String,
    next_attempt: Option<String>,
    steps: Vec<StepView>,
    letter_query: String,
    notice: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ShowQuery {
    retried: Option<String>,
}

fn run_id(text: &str) -> Result<Uuid, Refusal> {
    Uuid::parse_str(text).map_err(|_| {
        Refusal::page(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("{text:?} is not a run id."),
        )
    })
}

async fn run_page(
    console: &Console,
    operator: &Operator,
    id: Uuid,
    notice: Option<String>,
    error: Option<String>,
) -> Result<RunPage, Refusal> {
    let RunWithSteps {
        run,
        steps: recorded,
    } = run_steps::show(&console.pool, id).await?;
    let workflow = workflows::get(&console.pool, run.workflow_id).await.ok();
    let letter_query = FilterForm {
        event_id: run.event_id.clone(),
        user: run.user_id.clone(),
        workflow: run.workflow_id.to_string(),
        ..FilterForm::default()
    }
    .query();
    Ok(RunPage {
        chrome: Chrome::of(operator, "runs"),
        status: run.status.as_str(),
        created: when(run.created_at),
        updated: when(run.updated_at),
        next_attempt: run.next_attempt_at.map(when),
        steps: steps_of(&run, workflow.as_ref(), &recorded),
        letter_query,
        run,
        notice,
        error,
    })
}

pub(super) async fn show(
    State(console): State<Console>,
    operator: Operator,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<Response, Refusal> {
    let id = run_id(&id)?;
    let notice = query.retried.map(|_| {
        "Retried: the run's dead letter is back in the work queue; a worker runs it again."
            .to_owned()
    });
    let page = run_page(&console, &operator, id, notice, None).await?;
    Ok(html(StatusCode::OK, page))
}

#[derive(Deserialize)]
pub(super) struct RetryForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn retry(
    State(console): State<Console>,
    operator: Operator,
    Path(id): Path<String>,
    Form(form): Form<RetryForm>,
) -> Result<Response, Refusal> {
    operator.check(&form.csrf)?;
    let id = run_id(&id)?;
    let entry = audit::begin(
        &console.pool,
        &operator.name,
        Action::Retry,
        &format!("run {id}"),
    )
    .await?;
    tracing::info!(operator = %operator.name, run_id = %id, "console: retry");
    let outcome = match broker_connection(&console).await {
        Ok(connection) => {
            replay::retry_dead_run(&console.pool, &connection, &topology(&console), id)
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        }
        Err(err) => Err(err),
    };
    let text = match &outcome {
        Ok(()) => "replayed its dead letter".to_owned(),
        Err(err) => format!("failed: {err}"),
    };
    audit::finish(&console.pool, entry, &text).await?;
    match outcome {
        Ok(()) => Ok(Redirect::to(&format!("/console/runs/{id}?retried=1")).into_response()),
        Err(error) => {
            let page = run_page(&console, &operator, id, None, Some(error)).await?;
            Ok(html(StatusCode::CONFLICT, page))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_filter_values_are_refused_with_a_message() {
        let form = RunsForm {
            status: "sleeping".into(),
            ..RunsForm::default()
        };
        assert!(form.parse(None).unwrap_err().contains("unknown run status"));
        let form = RunsForm {
            since: "last tuesday".into(),
            ..RunsForm::default()
        };
        assert!(form.parse(None).unwrap_err().starts_with("since:"));
        assert!(RunsForm::default().parse(Some("12_x")).is_err());
    }

    #[test]
    fn a_cursor_reads_back_as_written() {
        let at =
            OffsetDateTime::from_unix_timestamp_nanos(1_765_000_000_123_456_000).expect("time");
        let id = Uuid::now_v7();
        let text = format!("{}_{id}", at.unix_timestamp_nanos());
        assert_eq!(parse_cursor(&text), Ok((at, id)));
    }
}
