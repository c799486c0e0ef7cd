//! Every provider response that is not a success is classified here, in one place: from
//! the HTTP status, the provider's error code and its rate-limit headers to a [`Failure`]
//! whose [`FailureKind`] drives the retry decision (`pipeline::retry`). Status and code stay
//! typed all the way.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::core::failure::{Failure, FailureKind};
use crate::core::provider::Provider;

const MAX_MESSAGE_CHARS: usize = 500;

/// Classifies a provider's non-success response.
pub fn response(provider: Provider, status: u16, headers: &HeaderMap, body: &[u8]) -> Failure {
    let (code, message) = provider_error(provider, body);
    let retry_after = retry_after(headers, SystemTime::now());
    let kind = match (status, code.as_deref()) {
        (_, Some("REQUEST_LIMIT_EXCEEDED" | "RATE_LIMIT")) | (429, _) => FailureKind::RateLimited,
        (401, _) | (_, Some("INVALID_SESSION_ID" | "EXPIRED_AUTHENTICATION")) => {
            FailureKind::ExpiredCredentials
        }
        (408 | 425, _) => FailureKind::Transient,
        (500..=599, _) => FailureKind::Transient,
        _ => FailureKind::Permanent,
    };
    let message = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        message
    };
    Failure {
        kind,
        status: Some(status),
        code,
        message,
        retry_after,
    }
}

/// Classifies an error from an OAuth token endpoint. `invalid_grant` (Salesforce, RFC 6749)
/// and HubSpot's `BAD_REFRESH_TOKEN` mean the refresh token is revoked or expired.
pub fn token_response(status: u16, headers: &HeaderMap, body: &[u8]) -> Failure {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let code = field("error").or_else(|| field("status"));
    let message = field("error_description")
        .or_else(|| field("message"))
        .unwrap_or_else(|| text_excerpt(body));
    let kind = match (status, code.as_deref()) {
        (
            _,
            Some("invalid_grant" | "BAD_REFRESH_TOKEN" | "invalid_client" | "unauthorized_client"),
        ) => FailureKind::RevokedCredentials,
        (429, _) => FailureKind::RateLimited,
        (408 | 500..=599, _) => FailureKind::Transient,
        _ => FailureKind::Permanent,
    };
    Failure {
        kind,
        status: Some(status),
        code,
        message: format!("token refresh failed: {message}"),
        retry_after: retry_after(headers, SystemTime::now()),
    }
}

/// Classifies a failure to get any response: all transient (the request may or may not have
/// reached the provider; the retry decides).
pub fn transport(error: &reqwest::Error) -> Failure {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_redirect() {
        return Failure::new(
            FailureKind::Permanent,
            format!("redirect refused: {}", error_chain(error)),
        );
    } else {
        "request failed"
    };
    Failure::new(
        FailureKind::Transient,
        format!("{what}: {}", error_chain(error)),
    )
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

/// The provider's own error code and message, from the shapes each one returns.
fn provider_error(provider: Provider, body: &[u8]) -> (Option<String>, String) {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return (None, text_excerpt(body));
    };
    match provider {
        // Salesforce: [{"message": "...", "errorCode": "...", "fields": [...]}]
        Provider::Salesforce => salesforce_error(&json),
        // HubSpot: {"status":"error","message":"...","category":"...","errorType":"..."}
        Provider::Hubspot => hubspot_error(&json),
        Provider::Http => generic_error(&json),
    }
    .unwrap_or_else(|| (None, text_excerpt(body)))
}

fn salesforce_error(json: &Value) -> Option<(Option<String>, String)> {
    let first = json.as_array()?.first()?;
    let code = first
        .get("errorCode")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut message = first
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if let Some(fields) = first
        .get("fields")
        .and_then(Value::as_array)
        .filter(|f| !f.is_empty())
    {
        let names: Vec<&str> = fields.iter().filter_map(Value::as_str).collect();
        message.push_str(&format!(" (fields: {})", names.join(", ")));
    }
    Some((code, clip(&message)))
}

fn hubspot_error(json: &Value) -> Option<(Option<String>, String)> {
    let object = json.as_object()?;
    let code = ["errorType", "category", "subCategory"]
        .iter()
        .find_map(|key| object.get(*key).and_then(Value::as_str))
        .map(str::to_owned);
    let message = object
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some((code, clip(message)))
}

fn generic_error(json: &Value) -> Option<(Option<String>, String)> {
    let object = json.as_object()?;
    let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
    let code = text("code").or_else(|| text("error"));
    let message = text("message")
        .or_else(|| text("error_description"))
        .unwrap_or_else(|| clip(&json.to_string()));
    Some((code, clip(&message)))
}

fn text_excerpt(body: &[u8]) -> String {
    clip(String::from_utf8_lossy(body).trim())
}

fn clip(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    out.push('…');
    out
}

