//! The catalog: app events (example payload, aliases, payload check), workflows (step and
//! mapping, with a Test button showing the dry run `workflow test` prints), and each user's
//! connections with their status, never a secret.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use uuid::Uuid;

use super::{Chrome, Console, Operator, Refusal, html};
use crate::catalog::connections::{self, ConnectionSummary};
use crate::catalog::{app_events, workflows};
use crate::pipeline::dry_run::{self, Spec, TestError};

pub struct AppEventRow {
    pub name: String,
    pub aliases: String,
    pub check: String,
    pub example: String,
}

pub struct WorkflowRow {
    pub id: Uuid,
    pub name: String,
    pub event: String,
    pub step: String,
    pub mapping: String,
}

#[derive(Template)]
#[template(path = "console/catalog.html")]
struct CatalogPage {
    chrome: Chrome,
    app_events: Vec<AppEventRow>,
    workflows: Vec<WorkflowRow>,
    users: BTreeMap<String, Vec<ConnectionSummary>>,
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

pub(super) async fn page(
    State(console): State<Console>,
    operator: Operator,
) -> Result<Response, Refusal> {
    let app_events = app_events::list(&console.pool)
        .await?
        .into_iter()
        .map(|e| AppEventRow {
            aliases: e.aliases.join(", "),
            check: serde_json::to_value(e.payload_check)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            example: pretty(&e.schema),
            name: e.name,
        })
        .collect();
    let workflows = workflows::list(&console.pool, None, None)
        .await?
        .into_iter()
        .map(|w| WorkflowRow {
            id: w.id,
            step: format!("{} {} {}", w.provider, w.action, options(&w.options)),
            mapping: pretty(&w.mapping),
            event: w.event,
            name: w.name,
        })
        .collect();
    let mut users: BTreeMap<String, Vec<ConnectionSummary>> = BTreeMap::new();
    for connection in connections::list(&console.pool, None).await? {
        users
            .entry(connection.user_id.clone())
            .or_default()
            .push(connection);
    }
    Ok(html(
        StatusCode::OK,
        CatalogPage {
            chrome: Chrome::of(&operator, "catalog"),
            app_events,
            workflows,
            users,
        },
    ))
}

/// A step's options, compact; none shows nothing.
fn options(options: &serde_json::Value) -> String {
    match options.as_object() {
        Some(map) if !map.is_empty() => options.to_string(),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
pub(super) struct TestQuery {
    user: Option<String>,
}

#[derive(Template)]
#[template(path = "console/workflow_test.html")]
struct TestPage {
    chrome: Chrome,
    id: Uuid,
    user: String,
    result: Result<String, String>,
}

/// The dry run of a workflow: the request the worker would send for the app event's
/// example payload, secrets masked. Sends nothing.
pub(super) async fn test(
    State(console): State<Console>,
    operator: Operator,
    Path(id): Path<String>,
    Query(query): Query<TestQuery>,
) -> Result<Response, Refusal> {
    let id = Uuid::parse_str(&id).map_err(|_| {
        Refusal::page(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("{id:?} is not a workflow id."),
        )
    })?;
    let user = query.user.map(|u| u.trim().to_owned()).unwrap_or_default();
    let spec = Spec {
        workflow: id,
        user: (!user.is_empty()).then(|| user.clone()),
        connection: None,
        payload: None,
    };
    let tested = dry_run::prepare(
        &console.pool,
        &console.keyring,
        &console.integrations,
        &spec,
    )
    .await;
    let (status, result) = match tested {
        Ok(test) => (StatusCode::OK, Ok(test.to_text())),
        Err(TestError::Store(err)) => return Err(err.into()),
        Err(err) => (StatusCode::BAD_REQUEST, Err(err.to_string())),
    };
    Ok(html(
        status,
        TestPage {
            chrome: Chrome::of(&operator, "catalog"),
            id,
            user,
            result,
        },
    ))
}
