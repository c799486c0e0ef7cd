//! HubSpot CRM v3 contacts and companies.
//!
//! Create: `POST /crm/v3/objects/contacts {"properties": {...}}` answers `201 {"id": ...}`,
//! or `409 {"category": "CONFLICT", "message": "Contact already exists. Existing ID: 123"}`,
//! which becomes `PATCH /crm/v3/objects/contacts/123`.
//! Upsert: `POST /crm/v3/objects/contacts/batch/upsert` with one input carrying `idProperty`.
//! Finding what an earlier attempt created: `POST /crm/v3/objects/{contacts|companies}/search`
//! with one filter group (the identifying property EQ the record's — a contact's `email`, a
//! company's `domain` or its `match_property` — and `createdate` GTE the first claim, in
//! epoch milliseconds) answers `200 {"total": n, "results": [{"id": ..., "properties": {...}}]}`.
//! The mapping renders the record's properties.

use reqwest::Method;
use serde_json::{Value, json};

use super::classify;
use super::{PreparedRequest, RawResponse, StepOutput, encode_segment, join_url};
use crate::core::connection::Connection;
use crate::core::failure::Failure;
use crate::core::provider::Provider;

const CONTACTS: &str = "crm/v3/objects/contacts";
const COMPANIES: &str = "crm/v3/objects/companies";

/// What identifies a company an earlier attempt created, unless `match_property` says.
pub const COMPANY_MATCH_PROPERTY: &str = "domain";

/// The objects whose records an earlier attempt may have created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Contacts,
    Companies,
}

impl Object {
    fn path(self) -> &'static str {
        match self {
            Object::Contacts => CONTACTS,
            Object::Companies => COMPANIES,
        }
    }
}

/// A HubSpot property's internal name: lowercase letters, digits and `_`, starting with a
/// letter (HubSpot's own rule for property names).
pub fn check_property_name(name: &str, what: &str) -> Result<(), String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "option {what} {name:?} is not a HubSpot property name (lowercase letters, digits and _)"
        ))
    }
}

pub fn create_contact(connection: &Connection, properties: Value) -> PreparedRequest {
    PreparedRequest::new(Method::POST, join_url(&connection.base_url, CONTACTS))
        .bearer(connection.access_token.as_ref())
        .json(json!({ "properties": properties }))
}

