//! Logging in and out, and who is asking.
//!
//! `GET /console/login` shows a form for the operator's key; `POST /console/login` checks
//! the key (SHA-256 digests compared in constant time) and opens a session: an HttpOnly,
//! SameSite=Strict cookie valid for `console.session_ttl`. The login form carries a CSRF
//! token of its own, the value of a short-lived cookie it must match (no session exists
//! yet). Every other POST must carry the session's token.

use askama::Template;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use secrecy::SecretString;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{Console, HOME, Refusal, SESSION_KIND, html};
use crate::core::authorization::random_token;
use crate::interfaces::http::pages::{self, SameSite, SessionCookie};
use crate::store::sessions;

/// The login form's own CSRF cookie: set with the form, sent back only with its post.
fn login_cookie(console: &Console) -> SessionCookie {
    SessionCookie {
        name: "appevents_console_login",
        path: "/console/login",
        secure: console.cookie.secure,
        same_site: SameSite::Strict,
    }
}

/// How long the login form may stay open.
const LOGIN_FORM_SECS: u64 = 15 * 60;

/// A logged-in operator: the name the audit log records, and the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub csrf: String,
}

impl Operator {
    /// Checks a posted form's CSRF token against the session's.
    pub fn check(&self, presented: &str) -> Result<(), Refusal> {
        if pages::csrf_matches(&self.csrf, presented) {
            return Ok(());
        }
        tracing::warn!(
            operator = %self.name,
            "console: a form without this session's CSRF token"
        );
        Err(Refusal::page(
            StatusCode::FORBIDDEN,
            "This form has expired",
            "The form did not carry this session's token. Reload the page and try again.",
        ))
    }
}

impl FromRequestParts<Console> for Operator {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Refusal> {
        // Back to the page asked for after logging in; a form posted without a session goes
        // back to the console's home.
        let next = if parts.method == Method::GET {
            parts
                .uri
                .path_and_query()
                .map_or(HOME.to_owned(), |p| p.as_str().to_owned())
        } else {
            HOME.to_owned()
        };
        let Some(cookie) = console.cookie.read(&parts.headers) else {
            return Err(Refusal::Login { next });
        };
        let session = sessions::find(&console.pool, SESSION_KIND, &cookie)
            .await?
            .ok_or(Refusal::Login { next })?;
        Ok(Operator {
            name: session.subject,
            csrf: session.csrf_token,
        })
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
}

/// Only a path of the console itself: never another site.
fn safe_next(next: Option<&str>) -> String {
    next.filter(|n| n.starts_with("/console") && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or(HOME)
        .to_owned()
}

pub(super) async fn login_page(
    State(console): State<Console>,
    Query(query): Query<LoginQuery>,
) -> Response {
    login_form(
        &console,
        StatusCode::OK,
        safe_next(query.next.as_deref()),
        None,
    )
}

/// The form with a fresh CSRF token, set in its cookie too.
fn login_form(
    console: &Console,
    status: StatusCode,
    next: String,
    error: Option<String>,
) -> Response {
    let Ok(csrf) = random_token(32) else {
        return Refusal::page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Something went wrong",
            "The system random number generator failed.",
        )
        .into_response();
    };
    let cookie = login_cookie(console).set(&SecretString::from(csrf.clone()), LOGIN_FORM_SECS);
    let mut response = html(status, LoginPage { csrf, next, error });
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
}

pub(super) async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, Refusal> {
    let next = safe_next(Some(&form.next));
    let expected = login_cookie(&console).read(&headers).unwrap_or_default();
    if expected.is_empty() || !pages::csrf_matches(&expected, &form.csrf) {
        tracing::warn!("console: a login without its form's CSRF token");
        return Ok(login_form(
            &console,
            StatusCode::FORBIDDEN,
            next,
            Some("The login form expired. Enter your key again.".into()),
        ));
    }
    let Some(name) = operator_of(&console, form.key.trim()) else {
        tracing::warn!("console: a login with an unknown key");
        return Ok(login_form(
            &console,
            StatusCode::UNAUTHORIZED,
            next,
            Some("That key is not an operator key of this server.".into()),
        ));
    };
    let ttl = console.settings.console.session_ttl;
    let opened = sessions::open(&console.pool, SESSION_KIND, &name, None, ttl).await?;
    tracing::info!(operator = %name, "console: logged in");
    let mut response = Redirect::to(&next).into_response();
    if let Some(cookie) = console.cookie.set(&opened.cookie, ttl.as_secs()) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
        .headers_mut()
        .append(header::SET_COOKIE, login_cookie(&console).clear());
    Ok(response)
}

/// The operator whose key this is. Every key is compared, so the time taken does not say
/// which one matched.
fn operator_of(console: &Console, key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let presented = super::super::digest(key.as_bytes());
    let mut found = None;
    for (name, digest) in console.operators.iter() {
        if bool::from(digest.ct_eq(&presented)) {
            found = Some(name.clone());
        }
    }
    found
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn logout(
    State(console): State<Console>,
    operator: Operator,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    operator.check(&form.csrf)?;
    if let Some(cookie) = console.cookie.read(&headers) {
        sessions::close(&console.pool, SESSION_KIND, &cookie).await?;
    }
    tracing::info!(operator = %operator.name, "console: logged out");
    let mut response = Redirect::to("/console/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, console.cookie.clear());
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_login_only_a_console_path_is_followed() {
        assert_eq!(
            safe_next(Some("/console/runs?status=dead")),
            "/console/runs?status=dead"
        );
        assert_eq!(safe_next(Some("https://evil.example")), "/console");
        assert_eq!(safe_next(Some("//evil.example/console")), "/console");
        assert_eq!(safe_next(Some("/portal/ada")), "/console");
        assert_eq!(safe_next(None), "/console");
    }
}
