//! The providers' batch endpoints: several runs' records in one call, and each record's
//! answer read back for its own run.
//!
//! - HubSpot: `POST /crm/v3/objects/contacts/batch/{create,update,upsert}`, at most 100
//!   inputs. Each input carries an `objectWriteTraceId` (its place in the batch), which turns
//!   on multi-status answers: `201`/`200` when every input succeeded, `207` with `errors`,
//!   each naming its inputs' trace ids under `context.objectWriteTraceId`. Results are
//!   matched by that id, never by position.
//! - Salesforce sObject Collections: `POST .../composite/sobjects` (create) and
//!   `PATCH .../composite/sobjects/{sObject}/{externalIdField}` (upsert), at most 200
//!   records, `allOrNone: false`. The answer is an array in the order of the records, each
//!   `{"id", "success", "errors": [{"statusCode", "message", "fields"}]}`.
//!
//! What a record's answer can be is [`RecordAnswer`]; a record the answer says nothing of is
//! [`RecordAnswer::Unanswered`], never a success.

use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Action, PreparedRequest, RawResponse, StepOutput, classify, hubspot, join_url, rendered_id,
    salesforce,
};
use crate::config::SalesforceSettings;
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::Scope;
use crate::core::provider::Provider;

/// Most HubSpot inputs in one batch call.
pub const HUBSPOT_MAX: usize = 100;
/// Most Salesforce records in one sObject Collections call.
pub const SALESFORCE_MAX: usize = 200;

/// An action whose records can share one call: runs of it on the same connection are
/// batched together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BatchKind {
    HubspotCreate,
    HubspotUpdate,
    HubspotUpsert {
        id_property: String,
    },
    SalesforceCreate {
        sobject: String,
    },
    SalesforceUpsert {
        sobject: String,
        external_id_field: String,
    },
}

impl BatchKind {
    /// The batch kind of an action, `None` for one that has no batch endpoint.
    pub fn of(action: &Action) -> Option<BatchKind> {
        match action {
            Action::HubspotCreateContact => Some(BatchKind::HubspotCreate),
            Action::HubspotUpdateContact { .. } => Some(BatchKind::HubspotUpdate),
            Action::HubspotUpsertContact { id_property } => Some(BatchKind::HubspotUpsert {
                id_property: id_property.clone(),
            }),
            Action::SalesforceCreate { sobject, .. } => Some(BatchKind::SalesforceCreate {
                sobject: sobject.clone(),
            }),
            Action::SalesforceUpsert {
                sobject,
                external_id_field,
            } => Some(BatchKind::SalesforceUpsert {
                sobject: sobject.clone(),
                external_id_field: external_id_field.clone(),
            }),
            _ => None,
        }
    }

    /// `provider action`, as in [`crate::config::BATCHABLE`].
    pub fn name(&self) -> &'static str {
        match self {
            BatchKind::HubspotCreate => "hubspot create-contact",
            BatchKind::HubspotUpdate => "hubspot update-contact",
            BatchKind::HubspotUpsert { .. } => "hubspot upsert-contact",
            BatchKind::SalesforceCreate { .. } => "salesforce create",
            BatchKind::SalesforceUpsert { .. } => "salesforce upsert",
        }
    }

    pub fn provider(&self) -> Provider {
        match self {
            BatchKind::HubspotCreate
            | BatchKind::HubspotUpdate
            | BatchKind::HubspotUpsert { .. } => Provider::Hubspot,
            BatchKind::SalesforceCreate { .. } | BatchKind::SalesforceUpsert { .. } => {
                Provider::Salesforce
            }
        }
    }

    /// Most records the provider takes in one call.
    pub fn max_records(&self) -> usize {
        match self.provider() {
            Provider::Salesforce => SALESFORCE_MAX,
            _ => HUBSPOT_MAX,
        }
    }

    /// Whether sending a record again after an attempt that may have reached the provider
    /// has the effect of sending it once. Creates are not: after an earlier attempt they run
    /// alone, through the single call's lookup of what that attempt made.
    pub fn repeats_safely(&self) -> bool {
        !matches!(
            self,
            BatchKind::HubspotCreate | BatchKind::SalesforceCreate { .. }
        )
    }
}

