//! `appevents runs`: run history, and replaying one dead run.

use anyhow::bail;
use clap::{Args, Subcommand};
use uuid::Uuid;

use super::dlq::broker_session;
use super::output::{print_json, print_table};
use crate::config::Settings;
use crate::core::failure::Failure;
use crate::pipeline::replay;
use crate::pipeline::run_steps;
use crate::pipeline::runs::{self, RunFilter, RunStatus};
use crate::store::db;

#[derive(Debug, Subcommand)]
pub(super) enum RunsCommand {
    /// Runs, newest first.
    List(RunsListArgs),
    /// One run in full, with each step of a workflow of several steps.
    Show { id: Uuid },
    /// Re-run one dead run: replays its dead letter (that workflow only, a fresh attempt budget).
    Retry { id: Uuid },
}

#[derive(Debug, Args)]
pub(super) struct RunsListArgs {
    /// Only this user's runs.
    #[arg(long)]
    user: Option<String>,
    /// Only this workflow's runs (its id).
    #[arg(long)]
    workflow: Option<Uuid>,
    /// running | succeeded | retrying | dead
    #[arg(long, value_parser = RunStatus::parse)]
    status: Option<RunStatus>,
    /// Only the runs of this event id.
    #[arg(long)]
    event_id: Option<String>,
    /// Only runs created at or after this RFC 3339 time, or this long ago (e.g. 1h).
    #[arg(long, value_parser = parse_time)]
    since: Option<time::OffsetDateTime>,
    /// Only runs created before this RFC 3339 time, or this long ago.
    #[arg(long, value_parser = parse_time)]
    until: Option<time::OffsetDateTime>,
    /// At most this many runs, newest first.
    #[arg(long, default_value_t = 100)]
    limit: i64,
    #[arg(long)]
    json: bool,
}

/// Parses an RFC 3339 time or a duration ago ("90s", "2h", "7d").
pub(crate) fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(at);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    Ok(time::OffsetDateTime::now_utc() - ago)
}

pub(super) async fn run(settings: &Settings, command: RunsCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        RunsCommand::List(args) => {
            if args.limit < 1 {
                bail!("--limit must be at least 1");
            }
            let filter = RunFilter {
                user_id: args.user,
                workflow_id: args.workflow,
                status: args.status,
                event_id: args.event_id,
                since: args.since,
                until: args.until,
                before: None,
                limit: args.limit,
            };
            let list = runs::list(pool, &filter).await?;
            if args.json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.created_at
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        r.user_id.clone(),
                        r.workflow.clone(),
                        r.event_id.clone(),
                        r.status.as_str().to_owned(),
                        r.attempts.to_string(),
                        r.provider_id.clone().unwrap_or_default(),
                        r.last_error
                            .as_ref()
                            .and_then(|e| serde_json::from_value::<Failure>(e.clone()).ok())
                            .map(|f| f.summary())
                            .unwrap_or_default(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &[
                    "RUN",
                    "CREATED",
                    "USER",
                    "WORKFLOW",
                    "EVENT",
                    "STATUS",
                    "ATTEMPTS",
                    "PROVIDER ID",
                    "LAST ERROR",
                ],
                &rows,
            );
        }
        RunsCommand::Show { id } => print_json(&run_steps::show(pool, id).await?)?,
        RunsCommand::Retry { id } => retry(settings, id).await?,
    }
    Ok(())
}

/// Replays the dead letter of one dead run.
async fn retry(settings: &Settings, id: Uuid) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let (connection, topology) = broker_session(settings, "appevents runs retry").await?;
    let retried = replay::retry_dead_run(&pool, &connection, &topology, id).await;
    let _ = connection.close(200, "done".into()).await;
    let found = retried?;
    println!(
        "replayed run {id} (event {}, workflow {})",
        found.event_id, found.workflow
    );
    Ok(())
}