/// `body` is the create request's body, sent again as the update.
pub fn update_contact(connection: &Connection, id: &str, body: Option<Value>) -> PreparedRequest {
    let path = format!("{CONTACTS}/{}", encode_segment(id));
    PreparedRequest::new(Method::PATCH, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
        .json(body.unwrap_or_else(|| json!({ "properties": {} })))
}

/// `POST .../contacts/search`: the rendered mapping is HubSpot's search body.
pub fn search_contacts(connection: &Connection, search: Value) -> PreparedRequest {
    PreparedRequest::new(
        Method::POST,
        join_url(&connection.base_url, &format!("{CONTACTS}/search")),
    )
    .bearer(connection.access_token.as_ref())
    .json(search)
}

pub fn create_company(connection: &Connection, properties: Value) -> PreparedRequest {
    PreparedRequest::new(Method::POST, join_url(&connection.base_url, COMPANIES))
        .bearer(connection.access_token.as_ref())
        .json(json!({ "properties": properties }))
}

/// The default (unlabeled) association, v4: `PUT .../associations/default/...`, no body.
pub fn associate(connection: &Connection, contact_id: &str, company_id: &str) -> PreparedRequest {
    let path = format!(
        "crm/v4/objects/contact/{}/associations/default/company/{}",
        encode_segment(contact_id),
        encode_segment(company_id)
    );
    PreparedRequest::new(Method::PUT, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
}

pub fn upsert_contact(
    connection: &Connection,
    id_property: &str,
    properties: Value,
) -> Result<PreparedRequest, Failure> {
    let id = id_property_value(&properties, id_property)?;
    let body = json!({
        "inputs": [{ "idProperty": id_property, "id": id, "properties": properties }]
    });
    Ok(PreparedRequest::new(
        Method::POST,
        join_url(&connection.base_url, &format!("{CONTACTS}/batch/upsert")),
    )
    .bearer(connection.access_token.as_ref())
    .json(body))
}

/// The value of an upsert's id property among the mapped properties.
pub fn id_property_value(properties: &Value, id_property: &str) -> Result<String, Failure> {
    super::identifying_value(
        properties,
        id_property,
        "id property",
        "MISSING_ID_PROPERTY",
    )
}

/// The search for a record of `object` whose `property` has the value `body` (a create's
/// body) gives, created at or after `since`; `None` when the body gives no value (a contact's
/// email is HubSpot's unique identifier of a contact; a company has none, so its mapping
/// names one).
pub fn find_created(
    connection: &Connection,
    object: Object,
    property: &str,
    body: Option<&Value>,
    since: time::OffsetDateTime,
) -> Option<PreparedRequest> {
    let value = match body?.get("properties")?.get(property)? {
        Value::String(text) if !text.trim().is_empty() => text.clone(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    let since_ms = since.unix_timestamp_nanos() / 1_000_000;
    let search = json!({
        "filterGroups": [{"filters": [
            {"propertyName": property, "operator": "EQ", "value": value},
            {"propertyName": "createdate", "operator": "GTE", "value": since_ms.to_string()},
        ]}],
        "properties": [property],
        "limit": 1,
    });
    Some(
        PreparedRequest::new(
            Method::POST,
            join_url(&connection.base_url, &format!("{}/search", object.path())),
        )
        .bearer(connection.access_token.as_ref())
        .json(search),
    )
}

/// The first record a search found, as the step's outcome.
pub fn interpret_found(response: &RawResponse) -> Option<StepOutput> {
    let body = response.json()?;
    let first = body.get("results")?.as_array()?.first()?;
    Some(StepOutput {
        provider_id: Some(id_of(Some(first))?),
        status: response.status,
        body: None,
    })
}

/// The existing contact's id from a 409 CONTACT_EXISTS answer.
pub fn existing_contact_id(response: &RawResponse) -> Option<String> {
    if response.status != 409 {
        return None;
    }
    let message = response.json()?.get("message")?.as_str()?.to_owned();
    existing_id_in(&message)
}

/// The id in HubSpot's "Contact already exists. Existing ID: 123".
pub(crate) fn existing_id_in(message: &str) -> Option<String> {
    let (_, tail) = message.split_once("Existing ID:")?;
    let id: String = tail
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!id.is_empty()).then_some(id)
}

pub fn interpret_create(response: &RawResponse) -> Result<StepOutput, Failure> {
    if !response.is_success() {
        return Err(classify::response(
            Provider::Hubspot,
            response.status,
            &response.headers,
            &response.body,
        ));
    }
    let body = response.json();
    Ok(StepOutput {
        provider_id: id_of(body.as_ref()),
        status: response.status,
        body,
    })
}

/// A batch answer can be 207 with per-input errors; one input, so its error is ours.
pub fn interpret_upsert(response: &RawResponse) -> Result<StepOutput, Failure> {
    let body = response.json();
    let first_error = body
        .as_ref()
        .and_then(|b| b.get("errors"))
        .and_then(Value::as_array)
        .and_then(|errors| errors.first());
    if let Some(error) = first_error {
        let bytes = serde_json::to_vec(error).unwrap_or_default();
        let mut failure = classify::response(Provider::Hubspot, 400, &response.headers, &bytes);
        failure.status = Some(response.status);
        return Err(failure);
    }
    let result = body
        .as_ref()
        .and_then(|b| b.get("results"))
        .and_then(Value::as_array)
        .and_then(|results| results.first());
    Ok(StepOutput {
        provider_id: id_of(result),
        status: response.status,
        body: result.cloned(),
    })
}

pub(crate) fn id_of(object: Option<&Value>) -> Option<String> {
    match object?.get("id")? {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::failure::FailureKind;

    fn response(status: u16, body: &str) -> RawResponse {
        crate::integrations::test_response(status, body)
    }

    #[test]
    fn the_search_names_the_email_and_the_first_claim_and_its_answer_gives_the_id() {
        let connection =
            Connection::without_credentials("u", Provider::Hubspot, "https://api.hubapi.example");
        let since =
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(1_796_000_000_123);
        let body = json!({"properties": {"email": "a@example.com", "firstname": "A"}});
        let search = find_created(&connection, Object::Contacts, "email", Some(&body), since)
            .expect("an email to search");
        assert_eq!(
            search.url,
            "https://api.hubapi.example/crm/v3/objects/contacts/search"
        );
        assert_eq!(
            search.body.expect("body")["filterGroups"][0]["filters"],
            json!([
                {"propertyName": "email", "operator": "EQ", "value": "a@example.com"},
                {"propertyName": "createdate", "operator": "GTE", "value": "1796000000123"},
            ])
        );
        let no_email = json!({"properties": {"firstname": "A"}});
        assert!(
            find_created(
                &connection,
                Object::Contacts,
                "email",
                Some(&no_email),
                since
            )
            .is_none()
        );

        let found = response(
            200,
            r#"{"total":1,"results":[{"id":"51","properties":{"email":"a@example.com"},"archived":false}]}"#,
        );
        assert_eq!(
            interpret_found(&found).and_then(|o| o.provider_id),
            Some("51".into())
        );
        assert!(interpret_found(&response(200, r#"{"total":0,"results":[]}"#)).is_none());
    }

    #[test]
    fn a_company_is_searched_for_by_its_identifying_property_when_the_mapping_gives_it() {
        let connection =
            Connection::without_credentials("u", Provider::Hubspot, "https://api.hubapi.example");
        let since = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(1_000);
        let body = json!({"properties": {"name": "Acme", "domain": "acme.example"}});

        let search = find_created(
            &connection,
            Object::Companies,
            COMPANY_MATCH_PROPERTY,
            Some(&body),
            since,
        )
        .expect("a domain to search");

        assert_eq!(
            search.url,
            "https://api.hubapi.example/crm/v3/objects/companies/search"
        );
        assert_eq!(
            search.body.expect("body"),
            json!({
                "filterGroups": [{"filters": [
                    {"propertyName": "domain", "operator": "EQ", "value": "acme.example"},
                    {"propertyName": "createdate", "operator": "GTE", "value": "1000"},
                ]}],
                "properties": ["domain"],
                "limit": 1,
            })
        );
        let by_name = find_created(&connection, Object::Companies, "name", Some(&body), since)
            .expect("a name to search");
        assert_eq!(
            by_name.body.expect("body")["filterGroups"][0]["filters"][0]["value"],
            json!("Acme")
        );
        let nameless = json!({"properties": {"name": "Acme", "domain": " "}});
        assert!(
            find_created(
                &connection,
                Object::Companies,
                COMPANY_MATCH_PROPERTY,
                Some(&nameless),
                since
            )
            .is_none(),
            "nothing to search by: the create is not guarded"
        );
        assert!(check_property_name("domain", "match_property").is_ok());
        assert!(check_property_name("Domain", "match_property").is_err());
        assert!(check_property_name("a b", "match_property").is_err());
    }

    #[test]
    fn the_existing_id_is_read_from_a_conflict() {
        let conflict = response(
            409,
            r#"{"status":"error","message":"Contact already exists. Existing ID: 51","category":"CONFLICT"}"#,
        );
        assert_eq!(existing_contact_id(&conflict).as_deref(), Some("51"));
        assert_eq!(existing_contact_id(&response(409, "{}")), None);
        assert_eq!(existing_contact_id(&response(201, r#"{"id":"1"}"#)), None);
    }

    #[test]
    fn a_batch_error_fails_the_upsert() {
        let partial = response(
            207,
            r#"{"status":"COMPLETE","results":[],"errors":[{"status":"error","category":"VALIDATION_ERROR","message":"Property values were not valid"}]}"#,
        );
        let failure = interpret_upsert(&partial).expect_err("error");
        assert_eq!(failure.kind, FailureKind::Permanent);
        assert_eq!(failure.status, Some(207));
        let ok = response(
            200,
            r#"{"status":"COMPLETE","results":[{"id":"77","new":true}]}"#,
        );
        assert_eq!(
            interpret_upsert(&ok).expect("ok").provider_id.as_deref(),
            Some("77")
        );
    }
}