/// One run's record, checked and rendered as its batch input.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    /// The mapped fields (HubSpot: the properties).
    pub fields: Value,
    /// The record it names, when it names one: HubSpot update, the contact's id; an
    /// upsert, its id property's or external id's value.
    pub id: Option<String>,
}

/// Renders a run's record for a batch, refusing what the single call would refuse before
/// sending (a missing id, id property or external id) with the same failure.
pub fn record(
    action: &Action,
    kind: &BatchKind,
    fields: Value,
    scope: &Scope<'_>,
) -> Result<BatchRecord, Failure> {
    let id = match (kind, action) {
        (BatchKind::HubspotUpdate, Action::HubspotUpdateContact { id }) => {
            Some(rendered_id(id, scope, "id")?)
        }
        (BatchKind::HubspotUpsert { id_property }, _) => {
            Some(hubspot::id_property_value(&fields, id_property)?)
        }
        (
            BatchKind::SalesforceUpsert {
                external_id_field, ..
            },
            _,
        ) => Some(salesforce::external_id_value(&fields, external_id_field)?),
        _ => None,
    };
    Ok(BatchRecord { fields, id })
}

/// The call that sends `records` in one batch.
pub fn request(
    settings: &SalesforceSettings,
    kind: &BatchKind,
    connection: &Connection,
    records: &[&BatchRecord],
) -> PreparedRequest {
    let hubspot_call = |verb: &str, inputs: Vec<Value>| {
        PreparedRequest::new(
            Method::POST,
            join_url(
                &connection.base_url,
                &format!("crm/v3/objects/contacts/batch/{verb}"),
            ),
        )
        .bearer(connection.access_token.as_ref())
        .json(json!({ "inputs": inputs }))
    };
    let traced = |index: usize, mut input: Value| {
        input["objectWriteTraceId"] = json!(index.to_string());
        input
    };
    match kind {
        BatchKind::HubspotCreate => hubspot_call(
            "create",
            records
                .iter()
                .enumerate()
                .map(|(i, r)| traced(i, json!({ "properties": r.fields })))
                .collect(),
        ),
        BatchKind::HubspotUpdate => hubspot_call(
            "update",
            records
                .iter()
                .enumerate()
                .map(|(i, r)| traced(i, json!({ "id": r.id, "properties": r.fields })))
                .collect(),
        ),
        BatchKind::HubspotUpsert { id_property } => hubspot_call(
            "upsert",
            records
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    traced(
                        i,
                        json!({ "idProperty": id_property, "id": r.id, "properties": r.fields }),
                    )
                })
                .collect(),
        ),
        BatchKind::SalesforceCreate { sobject } => {
            collection(settings, connection, sobject, None, records)
        }
        BatchKind::SalesforceUpsert {
            sobject,
            external_id_field,
        } => collection(
            settings,
            connection,
            sobject,
            Some(external_id_field),
            records,
        ),
    }
}

/// What became of one record of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordAnswer {
    Done(StepOutput),
    Failed(Failure),
    /// The batch cannot tell this record's fate in a way the single call handles better
    /// (a conflict the single create turns into an update, a refusal of the whole batch):
    /// the run sends its record alone.
    Alone,
    /// A HubSpot create found the contact existing, with this id: the run updates it, as a
    /// single create does after its `409`.
    Exists(String),
    /// The answer says nothing of this record: it is not known to have been written, and
    /// is tried again, never taken as a success.
    Unanswered,
}

