//! The Connect Portal: one end user's page, where they connect their Salesforce and HubSpot
//! accounts and switch workflows on and off. The product embeds it (an iframe; the parent
//! origins allowed in `portal.frame_ancestors`).
//!
//! How a user gets in: the product's backend mints a short-lived user token and opens
//! `/portal/{user}?token=…` once. The token is checked (signature, audience, expiry, that it
//! names this user), exchanged for a session — an HttpOnly cookie, the token's digest kept so
//! it opens nothing a second time — and the browser is sent on to `/portal/{user}`, a URL
//! with no secret in it. API keys never reach the browser.
//!
//! Routes (all under `/portal`, every form posting its session's CSRF token):
//! - `GET /portal/{user}`: the page (with `?token=…`: the way in);
//! - `POST /portal/{user}/connect/{provider}`: start an authorization, off to the provider;
//! - `GET /portal/oauth/{provider}/callback`: the provider's redirect back;
//! - `POST /portal/{user}/connections/{id}/disconnect`: revoke, then delete;
//! - `POST /portal/{user}/workflows/{id}`: switch a workflow on (`on=true`) or off.

use std::sync::Arc;

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use uuid::Uuid;

use super::pages::{self, ErrorPage, SameSite, Security, SessionCookie};
use crate::catalog::connect::{Callback, Caller, ConnectError, Connector};
use crate::catalog::connections;
use crate::catalog::{subscriptions, workflows};
use crate::config::PortalSettings;
use crate::core::connection::ConnectionStatus;
use crate::core::provider::Provider;
use crate::core::user_token::{KeyRing, TokenError};
use crate::observe::errors::report;
use crate::store::db::StoreError;
use crate::store::sessions::{self, Session};

/// The kind of the portal's sessions.
const SESSION_KIND: &str = "portal";

/// The providers an end user connects here, in the order the page shows them.
const PROVIDERS: [Provider; 2] = [Provider::Salesforce, Provider::Hubspot];

/// What the portal's handlers share.
#[derive(Clone)]
pub struct Portal {
    pool: Pool,
    connector: Arc<Connector>,
    tokens: Arc<KeyRing>,
    settings: PortalSettings,
    cookie: SessionCookie,
}

impl Portal {
    pub fn new(
        pool: Pool,
        connector: Arc<Connector>,
        tokens: Arc<KeyRing>,
        settings: &PortalSettings,
    ) -> Portal {
        Portal {
            pool,
            connector,
            tokens,
            settings: settings.clone(),
            cookie: SessionCookie {
                name: "appevents_portal",
                path: "/portal",
                secure: settings.secure_cookie,
                same_site: SameSite::Lax,
            },
        }
    }
}

/// The portal's routes, with the pages' security headers.
pub fn routes(portal: Portal) -> Router {
    let security = Security::new(
        &portal.settings.frame_ancestors,
        &portal.connector.authorize_origins(),
    );
    Router::new()
        .route("/portal/{user}", get(page))
        .route("/portal/{user}/connect/{provider}", post(connect))
        .route(
            "/portal/{user}/connections/{id}/disconnect",
            post(disconnect),
        )
        .route("/portal/{user}/workflows/{id}", post(switch))
        .route("/portal/oauth/{provider}/callback", get(callback))
        .with_state(portal)
        .merge(pages::assets())
        .layer(middleware::from_fn_with_state(
            security,
            pages::security_headers,
        ))
}

/// The portal page's address for a user: its path segment percent-encoded.
fn home(user: &str) -> String {
    format!("/portal/{}", crate::integrations::encode_segment(user))
}

