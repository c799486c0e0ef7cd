//! `appevents history prune`: one pass over the run history, for those who run it from cron
//! rather than (or beside) the workers' own passes.

use clap::Subcommand;

use crate::config::Settings;
use crate::store::history::{self, PruneOutcome};

#[derive(Debug, Subcommand)]
pub(super) enum HistoryCommand {
    /// Drop history older than history.retention (its event ids become new events) and
    /// create the coming days' partitions. Safe beside running workers.
    Prune,
}

pub(super) async fn run(settings: &Settings, command: HistoryCommand) -> anyhow::Result<()> {
    match command {
        HistoryCommand::Prune => prune(settings).await,
    }
}

async fn prune(settings: &Settings) -> anyhow::Result<()> {
    match history::prune(&settings.database, settings.history.retention).await? {
        PruneOutcome::Busy => println!("another process is pruning the run history; nothing done"),
        PruneOutcome::Pruned(pruned) => {
            println!(
                "older than {}: {} keys deleted, {} partitions dropped{}; {} partitions created ahead",
                humantime::format_duration(settings.history.retention),
                pruned.keys,
                pruned.partitions.len(),
                if pruned.partitions.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", pruned.partitions.join(", "))
                },
                pruned.created,
            );
        }
    }
    Ok(())
}
