//! A connection: one user's credentials for one provider account, as a value with its
//! secrets opened (in memory only). Stored, sealed, by `catalog::connections`; used by the
//! integrations to call the provider.

use secrecy::SecretString;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::core::failure::{Failure, FailureKind};
use crate::core::provider::Provider;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    Active,
    /// The refresh token was refused: the user must connect the account again.
    NeedsReauth,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Active => "active",
            ConnectionStatus::NeedsReauth => "needs_reauth",
        }
    }

    pub fn parse(text: &str) -> ConnectionStatus {
        match text {
            "needs_reauth" => ConnectionStatus::NeedsReauth,
            _ => ConnectionStatus::Active,
        }
    }
}

/// A connection with its secrets opened. `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub struct Connection {
    pub id: Uuid,
    pub user_id: String,
    pub provider: Provider,
    pub base_url: String,
    pub settings: Value,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub status: ConnectionStatus,
    pub status_reason: Option<String>,
}

impl Connection {
    /// A connection without credentials, to show or build a request against `base_url`.
    pub fn without_credentials(user_id: &str, provider: Provider, base_url: &str) -> Connection {
        Connection {
            id: Uuid::nil(),
            user_id: user_id.to_owned(),
            provider,
            base_url: base_url.to_owned(),
            settings: Value::Object(serde_json::Map::new()),
            access_token: None,
            refresh_token: None,
            token_url: None,
            client_id: None,
            client_secret: None,
            status: ConnectionStatus::Active,
            status_reason: None,
        }
    }

    /// The failure every run of a connection that needs re-authorisation ends with.
    pub fn needs_reauth(&self) -> Failure {
        let reason = self
            .status_reason
            .as_deref()
            .unwrap_or("the refresh token was refused");
        Failure::new(
            FailureKind::RevokedCredentials,
            format!("connection {} needs re-authorisation: {reason}", self.id),
        )
        .with_code("NEEDS_REAUTH")
    }
}
