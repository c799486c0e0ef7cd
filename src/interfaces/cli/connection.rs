//! `appevents connection`: a user's credentials for a provider account.

use clap::{Args, Subcommand};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use super::output::{print_json, print_table};
use crate::catalog::connections::{self, ConnectionPatch, NewConnection};
use crate::config::Settings;
use crate::config::rate_limit::{LimitOrNone, RateLimit};
use crate::core::provider::Provider;
use crate::store::{db, vault};

#[derive(Debug, Subcommand)]
pub(super) enum ConnectionCommand {
    /// Store a user's credentials for a provider account. Prints the id.
    Create(ConnectionArgs),
    /// Connections without their secrets, with their status (active / needs_reauth).
    List {
        /// Only this user's connections.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change a connection: only the options given change, the rest (a stored token
    /// above all) stays. New tokens make a connection that needs re-authorisation active
    /// again. Its subscriptions stay bound to it.
    Update {
        id: Uuid,
        #[command(flatten)]
        changes: PatchArgs,
    },
    /// Delete a connection and the subscriptions bound to it.
    Delete { id: Uuid },
    /// Re-encrypt every stored secret under the active key (after adding a new key).
    RotateKey,
}

#[derive(Debug, Args)]
pub(super) struct ConnectionArgs {
    /// The product's end user whose account this is.
    #[arg(long)]
    user: String,
    /// salesforce, hubspot or http.
    #[arg(long)]
    provider: Provider,
    /// API base: the Salesforce instance URL, https://api.hubapi.com, or an HTTP endpoint.
    #[arg(long)]
    base_url: String,
    /// The token sent as `Authorization: Bearer …`.
    #[arg(long)]
    access_token: Option<String>,
    /// OAuth refresh token, used when the access token expires.
    #[arg(long, requires = "token_url")]
    refresh_token: Option<String>,
    /// OAuth token endpoint used to refresh the access token.
    #[arg(long, requires = "refresh_token")]
    token_url: Option<String>,
    /// OAuth client id sent with a refresh.
    #[arg(long)]
    client_id: Option<String>,
    /// OAuth client secret sent with a refresh.
    #[arg(long)]
    client_secret: Option<String>,
    /// Salesforce REST API version for this connection, e.g. v62.0.
    #[arg(long)]
    api_version: Option<String>,
    /// This account's rate limit across the fleet, e.g. 100/10s, instead of the provider's
    /// default (rate_limits.*) and what HubSpot's headers say.
    #[arg(long, allow_hyphen_values = true)]
    rate_limit: Option<RateLimit>,
    #[arg(long)]
    json: bool,
}

/// What `connection update` may change; every option is optional.
#[derive(Debug, Args)]
pub(super) struct PatchArgs {
    /// New API base URL.
    #[arg(long)]
    base_url: Option<String>,
    /// New access token (the stored one is kept when this is not given).
    #[arg(long)]
    access_token: Option<String>,
    /// New OAuth refresh token (a token URL must be stored or given).
    #[arg(long)]
    refresh_token: Option<String>,
    /// New OAuth token endpoint.
    #[arg(long)]
    token_url: Option<String>,
    /// New OAuth client id.
    #[arg(long)]
    client_id: Option<String>,
    /// New OAuth client secret.
    #[arg(long)]
    client_secret: Option<String>,
    /// New Salesforce REST API version, e.g. v62.0.
    #[arg(long)]
    api_version: Option<String>,
    /// The account's own rate limit, e.g. 100/10s; "none" goes back to the provider's
    /// default.
    #[arg(long, allow_hyphen_values = true)]
    rate_limit: Option<LimitOrNone>,
}

pub(super) async fn run(settings: &Settings, command: ConnectionCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        ConnectionCommand::Create(args) => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let json = args.json;
            let limit = args.rate_limit;
            let id = connections::create(pool, &keyring, &args.into_new()).await?;
            if limit.is_some() {
                connections::set_rate_limit(pool, id, None, limit).await?;
            }
            if json {
                return print_json(&json!({"id": id}));
            }
            println!("{id}");
        }
        ConnectionCommand::Update { id, changes } => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let limit = changes.rate_limit;
            let patch = changes.into_patch();
            // A new limit alone is a change; nothing at all is refused by `patch`.
            if limit.is_none() || !patch.is_empty() {
                connections::patch(pool, &keyring, id, patch).await?;
            }
            if let Some(LimitOrNone(limit)) = limit {
                connections::set_rate_limit(pool, id, None, limit).await?;
            }
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
                        yes_no(c.has_access_token),
                        yes_no(c.has_refresh_token),
                        status,
                        limit_shown(settings, c),
                        usage_shown(c),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &[
                    "ID",
                    "USER",
                    "PROVIDER",
                    "BASE URL",
                    "TOKEN",
                    "REFRESHABLE",
                    "STATUS",
                    "LIMIT",
                    "USAGE",
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

/// The limit the fleet holds the account to, and where it comes from.
fn limit_shown(settings: &Settings, c: &connections::ConnectionSummary) -> String {
    if let Some(own) = &c.rate_limit {
        return own.clone();
    }
    if let Some(learned) = &c.learned_rate_limit {
        return format!("{learned} (learned)");
    }
    match settings.rate_limits.default_for(c.provider.as_str()) {
        Ok(Some(limit)) => format!("{limit} (default)"),
        _ => "none".to_owned(),
    }
}

/// What the provider last said of the account's usage.
fn usage_shown(c: &connections::ConnectionSummary) -> String {
    match (&c.api_usage, c.rate_limit_remaining) {
        (Some(usage), _) => format!("api-usage {usage}"),
        (None, Some(remaining)) => format!("{remaining} left"),
        (None, None) => "-".to_owned(),
    }
}

fn yes_no(set: bool) -> String {
    if set { "yes" } else { "no" }.to_owned()
}

impl PatchArgs {
    fn into_patch(self) -> ConnectionPatch {
        ConnectionPatch {
            base_url: self.base_url,
            api_version: self.api_version,
            access_token: self.access_token.map(SecretString::from),
            refresh_token: self.refresh_token.map(SecretString::from),
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret: self.client_secret.map(SecretString::from),
        }
    }
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
