//! The generic HTTP step: method, URL and headers rendered from the event, the mapping as
//! the JSON body.

use reqwest::Method;
use serde_json::{Map, Value};

use super::{
    Action, HeaderText, PreparedRequest, RawResponse, StepOutput, encode_segment, join_url,
};
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::Scope;
use crate::core::mapping::TextTemplate;

pub fn parse_options(options: &Map<String, Value>) -> Result<Action, String> {
    let url = match options.get("url") {
        Some(Value::String(url)) if !url.trim().is_empty() => url.trim(),
        _ => return Err("http request needs option url (a string)".into()),
    };
    let url = TextTemplate::compile(url).map_err(|e| format!("option url: {e}"))?;
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
                    "method {other:?}: expected GET, POST, PUT, PATCH or DELETE"
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
                    return Err(format!("header {name} must be a string"));
                };
                reqwest::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not a valid header name"))?;
                let template =
                    TextTemplate::compile(value).map_err(|e| format!("header {name}: {e}"))?;
                headers.push((name.to_ascii_lowercase(), template));
            }
        }
        Some(_) => return Err("option headers must be an object of strings".into()),
    }
    Ok(Action::HttpRequest {
        method,
        url,
        headers,
    })
}

/// Renders the request. Values inserted into the URL are percent-encoded; a relative URL is
/// joined to the connection's base URL; the connection's access token, if any, is sent as a
/// bearer token unless the workflow sets its own Authorization header.
pub fn prepare(
    connection: &Connection,
    method: &Method,
    url: &TextTemplate,
    headers: &[(String, TextTemplate)],
    body: Value,
    scope: &Scope<'_>,
) -> Result<PreparedRequest, Failure> {
    let rendered = url.render_with(scope, encode_segment);
    let url = if rendered.starts_with("http://") || rendered.starts_with("https://") {
        rendered
    } else {
        join_url(&connection.base_url, &rendered)
    };
    let sets_authorization = headers.iter().any(|(name, _)| name == "authorization");
    let mut request = PreparedRequest::new(method.clone(), url);
    if !sets_authorization {
        request = request.bearer(connection.access_token.as_ref());
    }
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
