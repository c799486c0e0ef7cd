//! `appevents connection`: a user's credentials for a provider account.

use clap::{Args, Subcommand};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use super::output::{print_json, print_table};
use crate::catalog::connections::{self, NewConnection};
use crate::config::Settings;
use crate::core::provider::Provider;
use crate::store::{db, vault};

#[derive(Debug, Subcommand)]
pub(super) enum ConnectionCommand {
    /// Store a user's credentials for a provider account. Prints the id.
    Create(ConnectionArgs),
    /// Connections without their secrets, with their status (active / needs_reauth).
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replace a connection's URL and credentials (the user reconnected the account); it
    /// becomes active again. Its subscriptions stay bound to it.
    Update {
        id: Uuid,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Delete a connection and the subscriptions bound to it.
    Delete { id: Uuid },
    /// Re-encrypt every stored secret under the active key (after adding a new key).
    RotateKey,
}

#[derive(Debug, Args)]
pub(super) struct ConnectionArgs {
    #[arg(long)]
    user: String,
    #[arg(long)]
    provider: Provider,
    /// API base: the Salesforce instance URL, https://api.hubapi.com, or an HTTP endpoint.
    #[arg(long)]
    base_url: String,
    #[arg(long)]
    access_token: Option<String>,
    #[arg(long, requires = "token_url")]
    refresh_token: Option<String>,
    /// OAuth token endpoint used to refresh the access token.
    #[arg(long, requires = "refresh_token")]
    token_url: Option<String>,
    #[arg(long)]
    client_id: Option<String>,
    #[arg(long)]
    client_secret: Option<String>,
    /// Salesforce REST API version for this connection, e.g. v62.0.
    #[arg(long)]
    api_version: Option<String>,
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(settings: &Settings, command: ConnectionCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        ConnectionCommand::Create(args) => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let json = args.json;
            let id = connections::create(pool, &keyring, &args.into_new()).await?;
            if json {
                return print_json(&json!({"id": id}));
            }
            println!("{id}");
        }
        ConnectionCommand::Update {
            id,
            connection: args,
        } => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            connections::replace(pool, &keyring, id, &args.into_new()).await?;
            println!("{id}");
        }
        ConnectionCommand::List { user, json } => {
            let list = connections::list(pool, user.as_deref()).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|c| {
                    let status = match &c.status_reason {
                        Some(reason) => format!("{} ({reason})", c.status.as_str()),
                        None => c.status.as_str().to_owned(),
                    };
                    vec![
                        c.id.to_string(),
                        c.user_id.clone(),
                        c.provider.to_string(),
                        c.base_url.clone(),
                        if c.has_refresh_token { "yes" } else { "no" }.to_owned(),
                        status,
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &[
                    "ID",
                    "USER",
                    "PROVIDER",
                    "BASE URL",
                    "REFRESHABLE",
                    "STATUS",
                ],
                &rows,
            );
        }
        ConnectionCommand::Delete { id } => {
            connections::delete(pool, id, None).await?;
            println!("deleted");
        }
        ConnectionCommand::RotateKey => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let changed = connections::rotate_key(pool, &keyring).await?;
            println!(
                "re-encrypted {changed} connection(s) under key {}",
                keyring.active_key_id()
            );
        }
    }
    Ok(())
}

impl ConnectionArgs {
    fn into_new(self) -> NewConnection {
        let mut connection_settings = serde_json::Map::new();
        if let Some(version) = &self.api_version {
            connection_settings.insert("api_version".into(), json!(version));
        }
        NewConnection {
            user_id: self.user,
            provider: self.provider,
            base_url: self.base_url,
            settings: Value::Object(connection_settings),
            access_token: self.access_token.map(SecretString::from),
            refresh_token: self.refresh_token.map(SecretString::from),
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret: self.client_secret.map(SecretString::from),
        }
    }
}
