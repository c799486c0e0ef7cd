//! Salesforce REST API: create a record of any sObject, upsert by external id.
//!
//! `POST {instance}/services/data/{version}/sobjects/{sObject}/` answers
//! `201 {"id": "...", "success": true, "errors": []}`;
//! `PATCH .../sobjects/{sObject}/{field}/{value}` answers 201 (created) or 200/204 (updated).
//! Errors are a JSON array of `{message, errorCode, fields}` (see `classify`); a duplicate
//! rule's `DUPLICATES_DETECTED` carries the matched records under `duplicateResult`.
//!
//! Finding what an earlier attempt created: `GET .../query?q=SELECT Id FROM {sObject} WHERE
//! {field} = '{value}' AND ... AND CreatedDate >= {since}` answers
//! `{"totalSize": n, "done": true, "records": [{"attributes": {...}, "Id": "..."}]}`.

use reqwest::Method;
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

use super::{PreparedRequest, RawResponse, StepOutput, encode_segment, join_url};
use crate::config::SalesforceSettings;
use crate::core::connection::Connection;
use crate::core::failure::Failure;
use crate::core::mapping::TextTemplate;

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
    let value = external_id_value(&body, external_id_field)?;
    if let Some(fields) = body.as_object_mut() {
        fields.remove(external_id_field);
    }
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

/// The external id's value among the mapped fields.
pub fn external_id_value(body: &Value, external_id_field: &str) -> Result<String, Failure> {
    super::identifying_value(
        body,
        external_id_field,
        "external id field",
        "MISSING_EXTERNAL_ID",
    )
}

pub fn interpret(response: &RawResponse) -> Result<StepOutput, Failure> {
    let body = response.json();
    let provider_id = body
        .as_ref()
        .and_then(|body| body.get("id").and_then(Value::as_str).map(str::to_owned));
    Ok(StepOutput {
        provider_id,
        status: response.status,
        body,
    })
}

