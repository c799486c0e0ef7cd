//! `appevents app-event`: define app events, rename them (keeping aliases), set their
//! payload check.

use anyhow::bail;
use clap::Subcommand;

use super::output::{json_arg, print_json, print_table};
use crate::catalog::app_events::{self, AppEventChanges};
use crate::config::Settings;
use crate::core::payload_check::Mode;
use crate::store::db;

#[derive(Debug, Subcommand)]
pub(super) enum AppEventCommand {
    /// Define an app event.
    Create {
        /// The app event's name, e.g. "Contact Created"; unique, with its aliases.
        #[arg(long)]
        name: String,
        /// Example payload: JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        schema: String,
        /// Check live events' payloads against the example: off, warn (log and count) or
        /// reject (dead-letter).
        #[arg(long, value_name = "off|warn|reject", default_value = "off")]
        payload_check: Mode,
        #[arg(long)]
        json: bool,
    },
    /// App events with their aliases and payload check.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Rename (workflows stay attached, the old name stays an alias), replace the example
    /// payload, set the payload check, remove aliases.
    Update {
        /// Current name or id.
        event: String,
        /// New name; events published under the current one keep matching (an alias).
        #[arg(long)]
        name: Option<String>,
        /// New example payload: JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        schema: Option<String>,
        /// Check live payloads against the example: off (default), warn or reject.
        #[arg(long, value_name = "off|warn|reject")]
        payload_check: Option<Mode>,
        /// Stop matching events published under this old name; repeatable.
        #[arg(long = "remove-alias", value_name = "ALIAS")]
        remove_aliases: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete an app event no workflow uses.
    Delete { event: String },
}

pub(super) async fn run(settings: &Settings, command: AppEventCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        AppEventCommand::Create {
            name,
            schema,
            payload_check,
            json,
        } => {
            let schema = json_arg(&schema, "--schema")?;
            let created = app_events::create(pool, &name, &schema, payload_check).await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        AppEventCommand::List { json } => {
            let events = app_events::list(pool).await?;
            if json {
                return print_json(&events);
            }
            let rows = events
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        e.name.clone(),
                        e.aliases.join(", "),
                        e.payload_check.to_string(),
                        e.schema.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &["ID", "NAME", "ALIASES", "PAYLOAD CHECK", "EXAMPLE PAYLOAD"],
                &rows,
            );
        }
        AppEventCommand::Update {
            event,
            name,
            schema,
            payload_check,
            remove_aliases,
            json,
        } => {
            let changes = AppEventChanges {
                schema: schema.map(|s| json_arg(&s, "--schema")).transpose()?,
                name,
                payload_check,
                remove_aliases,
            };
            if changes.is_empty() {
                bail!(
                    "nothing to update: give --name, --schema, --payload-check or --remove-alias"
                );
            }
            let updated = app_events::update(pool, &event, &changes).await?;
            if json {
                return print_json(&updated);
            }
            println!("{}", updated.id);
        }
        AppEventCommand::Delete { event } => {
            app_events::delete(pool, &event).await?;
            println!("deleted");
        }
    }
    Ok(())
}
