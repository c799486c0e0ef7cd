//! The stand-in's OAuth side: both providers' authorize pages (approve or deny, as a person
//! would), the code exchange and refresh, who the account is, and revoking.
//!
//! Faithful to the real endpoints where appevents meets them:
//! - Salesforce, under the login host: `GET|POST /services/oauth2/authorize`,
//!   `POST /services/oauth2/token` (no `expires_in`; `instance_url` and `id`, the identity
//!   URL; errors `{"error","error_description"}`: `invalid_grant` for a reused or unknown
//!   code, `redirect_uri_mismatch`, `invalid_client_id`, `invalid_client`), `GET /id/{org}/{user}`,
//!   `POST /services/oauth2/revoke` (200, or 400 `invalid_token`). Denying redirects with
//!   `error=access_denied`.
//! - HubSpot: `GET|POST /oauth/authorize` (the app.hubspot.com page), `POST /oauth/v1/token`
//!   (`expires_in` 1800, `hub_id`; errors carry `status` such as `BAD_AUTH_CODE` as well as
//!   `error`), `GET /oauth/v1/access-tokens/{token}`, `DELETE /oauth/v1/refresh-tokens/{token}`
//!   (204). Denying sends the browser nowhere, as HubSpot documents, unless told to redirect.
//! - Both: the redirect URI must be one the client registered, exactly, at the authorize page
//!   (else an error page, no redirect) and again at the exchange; a code works once; a PKCE
//!   challenge given at the authorize page needs its S256 verifier at the exchange.
//!
//! Two clients are known from the start (`standin-salesforce-app`, `standin-hubspot-app`,
//! calling back to `http://127.0.0.1:8080` or `http://localhost:8080`); tests register
//! their own with `POST /_standin/oauth`.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Standin, reply};

/// An OAuth client (a connected app, a HubSpot app) the stand-in knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OAuthClient {
    /// `salesforce` or `hubspot`.
    pub provider: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
}

/// How the stand-in's OAuth side behaves; `POST /_standin/oauth`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OAuthSettings {
    /// Clients to know besides the built-in two.
    #[serde(default)]
    pub clients: Vec<OAuthClient>,
    /// Salesforce's token answer leaves out `instance_url`.
    #[serde(default)]
    pub omit_instance_url: bool,
    /// A HubSpot denial redirects with `error=access_denied` (RFC 6749) instead of nothing.
    #[serde(default)]
    pub hubspot_deny_redirects: bool,
    /// Revoking answers with this status (and the provider's error body) instead of working.
    #[serde(default)]
    pub fail_revoke: Option<u16>,
}

/// An account someone approved access to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub provider: String,
    /// Salesforce: the org id; HubSpot: the hub id.
    pub id: String,
    /// Salesforce: the user id; HubSpot: the user's number.
    pub user_id: String,
    /// Who logged in to approve.
    pub login: String,
}

struct Code {
    provider: String,
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scope: String,
    account: Account,
}

#[derive(Default)]
pub(crate) struct OAuth {
    settings: OAuthSettings,
    codes: HashMap<String, Code>,
    /// Access tokens issued here, to their accounts.
    pub(crate) access: HashMap<String, Account>,
    /// Refresh tokens issued here, to their accounts and clients.
    refresh: HashMap<String, (Account, String)>,
    /// Tokens revoked: refused from then on.
    pub(crate) revoked: HashSet<String>,
    accounts: BTreeMap<(String, String), Account>,
    issued: u64,
}

fn built_in_clients() -> Vec<OAuthClient> {
    let callbacks = |provider: &str| {
        ["http://127.0.0.1:8080", "http://localhost:8080"]
            .iter()
            .map(|host| format!("{host}/portal/oauth/{provider}/callback"))
            .collect()
    };
    vec![
        OAuthClient {
            provider: "salesforce".into(),
            client_id: "standin-salesforce-app".into(),
            client_secret: "standin-salesforce-secret".into(),
            redirect_uris: callbacks("salesforce"),
        },
        OAuthClient {
            provider: "hubspot".into(),
            client_id: "standin-hubspot-app".into(),
            client_secret: "standin-hubspot-secret".into(),
            redirect_uris: callbacks("hubspot"),
        },
    ]
}

impl OAuth {
    pub(crate) fn configure(&mut self, settings: OAuthSettings) {
        self.settings = settings;
    }