/// The SOQL query for a record of `sobject` whose `match_fields` have the values `body` maps
/// them to, created at or after `since`.
pub fn find_created(
    settings: &SalesforceSettings,
    connection: &Connection,
    sobject: &str,
    match_fields: &[String],
    body: Option<&Value>,
    since: OffsetDateTime,
) -> PreparedRequest {
    let mut conditions: Vec<String> = match_fields
        .iter()
        .map(|field| {
            let value = body.and_then(|b| b.get(field)).unwrap_or(&Value::Null);
            format!("{field} = {}", soql_literal(value))
        })
        .collect();
    conditions.push(format!("CreatedDate >= {}", soql_datetime(since)));
    let soql = format!(
        "SELECT Id FROM {sobject} WHERE {}",
        conditions.join(" AND ")
    );
    let path = format!(
        "services/data/{}/query?q={}",
        api_version(settings, connection),
        encode_segment(&soql)
    );
    PreparedRequest::new(Method::GET, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
}

/// The first record a query found, as the step's outcome.
pub fn interpret_found(response: &RawResponse) -> Option<StepOutput> {
    let body = response.json()?;
    let id = body
        .get("records")?
        .as_array()?
        .first()?
        .get("Id")?
        .as_str()?
        .to_owned();
    Some(StepOutput {
        provider_id: Some(id),
        status: response.status,
        body: None,
    })
}

/// The id of the record a duplicate rule matched, from a `DUPLICATES_DETECTED` answer.
pub fn duplicate_of(response: &RawResponse) -> Option<String> {
    let body = response.json()?;
    let error = body
        .as_array()?
        .iter()
        .find(|e| e.get("errorCode").and_then(Value::as_str) == Some("DUPLICATES_DETECTED"))?;
    error
        .get("duplicateResult")?
        .get("matchResults")?
        .as_array()?
        .iter()
        .filter_map(|m| m.get("matchRecords").and_then(Value::as_array))
        .flatten()
        .find_map(|r| r.get("record")?.get("Id")?.as_str().map(str::to_owned))
}

/// A value as a SOQL literal: strings quoted with SOQL's escapes, numbers and booleans as
/// they are, anything else (missing, null, objects) as `null`.
/// A query step's SOQL: what it renders, for one event.
pub fn query(
    settings: &SalesforceSettings,
    connection: &Connection,
    soql: &str,
) -> PreparedRequest {
    let path = format!(
        "services/data/{}/query?q={}",
        api_version(settings, connection),
        encode_segment(soql)
    );
    PreparedRequest::new(Method::GET, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
}

/// A query step is a SELECT, and its references stand where a literal does, never inside
/// quotes (`Email = {{payload.email}}`, not `Email = '{{payload.email}}'`).
pub fn check_query(soql: &TextTemplate) -> Result<(), String> {
    if !soql
        .text_before_first_reference()
        .trim_start()
        .to_ascii_uppercase()
        .starts_with("SELECT ")
    {
        return Err("option soql must be a SELECT query".into());
    }
    if soql.reference_inside_quotes('\'') {
        return Err(
            "option soql: a reference renders as a quoted literal itself: write Email = {{payload.email}}, not '{{payload.email}}'"
                .into(),
        );
    }
    Ok(())
}

/// A referenced value as a SOQL literal; a missing one is `null`.
pub fn soql_value(value: Option<&Value>) -> String {
    value.map_or_else(|| "null".to_owned(), soql_literal)
}

/// `PATCH .../sobjects/{sObject}/{id}`: 204 on success.
pub fn update(
    settings: &SalesforceSettings,
    connection: &Connection,
    sobject: &str,
    id: &str,
    body: Value,
) -> Result<PreparedRequest, Failure> {
    let path = format!(
        "services/data/{}/sobjects/{sobject}/{}",
        api_version(settings, connection),
        encode_segment(id)
    );
    Ok(
        PreparedRequest::new(Method::PATCH, join_url(&connection.base_url, &path))
            .bearer(connection.access_token.as_ref())
            .json(body),
    )
}

fn soql_literal(value: &Value) -> String {
    match value {
        Value::String(text) => {
            let mut quoted = String::with_capacity(text.len() + 2);
            quoted.push('\'');
            for c in text.chars() {
                match c {
                    '\'' => quoted.push_str("\\'"),
                    '"' => quoted.push_str("\\\""),
                    '\\' => quoted.push_str("\\\\"),
                    '\n' => quoted.push_str("\\n"),
                    '\r' => quoted.push_str("\\r"),
                    '\t' => quoted.push_str("\\t"),
                    '\u{8}' => quoted.push_str("\\b"),
                    '\u{c}' => quoted.push_str("\\f"),
                    other => quoted.push(other),
                }
            }
            quoted.push('\'');
            quoted
        }
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => "null".to_owned(),
    }
}

/// A SOQL dateTime literal (unquoted, UTC, whole seconds): `2026-12-07T11:00:00Z`.
fn soql_datetime(at: OffsetDateTime) -> String {
    let at = at.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// The connection's `api_version` setting, else the configured default; always "vNN.N".
pub(crate) fn api_version(settings: &SalesforceSettings, connection: &Connection) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(status: u16, body: Value) -> RawResponse {
        crate::integrations::test_response(status, &body.to_string())
    }

    #[test]
    fn values_become_soql_literals_that_cannot_leave_their_quotes() {
        assert_eq!(soql_literal(&json!("ada@example.com")), "'ada@example.com'");
        assert_eq!(
            soql_literal(&json!("O'Brien\\' OR Name != ''")),
            r"'O\'Brien\\\' OR Name != \'\''"
        );
        assert_eq!(soql_literal(&json!("a\nb\"c")), r#"'a\nb\"c'"#);
        assert_eq!(soql_literal(&json!(42)), "42");
        assert_eq!(soql_literal(&json!(true)), "true");
        assert_eq!(soql_literal(&Value::Null), "null");
    }

    #[test]
    fn the_lookup_names_the_fields_and_the_first_claim() {
        let settings = SalesforceSettings {
            api_version: "v62.0".into(),
        };
        let connection = Connection::without_credentials(
            "u",
            crate::core::provider::Provider::Salesforce,
            "https://org.my.salesforce.com",
        );
        let since = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_796_000_000);

        let request = find_created(
            &settings,
            &connection,
            "Contact",
            &["Email".into(), "LastName".into()],
            Some(&json!({"Email": "ada@example.com", "LastName": "O'Hara"})),
            since,
        );

        assert_eq!(request.method, Method::GET);
        let (path, query) = request.url.split_once("?q=").expect("a query");
        assert_eq!(
            path,
            "https://org.my.salesforce.com/services/data/v62.0/query"
        );
        let soql = percent_encoding::percent_decode_str(query)
            .decode_utf8()
            .expect("utf-8");
        assert_eq!(
            soql,
            r"SELECT Id FROM Contact WHERE Email = 'ada@example.com' AND LastName = 'O\'Hara' AND CreatedDate >= 2026-11-30T00:53:20Z"
        );
    }

    #[test]
    fn a_found_record_and_a_duplicate_rule_s_match_give_the_id() {
        let found = response(
            200,
            json!({"totalSize": 1, "done": true, "records": [{"attributes": {"type": "Contact"}, "Id": "003A"}]}),
        );
        assert_eq!(
            interpret_found(&found)
                .and_then(|o| o.provider_id)
                .as_deref(),
            Some("003A")
        );
        let none = response(200, json!({"totalSize": 0, "done": true, "records": []}));
        assert_eq!(interpret_found(&none), None);

        let duplicate = response(
            400,
            json!([{"duplicateResult": {"allowSave": false, "duplicateRule": "Standard_Contact_Duplicate_Rule",
                "matchResults": [{"entityType": "Contact", "matchRecords": [{"matchConfidence": 100.0,
                "record": {"attributes": {"type": "Contact"}, "Id": "003B"}}], "size": 1, "success": true}]},
                "errorCode": "DUPLICATES_DETECTED", "message": "Use one of these records?"}]),
        );
        assert_eq!(duplicate_of(&duplicate).as_deref(), Some("003B"));
        let other = response(
            400,
            json!([{"errorCode": "REQUIRED_FIELD_MISSING", "message": "x", "fields": []}]),
        );
        assert_eq!(duplicate_of(&other), None);
    }
}
