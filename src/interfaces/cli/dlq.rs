//! `appevents dlq`: inspect, replay and purge the dead-letter queue.

use std::collections::HashMap;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use uuid::Uuid;

use super::output::{print_json, print_table};
use crate::catalog::workflows;
use crate::config::Settings;
use crate::store::db;
use crate::transport::broker;
use crate::transport::dead_letter;
use crate::transport::topology::Topology;

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
    /// What is dead-lettered, with a summary by reason.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Show at most this many letters (the summary counts them all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move matching letters back to the work queue with a fresh attempt budget, for the
    /// workflows that failed. Each move is confirmed by the broker before the letter is removed.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Only show what would move.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete matching letters. Refuses without --yes.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Filters shared by the dlq commands; all given must match.
#[derive(Debug, Args)]
pub(super) struct DlqFilter {
    /// Event name.
    #[arg(long)]
    event: Option<String>,
    /// Only letters of this event id.
    #[arg(long)]
    event_id: Option<String>,
    /// Only letters of this user.
    #[arg(long)]
    user: Option<String>,
    /// Only letters of this workflow (its id).
    #[arg(long)]
    workflow: Option<Uuid>,
    /// Substring of the reason, case-insensitive.
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at least this long ago, e.g. 30m.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Dead-lettered at most this long ago, e.g. 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    newer_than: Option<std::time::Duration>,
}

impl DlqFilter {
    fn to_filter(&self) -> dead_letter::Filter {
        dead_letter::Filter {
            event_id: self.event_id.clone(),
            event_name: self.event.clone(),
            user_id: self.user.clone(),
            workflow_id: self.workflow,
            reason: self.reason.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
        }
    }
}

pub(super) async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let (connection, topology) = broker_session(settings, "appevents dlq").await?;
    let result = walk(settings, &connection, &topology, command).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn walk(
    settings: &Settings,
    connection: &lapin::Connection,
    topology: &Topology,
    command: DlqCommand,
) -> anyhow::Result<()> {
    use dead_letter::Action;
    let (filter, action, json, limit) = match &command {
        DlqCommand::List {
            filter,
            json,
            limit,
        } => (filter, Action::List, *json, *limit),
        DlqCommand::Replay {
            filter,
            dry_run,
            json,
        } => (
            filter,
            if *dry_run {
                Action::List
            } else {
                Action::Replay
            },
            *json,
            usize::MAX,
        ),
        DlqCommand::Purge { filter, yes, json } => (
            filter,
            if *yes { Action::Purge } else { Action::List },
            *json,
            usize::MAX,
        ),
    };
    let mut letters = Vec::new();
    let report = dead_letter::walk(
        connection,
        topology,
        &filter.to_filter(),
        action,
        |letter| {
            if letters.len() < limit {
                letters.push(letter.clone());
            }
        },
    )
    .await?;
    if json {
        print_json(&json!({"report": report, "letters": letters}))?;
    } else {
        print_letters(&letters, &workflow_names(settings).await);
        print_report(&command, &report);
    }
    if let DlqCommand::Purge { yes: false, .. } = command
        && report.matched > 0
    {
        bail!(
            "refusing to purge {} dead letter(s) without --yes",
            report.matched
        );
    }
    Ok(())
}

/// Workflow names by id, as `runs list` shows them.
async fn workflow_names(settings: &Settings) -> HashMap<String, String> {
    match db::pool(&settings.database) {
        Ok(pool) => workflows::names(&pool).await,
        Err(_) => HashMap::new(),
    }
}

fn print_letters(letters: &[dead_letter::Letter], workflow_names: &HashMap<String, String>) {
    if letters.is_empty() {
        return;
    }
    let rows = letters
        .iter()
        .map(|l| {
            vec![
                l.position.to_string(),
                l.dead_lettered_at
                    .and_then(|at| {
                        at.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default(),
                l.event_name.clone().unwrap_or_default(),
                l.user_id.clone().unwrap_or_default(),
                l.workflow_id
                    .as_ref()
                    .map(|id| workflow_names.get(id).unwrap_or(id).clone())
                    .unwrap_or_default(),
                l.provider_calls
                    .map(|calls| calls.to_string())
                    .unwrap_or_default(),
                l.reason.clone(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "#",
            "DEAD-LETTERED",
            "EVENT",
            "USER",
            "WORKFLOW",
            "ATTEMPTS",
            "REASON",
        ],
        &rows,
    );
    println!();
}

fn print_report(command: &DlqCommand, report: &dead_letter::Report) {
    let by_reason: Vec<String> = report
        .by_reason
        .iter()
        .map(|(reason, count)| format!("{reason}: {count}"))
        .collect();
    let summary = if by_reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_reason.join(", "))
    };
    let line = match command {
        DlqCommand::List { .. } => format!("{} dead letter(s) match{summary}", report.matched),
        DlqCommand::Replay { dry_run: true, .. } => {
            format!("would replay {} dead letter(s){summary}", report.matched)
        }
        DlqCommand::Replay { .. } => format!("replayed {} dead letter(s){summary}", report.moved),
        DlqCommand::Purge { yes: true, .. } => {
            format!("purged {} dead letter(s){summary}", report.purged)
        }
        DlqCommand::Purge { .. } => format!("{} dead letter(s) match{summary}", report.matched),
    };
    println!(
        "{line}; {} scanned, the others left in place",
        report.scanned
    );
}

/// A one-shot connection to the broker and the topology the workers use.
pub(super) async fn broker_session(
    settings: &Settings,
    name: &str,
) -> anyhow::Result<(lapin::Connection, Topology)> {
    broker::operator_session(settings, name)
        .await
        .map_err(anyhow::Error::msg)
}
