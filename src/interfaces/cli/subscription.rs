//! `appevents subscription`: switch a workflow on or off for a user.

use clap::Subcommand;
use uuid::Uuid;

use super::output::{print_json, print_table};
use crate::catalog::subscriptions;
use crate::config::Settings;
use crate::store::db;

#[derive(Debug, Subcommand)]
pub(super) enum SubscriptionCommand {
    /// Switch a workflow on for a user (again: rebinds the connection).
    Create {
        /// The user switching the workflow on.
        #[arg(long)]
        user: String,
        /// The workflow's id.
        #[arg(long)]
        workflow: Uuid,
        /// One of the user's connections for the workflow's provider.
        #[arg(long)]
        connection: Uuid,
        #[arg(long)]
        json: bool,
    },
    List {
        /// Only this user's subscriptions.
        #[arg(long)]
        user: Option<String>,
        /// Only this workflow's subscriptions (its id).
        #[arg(long)]
        workflow: Option<Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// Switch a workflow off for a user.
    Delete {
        /// The user switching the workflow off.
        #[arg(long)]
        user: String,
        /// The workflow's id.
        #[arg(long)]
        workflow: Uuid,
    },
}

pub(super) async fn run(settings: &Settings, command: SubscriptionCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        SubscriptionCommand::Create {
            user,
            workflow,
            connection,
            json,
        } => {
            let created = subscriptions::create(pool, &user, workflow, connection).await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        SubscriptionCommand::List {
            user,
            workflow,
            json,
        } => {
            let list = subscriptions::list(pool, user.as_deref(), workflow).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.user_id.clone(),
                        s.workflow_id.to_string(),
                        s.workflow.clone(),
                        s.event.clone(),
                        s.connection_id.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(&["USER", "WORKFLOW", "NAME", "EVENT", "CONNECTION"], &rows);
        }
        SubscriptionCommand::Delete { user, workflow } => {
            subscriptions::delete(pool, &user, workflow).await?;
            println!("deleted");
        }
    }
    Ok(())
}
