//! Connecting an account (OAuth 2.0 authorization code with PKCE), as Salesforce and HubSpot
//! implement it: the authorize URL the browser is sent to, the code exchange, who the account
//! is, and revoking the tokens when the user disconnects.
//!
//! - Salesforce: `{login}/services/oauth2/authorize|token|revoke`; the token answer carries
//!   the account's `instance_url` (the connection's base URL) and `id`, its identity URL.
//! - HubSpot: `app.hubspot.com/oauth/authorize`, `{api}/oauth/v1/token`; the account (the
//!   hub) comes from `{api}/oauth/v1/access-tokens/{token}`; disconnecting deletes the
//!   refresh token (`DELETE {api}/oauth/v1/refresh-tokens/{token}`).
//!
//! No URL that carries a token is ever part of an error: reqwest's errors lose their URL.

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use super::{Integrations, classify, join_url, read_capped};
use crate::config::{OAuthApp, OAuthSettings};
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};
use crate::core::provider::Provider;

/// The providers an end user connects through OAuth, with their apps' settings.
#[derive(Debug, Clone)]
pub struct OAuthProviders {
    settings: OAuthSettings,
}

/// What the code exchange gave.
#[derive(Debug)]
pub struct Grant {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    /// Salesforce: the org's API host.
    instance_url: Option<String>,
    /// Salesforce: the identity URL of the user who approved.
    identity_url: Option<String>,
}

/// The account connected: where its API is and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub base_url: String,
    /// Salesforce: the org id; HubSpot: the hub (portal) id.
    pub id: String,
    /// What the user recognises it by: the Salesforce username, the HubSpot user and hub.
    pub label: String,
}

/// How a disconnect went at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Done,
    /// The provider no longer knew the token (revoked there already, or expired): it
    /// cannot be used, which is what revoking wants.
    AlreadyInvalid,
    /// The connection holds no token this provider revokes.
    NothingToRevoke,
}

impl OAuthProviders {
    pub fn new(settings: &OAuthSettings) -> OAuthProviders {
        OAuthProviders {
            settings: settings.clone(),
        }
    }

    /// The app of a provider users can connect: one with a client id.
    pub fn app(&self, provider: Provider) -> Option<&OAuthApp> {
        let app = match provider {
            Provider::Salesforce => &self.settings.salesforce.app,
            Provider::Hubspot => &self.settings.hubspot.app,
            Provider::Http => return None,
        };
        Some(app).filter(|app| !app.client_id.is_empty())
    }

    fn required(&self, provider: Provider) -> Result<&OAuthApp, Failure> {
        self.app(provider).ok_or_else(|| {
            Failure::new(
                FailureKind::Permanent,
                format!("{provider} cannot be connected: oauth.{provider}.client_id is not set"),
            )
        })
    }

