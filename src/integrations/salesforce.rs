//! Salesforce REST API: create a record of any sObject, upsert by external id.
//!
//! `POST {instance}/services/data/{version}/sobjects/{sObject}/` answers
//! `201 {"id": "...", "success": true, "errors": []}`;
//! `PATCH .../sobjects/{sObject}/{field}/{value}` answers 201 (created) or 200/204 (updated).
//! Errors are a JSON array of `{message, errorCode, fields}` (see `classify`).

use reqwest::Method;
use serde_json::Value;

use super::{PreparedRequest, RawResponse, StepOutput, encode_segment, join_url};
use crate::config::SalesforceSettings;
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};

pub fn create(
    settings: &SalesforceSettings,
    connection: &Connection,
    sobject: &str,
    body: Value,
) -> PreparedRequest {
    let path = format!(
        "services/data/{}/sobjects/{sobject}/",
        api_version(settings, connection)
    );
    PreparedRequest::new(Method::POST, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
        .json(body)
}

/// The external id's value is the mapped field of that name; it goes into the URL and is
/// left out of the body, as Salesforce requires.
pub fn upsert(
    settings: &SalesforceSettings,
    connection: &Connection,
    sobject: &str,
    external_id_field: &str,
    mut body: Value,
) -> Result<PreparedRequest, Failure> {
    let value = body
        .as_object_mut()
        .and_then(|fields| fields.remove(external_id_field))
        .and_then(|value| match value {
            Value::String(text) if !text.is_empty() => Some(text),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        })
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Permanent,
                format!("the mapping gave no value for the external id field {external_id_field}"),
            )
            .with_code("MISSING_EXTERNAL_ID")
        })?;
    let path = format!(
        "services/data/{}/sobjects/{sobject}/{external_id_field}/{}",
        api_version(settings, connection),
        encode_segment(&value)
    );
    Ok(
        PreparedRequest::new(Method::PATCH, join_url(&connection.base_url, &path))
            .bearer(connection.access_token.as_ref())
            .json(body),
    )
}

pub fn interpret(response: &RawResponse) -> Result<StepOutput, Failure> {
    let provider_id = response
        .json()
        .and_then(|body| body.get("id").and_then(Value::as_str).map(str::to_owned));
    Ok(StepOutput {
        provider_id,
        status: response.status,
    })
}

/// The connection's `api_version` setting, else the configured default; always "vNN.N".
fn api_version(settings: &SalesforceSettings, connection: &Connection) -> String {
    let version = connection
        .settings
        .get("api_version")
        .and_then(Value::as_str)
        .unwrap_or(&settings.api_version);
    if version.starts_with('v') {
        version.to_owned()
    } else {
        format!("v{version}")
    }
}
