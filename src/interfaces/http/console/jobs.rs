//! Replays and purges run in the background, so a long one shows its progress: the page
//! of a job polls itself with htmx every second (and has a Refresh link without
//! JavaScript). Jobs live in this server's memory; their outcome is in the audit log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Chrome, Console, Operator, Refusal, html, walk_letters, when};
use crate::store::audit::{self, Action};
use crate::transport::dead_letter::{self, Filter};

/// Jobs kept for their pages; older ones are forgotten (the audit log keeps them).
const KEPT: usize = 100;

#[derive(Clone, Default)]
pub struct Jobs(Arc<Mutex<HashMap<Uuid, Arc<Job>>>>);

/// One replay or purge.
pub struct Job {
    action: Action,
    actor: String,
    target: String,
    /// How many letters matched the preview.
    expected: usize,
    /// Letters handled so far.
    done: AtomicUsize,
    outcome: Mutex<Option<Result<String, String>>>,
    started: OffsetDateTime,
}

impl Jobs {
    fn get(&self, id: Uuid) -> Option<Arc<Job>> {
        self.0.lock().ok()?.get(&id).cloned()
    }

    fn insert(&self, id: Uuid, job: Arc<Job>) {
        if let Ok(mut jobs) = self.0.lock() {
            if jobs.len() >= KEPT
                && let Some(oldest) = jobs
                    .iter()
                    .min_by_key(|(_, job)| job.started)
                    .map(|(id, _)| *id)
            {
                jobs.remove(&oldest);
            }
            jobs.insert(id, job);
        }
    }
}

/// Starts a replay or purge of the letters `filter` matches, written to the audit log
/// first; returns the job's id.
pub async fn start(
    console: &Console,
    operator: &Operator,
    action: Action,
    filter: Filter,
    target: String,
    expected: usize,
) -> Result<Uuid, Refusal> {
    let entry = audit::begin(&console.pool, &operator.name, action, &target).await?;
    tracing::info!(operator = %operator.name, action = action.as_str(), %target, "console: dead letters");
    let id = Uuid::now_v7();
    let job = Arc::new(Job {
        action,
        actor: operator.name.clone(),
        target,
        expected,
        done: AtomicUsize::new(0),
        outcome: Mutex::new(None),
        started: OffsetDateTime::now_utc(),
    });
    console.jobs.insert(id, job.clone());
    let console = console.clone();
    tokio::spawn(async move {
        let outcome = run(&console, &job, &filter).await;
        let text = match &outcome {
            Ok(done) => done.clone(),
            Err(err) => format!("failed: {err}"),
        };
        if let Err(err) = audit::finish(&console.pool, entry, &text).await {
            tracing::warn!(error = %err, "console: the audit entry could not be completed");
        }
        if let Ok(mut slot) = job.outcome.lock() {
            *slot = Some(outcome);
        }
    });
    Ok(id)
}

async fn run(console: &Console, job: &Job, filter: &Filter) -> Result<String, String> {
    let walk_action = match job.action {
        Action::Purge => dead_letter::Action::Purge,
        Action::Replay | Action::Retry => dead_letter::Action::Replay,
    };
    let report = walk_letters(console, filter, walk_action, |_| {
        job.done.fetch_add(1, Ordering::Relaxed);
    })
    .await?;
    Ok(match job.action {
        Action::Purge => format!("purged {} of {} scanned", report.purged, report.scanned),
        Action::Replay | Action::Retry => {
            format!("replayed {} of {} scanned", report.moved, report.scanned)
        }
    })
}

#[derive(Template)]
#[template(path = "console/job.html")]
struct JobPage {
    chrome: Chrome,
    id: Uuid,
    action: &'static str,
    actor: String,
    target: String,
    started: String,
    expected: usize,
    done: usize,
    percent: usize,
    running: bool,
    outcome: Option<Result<String, String>>,
}

pub(super) async fn show(
    State(console): State<Console>,
    operator: Operator,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let job = Uuid::parse_str(&id)
        .ok()
        .and_then(|id| console.jobs.get(id))
        .ok_or_else(|| {
            Refusal::page(
                StatusCode::NOT_FOUND,
                "No such job",
                "This server does not know that job (it may have restarted): the audit log has every replay and purge.",
            )
        })?;
    let outcome = job.outcome.lock().ok().and_then(|o| o.clone());
    let done = job.done.load(Ordering::Relaxed);
    let percent = (done * 100)
        .checked_div(job.expected)
        .unwrap_or(100)
        .min(100);
    Ok(html(
        StatusCode::OK,
        JobPage {
            chrome: Chrome::of(&operator, "dead-letters"),
            id: id.parse().unwrap_or_default(),
            action: job.action.as_str(),
            actor: job.actor.clone(),
            target: job.target.clone(),
            started: when(job.started),
            expected: job.expected,
            done,
            percent,
            running: outcome.is_none(),
            outcome,
        },
    ))
}
