//! What every page group shares (the Connect Portal, the operator console): askama
//! templates rendered with a status, the security headers of every page, CSRF tokens
//! checked in constant time, the session cookie, the stylesheet and the vendored htmx.
//!
//! Pages are rendered on the server and escaped by askama; they need no JavaScript to be
//! read. The Content-Security-Policy allows nothing but our own stylesheet (and, for the
//! console, our own copy of htmx and requests back to this server), forms that post to this
//! server (or lead to an OAuth provider's authorize page) and the configured parent origins.

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// The stylesheet every page links to; compiled in, so the binary serves it anywhere.
const STYLESHEET: &str = include_str!("../../../assets/pages.css");

/// Where the stylesheet is served.
pub const STYLESHEET_PATH: &str = "/assets/pages.css";

/// htmx 2.0.11 (0BSD), vendored unchanged from the `htmx.org` npm package's
/// `dist/htmx.min.js`: the console's progress and refreshes, with no JavaScript build.
const HTMX: &str = include_str!("../../../assets/vendor/htmx.min.js");

/// Where htmx is served.
pub const HTMX_PATH: &str = "/assets/htmx.min.js";

/// The shared routes: the stylesheet and htmx.
pub fn assets() -> Router {
    Router::new()
        .route(STYLESHEET_PATH, get(stylesheet))
        .route(HTMX_PATH, get(htmx))
}

async fn htmx() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        HTMX,
    )
        .into_response()
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// A page with its status.
pub fn render(status: StatusCode, page: impl IntoResponse) -> Response {
    (status, page).into_response()
}

/// An error page: a title, what happened, and where to go.
#[derive(Template, WebTemplate)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub message: String,
    /// A link back, with its text.
    pub back: Option<(String, String)>,
}

impl ErrorPage {
    pub fn new(title: impl Into<String>, message: impl Into<String>) -> ErrorPage {
        ErrorPage {
            title: title.into(),
            message: message.into(),
            back: None,
        }
    }

    pub fn back(mut self, href: impl Into<String>, text: impl Into<String>) -> ErrorPage {
        self.back = Some((href.into(), text.into()));
        self
    }

    pub fn into_response(self, status: StatusCode) -> Response {
        render(status, self)
    }
}

/// The security headers of a page group.
#[derive(Debug, Clone)]
pub struct Security {
    csp: HeaderValue,
}

impl Security {
    /// `frame_ancestors`: the origins that may embed the pages (none: they cannot be
    /// framed); `form_targets`: origins besides this server that a form may lead to.
    pub fn new(frame_ancestors: &[String], form_targets: &[String]) -> Security {
        Security::with_policy(frame_ancestors, form_targets, "")
    }

    /// The console's: never framed, forms to this server only, and our own scripts (htmx)
    /// with their requests back to this server. No inline script, no eval.
    pub fn console() -> Security {
        Security::with_policy(&[], &[], " script-src 'self'; connect-src 'self';")
    }

    fn with_policy(frame_ancestors: &[String], form_targets: &[String], scripts: &str) -> Security {
        let ancestors = if frame_ancestors.is_empty() {
            "'none'".to_owned()
        } else {
            frame_ancestors.join(" ")
        };
        let forms = std::iter::once("'self'".to_owned())
            .chain(form_targets.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let policy = format!(
            "default-src 'none';{scripts} style-src 'self'; img-src 'self'; form-action {forms}; \
             frame-ancestors {ancestors}; base-uri 'none'"
        );
        // Origins were checked when the configuration loaded; a value that still cannot be
        // a header falls back to the strictest policy.
        let csp = HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ));
        Security { csp }
    }
}

/// Adds the security headers to every response of the pages: the CSP, no sniffing, no
/// referrer (a URL never leaves with a query in it), and no caching of what a user saw.
pub async fn security_headers(
    State(security): State<Security>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, security.csp.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Whether the CSRF token a form posted is the session's, compared in constant time.
pub fn csrf_matches(expected: &str, presented: &str) -> bool {
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// A session cookie: HttpOnly (no script reads it), limited to `path`, Secure unless
/// turned off for plain-HTTP development, and SameSite as `same_site` says.
#[derive(Debug, Clone)]
pub struct SessionCookie {
    pub name: &'static str,
    pub path: &'static str,
    pub secure: bool,
    pub same_site: SameSite,
}

/// Which requests from elsewhere carry the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// No other site's form or frame sends it; a provider's redirect back, a top-level GET,
    /// does (the portal needs that).
    Lax,
    /// Only requests from this site's own pages send it (the console: nothing an operator
    /// follows from elsewhere acts with their session).
    Strict,
}

impl SessionCookie {
    /// The `Set-Cookie` value that stores `value` for `max_age_secs`.
    pub fn set(&self, value: &SecretString, max_age_secs: u64) -> Option<HeaderValue> {
        let secure = if self.secure { "; Secure" } else { "" };
        let same_site = match self.same_site {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
        };
        HeaderValue::from_str(&format!(
            "{}={}; Path={}; Max-Age={max_age_secs}; HttpOnly; SameSite={same_site}{secure}",
            self.name,
            value.expose_secret(),
            self.path
        ))
        .ok()
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub fn clear(&self) -> HeaderValue {
        self.set(&SecretString::from(""), 0)
            .unwrap_or(HeaderValue::from_static("Max-Age=0"))
    }

    /// The cookie's value in a request, if it has one.
    pub fn read(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == self.name)
            .map(|(_, value)| value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_parents_and_the_form_targets() {
        let security = Security::new(
            &["https://app.example.com".into()],
            &["https://login.salesforce.com".into()],
        );
        let csp = security.csp.to_str().expect("ascii");
        assert!(
            csp.contains("frame-ancestors https://app.example.com;"),
            "{csp}"
        );
        assert!(
            csp.contains("form-action 'self' https://login.salesforce.com;"),
            "{csp}"
        );
        let unframed = Security::new(&[], &[]);
        assert!(
            unframed
                .csp
                .to_str()
                .expect("ascii")
                .contains("frame-ancestors 'none'")
        );
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abc", "abd"));
        assert!(!csrf_matches("abc", "ab"));
        assert!(!csrf_matches("abc", ""));
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let cookie = SessionCookie {
            name: "s",
            path: "/p",
            secure: true,
            same_site: SameSite::Lax,
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; s=xyz; b=2"));
        assert_eq!(cookie.read(&headers).as_deref(), Some("xyz"));
        let set = cookie
            .set(&SecretString::from("v"), 60)
            .expect("header value");
        assert_eq!(
            set.to_str().expect("ascii"),
            "s=v; Path=/p; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
        let strict = SessionCookie {
            same_site: SameSite::Strict,
            secure: false,
            ..cookie
        };
        assert_eq!(
            strict.clear().to_str().expect("ascii"),
            "s=; Path=/p; Max-Age=0; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    fn the_console_may_run_its_own_scripts_only() {
        let csp = Security::console();
        let csp = csp.csp.to_str().expect("ascii");
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        let portal = Security::new(&[], &[]);
        assert!(!portal.csp.to_str().expect("ascii").contains("script-src"));
    }
}