    fn client(&self, provider: &str, client_id: &str) -> Option<OAuthClient> {
        built_in_clients()
            .into_iter()
            .chain(self.settings.clients.iter().cloned())
            .find(|c| c.provider == provider && c.client_id == client_id)
    }

    /// The client an authorize request names, if its redirect URI is one the client
    /// registered; else the provider's error page (it sends the browser nowhere).
    fn registered(
        &self,
        provider: &str,
        request: &Authorize,
    ) -> Result<OAuthClient, Box<Response>> {
        let Some(client) = self.client(provider, &request.client_id) else {
            return Err(Box::new(error_page(
                provider,
                "invalid_client_id",
                "client identifier invalid",
            )));
        };
        if !client.redirect_uris.contains(&request.redirect_uri) {
            return Err(Box::new(error_page(
                provider,
                "redirect_uri_mismatch",
                "redirect_uri must match configuration",
            )));
        }
        Ok(client)
    }

    fn account(&mut self, provider: &str, login: &str) -> Account {
        let next = self.accounts.len() as u64 + 1;
        self.accounts
            .entry((provider.to_owned(), login.to_owned()))
            .or_insert_with(|| match provider {
                "salesforce" => Account {
                    provider: provider.into(),
                    id: format!("00D{next:015}"),
                    user_id: format!("005{next:015}"),
                    login: login.to_owned(),
                },
                _ => Account {
                    provider: provider.into(),
                    id: (7_000_000 + next).to_string(),
                    user_id: (290_000 + next).to_string(),
                    login: login.to_owned(),
                },
            })
            .clone()
    }

    fn token(&mut self, kind: &str) -> String {
        self.issued += 1;
        format!("standin-{kind}-{}-{:016x}", self.issued, fastrand::u64(..))
    }

    /// A new access and refresh token for an account.
    fn issue(&mut self, account: &Account, client_id: &str) -> (String, String) {
        let access = self.token("access");
        let refresh = self.token("refresh");
        self.access.insert(access.clone(), account.clone());
        self.refresh
            .insert(refresh.clone(), (account.clone(), client_id.to_owned()));
        (access, refresh)
    }
}

/// The parameters of an authorize request, in its query and again in the decision form.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Authorize {
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    redirect_uri: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    code_challenge: Option<String>,
    #[serde(default)]
    code_challenge_method: Option<String>,
    /// The decision form's: `approve` or `deny`.
    #[serde(default)]
    decision: Option<String>,
    /// The decision form's: who logs in.
    #[serde(default)]
    login: Option<String>,
}

