//! An end user connects an account (OAuth authorization code with PKCE), and disconnects it.
//!
//! - [`Connector::begin`]: a nonce and a PKCE pair; the nonce and verifier are stored (bound
//!   to the user, the provider and the browser session), and the browser is sent to the
//!   provider with the signed state and the challenge.
//! - [`Connector::finish`]: the callback. The state's signature, expiry and provider are
//!   checked, then the stored authorization is taken (once) for that user and session; the
//!   code is exchanged with the verifier, the account identified, and the connection stored
//!   encrypted: new, or the user's existing one given new credentials in place (so its
//!   subscriptions stay). Nothing is stored unless every step succeeded.
//! - [`Connector::disconnect`]: the tokens are revoked at the provider, then the connection
//!   and its subscriptions are deleted. A revoke that fails deletes nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use secrecy::SecretBox;
use serde_json::json;
use uuid::Uuid;

use crate::catalog::authorizations::{self, NewAuthorization, Taken};
use crate::catalog::connections::{self, NewConnection, Stored};
use crate::config::Settings;
use crate::core::authorization::{Pkce, RandomError, State, StateError, random_token};
use crate::core::provider::Provider;
use crate::integrations::connect::{Account, OAuthProviders, Revocation};
use crate::integrations::{Integrations, SetupError};
use crate::store::db::StoreError;
use crate::store::vault::Keyring;

/// What the provider's redirect back carried.
#[derive(Debug, Default, Clone)]
pub struct Callback {
    pub state: Option<String>,
    pub code: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// Whose browser is calling: the session's user and its cookie's digest.
pub struct Caller<'a> {
    pub user: &'a str,
    pub session_digest: &'a [u8],
}

/// An account connected.
#[derive(Debug)]
pub struct Connected {
    pub connection_id: Uuid,
    pub account: Account,
    pub stored: Stored,
}

/// Why connecting or disconnecting did not happen. Each is a clear message for the page;
/// none carries a token, a code or a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0} cannot be connected here: its OAuth app is not configured")]
    NotConfigured(Provider),
    #[error("the authorization cannot be trusted: {0}")]
    State(#[from] StateError),
    #[error("the authorization was used already, or was not started here: connect again")]
    StateUsed,
    #[error(
        "the authorization was started in another browser session: connect again from the portal"
    )]
    OtherSession,
    #[error("the authorization was started for another user")]
    OtherUser,
    #[error("access was not granted at {provider}: {description}")]
    Denied {
        provider: Provider,
        description: String,
    },
    #[error("{provider} answered with an error: {error}")]
    ProviderError { provider: Provider, error: String },
    #[error("{0} sent no authorization code")]
    NoCode(Provider),
    #[error("{provider} refused the authorization code: {failure}")]
    Exchange { provider: Provider, failure: String },
    #[error("the {provider} account could not be read: {failure}")]
    Account { provider: Provider, failure: String },
    #[error("{provider} could not revoke the tokens, so the connection is kept: {failure}")]
    Revoke { provider: Provider, failure: String },
    #[error("no such connection of this user")]
    NoConnection,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// The purpose the state's signing key is derived for, from the vault's active key.
const STATE_KEY_PURPOSE: &str = "appevents/oauth-state/v1";

/// Connects and disconnects accounts.
pub struct Connector {
    pool: Pool,
    keyring: Arc<Keyring>,
    integrations: Arc<Integrations>,
    providers: OAuthProviders,
    state_key: SecretBox<[u8; 32]>,
    ttl: Duration,
}

impl Connector {
    /// A connector for the configured OAuth apps, with its own HTTP clients.
    pub fn from_settings(
        settings: &Settings,
        pool: Pool,
        keyring: Arc<Keyring>,
    ) -> Result<Connector, SetupError> {
        let integrations = Integrations::new(&settings.http, &settings.salesforce)?;
        let state_key = keyring.derive(STATE_KEY_PURPOSE);
        Ok(Connector {
            pool,
            keyring,
            integrations: Arc::new(integrations),
            providers: OAuthProviders::new(&settings.oauth),
            state_key,
            ttl: settings.portal.authorization_ttl,
        })
    }

    /// Whether users can connect `provider` here: its OAuth app is configured.
    pub fn can_connect(&self, provider: Provider) -> bool {
        self.providers.app(provider).is_some()
    }

    /// The origins of the providers' authorize pages: where the portal's forms may lead.
    pub fn authorize_origins(&self) -> Vec<String> {
        self.providers.authorize_origins()
    }