/// Why a request was turned away, as the page that says so.
enum Refusal {
    Page(StatusCode, ErrorPage),
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        Refusal::Store(err)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Page(status, page) => page.into_response(status),
            Refusal::Store(StoreError::NotFound(message)) => {
                ErrorPage::new("Not found", message).into_response(StatusCode::NOT_FOUND)
            }
            Refusal::Store(StoreError::Invalid(message) | StoreError::Conflict(message)) => {
                ErrorPage::new("That did not work", message).into_response(StatusCode::BAD_REQUEST)
            }
            Refusal::Store(err) => {
                tracing::warn!(error = %report(&err), "portal: storage failed");
                ErrorPage::new(
                    "Something went wrong",
                    "The page could not be loaded just now. Try again in a moment.",
                )
                .into_response(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }
}

fn no_session() -> Refusal {
    Refusal::Page(
        StatusCode::UNAUTHORIZED,
        ErrorPage::new(
            "Your session has ended",
            "Open the integrations page again from the app.",
        ),
    )
}

fn other_user() -> Refusal {
    Refusal::Page(
        StatusCode::FORBIDDEN,
        ErrorPage::new(
            "Not your page",
            "This page belongs to another user. Open the integrations page again from the app.",
        ),
    )
}

/// The session of the browser, if it belongs to `user`.
async fn session_of(portal: &Portal, headers: &HeaderMap, user: &str) -> Result<Session, Refusal> {
    let cookie = portal.cookie.read(headers).ok_or_else(no_session)?;
    let session = sessions::find(&portal.pool, SESSION_KIND, &cookie)
        .await?
        .ok_or_else(no_session)?;
    if session.subject != user {
        tracing::warn!(user_id = user, "portal: a session of another user");
        return Err(other_user());
    }
    Ok(session)
}

/// The session, and the form's CSRF token checked against it.
async fn posted_by(
    portal: &Portal,
    headers: &HeaderMap,
    user: &str,
    csrf: &str,
) -> Result<Session, Refusal> {
    let session = session_of(portal, headers, user).await?;
    if !pages::csrf_matches(&session.csrf_token, csrf) {
        tracing::warn!(
            user_id = user,
            "portal: a form without this session's CSRF token"
        );
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            ErrorPage::new(
                "This form has expired",
                "Reload the integrations page and try again.",
            )
            .back(home(user), "Back to your integrations"),
        ));
    }
    Ok(session)
}

#[derive(Deserialize)]
struct Entry {
    token: Option<String>,
}

#[tracing::instrument(skip_all, fields(user_id = %user))]
async fn page(
    State(portal): State<Portal>,
    Path(user): Path<String>,
    Query(entry): Query<Entry>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    if let Some(token) = entry.token {
        return enter(&portal, &user, SecretString::from(token)).await;
    }
    let session = session_of(&portal, &headers, &user).await?;
    Ok(pages::render(
        StatusCode::OK,
        portal_page(&portal, &user, &session, None).await?,
    ))
}

/// The way in: a user token for this user becomes a session, once.
async fn enter(portal: &Portal, user: &str, token: SecretString) -> Result<Response, Refusal> {
    let claims = portal.tokens.verify(token.expose_secret()).map_err(|err| {
        tracing::warn!(reason = %err, "portal: user token refused");
        // The page says only "invalid or expired": which check failed is for the log.
        let message = if err == TokenError::NoKeys {
            "The integrations page is not set up on this server."
        } else {
            "This link is invalid or has expired. Open the integrations page again from the app."
        };
        Refusal::Page(
            StatusCode::UNAUTHORIZED,
            ErrorPage::new("This link does not work", message),
        )
    })?;
    if claims.sub != user {
        tracing::warn!("portal: a user token for another user");
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            ErrorPage::new(
                "Not your page",
                "This link was made for another user. Open the integrations page again from the app.",
            ),
        ));
    }
    let ttl = portal.settings.session_ttl;
    let opened = match sessions::open(&portal.pool, SESSION_KIND, user, Some(&token), ttl).await {
        Ok(opened) => opened,
        Err(StoreError::Conflict(_)) => {
            tracing::warn!("portal: a user token used a second time");
            return Err(Refusal::Page(
                StatusCode::UNAUTHORIZED,
                ErrorPage::new(
                    "This link was used already",
                    "Each link opens the integrations page once. Open it again from the app.",
                ),
            ));
        }
        Err(err) => return Err(err.into()),
    };
    tracing::info!("portal: session opened");
    let mut response = Redirect::to(&home(user)).into_response();
    if let Some(cookie) = portal.cookie.set(&opened.cookie, ttl.as_secs()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// A provider's place on the page.
enum Status {
    NotConnected,
    Connected(String),
    NeedsReauth(String),
}

struct ProviderCard {
    slug: &'static str,
    name: &'static str,
    status: Status,
    connection: Option<Uuid>,
    can_connect: bool,
    workflows: Vec<WorkflowRow>,
}

struct WorkflowRow {
    id: Uuid,
    name: String,
    event: String,
    on: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "portal.html")]