    /// Where the browser goes to approve: the provider's authorize page.
    pub fn authorize_url(
        &self,
        provider: Provider,
        state: &str,
        challenge: Option<&str>,
    ) -> Result<String, Failure> {
        let app = self.required(provider)?;
        let endpoint = match provider {
            Provider::Salesforce => join_url(
                &self.settings.salesforce.login_url,
                "/services/oauth2/authorize",
            ),
            Provider::Hubspot | Provider::Http => self.settings.hubspot.authorize_url.clone(),
        };
        let mut url = Url::parse(&endpoint).map_err(|e| {
            Failure::new(
                FailureKind::Permanent,
                format!("authorize URL {endpoint:?}: {e}"),
            )
        })?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &app.client_id)
                .append_pair("redirect_uri", &app.redirect_url)
                .append_pair("scope", &app.scopes.join(" "))
                .append_pair("state", state);
            if let Some(challenge) = challenge {
                query
                    .append_pair("code_challenge", challenge)
                    .append_pair("code_challenge_method", "S256");
            }
        }
        Ok(url.into())
    }

    /// The origins (scheme, host, port) of the configured providers' authorize pages.
    pub fn authorize_origins(&self) -> Vec<String> {
        let endpoints = [
            (
                Provider::Salesforce,
                self.settings.salesforce.login_url.as_str(),
            ),
            (
                Provider::Hubspot,
                self.settings.hubspot.authorize_url.as_str(),
            ),
        ];
        let mut origins: Vec<String> = endpoints
            .into_iter()
            .filter(|(provider, _)| self.app(*provider).is_some())
            .filter_map(|(_, url)| Url::parse(url).ok())
            .map(|url| url.origin().ascii_serialization())
            .collect();
        origins.dedup();
        origins
    }

    /// Whether the provider's app is set to use PKCE.
    pub fn uses_pkce(&self, provider: Provider) -> bool {
        self.app(provider).is_some_and(|app| app.pkce)
    }

    /// The token endpoint: the code exchange, and later every refresh of the connection.
    pub fn token_url(&self, provider: Provider) -> String {
        match provider {
            Provider::Salesforce => join_url(
                &self.settings.salesforce.login_url,
                "/services/oauth2/token",
            ),
            Provider::Hubspot | Provider::Http => {
                join_url(&self.settings.hubspot.api_url, "/oauth/v1/token")
            }
        }
    }

    /// Exchanges the code the provider sent back for tokens (RFC 6749 §4.1.3): the
    /// client's secret always, the PKCE verifier when one was used.
    pub async fn exchange(
        &self,
        integrations: &Integrations,
        provider: Provider,
        code: &str,
        verifier: Option<&SecretString>,
    ) -> Result<Grant, Failure> {
        let app = self.required(provider)?;
        let mut form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.to_owned()),
            ("client_id", app.client_id.clone()),
            (
                "client_secret",
                app.client_secret.expose_secret().to_owned(),
            ),
            ("redirect_uri", app.redirect_url.clone()),
        ];
        if let Some(verifier) = verifier {
            form.push(("code_verifier", verifier.expose_secret().to_owned()));
        }
        let request = integrations
            .crm_client()
            .post(self.token_url(provider))
            .form(&form);
        let (status, body) = send(integrations, request).await?;
        if !(200..300).contains(&status) {
            return Err(classify::token_response(status, &Default::default(), &body));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            invalid(format!(
                "{provider}'s token endpoint answered without an access token"
            ))
        })?;
        Ok(Grant {
            access_token: SecretString::from(answer.access_token),
            refresh_token: answer.refresh_token.map(SecretString::from),
            instance_url: answer.instance_url,
            identity_url: answer.id,
        })
    }

    /// Who the connected account is, and where its API is.
    pub async fn identify(
        &self,
        integrations: &Integrations,
        provider: Provider,
        grant: &Grant,
    ) -> Result<Account, Failure> {
        match provider {
            Provider::Salesforce => salesforce_identity(integrations, grant).await,
            Provider::Hubspot | Provider::Http => {
                self.hubspot_identity(integrations, &grant.access_token)
                    .await
            }
        }
    }

    async fn hubspot_identity(
        &self,
        integrations: &Integrations,
        access_token: &SecretString,
    ) -> Result<Account, Failure> {
        let url = join_url(
            &self.settings.hubspot.api_url,
            &format!(
                "/oauth/v1/access-tokens/{}",
                super::encode_segment(access_token.expose_secret())
            ),
        );
        let (status, body) = send(integrations, integrations.crm_client().get(url)).await?;
        if !(200..300).contains(&status) {
            return Err(classify::response(
                Provider::Hubspot,
                status,
                &Default::default(),
                &body,
            ));
        }
        let info: HubspotTokenInfo = serde_json::from_slice(&body)
            .map_err(|_| invalid("HubSpot's token information has no hub_id".into()))?;
        let hub = id_text(&info.hub_id);
        let label = match (info.user, info.hub_domain) {
            (Some(user), Some(domain)) => format!("{user} ({domain}, hub {hub})"),
            (Some(user), None) => format!("{user} (hub {hub})"),
            (None, Some(domain)) => format!("{domain} (hub {hub})"),
            (None, None) => format!("hub {hub}"),
        };
        Ok(Account {
            base_url: self.settings.hubspot.api_url.clone(),
            id: hub,
            label,
        })
    }

    /// Revokes a connection's tokens at its provider: Salesforce's revoke endpoint (the
    /// refresh token, which takes its access tokens with it), HubSpot's refresh-token delete.
    pub async fn revoke(
        &self,
        integrations: &Integrations,
        connection: &Connection,
    ) -> Result<Revocation, Failure> {
        match connection.provider {
            Provider::Salesforce => self.revoke_salesforce(integrations, connection).await,
            Provider::Hubspot => self.revoke_hubspot(integrations, connection).await,
            Provider::Http => Ok(Revocation::NothingToRevoke),
        }
    }

    async fn revoke_salesforce(
        &self,
        integrations: &Integrations,
        connection: &Connection,
    ) -> Result<Revocation, Failure> {
        let Some(token) = connection
            .refresh_token
            .as_ref()
            .or(connection.access_token.as_ref())
        else {
            return Ok(Revocation::NothingToRevoke);
        };
        let url = join_url(
            &self.settings.salesforce.login_url,
            "/services/oauth2/revoke",
        );
        let request = integrations
            .crm_client()
            .post(url)
            .form(&[("token", token.expose_secret())]);
        let (status, body) = send(integrations, request).await?;
        match status {
            200..=299 => Ok(Revocation::Done),
            400 if error_code(&body).as_deref() == Some("invalid_token") => {
                Ok(Revocation::AlreadyInvalid)
            }
            _ => Err(classify::token_response(status, &Default::default(), &body)),
        }
    }

    async fn revoke_hubspot(
        &self,
        integrations: &Integrations,
        connection: &Connection,
    ) -> Result<Revocation, Failure> {
        let Some(token) = &connection.refresh_token else {
            return Ok(Revocation::NothingToRevoke);
        };
        let url = join_url(
            &self.settings.hubspot.api_url,
            &format!(
                "/oauth/v1/refresh-tokens/{}",
                super::encode_segment(token.expose_secret())
            ),
        );
        let (status, body) = send(integrations, integrations.crm_client().delete(url)).await?;
        match status {
            200..=299 => Ok(Revocation::Done),
            404 => Ok(Revocation::AlreadyInvalid),
            _ => Err(classify::response(
                Provider::Hubspot,
                status,
                &Default::default(),
                &body,
            )),
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    instance_url: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct SalesforceIdentity {
    organization_id: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct HubspotTokenInfo {
    hub_id: Value,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    hub_domain: Option<String>,
}

async fn salesforce_identity(
    integrations: &Integrations,
    grant: &Grant,
) -> Result<Account, Failure> {
    let instance_url = grant
        .instance_url
        .as_deref()
        .filter(|url| !url.is_empty())
        .ok_or_else(|| {
            invalid(
                "Salesforce's token answer has no instance_url: the org's API is unknown".into(),
            )
        })?;
    let base = Url::parse(instance_url)
        .map_err(|_| invalid("Salesforce's instance_url is not a URL".into()))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(invalid(
            "Salesforce's instance_url is not an http(s) URL".into(),
        ));
    }
    let identity_url = grant
        .identity_url
        .as_deref()
        .ok_or_else(|| invalid("Salesforce's token answer has no id (identity URL)".into()))?;
    let request = integrations
        .crm_client()
        .get(identity_url)
        .bearer_auth(grant.access_token.expose_secret());
    let (status, body) = send(integrations, request).await?;
    if !(200..300).contains(&status) {
        return Err(classify::response(
            Provider::Salesforce,
            status,
            &Default::default(),
            &body,
        ));
    }
    let identity: SalesforceIdentity = serde_json::from_slice(&body)
        .map_err(|_| invalid("Salesforce's identity answer has no organization_id".into()))?;
    let label = identity
        .username
        .or(identity.display_name)
        .unwrap_or_else(|| format!("org {}", identity.organization_id));
    Ok(Account {
        base_url: instance_url.trim_end_matches('/').to_owned(),
        id: identity.organization_id,
        label,
    })
}

/// Sends, and reads the answer whatever its status. A transport error keeps no URL.
async fn send(
    integrations: &Integrations,
    request: reqwest::RequestBuilder,
) -> Result<(u16, bytes::Bytes), Failure> {
    let response = request
        .send()
        .await
        .map_err(|e| classify::transport(&e.without_url()))?;
    let status = response.status().as_u16();
    let body = read_capped(response, integrations.max_response_bytes()).await?;
    Ok((status, body))
}

fn invalid(message: String) -> Failure {
    Failure::new(FailureKind::Permanent, message)
}

fn error_code(body: &[u8]) -> Option<String> {
    let json: Value = serde_json::from_slice(body).ok()?;
    json.get("error")?.as_str().map(str::to_owned)
}

/// HubSpot's ids are numbers in JSON; they are kept as text.
fn id_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
