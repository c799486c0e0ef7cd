//! The overview — events per minute, runs by outcome and provider over the last hour and
//! day, dead-letter depth by reason code, connections needing reauth, workers alive — and
//! the audit log.

use std::collections::BTreeMap;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::{Chrome, Console, Operator, Refusal, charts, html, walk_letters, when};
use crate::catalog::connections::{self, ConnectionSummary};
use crate::core::connection::ConnectionStatus;
use crate::pipeline::overview;
use crate::store::audit::{self, Entry};
use crate::transport::dead_letter::{self, Filter};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

pub struct WorkerRow {
    pub id: String,
    pub started: String,
    pub alive_until: String,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    chrome: Chrome,
    per_minute: String,
    last_hour: String,
    last_day: String,
    /// Dead letters by reason code, or why the queue could not be read.
    depth: Result<Vec<(String, usize)>, String>,
    reauth: Vec<ConnectionSummary>,
    workers: Vec<WorkerRow>,
}

/// Runs by provider and status, as chart rows.
fn outcome_rows(outcomes: &[overview::Outcomes]) -> Vec<(String, &str, i64)> {
    outcomes
        .iter()
        .map(|o| {
            (
                format!("{} · {}", o.provider, o.status),
                o.status.as_str(),
                o.runs,
            )
        })
        .collect()
}

pub(super) async fn page(
    State(console): State<Console>,
    operator: Operator,
) -> Result<Response, Refusal> {
    // Each figure on a connection of its own, at once: the page takes as long as the
    // slowest, not the sum.
    let (figures, depth) = tokio::join!(
        async {
            tokio::try_join!(
                overview::events_per_minute(&console.pool, 60),
                overview::outcomes(&console.pool, HOUR),
                overview::outcomes(&console.pool, DAY),
                connections::list(&console.pool, None),
                overview::workers(&console.pool),
            )
        },
        depth(&console)
    );
    let (minutes, hour, day, connections, workers) = figures?;
    let minutes: Vec<(String, i64)> = minutes
        .into_iter()
        .map(|(at, n)| (when(at).get(11..16).unwrap_or_default().to_owned(), n))
        .collect();
    let reauth = connections
        .into_iter()
        .filter(|c| c.status == ConnectionStatus::NeedsReauth)
        .collect();
    let workers = workers
        .into_iter()
        .map(|w| WorkerRow {
            id: w.id.to_string(),
            started: when(w.started_at),
            alive_until: when(w.alive_until),
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        OverviewPage {
            chrome: Chrome::of(&operator, "overview"),
            per_minute: charts::columns("Events per minute, last hour", &minutes),
            last_hour: charts::bars("Runs in the last hour", &outcome_rows(&hour)),
            last_day: charts::bars("Runs in the last day", &outcome_rows(&day)),
            depth,
            reauth,
            workers,
        },
    ))
}

/// Dead letters by reason code.
async fn depth(console: &Console) -> Result<Vec<(String, usize)>, String> {
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    walk_letters(
        console,
        &Filter::default(),
        dead_letter::Action::List,
        |letter| *by_code.entry(letter.reason_code.clone()).or_default() += 1,
    )
    .await?;
    Ok(by_code.into_iter().collect())
}

pub struct EntryRow {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

impl EntryRow {
    fn of(entry: Entry) -> EntryRow {
        EntryRow {
            at: when(entry.at),
            actor: entry.actor,
            action: entry.action,
            target: entry.target,
            outcome: entry.outcome.unwrap_or_else(|| "not finished".to_owned()),
        }
    }
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    chrome: Chrome,
    entries: Vec<EntryRow>,
}

pub(super) async fn audit(
    State(console): State<Console>,
    operator: Operator,
) -> Result<Response, Refusal> {
    let entries = audit::latest(&console.pool, 200).await?;
    Ok(html(
        StatusCode::OK,
        AuditPage {
            chrome: Chrome::of(&operator, "audit"),
            entries: entries.into_iter().map(EntryRow::of).collect(),
        },
    ))
}