/// Each record's answer, in the order of `records` (the batch as sent); `Err` when the whole
/// batch failed in a way every record shares (a 429, a 5xx, expired credentials): each run
/// handles it as its own call's failure.
pub fn answers(
    kind: &BatchKind,
    response: &RawResponse,
    records: &[&BatchRecord],
) -> Result<Vec<RecordAnswer>, Failure> {
    let count = records.len();
    let provider = kind.provider();
    let multi_status = provider == Provider::Hubspot && response.status == 207;
    if !response.is_success() || (multi_status && response.json().is_none()) {
        let failure =
            classify::response(provider, response.status, &response.headers, &response.body);
        if failure.kind == FailureKind::Permanent {
            // A refusal of the whole batch (a malformed input, a duplicate within it): each
            // record's own call says which run it belongs to.
            tracing::info!(status = response.status, error = %failure.message, "the provider refused the batch as a whole; its records are sent one by one");
            return Ok(vec![RecordAnswer::Alone; count]);
        }
        return Err(failure);
    }
    Ok(match provider {
        Provider::Salesforce => collection_answers(response, count),
        _ => hubspot_answers(kind, response, records),
    })
}

/// Each input's answer in a batch answer (`results` and, in a 207, `errors`), matched by
/// the `objectWriteTraceId` the input carried (its place in the batch). A create's
/// `CONFLICT` names the existing contact, which the run updates (alone, when it does not).
fn hubspot_answers(
    kind: &BatchKind,
    response: &RawResponse,
    records: &[&BatchRecord],
) -> Vec<RecordAnswer> {
    let count = records.len();
    let mut answers = vec![RecordAnswer::Unanswered; count];
    let body = response.json().unwrap_or(Value::Null);
    let place = |trace: Option<&Value>| -> Option<usize> {
        let index: usize = trace?.as_str()?.parse().ok()?;
        (index < count).then_some(index)
    };
    for result in body
        .get("results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index =
            place(result.get("objectWriteTraceId")).or_else(|| identified(kind, result, records));
        if let Some(index) = index {
            answers[index] = RecordAnswer::Done(StepOutput {
                provider_id: hubspot::id_of(Some(result)),
                status: response.status,
                body: Some(result.clone()),
            });
        }
    }
    for error in body
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let category = error.get("category").and_then(Value::as_str);
        let answer = if *kind == BatchKind::HubspotCreate && category == Some("CONFLICT") {
            error
                .get("message")
                .and_then(Value::as_str)
                .and_then(hubspot::existing_id_in)
                .map_or(RecordAnswer::Alone, RecordAnswer::Exists)
        } else {
            let bytes = serde_json::to_vec(error).unwrap_or_default();
            let status = if category == Some("OBJECT_NOT_FOUND") {
                404
            } else {
                400
            };
            let mut failure =
                classify::response(Provider::Hubspot, status, &response.headers, &bytes);
            failure.status = Some(response.status);
            RecordAnswer::Failed(failure)
        };
        let traces = error
            .get("context")
            .and_then(|c| c.get("objectWriteTraceId"))
            .and_then(Value::as_array);
        for index in traces.into_iter().flatten().filter_map(|t| place(Some(t))) {
            answers[index] = answer.clone();
        }
    }
    answers
}

