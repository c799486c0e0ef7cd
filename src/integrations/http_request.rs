//! The generic HTTP step: method, URL and headers rendered from the event, the mapping as
//! the JSON body. An http workflow's `request` uses its connection (base URL, token); a
//! Salesforce or HubSpot workflow's `http.request` uses nothing of its CRM connection.

use reqwest::Method;
use serde_json::{Map, Value};

use super::{
    Action, HTTP_STEP, HeaderText, HttpAuth, PreparedRequest, RawResponse, StepOutput,
    encode_segment, join_url,
};
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::Scope;
use crate::core::mapping::TextTemplate;

/// Parses an HTTP step's options. An `OwnHeaders` step (in a CRM workflow) has no base URL
/// to join a relative URL to: its URL must start with `https://` or `http://`.
pub fn parse_options(options: &Map<String, Value>, auth: HttpAuth) -> Result<Action, String> {
    let url = match options.get("url") {
        Some(Value::String(url)) if !url.trim().is_empty() => url.trim(),
        _ => return Err("option url: required, a string".into()),
    };
    let url = TextTemplate::compile(url).map_err(|e| format!("option url: {e}"))?;
    if auth == HttpAuth::OwnHeaders && !is_absolute(url.text_before_first_reference()) {
        return Err(format!(
            "option url {:?} is not absolute: a salesforce or hubspot workflow's {HTTP_STEP} has no base URL, so its URL starts with https:// or http://",
            url_text(options)
        ));
    }
    let method = match options.get("method") {
        None | Some(Value::Null) => Method::POST,
        Some(Value::String(m)) => match m.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => {
                return Err(format!(
                    "option method {other:?}: expected GET, POST, PUT, PATCH or DELETE"
                ));
            }
        },
        Some(_) => return Err("option method must be a string".into()),
    };
    let mut headers = Vec::new();
    match options.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let Value::String(value) = value else {
                    return Err(format!("option headers: {name} must be a string"));
                };
                reqwest::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("option headers: {name:?} is not a valid header name"))?;
                let template = TextTemplate::compile(value)
                    .map_err(|e| format!("option headers: {name}: {e}"))?;
                headers.push((name.to_ascii_lowercase(), template));
            }
        }
        Some(_) => return Err("option headers must be an object of strings".into()),
    }
    Ok(Action::HttpRequest {
        method,
        url,
        headers,
        auth,
    })
}

fn is_absolute(url: &str) -> bool {
    let starts = |scheme: &str| {
        url.get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    };
    starts("https://") || starts("http://")
}

fn url_text(options: &Map<String, Value>) -> &str {
    options
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
}

/// Renders the request. Values inserted into the URL are percent-encoded. With the
/// connection's `auth`, a relative URL is joined to the connection's base URL and the
/// connection's access token, if any, is sent as a bearer token unless the workflow sets its
/// own Authorization header; with `OwnHeaders`, nothing of the connection is used.
pub fn prepare(
    connection: &Connection,
    method: &Method,
    url: &TextTemplate,
    headers: &[(String, TextTemplate)],
    auth: HttpAuth,
    body: Value,
    scope: &Scope<'_>,
) -> Result<PreparedRequest, Failure> {
    let rendered = url.render_with(scope, encode_segment);
    let mut request = match auth {
        HttpAuth::Connection => {
            let url = if is_absolute(&rendered) {
                rendered
            } else {
                join_url(&connection.base_url, &rendered)
            };
            let sets_authorization = headers.iter().any(|(name, _)| name == "authorization");
            let request = PreparedRequest::new(method.clone(), url);
            if sets_authorization {
                request
            } else {
                request.bearer(connection.access_token.as_ref())
            }
        }
        // Checked when defined; a stored definition is held to it again here.
        HttpAuth::OwnHeaders if !is_absolute(&rendered) => {
            return Err(Failure::new(
                FailureKind::Permanent,
                format!("option url rendered {rendered:?}, which is not an absolute URL"),
            ));
        }
        HttpAuth::OwnHeaders => PreparedRequest::new(method.clone(), rendered),
    };
    for (name, template) in headers {
        let value = template.render_with(scope, str::to_owned);
        if value.chars().any(char::is_control) {
            return Err(Failure::new(
                FailureKind::Permanent,
                format!("header {name} rendered with control characters"),
            ));
        }
        request
            .headers
            .push((name.clone(), HeaderText::Plain(value)));
    }
    if method != Method::GET {
        request = request.json(body);
    }
    Ok(request)
}