    /// Starts an authorization: returns the provider's authorize URL to send the browser to.
    #[tracing::instrument(skip_all, fields(user_id = caller.user, provider = %provider))]
    pub async fn begin(
        &self,
        caller: &Caller<'_>,
        provider: Provider,
    ) -> Result<String, ConnectError> {
        if self.providers.app(provider).is_none() {
            return Err(ConnectError::NotConfigured(provider));
        }
        let nonce = random_token(32)?;
        let pkce = if self.providers.uses_pkce(provider) {
            Some(Pkce::new()?)
        } else {
            None
        };
        authorizations::store(
            &self.pool,
            &self.keyring,
            &NewAuthorization {
                nonce: &nonce,
                user: caller.user,
                provider,
                session_digest: caller.session_digest,
                verifier: pkce.as_ref().map(|p| &p.verifier),
                ttl: self.ttl,
            },
        )
        .await?;
        let state = State {
            provider,
            nonce,
            user: caller.user.to_owned(),
            expires_at: now() + self.ttl.as_secs(),
        }
        .sign(&self.state_key);
        let url = self
            .providers
            .authorize_url(
                provider,
                &state,
                pkce.as_ref().map(|p| p.challenge.as_str()),
            )
            .map_err(|_| ConnectError::NotConfigured(provider))?;
        tracing::info!(pkce = pkce.is_some(), "authorization started");
        Ok(url)
    }

    /// Finishes an authorization from the provider's redirect back.
    #[tracing::instrument(skip_all, fields(user_id = caller.user, provider = %provider))]
    pub async fn finish(
        &self,
        caller: &Caller<'_>,
        provider: Provider,
        callback: &Callback,
    ) -> Result<Connected, ConnectError> {
        let state_text = callback.state.as_deref().ok_or(StateError::Malformed)?;
        let state = State::verify(state_text, provider, &self.state_key, now())?;
        if state.user != caller.user {
            return Err(ConnectError::OtherUser);
        }
        let taken = authorizations::take(
            &self.pool,
            &self.keyring,
            &state.nonce,
            &state.user,
            provider,
            caller.session_digest,
        )
        .await?;
        let verifier = match taken {
            Taken::Found { verifier } => verifier,
            Taken::OtherSession => return Err(ConnectError::OtherSession),
            Taken::Missing => return Err(ConnectError::StateUsed),
        };
        refused_at_provider(provider, callback)?;
        let code = callback
            .code
            .as_deref()
            .filter(|code| !code.is_empty())
            .ok_or(ConnectError::NoCode(provider))?;
        let grant = self
            .providers
            .exchange(&self.integrations, provider, code, verifier.as_ref())
            .await
            .map_err(|failure| ConnectError::Exchange {
                provider,
                failure: failure.summary(),
            })?;
        let account = self
            .providers
            .identify(&self.integrations, provider, &grant)
            .await
            .map_err(|failure| ConnectError::Account {
                provider,
                failure: failure.summary(),
            })?;
        let app = self
            .providers
            .app(provider)
            .ok_or(ConnectError::NotConfigured(provider))?;
        // What the worker's refresh needs, exactly as for a connection posted by the API;
        // without a refresh token there is nothing to refresh with.
        let token_url = grant
            .refresh_token
            .as_ref()
            .map(|_| self.providers.token_url(provider));
        let new = NewConnection {
            user_id: state.user.clone(),
            provider,
            base_url: account.base_url.clone(),
            settings: json!({"account": account.label, "account_id": account.id}),
            access_token: Some(grant.access_token),
            refresh_token: grant.refresh_token,
            token_url,
            client_id: Some(app.client_id.clone()),
            client_secret: Some(app.client_secret.clone()),
        };
        let (connection_id, stored) =
            connections::connect_account(&self.pool, &self.keyring, &new).await?;
        tracing::info!(%connection_id, ?stored, "account connected");
        Ok(Connected {
            connection_id,
            account,
            stored,
        })
    }

    /// Revokes a connection's tokens at its provider, then deletes it and its
    /// subscriptions. If the provider could not revoke them, nothing is deleted.
    #[tracing::instrument(skip_all, fields(user_id = user, %connection_id))]
    pub async fn disconnect(
        &self,
        user: &str,
        connection_id: Uuid,
    ) -> Result<Revocation, ConnectError> {
        let connection = match connections::get(&self.pool, &self.keyring, connection_id).await {
            Ok(connection) if connection.user_id == user => connection,
            Ok(_) | Err(StoreError::NotFound(_)) => return Err(ConnectError::NoConnection),
            Err(err) => return Err(err.into()),
        };
        let provider = connection.provider;
        let revoked = self
            .providers
            .revoke(&self.integrations, &connection)
            .await
            .map_err(|failure| {
                tracing::warn!(error = %failure.summary(), "revoking failed; the connection is kept");
                ConnectError::Revoke {
                    provider,
                    failure: failure.summary(),
                }
            })?;
        connections::delete(&self.pool, connection_id, Some(user)).await?;
        tracing::info!(?revoked, "account disconnected");
        Ok(revoked)
    }
}

/// The provider's redirect said no: `error=access_denied` when the user declined, or
/// another error.
fn refused_at_provider(provider: Provider, callback: &Callback) -> Result<(), ConnectError> {
    let Some(error) = callback.error.as_deref() else {
        return Ok(());
    };
    let description = callback
        .error_description
        .clone()
        .unwrap_or_else(|| error.to_owned());
    if error == "access_denied" {
        return Err(ConnectError::Denied {
            provider,
            description,
        });
    }
    Err(ConnectError::ProviderError {
        provider,
        error: format!("{error} ({description})"),
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