/// The delay a provider asks for: `Retry-After` (seconds or an HTTP date), else HubSpot's
/// rate-limit headers when the window is used up.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Ok(when) = httpdate::parse_http_date(value) {
            return Some(when.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let exhausted = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok()) == Some(0);
    if exhausted("x-hubspot-ratelimit-remaining") {
        let interval = header("x-hubspot-ratelimit-interval-milliseconds")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(10_000);
        return Some(Duration::from_millis(interval));
    }
    if exhausted("x-hubspot-ratelimit-secondly-remaining") {
        return Some(Duration::from_secs(1));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn classify(provider: Provider, status: u16, body: &str) -> Failure {
        response(provider, status, &HeaderMap::new(), body.as_bytes())
    }

    #[test]
    fn salesforce_errors_keep_their_code() {
        let session = classify(
            Provider::Salesforce,
            401,
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#,
        );
        assert_eq!(session.kind, FailureKind::ExpiredCredentials);
        assert_eq!(session.code.as_deref(), Some("INVALID_SESSION_ID"));

        let limit = classify(
            Provider::Salesforce,
            403,
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
        );
        assert_eq!(limit.kind, FailureKind::RateLimited);
        assert_eq!(limit.status, Some(403));

        let dup = classify(
            Provider::Salesforce,
            400,
            r#"[{"message":"Use one of these records?","errorCode":"DUPLICATES_DETECTED","fields":[]}]"#,
        );
        assert_eq!(dup.kind, FailureKind::Permanent);
        assert_eq!(dup.code.as_deref(), Some("DUPLICATES_DETECTED"));

        let missing = classify(
            Provider::Salesforce,
            400,
            r#"[{"message":"Required fields are missing: [LastName]","errorCode":"REQUIRED_FIELD_MISSING","fields":["LastName"]}]"#,
        );
        assert_eq!(missing.kind, FailureKind::Permanent);
        assert!(
            missing.message.contains("(fields: LastName)"),
            "{}",
            missing.message
        );
    }

    #[test]
    fn hubspot_errors_and_rate_limits() {
        let limited = response(
            Provider::Hubspot,
            429,
            &headers(&[
                ("X-HubSpot-RateLimit-Remaining", "0"),
                ("X-HubSpot-RateLimit-Interval-Milliseconds", "10000"),
            ]),
            br#"{"status":"error","message":"You have reached your ten_secondly_rolling limit.","errorType":"RATE_LIMIT","policyName":"TEN_SECONDLY_ROLLING"}"#,
        );
        assert_eq!(limited.kind, FailureKind::RateLimited);
        assert_eq!(limited.code.as_deref(), Some("RATE_LIMIT"));
        assert_eq!(limited.retry_after, Some(Duration::from_secs(10)));

        let expired = classify(
            Provider::Hubspot,
            401,
            r#"{"status":"error","message":"The OAuth token used to make this call expired 1 minute(s) ago.","category":"EXPIRED_AUTHENTICATION"}"#,
        );
        assert_eq!(expired.kind, FailureKind::ExpiredCredentials);

        let invalid = classify(
            Provider::Hubspot,
            400,
            r#"{"status":"error","message":"Property values were not valid","category":"VALIDATION_ERROR"}"#,
        );
        assert_eq!(invalid.kind, FailureKind::Permanent);
    }

    #[test]
    fn statuses_without_a_provider_code() {
        for (status, kind) in [
            (500, FailureKind::Transient),
            (502, FailureKind::Transient),
            (503, FailureKind::Transient),
            (408, FailureKind::Transient),
            (429, FailureKind::RateLimited),
            (401, FailureKind::ExpiredCredentials),
            (400, FailureKind::Permanent),
            (403, FailureKind::Permanent),
            (404, FailureKind::Permanent),
            (409, FailureKind::Permanent),
            (422, FailureKind::Permanent),
        ] {
            assert_eq!(
                classify(Provider::Http, status, "oops").kind,
                kind,
                "{status}"
            );
        }
        assert_eq!(classify(Provider::Http, 500, "oops").message, "oops");
        assert_eq!(classify(Provider::Http, 500, "").message, "HTTP 500");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            retry_after(&headers(&[("Retry-After", "7")]), now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            retry_after(&headers(&[("Retry-After", &later)]), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&headers(&[("Retry-After", "soon")]), now), None);
        assert_eq!(
            retry_after(
                &headers(&[("X-HubSpot-RateLimit-Secondly-Remaining", "0")]),
                now
            ),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn token_endpoint_errors() {
        let revoked = token_response(
            400,
            &HeaderMap::new(),
            br#"{"error":"invalid_grant","error_description":"expired access/refresh token"}"#,
        );
        assert_eq!(revoked.kind, FailureKind::RevokedCredentials);
        assert_eq!(revoked.code.as_deref(), Some("invalid_grant"));
        let hubspot = token_response(
            400,
            &HeaderMap::new(),
            br#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
        );
        assert_eq!(hubspot.kind, FailureKind::RevokedCredentials);
        assert_eq!(
            token_response(503, &HeaderMap::new(), b"").kind,
            FailureKind::Transient
        );
    }
}
