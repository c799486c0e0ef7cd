//! The operator console, under `/console`: what an operator or integration engineer looks
//! at instead of typing CLI commands. Server-rendered pages (askama, escaped), readable
//! without JavaScript; htmx, vendored and served by this binary, only refreshes parts of a
//! page (a replay's progress, the overview).
//!
//! Access (`access`): an operator key from `console.operators` is exchanged for an HttpOnly,
//! SameSite=Strict session cookie; every POST carries the session's CSRF token; a page
//! without a session redirects to the login page. Replays, purges and retries are written to
//! the audit log (`store::audit`) with the operator's name before they start.
//!
//! Route groups, a file each: `overview` (and the audit log), `runs`, `dead_letters` (with
//! `jobs`, the progress of long replays and purges), `catalog`. `charts` draws the SVG.
//! Every action calls the same library function as the CLI (`transport::dead_letter::walk`,
//! `pipeline::replay`, `pipeline::dry_run`).

mod access;
mod catalog;
mod charts;
mod dead_letters;
mod jobs;
mod overview;
mod runs;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use secrecy::ExposeSecret;

use super::pages::{self, ErrorPage, SameSite, Security, SessionCookie};
use crate::config::Settings;
use crate::integrations::Integrations;
use crate::observe::errors::report;
use crate::store::db::StoreError;
use crate::store::vault::Keyring;
use crate::transport::topology::Topology;
use crate::transport::{broker, dead_letter};

pub use self::access::Operator;

/// The kind of the console's sessions.
const SESSION_KIND: &str = "console";

/// Where the console lives.
const HOME: &str = "/console";

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    pool: Pool,
    settings: Arc<Settings>,
    keyring: Arc<Keyring>,
    integrations: Arc<Integrations>,
    /// SHA-256 digests of the operator keys, by operator name.
    operators: Arc<[(String, [u8; 32])]>,
    cookie: SessionCookie,
    jobs: jobs::Jobs,
    /// The broker connection the dead-letter walks share, made on first use and again once
    /// lost: a connection per page would cost about 100 ms of handshakes.
    broker: Arc<tokio::sync::Mutex<Option<Arc<lapin::Connection>>>>,
}

impl Console {
    pub fn new(settings: &Settings, pool: Pool, keyring: Arc<Keyring>) -> anyhow::Result<Console> {
        let operators = settings
            .console
            .operators
            .iter()
            .map(|(name, key)| (name.clone(), super::digest(key.expose_secret().as_bytes())))
            .collect();
        Ok(Console {
            pool,
            settings: Arc::new(settings.clone()),
            keyring,
            integrations: Arc::new(Integrations::new(&settings.http, &settings.salesforce)?),
            operators,
            cookie: SessionCookie {
                name: "appevents_console",
                path: HOME,
                secure: settings.console.secure_cookie,
                same_site: SameSite::Strict,
            },
            jobs: jobs::Jobs::default(),
            broker: Arc::default(),
        })
    }
}

/// The console's routes, with its security headers.
pub fn routes(console: Console) -> Router {
    Router::new()
        .route("/console", get(overview::page))
        .route(
            "/console/login",
            get(access::login_page).post(access::login),
        )
        .route("/console/logout", post(access::logout))
        .route("/console/audit", get(overview::audit))
        .route("/console/runs", get(runs::list))
        .route("/console/runs/{id}", get(runs::show))
        .route("/console/runs/{id}/retry", post(runs::retry))
        .route("/console/dead-letters", get(dead_letters::list))
        .route("/console/dead-letters/raw", get(dead_letters::raw))
        .route(
            "/console/dead-letters/{action}",
            get(dead_letters::preview).post(dead_letters::start),
        )
        .route("/console/jobs/{id}", get(jobs::show))
        .route("/console/catalog", get(catalog::page))
        .route("/console/catalog/workflows/{id}/test", get(catalog::test))
        .with_state(console)
        .layer(middleware::from_fn_with_state(
            Security::console(),
            pages::security_headers,
        ))
}

/// What every console page shows around its content: who is logged in, the CSRF token of
/// the log-out form, and which section is open.
pub struct Chrome {
    pub operator: String,
    pub csrf: String,
    pub section: &'static str,
}

impl Chrome {
    fn of(operator: &Operator, section: &'static str) -> Chrome {
        Chrome {
            operator: operator.name.clone(),
            csrf: operator.csrf.clone(),
            section,
        }
    }
}

/// Why a console request was turned away, as the page that says so.
pub enum Refusal {
    /// No session: to the login page, coming back to `next` afterwards.
    Login {
        next: String,
    },
    Page(StatusCode, ErrorPage),
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        Refusal::Store(err)
    }
}

impl Refusal {
    fn page(status: StatusCode, title: &str, message: impl Into<String>) -> Refusal {
        Refusal::Page(
            status,
            ErrorPage::new(title, message).back(HOME, "Back to the console"),
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Login { next } => Redirect::to(&format!(
                "/console/login?next={}",
                percent_encoding::utf8_percent_encode(&next, percent_encoding::NON_ALPHANUMERIC)
            ))
            .into_response(),
            Refusal::Page(status, page) => page.into_response(status),
            Refusal::Store(StoreError::NotFound(message)) => {
                Refusal::page(StatusCode::NOT_FOUND, "Not found", message).into_response()
            }
            Refusal::Store(StoreError::Invalid(message) | StoreError::Conflict(message)) => {
                Refusal::page(StatusCode::BAD_REQUEST, "That did not work", message).into_response()
            }
            Refusal::Store(err) => {
                tracing::warn!(error = %report(&err), "console: storage failed");
                Refusal::page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The database is unavailable",
                    "The page could not be loaded just now. Try again in a moment.",
                )
                .into_response()
            }
        }
    }
}

/// One walk of the dead-letter queue (`dead_letter::walk`, as the CLI's), on a channel of
/// its own; the error is one line, the broker's password hidden.
async fn walk_letters(
    console: &Console,
    filter: &dead_letter::Filter,
    action: dead_letter::Action,
    visit: impl FnMut(&dead_letter::Letter),
) -> Result<dead_letter::Report, String> {
    let connection = broker_connection(console).await?;
    dead_letter::walk(&connection, &topology(console), filter, action, visit)
        .await
        .map_err(|err| err.to_string())
}

/// The queues the workers use.
fn topology(console: &Console) -> Topology {
    Topology::new(&console.settings.amqp, &console.settings.retry.schedule)
}

/// The console's broker connection, connecting when there is none or it was lost.
async fn broker_connection(console: &Console) -> Result<Arc<lapin::Connection>, String> {
    let mut slot = console.broker.lock().await;
    if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
        return Ok(connection.clone());
    }
    let (connection, _) = broker::operator_session(&console.settings, "appevents console").await?;
    let connection = Arc::new(connection);
    *slot = Some(connection.clone());
    Ok(connection)
}

/// A page rendered with 200, or the error page when the template fails.
fn html(status: StatusCode, page: impl Template) -> Response {
    match page.render() {
        Ok(body) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "console: a page could not be rendered");
            Refusal::page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "The page could not be rendered.",
            )
            .into_response()
        }
    }
}

/// Text cut to `max` bytes at a character boundary; whether it was cut.
pub fn truncate(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (format!("{}…", &text[..end]), true)
}

/// A time as the console shows it: UTC, to the second.
pub fn when(at: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("short", 10), ("short".to_owned(), false));
        let (cut, truncated) = truncate("ééé", 3);
        assert!(truncated);
        assert_eq!(cut, "é…");
    }
}