struct PortalPage {
    home: String,
    csrf: String,
    providers: Vec<ProviderCard>,
    error: Option<String>,
}

fn display_name(provider: Provider) -> &'static str {
    match provider {
        Provider::Salesforce => "Salesforce",
        Provider::Hubspot => "HubSpot",
        Provider::Http => "HTTP",
    }
}

/// The page: each provider that has workflows, its connection's status, its workflows.
async fn portal_page(
    portal: &Portal,
    user: &str,
    session: &Session,
    error: Option<String>,
) -> Result<PortalPage, StoreError> {
    let all = workflows::list(&portal.pool, None, None).await?;
    let on = subscriptions::list(&portal.pool, Some(user), None).await?;
    let mut providers = Vec::new();
    for provider in PROVIDERS {
        let rows: Vec<WorkflowRow> = all
            .iter()
            .filter(|w| w.provider == provider)
            .map(|w| WorkflowRow {
                id: w.id,
                name: w.name.clone(),
                event: w.event.clone(),
                on: on.iter().any(|s| s.workflow_id == w.id),
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let connection = connections::user_connection(&portal.pool, user, provider).await?;
        let status = match &connection {
            None => Status::NotConnected,
            Some(c) => {
                let account = c
                    .settings
                    .get("account")
                    .and_then(|a| a.as_str())
                    .map_or_else(|| c.base_url.clone(), str::to_owned);
                match c.status {
                    ConnectionStatus::Active => Status::Connected(account),
                    ConnectionStatus::NeedsReauth => Status::NeedsReauth(account),
                }
            }
        };
        providers.push(ProviderCard {
            slug: provider.as_str(),
            name: display_name(provider),
            status,
            connection: connection.map(|c| c.id),
            can_connect: portal.connector.can_connect(provider),
            workflows: rows,
        });
    }
    Ok(PortalPage {
        home: home(user),
        csrf: session.csrf_token.clone(),
        providers,
        error,
    })
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

#[tracing::instrument(skip_all, fields(user_id = %user, provider = %provider))]
async fn connect(
    State(portal): State<Portal>,
    Path((user, provider)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let session = posted_by(&portal, &headers, &user, &form.csrf).await?;
    let provider = portal_provider(&provider, &user)?;
    let caller = Caller {
        user: &user,
        session_digest: &session.digest,
    };
    match portal.connector.begin(&caller, provider).await {
        // 303: the browser follows with a GET to the provider's authorize page.
        Ok(url) => Ok(Redirect::to(&url).into_response()),
        Err(err) => Err(connect_refusal(err, &user)),
    }
}

/// A provider slug of the portal's, or a 404 page.
fn portal_provider(slug: &str, user: &str) -> Result<Provider, Refusal> {
    slug.parse::<Provider>()
        .ok()
        .filter(|p| PROVIDERS.contains(p))
        .ok_or_else(|| {
            Refusal::Page(
                StatusCode::NOT_FOUND,
                ErrorPage::new(
                    "No such integration",
                    format!("{slug:?} cannot be connected."),
                )
                .back(home(user), "Back to your integrations"),
            )
        })
}

fn connect_refusal(err: ConnectError, user: &str) -> Refusal {
    let status = match &err {
        ConnectError::Store(_) | ConnectError::Random(_) => StatusCode::SERVICE_UNAVAILABLE,
        ConnectError::Exchange { .. }
        | ConnectError::Account { .. }
        | ConnectError::Revoke { .. } => StatusCode::BAD_GATEWAY,
        ConnectError::OtherUser | ConnectError::OtherSession => StatusCode::FORBIDDEN,
        ConnectError::NoConnection => StatusCode::NOT_FOUND,
        ConnectError::NotConfigured(_)
        | ConnectError::State(_)
        | ConnectError::StateUsed
        | ConnectError::Denied { .. }
        | ConnectError::ProviderError { .. }
        | ConnectError::NoCode(_) => StatusCode::BAD_REQUEST,
    };
    let title = if matches!(err, ConnectError::Denied { .. }) {
        "Not connected"
    } else {
        "The account could not be connected"
    };
    tracing::warn!(reason = %err, "portal: connecting failed");
    Refusal::Page(
        status,
        ErrorPage::new(title, err.to_string()).back(home(user), "Back to your integrations"),
    )
}

#[derive(Deserialize)]
struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The provider's redirect back. The browser's session must be the one that started the
/// authorization, for the user the state names.
#[tracing::instrument(skip_all, fields(provider = %provider))]
async fn callback(
    State(portal): State<Portal>,
    Path(provider): Path<String>,
    Query(query): Query<CallbackQuery>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let cookie = portal.cookie.read(&headers).ok_or_else(no_session)?;
    let session = sessions::find(&portal.pool, SESSION_KIND, &cookie)
        .await?
        .ok_or_else(no_session)?;
    let user = session.subject.clone();
    let provider = portal_provider(&provider, &user)?;
    let callback = Callback {
        state: query.state,
        code: query.code,
        error: query.error,
        error_description: query.error_description,
    };
    let caller = Caller {
        user: &user,
        session_digest: &session.digest,
    };
    match portal.connector.finish(&caller, provider, &callback).await {
        Ok(_) => Ok(Redirect::to(&home(&user)).into_response()),
        Err(err) => Err(connect_refusal(err, &user)),
    }
}

#[tracing::instrument(skip_all, fields(user_id = %user, connection_id = %id))]
async fn disconnect(
    State(portal): State<Portal>,
    Path((user, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let session = posted_by(&portal, &headers, &user, &form.csrf).await?;
    match portal.connector.disconnect(&user, id).await {
        Ok(_) => Ok(Redirect::to(&home(&user)).into_response()),
        // The connection is kept: the page says why, and its Disconnect button is the retry.
        Err(err @ ConnectError::Revoke { .. }) => {
            let page = portal_page(&portal, &user, &session, Some(err.to_string())).await?;
            Ok(pages::render(StatusCode::BAD_GATEWAY, page))
        }
        Err(err) => Err(connect_refusal(err, &user)),
    }
}

#[derive(Deserialize)]
struct SwitchForm {
    #[serde(default)]
    csrf: String,
    on: bool,
}

#[tracing::instrument(skip_all, fields(user_id = %user, workflow_id = %id))]
async fn switch(
    State(portal): State<Portal>,
    Path((user, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
    Form(form): Form<SwitchForm>,
) -> Result<Response, Refusal> {
    let session = posted_by(&portal, &headers, &user, &form.csrf).await?;
    let workflow = workflows::get(&portal.pool, id).await?;
    if !form.on {
        match subscriptions::delete(&portal.pool, &user, id).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(err) => return Err(err.into()),
        }
        return Ok(Redirect::to(&home(&user)).into_response());
    }
    let Some(connection) =
        connections::user_connection(&portal.pool, &user, workflow.provider).await?
    else {
        let message = format!(
            "Connect {} before switching “{}” on.",
            display_name(workflow.provider),
            workflow.name
        );
        let page = portal_page(&portal, &user, &session, Some(message)).await?;
        return Ok(pages::render(StatusCode::CONFLICT, page));
    };
    subscriptions::create(&portal.pool, &user, id, connection.id).await?;
    Ok(Redirect::to(&home(&user)).into_response())
}