fn provider_name(provider: &str) -> &'static str {
    if provider == "salesforce" {
        "Salesforce"
    } else {
        "HubSpot"
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>\
         body{{font-family:system-ui,sans-serif;background:#eef1f6;margin:0;color:#1d2433}}\
         main{{max-width:420px;margin:48px auto;background:#fff;border-radius:10px;padding:24px;border:1px solid #d6dbe4}}\
         h1{{font-size:1.3rem}} label{{display:block;margin:12px 0 4px}} input[type=text]{{width:100%;padding:8px;box-sizing:border-box}}\
         .buttons{{display:flex;gap:10px;margin-top:18px}} button{{padding:8px 16px;border-radius:6px;border:1px solid #aab;font:inherit}}\
         #approve{{background:#2f5bea;color:#fff;border-color:#2f5bea}} .tag{{color:#5b6475;font-size:.85rem}}\
         </style></head><body><main><p class=\"tag\">stand-in</p>{body}</main></body></html>"
    )
}

fn error_page(provider: &str, error: &str, description: &str) -> Response {
    let body = format!(
        "<h1>{} could not authorize this app</h1><p id=\"error\">{}: {}</p>",
        provider_name(provider),
        escape(error),
        escape(description)
    );
    (
        StatusCode::BAD_REQUEST,
        Html(page("Authorization error", &body)),
    )
        .into_response()
}

/// `GET` an authorize page: check the client and redirect URI, then ask.
pub(crate) async fn authorize_page(
    State(standin): State<Standin>,
    provider: &'static str,
    Query(request): Query<Authorize>,
) -> Response {
    let provider = provider.to_owned();
    let client = match standin.lock().oauth.registered(&provider, &request) {
        Ok(client) => client,
        Err(page) => return *page,
    };
    let hidden = |name: &str, value: &str| {
        format!(
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            escape(value)
        )
    };
    let mut fields = String::new();
    fields += &hidden("client_id", &request.client_id);
    fields += &hidden("redirect_uri", &request.redirect_uri);
    fields += &hidden("scope", &request.scope);
    for (name, value) in [
        ("state", &request.state),
        ("code_challenge", &request.code_challenge),
        ("code_challenge_method", &request.code_challenge_method),
    ] {
        if let Some(value) = value {
            fields += &hidden(name, value);
        }
    }
    let body = format!(
        "<h1>Allow access to your {name} account?</h1>\
         <p><strong>{client}</strong> asks for: {scope}</p>\
         <form method=\"post\">{fields}\
         <label for=\"login\">Logged in as</label>\
         <input type=\"text\" id=\"login\" name=\"login\" value=\"ada@example.com\">\
         <div class=\"buttons\">\
         <button type=\"submit\" id=\"approve\" name=\"decision\" value=\"approve\">Allow</button>\
         <button type=\"submit\" id=\"deny\" name=\"decision\" value=\"deny\">Deny</button>\
         </div></form>",
        name = provider_name(&provider),
        client = escape(&client.client_id),
        scope = escape(&request.scope),
    );
    Html(page(
        &format!("{} authorization", provider_name(&provider)),
        &body,
    ))
    .into_response()
}

/// `POST` the decision: approve (a code, back to the app) or deny.
pub(crate) async fn decide(
    State(standin): State<Standin>,
    provider: &'static str,
    Form(request): Form<Authorize>,
) -> Response {
    let provider = provider.to_owned();
    let mut inner = standin.lock();
    let oauth = &mut inner.oauth;
    if let Err(page) = oauth.registered(&provider, &request) {
        return *page;
    }
    let mut back = vec![];
    if request.decision.as_deref() != Some("approve") {
        if provider == "hubspot" && !oauth.settings.hubspot_deny_redirects {
            let body =
                "<h1>Access was not granted</h1><p id=\"denied\">You can close this tab.</p>";
            return Html(page("Not granted", body)).into_response();
        }
        back.push(("error", "access_denied".to_owned()));
        back.push((
            "error_description",
            "end-user denied authorization".to_owned(),
        ));
    } else {
        let login = request
            .login
            .clone()
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| "ada@example.com".into());
        let account = oauth.account(&provider, login.trim());
        let code = oauth.token("code");
        if request
            .code_challenge_method
            .as_deref()
            .is_some_and(|m| m != "S256")
        {
            return error_page(
                &provider,
                "invalid_request",
                "code_challenge_method must be S256",
            );
        }
        oauth.codes.insert(
            code.clone(),
            Code {
                provider: provider.clone(),
                client_id: request.client_id.clone(),
                redirect_uri: request.redirect_uri.clone(),
                challenge: request.code_challenge.clone(),
                scope: request.scope.clone(),
                account,
            },
        );
        back.push(("code", code));
    }
    if let Some(state) = &request.state {
        back.push(("state", state.clone()));
    }
    let query = serde_urlencoded(&back);
    let separator = if request.redirect_uri.contains('?') {
        '&'
    } else {
        '?'
    };
    Redirect::to(&format!("{}{separator}{query}", request.redirect_uri)).into_response()
}

fn serde_urlencoded(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A token endpoint error in the provider's shape.
fn token_error(provider: &str, error: &str, description: &str, status: &str) -> Response {
    let body = if provider == "salesforce" {
        json!({"error": error, "error_description": description})
    } else {
        json!({"status": status, "message": description, "error": error, "error_description": description, "correlationId": "00000000-0000-4000-8000-000000000000"})
    };
    reply(StatusCode::BAD_REQUEST, body)
}

/// `POST` a token endpoint: `authorization_code` or `refresh_token`.
pub(crate) async fn token(
    State(standin): State<Standin>,
    provider: &'static str,
    headers: HeaderMap,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let provider = provider.to_owned();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let mut inner = standin.lock();
    let oauth = &mut inner.oauth;
    let Some(client) = oauth.client(&provider, &field("client_id")) else {
        return token_error(
            &provider,
            "invalid_client_id",
            "client identifier invalid",
            "BAD_CLIENT_ID",
        );
    };
    if client.client_secret != field("client_secret") {
        return token_error(
            &provider,
            "invalid_client",
            "invalid client credentials",
            "BAD_CLIENT_SECRET",
        );
    }
    let (account, scope) = match field("grant_type").as_str() {
        "authorization_code" => {
            // A code works once: taken out whatever the exchange's outcome.
            let Some(code) = oauth.codes.remove(&field("code")) else {
                let description = if provider == "salesforce" {
                    "expired authorization code"
                } else {
                    "missing or unknown auth code"
                };
                return token_error(&provider, "invalid_grant", description, "BAD_AUTH_CODE");
            };
            if code.provider != provider || code.client_id != client.client_id {
                return token_error(
                    &provider,
                    "invalid_grant",
                    "authorization code was issued to another client",
                    "BAD_AUTH_CODE",
                );
            }
            if code.redirect_uri != field("redirect_uri") {
                return token_error(
                    &provider,
                    "redirect_uri_mismatch",
                    "redirect_uri must match configuration",
                    "BAD_REDIRECT_URI",
                );
            }
            if let Some(challenge) = &code.challenge {
                let verifier = field("code_verifier");
                if verifier.is_empty() {
                    return token_error(
                        &provider,
                        "invalid_grant",
                        "code verifier missing",
                        "BAD_CODE_VERIFIER",
                    );
                }
                if &B64.encode(Sha256::digest(verifier.as_bytes())) != challenge {
                    return token_error(
                        &provider,
                        "invalid_request",
                        "invalid code verifier",
                        "BAD_CODE_VERIFIER",
                    );
                }
            }
            (code.account, code.scope)
        }
        "refresh_token" => {
            let refresh = field("refresh_token");
            let known = oauth
                .refresh
                .get(&refresh)
                .filter(|(_, client_id)| *client_id == client.client_id)
                .filter(|_| !oauth.revoked.contains(&refresh));
            let Some((account, _)) = known.cloned() else {
                return token_error(
                    &provider,
                    "invalid_grant",
                    "expired access/refresh token",
                    "BAD_REFRESH_TOKEN",
                );
            };
            let access = oauth.token("access");
            oauth.access.insert(access.clone(), account.clone());
            let answer = if provider == "salesforce" {
                json!({"access_token": access, "token_type": "Bearer", "issued_at": millis(), "instance_url": base(&headers), "id": identity_url(&headers, &account), "scope": "api refresh_token id", "signature": "c3RhbmQtaW4="})
            } else {
                json!({"token_type": "bearer", "access_token": access, "refresh_token": refresh, "expires_in": 1800, "hub_id": hub_id(&account), "token_use": "access_token"})
            };
            if let Some(valid) = &mut inner.valid_access {
                valid.insert(access);
            }
            return reply(StatusCode::OK, answer);
        }
        _ => {
            return token_error(
                &provider,
                "unsupported_grant_type",
                "grant type not supported",
                "BAD_GRANT_TYPE",
            );
        }
    };
    let (access, refresh) = oauth.issue(&account, &client.client_id);
    let answer = if provider == "salesforce" {
        let mut answer = json!({
            "access_token": access, "refresh_token": refresh, "signature": "c3RhbmQtaW4=",
            "scope": scope, "instance_url": base(&headers), "id": identity_url(&headers, &account),
            "token_type": "Bearer", "issued_at": millis(),
        });
        if oauth.settings.omit_instance_url
            && let Some(object) = answer.as_object_mut()
        {
            object.remove("instance_url");
        }
        answer
    } else {
        json!({
            "token_type": "bearer", "refresh_token": refresh, "access_token": access,
            "expires_in": 1800, "hub_id": hub_id(&account),
            "scopes": scope.split_whitespace().collect::<Vec<_>>(), "token_use": "access_token",
        })
    };
    if let Some(valid) = &mut inner.valid_access {
        valid.insert(access);
    }
    reply(StatusCode::OK, answer)
}

fn base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn identity_url(headers: &HeaderMap, account: &Account) -> String {
    format!("{}/id/{}/{}", base(headers), account.id, account.user_id)
}

fn hub_id(account: &Account) -> Value {
    account
        .id
        .parse::<u64>()
        .map_or_else(|_| json!(account.id), |id| json!(id))
}

fn millis() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().to_string())
        .unwrap_or_default()
}

fn bearer_account(standin: &Standin, headers: &HeaderMap) -> Option<(String, Account)> {
    let token = crate::bearer(headers)?.to_owned();
    let inner = standin.lock();
    if inner.oauth.revoked.contains(&token) {
        return None;
    }
    inner.oauth.access.get(&token).cloned().map(|a| (token, a))
}

/// Salesforce's identity URL.
pub(crate) async fn identity(
    State(standin): State<Standin>,
    Path((org, user)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some((_, account)) =
        bearer_account(&standin, &headers).filter(|(_, a)| a.id == org && a.user_id == user)
    else {
        return reply(
            StatusCode::FORBIDDEN,
            json!([{"message": "Bad_OAuth_Token", "errorCode": "Bad_OAuth_Token"}]),
        );
    };
    let base = base(&headers);
    reply(
        StatusCode::OK,
        json!({
            "id": identity_url(&headers, &account), "asserted_user": true,
            "user_id": account.user_id, "organization_id": account.id,
            "username": account.login, "nick_name": account.login.split('@').next(),
            "display_name": account.login, "email": account.login, "email_verified": true,
            "urls": {"rest": format!("{base}/services/data/v{{version}}/"), "sobjects": format!("{base}/services/data/v{{version}}/sobjects/")},
            "active": true, "user_type": "STANDARD", "language": "en_US", "locale": "en_US",
        }),
    )
}

/// HubSpot's access-token information.
pub(crate) async fn access_token_info(
    State(standin): State<Standin>,
    Path(token): Path<String>,
) -> Response {
    let inner = standin.lock();
    let account = inner
        .oauth
        .access
        .get(&token)
        .filter(|_| !inner.oauth.revoked.contains(&token));
    let Some(account) = account else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"status": "error", "message": "access token not found", "category": "OBJECT_NOT_FOUND"}),
        );
    };
    let domain = account.login.split('@').nth(1).unwrap_or("example.com");
    reply(
        StatusCode::OK,
        json!({
            "token": token, "user": account.login, "hub_domain": domain,
            "scopes": ["oauth", "crm.objects.contacts.read", "crm.objects.contacts.write"],
            "hub_id": hub_id(account), "app_id": 111111, "expires_in": 1754,
            "user_id": account.user_id.parse::<u64>().unwrap_or(0), "token_type": "access",
        }),
    )
}