/// A failed request's failure. A step with its own headers has no credentials the worker
/// could refresh: the server refusing them (401) is permanent, and never leads to a refresh
/// of the workflow's CRM connection.
pub fn failure_of(auth: HttpAuth, failure: Failure) -> Failure {
    match auth {
        HttpAuth::OwnHeaders if failure.kind == FailureKind::ExpiredCredentials => Failure {
            kind: FailureKind::Permanent,
            message: format!(
                "the server refused the step's credentials (set them in its headers): {}",
                failure.message
            ),
            ..failure
        },
        _ => failure,
    }
}

/// Any 2xx is success; an `id` in a JSON answer is kept as the provider's id.
pub fn interpret(response: &RawResponse) -> StepOutput {
    let body = response.json();
    let provider_id = body.as_ref().and_then(|body| match body.get("id")? {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    });
    StepOutput {
        provider_id,
        status: response.status,
        body,
    }
}

/// Redirects are followed within the same host only (at most five); a redirect elsewhere is
/// refused, so a workflow cannot be bounced to a host nobody configured.
pub fn same_host_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_host = attempt
            .previous()
            .first()
            .is_some_and(|first| first.host_str() == attempt.url().host_str());
        if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects")
        } else if same_host {
            attempt.follow()
        } else {
            attempt.error("redirect to another host")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::provider::Provider;

    #[test]
    fn a_crm_workflow_s_http_step_sends_only_its_own_headers_to_its_absolute_url() {
        let connection = Connection {
            access_token: Some(secrecy::SecretString::from("crm-token")),
            ..Connection::without_credentials("u", Provider::Hubspot, "https://api.hubapi.example")
        };
        let event = crate::core::event::Event {
            id: "e".into(),
            id_source: crate::core::event::IdSource::Body,
            name: "Contact Created".into(),
            user_id: "u".into(),
            payload: serde_json::json!({"email": "a b@example.com"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            occurred_at: None,
        };
        let options = serde_json::json!({
            "url": "https://hooks.example/{{payload.email}}",
            "headers": {"X-Key": "k"},
        });
        let Ok(Action::HttpRequest {
            method,
            url,
            headers,
            auth,
        }) = parse_options(options.as_object().expect("object"), HttpAuth::OwnHeaders)
        else {
            panic!("parsed");
        };

        let request = prepare(
            &connection,
            &method,
            &url,
            &headers,
            auth,
            serde_json::json!({"a": 1}),
            &Scope::event(&event),
        )
        .expect("prepared");

        assert_eq!(request.url, "https://hooks.example/a%20b%40example.com");
        let names: Vec<&str> = request.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-key"]);
        assert_eq!(request.body, Some(serde_json::json!({"a": 1})));
    }

    #[test]
    fn a_401_to_a_step_with_its_own_headers_is_permanent_and_refreshes_nothing() {
        let expired =
            || Failure::new(FailureKind::ExpiredCredentials, "HTTP 401").with_code("UNAUTHORIZED");

        let own = failure_of(HttpAuth::OwnHeaders, expired());
        let connection = failure_of(HttpAuth::Connection, expired());

        assert_eq!(own.kind, FailureKind::Permanent);
        assert!(
            own.message.contains("refused the step's credentials"),
            "{}",
            own.message
        );
        assert_eq!(
            connection.kind,
            FailureKind::ExpiredCredentials,
            "an http workflow's connection is refreshed as before"
        );
    }
}