/// The one record of the batch a result without a trace id is about, by what identifies it:
/// an upsert's id property, an update's id, a create's email. `None` when no record, or more
/// than one, has that value: the record stays unanswered, and is tried again alone.
fn identified(kind: &BatchKind, result: &Value, records: &[&BatchRecord]) -> Option<usize> {
    let property = |name: &str| result.get("properties")?.get(name).map(text_of);
    let value = match kind {
        BatchKind::HubspotUpsert { id_property } => property(id_property),
        BatchKind::HubspotUpdate => hubspot::id_of(Some(result)),
        BatchKind::HubspotCreate => property("email"),
        _ => return None,
    }
    .filter(|v| !v.is_empty())?;
    let of_record = |record: &BatchRecord| match kind {
        BatchKind::HubspotCreate => record.fields.get("email").map(text_of),
        _ => record.id.clone(),
    };
    let mut matching = records.iter().enumerate().filter(|(_, record)| {
        of_record(record).is_some_and(|mine| mine.eq_ignore_ascii_case(&value))
    });
    let (index, _) = matching.next()?;
    matching.next().is_none().then_some(index)
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// sObject Collections: `POST .../composite/sobjects` creates the records;
/// `PATCH .../composite/sobjects/{sObject}/{externalIdField}` upserts them by that field,
/// which stays in each record. `allOrNone: false`: each record succeeds or fails alone.
fn collection(
    settings: &SalesforceSettings,
    connection: &Connection,
    sobject: &str,
    external_id_field: Option<&str>,
    records: &[&BatchRecord],
) -> PreparedRequest {
    let version = salesforce::api_version(settings, connection);
    let (method, path) = match external_id_field {
        None => (
            Method::POST,
            format!("services/data/{version}/composite/sobjects"),
        ),
        Some(field) => (
            Method::PATCH,
            format!("services/data/{version}/composite/sobjects/{sobject}/{field}"),
        ),
    };
    let records: Vec<Value> = records
        .iter()
        .map(|record| {
            let mut fields = record.fields.as_object().cloned().unwrap_or_default();
            fields.insert("attributes".into(), serde_json::json!({ "type": sobject }));
            Value::Object(fields)
        })
        .collect();
    PreparedRequest::new(method, join_url(&connection.base_url, &path))
        .bearer(connection.access_token.as_ref())
        .json(serde_json::json!({ "allOrNone": false, "records": records }))
}

/// Record errors that say "not now" rather than "never".
const TRANSIENT_RECORD_ERRORS: &[&str] = &[
    "UNABLE_TO_LOCK_ROW",
    "REQUEST_RUNNING_TOO_LONG",
    "SERVER_UNAVAILABLE",
];

/// Each record's answer, by position; records past the end of the answer are unanswered.
fn collection_answers(response: &RawResponse, count: usize) -> Vec<RecordAnswer> {
    let results = response
        .json()
        .and_then(|body| body.as_array().cloned())
        .unwrap_or_default();
    let mut answers: Vec<RecordAnswer> = results
        .into_iter()
        .take(count)
        .map(|result| record_answer(response, result))
        .collect();
    answers.resize(count, RecordAnswer::Unanswered);
    answers
}

fn record_answer(response: &RawResponse, result: Value) -> RecordAnswer {
    if result.get("success").and_then(Value::as_bool) == Some(true) {
        return RecordAnswer::Done(StepOutput {
            provider_id: result.get("id").and_then(Value::as_str).map(str::to_owned),
            status: response.status,
            body: Some(result),
        });
    }
    let Some(error) = result
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|errors| errors.first())
    else {
        return RecordAnswer::Unanswered;
    };
    let code = error
        .get("statusCode")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if code == "DUPLICATE_VALUE" && message.starts_with("Duplicate external id specified") {
        // Two records of the batch share an external id (two events of one contact): neither
        // was written, and each goes alone, one after the other.
        return RecordAnswer::Alone;
    }
    // The single call's error shape, so the record's failure reads as the single call's.
    let single = serde_json::json!([{
        "errorCode": code,
        "message": error.get("message").cloned().unwrap_or(Value::Null),
        "fields": error.get("fields").cloned().unwrap_or_else(|| serde_json::json!([])),
    }]);
    let status = if TRANSIENT_RECORD_ERRORS.contains(&code) {
        503
    } else {
        400
    };
    let bytes = serde_json::to_vec(&single).unwrap_or_default();
    let mut failure = classify::response(Provider::Salesforce, status, &response.headers, &bytes);
    failure.status = Some(response.status);
    RecordAnswer::Failed(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` records, each with its own email.
    fn records(n: usize) -> Vec<BatchRecord> {
        (0..n)
            .map(|i| BatchRecord {
                fields: json!({ "email": format!("{i}@example.com") }),
                id: Some(format!("{i}@example.com")),
            })
            .collect()
    }

    fn answered(
        kind: &BatchKind,
        response: &RawResponse,
        n: usize,
    ) -> Result<Vec<RecordAnswer>, Failure> {
        let records = records(n);
        let refs: Vec<&BatchRecord> = records.iter().collect();
        super::answers(kind, response, &refs)
    }

    fn response(status: u16, body: Value) -> RawResponse {
        crate::integrations::test_response(status, &body.to_string())
    }

    #[test]
    fn hubspot_answers_are_matched_by_trace_id_not_position() {
        let answer = response(
            207,
            json!({
                "status": "COMPLETE",
                "results": [
                    {"id": "12", "properties": {}, "objectWriteTraceId": "2"},
                    {"id": "10", "properties": {}, "objectWriteTraceId": "0"},
                ],
                "numErrors": 2,
                "errors": [
                    {"status": "error", "category": "VALIDATION_ERROR", "message": "Property values were not valid",
                     "context": {"objectWriteTraceId": ["1"]}},
                    {"status": "error", "category": "CONFLICT", "message": "Contact already exists. Existing ID: 7",
                     "context": {"objectWriteTraceId": ["3"]}},
                ],
            }),
        );

        let answers = answered(&BatchKind::HubspotCreate, &answer, 5).expect("per record");

        let id = |a: &RecordAnswer| match a {
            RecordAnswer::Done(output) => output.provider_id.clone(),
            _ => None,
        };
        assert_eq!(id(&answers[0]).as_deref(), Some("10"));
        assert_eq!(id(&answers[2]).as_deref(), Some("12"));
        assert!(
            matches!(&answers[1], RecordAnswer::Failed(f) if f.kind == FailureKind::Permanent && f.code.as_deref() == Some("VALIDATION_ERROR"))
        );
        assert_eq!(
            answers[3],
            RecordAnswer::Exists("7".into()),
            "a conflict names the contact to update"
        );
        assert_eq!(answers[4], RecordAnswer::Unanswered, "never a success");
    }

    #[test]
    fn a_hubspot_result_without_a_trace_id_is_matched_by_what_identifies_its_record() {
        let kind = BatchKind::HubspotUpsert {
            id_property: "email".into(),
        };
        let answer = response(
            200,
            json!({"status": "COMPLETE", "results": [
                {"id": "21", "properties": {"email": "2@EXAMPLE.com"}},
                {"id": "20", "properties": {"email": "0@example.com"}},
                {"id": "99", "properties": {"email": "someone-else@example.com"}},
            ]}),
        );

        let answers = answered(&kind, &answer, 3).expect("per record");

        let id = |a: &RecordAnswer| match a {
            RecordAnswer::Done(output) => output.provider_id.clone(),
            _ => None,
        };
        assert_eq!(id(&answers[0]).as_deref(), Some("20"));
        assert_eq!(answers[1], RecordAnswer::Unanswered, "no result names it");
        assert_eq!(id(&answers[2]).as_deref(), Some("21"));

        // Two records of one email in a create: neither can be told apart.
        let twins = [
            BatchRecord {
                fields: json!({"email": "a@example.com"}),
                id: None,
            },
            BatchRecord {
                fields: json!({"email": "a@example.com"}),
                id: None,
            },
        ];
        let refs: Vec<&BatchRecord> = twins.iter().collect();
        let created = response(
            201,
            json!({"status": "COMPLETE", "results": [{"id": "5", "properties": {"email": "a@example.com"}}]}),
        );
        assert_eq!(
            super::answers(&BatchKind::HubspotCreate, &created, &refs).expect("per record"),
            vec![RecordAnswer::Unanswered, RecordAnswer::Unanswered]
        );
    }

    #[test]
    fn salesforce_answers_are_by_position_and_a_short_answer_leaves_the_rest_unanswered() {
        let answer = response(
            200,
            json!([
                {"id": "003A", "success": true, "errors": []},
                {"success": false, "errors": [{"statusCode": "REQUIRED_FIELD_MISSING", "message": "Required fields are missing: [LastName]", "fields": ["LastName"]}]},
                {"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access", "fields": []}]},
            ]),
        );
        let kind = BatchKind::SalesforceCreate {
            sobject: "Contact".into(),
        };

        let answers = answered(&kind, &answer, 4).expect("per record");

        assert!(
            matches!(&answers[0], RecordAnswer::Done(o) if o.provider_id.as_deref() == Some("003A"))
        );
        assert!(
            matches!(&answers[1], RecordAnswer::Failed(f) if f.kind == FailureKind::Permanent && f.message.contains("LastName"))
        );
        assert!(matches!(&answers[2], RecordAnswer::Failed(f) if f.kind == FailureKind::Transient));
        assert_eq!(answers[3], RecordAnswer::Unanswered);

        let shared = response(
            200,
            json!([{"success": false, "errors": [{"statusCode": "DUPLICATE_VALUE", "message": "Duplicate external id specified: a@example.com", "fields": ["Email"]}]}]),
        );
        assert_eq!(
            answered(&kind, &shared, 1).expect("per record"),
            vec![RecordAnswer::Alone],
            "two records of one contact: sent alone, not failed"
        );
    }

    #[test]
    fn a_whole_batch_s_failure_is_each_run_s_or_sends_them_alone() {
        let kind = BatchKind::HubspotUpsert {
            id_property: "email".into(),
        };
        let limited = response(
            429,
            json!({"status": "error", "category": "RATE_LIMITS", "errorType": "RATE_LIMIT", "message": "slow down"}),
        );
        assert_eq!(
            answered(&kind, &limited, 3).expect_err("shared").kind,
            FailureKind::RateLimited
        );
        let down = response(503, json!({"status": "error", "message": "down"}));
        assert_eq!(
            answered(&kind, &down, 3).expect_err("shared").kind,
            FailureKind::Transient
        );
        let refused = response(
            400,
            json!({"status": "error", "category": "VALIDATION_ERROR", "message": "Duplicate IDs found in batch input"}),
        );
        assert_eq!(
            answered(&kind, &refused, 2).expect("each alone"),
            vec![RecordAnswer::Alone, RecordAnswer::Alone]
        );
    }

    #[test]
    fn each_provider_s_batch_request_has_its_shape() {
        let hubspot =
            Connection::without_credentials("u", Provider::Hubspot, "https://api.example");
        let records = [
            BatchRecord {
                fields: json!({"email": "a@example.com"}),
                id: Some("a@example.com".into()),
            },
            BatchRecord {
                fields: json!({"email": "b@example.com"}),
                id: Some("b@example.com".into()),
            },
        ];
        let refs: Vec<&BatchRecord> = records.iter().collect();
        let settings = SalesforceSettings {
            api_version: "v62.0".into(),
        };
        let kind = BatchKind::HubspotUpsert {
            id_property: "email".into(),
        };
        let upsert = request(&settings, &kind, &hubspot, &refs);
        assert_eq!(
            upsert.url,
            "https://api.example/crm/v3/objects/contacts/batch/upsert"
        );
        assert_eq!(
            upsert.body.expect("body")["inputs"][1],
            json!({"idProperty": "email", "id": "b@example.com", "properties": {"email": "b@example.com"}, "objectWriteTraceId": "1"})
        );
        let salesforce =
            Connection::without_credentials("u", Provider::Salesforce, "https://org.example");
        let kind = BatchKind::SalesforceUpsert {
            sobject: "Contact".into(),
            external_id_field: "Email".into(),
        };
        let collection = request(&settings, &kind, &salesforce, &refs);
        assert_eq!(collection.method, Method::PATCH);
        assert_eq!(
            collection.url,
            "https://org.example/services/data/v62.0/composite/sobjects/Contact/Email"
        );
        let body = collection.body.expect("body");
        assert_eq!(body["allOrNone"], json!(false));
        assert_eq!(
            body["records"][0],
            json!({"attributes": {"type": "Contact"}, "email": "a@example.com"})
        );
    }
}