/// Revokes a token and everything issued with it: a refresh token takes its account's
/// access tokens along.
fn revoke_token(oauth: &mut OAuth, token: &str) -> bool {
    if oauth.revoked.contains(token) {
        return false;
    }
    if let Some((account, _)) = oauth.refresh.get(token).cloned() {
        oauth.revoked.insert(token.to_owned());
        let access: Vec<String> = oauth
            .access
            .iter()
            .filter(|(_, a)| **a == account)
            .map(|(t, _)| t.clone())
            .collect();
        oauth.revoked.extend(access);
        return true;
    }
    if oauth.access.contains_key(token) {
        oauth.revoked.insert(token.to_owned());
        return true;
    }
    false
}

/// Salesforce's revoke endpoint.
pub(crate) async fn salesforce_revoke(
    State(standin): State<Standin>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let mut inner = standin.lock();
    if let Some(status) = inner.oauth.settings.fail_revoke {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return reply(
            status,
            json!({"error": "server_error", "error_description": "stand-in: revoking failed"}),
        );
    }
    let token = form.get("token").cloned().unwrap_or_default();
    if revoke_token(&mut inner.oauth, &token) {
        return StatusCode::OK.into_response();
    }
    reply(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_token", "error_description": "Token was invalid"}),
    )
}

/// HubSpot's refresh-token delete.
pub(crate) async fn hubspot_revoke(
    State(standin): State<Standin>,
    Path(token): Path<String>,
) -> Response {
    let mut inner = standin.lock();
    if let Some(status) = inner.oauth.settings.fail_revoke {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return reply(
            status,
            json!({"status": "error", "message": "stand-in: revoking failed", "category": "INTERNAL_ERROR"}),
        );
    }
    if inner.oauth.refresh.contains_key(&token) && revoke_token(&mut inner.oauth, &token) {
        return StatusCode::NO_CONTENT.into_response();
    }
    reply(
        StatusCode::NOT_FOUND,
        json!({"status": "error", "message": "refresh token not found", "category": "OBJECT_NOT_FOUND"}),
    )
}
