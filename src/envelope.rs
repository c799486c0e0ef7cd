//! The publishing contract: turning a message body and its properties into an [`Event`], or
//! into the precise reason it is not one; and reading the headers appevents reserves for
//! itself into a [`Routing`], or into the precise reason they are malformed.

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::broker::{self, header};

/// Longest accepted `id`, `name` and `user_id`, in characters.
pub const MAX_FIELD_CHARS: usize = 255;

/// One occurrence of an app event, as published.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub id_source: IdSource,
    pub name: String,
    pub user_id: String,
    pub payload: Map<String, Value>,
    pub occurred_at: Option<String>,
}

/// Where the event id came from. It is the idempotency key, so it must be stable across
/// redeliveries of the same message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    Body,
    MessageId,
    /// Neither the body nor `message_id` had one: the id is the SHA-256 of the body, so a
    /// redelivery keeps its id and two byte-identical bodies count as one event.
    BodyHash,
}

/// The AMQP properties the contract looks at.
#[derive(Debug, Clone, Default)]
pub struct MessageMeta<'a> {
    pub content_type: Option<&'a str>,
    pub message_id: Option<&'a str>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

/// Why a message is not a valid event. The text is the dead letter's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("content type {0:?} is not application/json")]
    ContentType(String),
    #[error("body is not valid UTF-8 (first bad byte at offset {0})")]
    NotUtf8(usize),
    #[error("body nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is a JSON {0}, not an object")]
    NotObject(&'static str),
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{0}` is empty")]
    Empty(&'static str),
    #[error("field `{field}` is {chars} characters, over the {limit}-character limit")]
    TooLong {
        field: &'static str,
        chars: usize,
        limit: usize,
    },
    #[error("field `{0}` contains control characters")]
    ControlCharacters(&'static str),
    #[error("field `occurred_at` is not an RFC 3339 timestamp: {0:?}")]
    BadTimestamp(String),
    #[error("message_id property {0}")]
    BadMessageId(&'static str),
    #[error("header {header} must be {expected}")]
    BadHeader {
        header: &'static str,
        expected: &'static str,
    },
}

impl Invalid {
    /// A stable, low-cardinality label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Invalid::TooLarge { .. } => "too_large",
            Invalid::ContentType(_) => "content_type",
            Invalid::NotUtf8(_) => "not_utf8",
            Invalid::TooDeep(_) => "too_deep",
            Invalid::NotJson(_) => "not_json",
            Invalid::NotObject(_) => "not_object",
            Invalid::Missing(_) => "missing_field",
            Invalid::WrongType { .. } => "wrong_type",
            Invalid::Empty(_) => "empty_field",
            Invalid::TooLong { .. } => "too_long",
            Invalid::ControlCharacters(_) => "control_characters",
            Invalid::BadTimestamp(_) => "bad_timestamp",
            Invalid::BadMessageId(_) => "bad_message_id",
            Invalid::BadHeader { .. } => "bad_header",
        }
    }
}

/// Parses and validates one message against the publishing contract.
pub fn parse(body: &[u8], meta: &MessageMeta<'_>, limits: Limits) -> Result<Event, Invalid> {
    if body.len() > limits.max_bytes {
        return Err(Invalid::TooLarge {
            size: body.len(),
            limit: limits.max_bytes,
        });
    }
    if let Some(content_type) = meta.content_type {
        check_content_type(content_type)?;
    }
    let text = std::str::from_utf8(body).map_err(|e| Invalid::NotUtf8(e.valid_up_to()))?;
    // Checked before parsing so a deeply nested body is refused with a precise reason
    // instead of serde_json's recursion limit.
    if nests_deeper_than(text.as_bytes(), limits.max_depth) {
        return Err(Invalid::TooDeep(limits.max_depth));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(Invalid::NotObject(kind(&value)));
    };
    let name = required_text(&mut object, "name")?;
    let user_id = required_text(&mut object, "user_id")?;
    let payload = match object.remove("payload") {
        None => return Err(Invalid::Missing("payload")),
        Some(Value::Object(payload)) => payload,
        Some(other) => return Err(wrong_type("payload", "an object", &other)),
    };
    let occurred_at = optional_text(&mut object, "occurred_at")?;
    if let Some(ts) = &occurred_at {
        check_timestamp(ts)?;
    }
    let (id, id_source) = match optional_text(&mut object, "id")? {
        Some(id) => (id, IdSource::Body),
        None => match meta.message_id {
            Some(message_id) => (message_id_text(message_id)?, IdSource::MessageId),
            None => (body_hash_id(body), IdSource::BodyHash),
        },
    };
    Ok(Event {
        id,
        id_source,
        name,
        user_id,
        payload,
        occurred_at,
    })
}

/// What the reserved headers say about how to run a message. A first delivery from a
/// producer has none of them and gets the default: attempt 0, every workflow, no replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Broker-level retries already done (`x-appevents-attempt`).
    pub attempt: u32,
    /// Only these workflows run (`x-appevents-workflows`): a retry or a replay of one run.
    pub workflows: Option<Vec<Uuid>>,
    /// Dead runs may run again (`x-appevents-replay`).
    pub replay: bool,
    /// Times the broker delivered it before (`x-delivery-count`).
    pub deliveries: i64,
}

const ATTEMPT_EXPECTED: &str = "an integer from 0 to 4294967295";
const WORKFLOWS_EXPECTED: &str = "an array of workflow ids";
const WORKFLOWS_EMPTY_EXPECTED: &str = "a non-empty array of workflow ids";
const REPLAY_EXPECTED: &str = "a boolean";

/// Reads and checks the routing headers. Only appevents sets them (on retries and replays),
/// so a malformed one means a producer set a reserved header or a message was tampered
/// with: reading it leniently would run the wrong workflows, skip the replay mark or reset
/// the retry budget, so the message is refused instead.
pub fn routing(headers: Option<&FieldTable>) -> Result<Routing, Invalid> {
    let get = |key: &str| headers.and_then(|h| h.inner().get(key));
    Ok(Routing {
        attempt: get(header::ATTEMPT).map(attempt).transpose()?.unwrap_or(0),
        workflows: get(header::WORKFLOWS).map(workflows).transpose()?,
        replay: get(header::REPLAY)
            .map(replay)
            .transpose()?
            .unwrap_or(false),
        // The broker's own header, not ours: any integer type RabbitMQ or a client picks is
        // fine, and a malformed one reads as a first delivery (the queue's delivery limit
        // still bounds redeliveries).
        deliveries: broker::header_int(headers, header::DELIVERY_COUNT).unwrap_or(0),
    })
}

fn attempt(value: &AMQPValue) -> Result<u32, Invalid> {
    broker::integer(value)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(bad_header(header::ATTEMPT, ATTEMPT_EXPECTED))
}

fn workflows(value: &AMQPValue) -> Result<Vec<Uuid>, Invalid> {
    let AMQPValue::FieldArray(items) = value else {
        return Err(bad_header(header::WORKFLOWS, WORKFLOWS_EXPECTED));
    };
    // Empty would run nothing and acknowledge the message: a silent loss, not a routing.
    if items.as_slice().is_empty() {
        return Err(bad_header(header::WORKFLOWS, WORKFLOWS_EMPTY_EXPECTED));
    }
    items
        .as_slice()
        .iter()
        .map(|item| {
            broker::text(item)
                .and_then(|id| Uuid::parse_str(id).ok())
                .ok_or(bad_header(header::WORKFLOWS, WORKFLOWS_EXPECTED))
        })
        .collect()
}

fn replay(value: &AMQPValue) -> Result<bool, Invalid> {
    match value {
        AMQPValue::Boolean(replay) => Ok(*replay),
        _ => Err(bad_header(header::REPLAY, REPLAY_EXPECTED)),
    }
}

fn bad_header(header: &'static str, expected: &'static str) -> Invalid {
    Invalid::BadHeader { header, expected }
}

fn check_content_type(content_type: &str) -> Result<(), Invalid> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(Invalid::ContentType(truncate(content_type, 64)))
    }
}

fn required_text(object: &mut Map<String, Value>, field: &'static str) -> Result<String, Invalid> {
    optional_text(object, field)?.ok_or(Invalid::Missing(field))
}

fn optional_text(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, Invalid> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => check_text(field, &text).map(|()| Some(text)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::Empty(field));
    }
    let chars = text.chars().count();
    if chars > MAX_FIELD_CHARS {
        return Err(Invalid::TooLong {
            field,
            chars,
            limit: MAX_FIELD_CHARS,
        });
    }
    if text.chars().any(char::is_control) {
        return Err(Invalid::ControlCharacters(field));
    }
    Ok(())
}

const MESSAGE_ID_TOO_LONG: &str = "is over the 255-character limit";

fn message_id_text(message_id: &str) -> Result<String, Invalid> {
    if message_id.trim().is_empty() {
        return Err(Invalid::BadMessageId("is empty"));
    }
    if message_id.chars().any(char::is_control) {
        return Err(Invalid::BadMessageId("contains control characters"));
    }
    // An AMQP message_id cannot be longer (a short string is at most 255 bytes), but a
    // direct caller's can: the id keeps the same limit whichever way it came.
    if message_id.chars().count() > MAX_FIELD_CHARS {
        return Err(Invalid::BadMessageId(MESSAGE_ID_TOO_LONG));
    }
    Ok(message_id.to_owned())
}

fn check_timestamp(ts: &str) -> Result<(), Invalid> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map(|_| ())
        .map_err(|_| Invalid::BadTimestamp(truncate(ts, 64)))
}

fn body_hash_id(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> Invalid {
    Invalid::WrongType {
        field,
        expected,
        found: kind(found),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// True when the JSON text opens more than `limit` nested arrays or objects. Brackets inside
/// strings do not count.
fn nests_deeper_than(text: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1024,
        max_depth: 8,
    };

    fn parse_str(body: &str) -> Result<Event, Invalid> {
        parse(body.as_bytes(), &MessageMeta::default(), LIMITS)
    }

    #[test]
    fn a_complete_event_parses() {
        let event = parse_str(
            r#"{"id":"evt_1","name":"Contact Created","user_id":"u1","payload":{"email":"a@b.c"},"occurred_at":"2026-11-26T19:00:00Z"}"#,
        )
        .expect("valid");
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.id_source, IdSource::Body);
        assert_eq!(event.name, "Contact Created");
        assert_eq!(event.user_id, "u1");
        assert_eq!(event.payload["email"], "a@b.c");
        assert_eq!(event.occurred_at.as_deref(), Some("2026-11-26T19:00:00Z"));
    }

    #[test]
    fn the_id_falls_back_to_message_id_then_to_a_body_hash() {
        let body = br#"{"name":"n","user_id":"u","payload":{}}"#;
        let meta = MessageMeta {
            message_id: Some("m-1"),
            ..MessageMeta::default()
        };
        let from_property = parse(body, &meta, LIMITS).expect("valid");
        assert_eq!(
            (from_property.id.as_str(), from_property.id_source),
            ("m-1", IdSource::MessageId)
        );
        let hashed = parse(body, &MessageMeta::default(), LIMITS).expect("valid");
        assert_eq!(hashed.id_source, IdSource::BodyHash);
        assert!(hashed.id.starts_with("sha256:"));
        let again = parse(body, &MessageMeta::default(), LIMITS).expect("valid");
        assert_eq!(hashed.id, again.id, "the same body keeps its id");
    }

    #[test]
    fn each_kind_of_invalid_body_has_its_reason() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not_json"),
            ("[1,2]", "not_object"),
            ("null", "not_object"),
            ("42", "not_object"),
            (r#"{"user_id":"u","payload":{}}"#, "missing_field"),
            (r#"{"name":"n","payload":{}}"#, "missing_field"),
            (r#"{"name":"n","user_id":"u"}"#, "missing_field"),
            (r#"{"name":7,"user_id":"u","payload":{}}"#, "wrong_type"),
            (r#"{"name":"n","user_id":"u","payload":[]}"#, "wrong_type"),
            (r#"{"name":"","user_id":"u","payload":{}}"#, "empty_field"),
            (
                r#"{"name":"a\nb","user_id":"u","payload":{}}"#,
                "control_characters",
            ),
            (
                r#"{"name":"n","user_id":"u","payload":{},"occurred_at":"yesterday"}"#,
                "bad_timestamp",
            ),
            (
                r#"{"name":"n","user_id":"u","payload":{},"id":5}"#,
                "wrong_type",
            ),
            (
                r#"{"name":null,"user_id":"u","payload":{}}"#,
                "missing_field",
            ),
            (
                r#"{"name":"n","user_id":"u","payload":{"a":[[[[[[[[[1]]]]]]]]]}}"#,
                "too_deep",
            ),
        ];
        for (body, code) in cases {
            let err = parse_str(body).expect_err(body);
            assert_eq!(err.code(), *code, "{body}: {err}");
        }
    }

    #[test]
    fn size_utf8_and_content_type_are_checked() {
        let big = vec![b' '; 2048];
        assert_eq!(
            parse(&big, &MessageMeta::default(), LIMITS).map_err(|e| e.code()),
            Err("too_large")
        );
        let bad_utf8 = [b'{', 0xff, b'}'];
        assert_eq!(
            parse(&bad_utf8, &MessageMeta::default(), LIMITS),
            Err(Invalid::NotUtf8(1))
        );
        let body = br#"{"name":"n","user_id":"u","payload":{}}"#;
        let xml = MessageMeta {
            content_type: Some("text/xml"),
            ..MessageMeta::default()
        };
        assert_eq!(
            parse(body, &xml, LIMITS).map_err(|e| e.code()),
            Err("content_type")
        );
        let json_utf8 = MessageMeta {
            content_type: Some("application/json; charset=utf-8"),
            ..MessageMeta::default()
        };
        assert!(parse(body, &json_utf8, LIMITS).is_ok());
    }

    #[test]
    fn a_message_id_over_the_limit_is_refused() {
        let body = br#"{"name":"n","user_id":"u","payload":{}}"#;
        let long = "é".repeat(MAX_FIELD_CHARS + 1);
        let meta = MessageMeta {
            message_id: Some(&long),
            ..MessageMeta::default()
        };

        let parsed = parse(body, &meta, LIMITS);

        assert_eq!(parsed, Err(Invalid::BadMessageId(MESSAGE_ID_TOO_LONG)));
        assert!(MESSAGE_ID_TOO_LONG.contains(&MAX_FIELD_CHARS.to_string()));
    }

    #[test]
    fn a_name_over_the_limit_is_refused() {
        let body = format!(
            r#"{{"name":"{}","user_id":"u","payload":{{}}}}"#,
            "x".repeat(MAX_FIELD_CHARS + 1)
        );
        assert_eq!(parse_str(&body).map_err(|e| e.code()), Err("too_long"));
    }

    fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(key.into(), value);
        }
        table
    }

    fn strings(items: &[&str]) -> AMQPValue {
        AMQPValue::FieldArray(
            items
                .iter()
                .map(|s| AMQPValue::LongString((*s).into()))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    #[test]
    fn a_message_without_routing_headers_is_a_first_delivery_to_every_workflow() {
        assert_eq!(routing(None), Ok(Routing::default()));
        assert_eq!(
            routing(Some(&FieldTable::default())),
            Ok(Routing::default())
        );
    }

    #[test]
    fn the_worker_s_own_routing_headers_read_back() {
        let id = Uuid::new_v4();
        let mut table = FieldTable::default();
        broker::set_int(&mut table, header::ATTEMPT, 2);
        broker::set_strings(&mut table, header::WORKFLOWS, &[id.to_string()]);
        broker::set_bool(&mut table, header::REPLAY, true);
        table.insert(header::DELIVERY_COUNT.into(), AMQPValue::ShortUInt(3));

        let read = routing(Some(&table));

        assert_eq!(
            read,
            Ok(Routing {
                attempt: 2,
                workflows: Some(vec![id]),
                replay: true,
                deliveries: 3,
            })
        );
    }

    #[test]
    fn workflow_ids_are_compared_as_uuids_not_as_text() {
        let id = Uuid::new_v4();
        let table = headers(vec![(
            header::WORKFLOWS,
            strings(&[&id.to_string().to_uppercase()]),
        )]);
        assert_eq!(
            routing(Some(&table)).map(|r| r.workflows),
            Ok(Some(vec![id]))
        );
    }

    #[test]
    fn the_broker_s_delivery_count_is_read_whatever_its_integer_type() {
        for value in [
            AMQPValue::ShortShortUInt(4),
            AMQPValue::LongInt(4),
            AMQPValue::LongLongInt(4),
        ] {
            let table = headers(vec![(header::DELIVERY_COUNT, value)]);
            assert_eq!(routing(Some(&table)).map(|r| r.deliveries), Ok(4));
        }
        let junk = headers(vec![(header::DELIVERY_COUNT, AMQPValue::Boolean(true))]);
        assert_eq!(routing(Some(&junk)).map(|r| r.deliveries), Ok(0));
    }

    #[test]
    fn each_malformed_routing_header_is_refused_with_what_it_must_be() {
        let uuid = Uuid::new_v4().to_string();
        let cases: Vec<(&str, AMQPValue, &str)> = vec![
            (
                header::ATTEMPT,
                AMQPValue::LongString("1".into()),
                ATTEMPT_EXPECTED,
            ),
            (
                header::ATTEMPT,
                AMQPValue::LongLongInt(-1),
                ATTEMPT_EXPECTED,
            ),
            (
                header::ATTEMPT,
                AMQPValue::LongLongInt(1 << 40),
                ATTEMPT_EXPECTED,
            ),
            (header::ATTEMPT, AMQPValue::Double(1.0), ATTEMPT_EXPECTED),
            (
                header::WORKFLOWS,
                AMQPValue::LongLongInt(1),
                WORKFLOWS_EXPECTED,
            ),
            (
                header::WORKFLOWS,
                AMQPValue::LongString(uuid.as_str().into()),
                WORKFLOWS_EXPECTED,
            ),
            (
                header::WORKFLOWS,
                strings(&["not-a-uuid"]),
                WORKFLOWS_EXPECTED,
            ),
            (
                header::WORKFLOWS,
                strings(&[&uuid, "x"]),
                WORKFLOWS_EXPECTED,
            ),
            (
                header::WORKFLOWS,
                AMQPValue::FieldArray(vec![AMQPValue::LongLongInt(1)].into()),
                WORKFLOWS_EXPECTED,
            ),
            (header::WORKFLOWS, strings(&[]), WORKFLOWS_EMPTY_EXPECTED),
            (
                header::REPLAY,
                AMQPValue::LongString("true".into()),
                REPLAY_EXPECTED,
            ),
            (
                header::REPLAY,
                AMQPValue::ShortShortUInt(1),
                REPLAY_EXPECTED,
            ),
            (header::REPLAY, AMQPValue::Void, REPLAY_EXPECTED),
        ];
        for (name, value, expected) in cases {
            let table = headers(vec![(name, value.clone())]);

            let read = routing(Some(&table));

            assert_eq!(
                read,
                Err(Invalid::BadHeader {
                    header: name,
                    expected
                }),
                "{name} = {value:?}"
            );
        }
    }

    #[test]
    fn a_bad_header_reason_names_the_header_and_what_it_must_be() {
        let invalid = bad_header(header::WORKFLOWS, WORKFLOWS_EXPECTED);
        assert_eq!(invalid.code(), "bad_header");
        assert_eq!(
            invalid.to_string(),
            "header x-appevents-workflows must be an array of workflow ids"
        );
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_depth() {
        let body = r#"{"name":"n","user_id":"u","payload":{"s":"[[[[[[[[[[[[{{{{{{\"]]]"}}"#;
        assert!(parse_str(body).is_ok());
    }
}

/// Properties over generated input: `parse` is total (never panics, whatever the bytes,
/// JSON, fields, properties or limits), and whatever it accepts respects the contract.
#[cfg(test)]
mod properties {
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::json;

    use super::*;

    /// Text aimed at the field rules: arbitrary characters (control characters included),
    /// blanks, control characters inside text, and lengths either side of the limit.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => ".{0,12}",
            1 => Just(String::new()),
            1 => "[ \t\n\r]{1,3}",
            2 => "[a-z]{1,3}[\u{0}-\u{1f}\u{7f}-\u{9f}][a-z]{0,3}",
            1 => (250usize..260).prop_map(|n| "é".repeat(n)),
            // What the depth scanner must not be fooled by when it is inside a string.
            2 => "[\\[\\]{}\"\\\\a]{0,8}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_tree(prop_oneof![
            exact_scalar(),
            // Not finite → null, as serde_json has it.
            any::<f64>().prop_map(Value::from),
        ])
    }

    /// JSON without floats: serde_json's default float parsing may be one unit in the last
    /// place off, so only these compare equal after a round trip.
    fn exact_json_value() -> impl Strategy<Value = Value> {
        json_tree(exact_scalar())
    }

    fn exact_scalar() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            text().prop_map(Value::String),
        ]
        .boxed()
    }

    fn json_tree(leaf: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Value> {
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                btree_map(text(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A field as producers get it wrong: mostly text, sometimes any JSON.
    fn field() -> impl Strategy<Value = Option<Value>> {
        option::weighted(
            0.9,
            prop_oneof![3 => text().prop_map(Value::String), 1 => json_value()],
        )
    }

    fn timestamp() -> impl Strategy<Value = Option<Value>> {
        let rfc3339 = "[0-9]{4}-[0-1][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,9})?([Zz]|[+-][0-2][0-9]:[0-5][0-9])?";
        option::of(prop_oneof![
            rfc3339.prop_map(Value::String),
            text().prop_map(Value::String),
            json_value(),
        ])
    }

    fn payload() -> impl Strategy<Value = Option<Value>> {
        option::weighted(
            0.9,
            prop_oneof![
                3 => btree_map(text(), json_value(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                1 => json_value(),
            ],
        )
    }

    /// An object with each event field absent or set to anything, plus stray fields.
    fn event_object() -> impl Strategy<Value = Value> {
        (
            field(),
            field(),
            payload(),
            field(),
            timestamp(),
            btree_map(text(), json_value(), 0..3),
        )
            .prop_map(|(name, user_id, payload, id, occurred_at, extra)| {
                let mut object: Map<String, Value> = extra.into_iter().collect();
                let fields = [
                    ("name", name),
                    ("user_id", user_id),
                    ("payload", payload),
                    ("id", id),
                    ("occurred_at", occurred_at),
                ];
                for (key, value) in fields {
                    match value {
                        Some(value) => object.insert(key.to_owned(), value),
                        None => object.remove(key),
                    };
                }
                Value::Object(object)
            })
    }

    /// Properties as a producer might set them; a message_id may be anything a direct
    /// caller passes, not only what fits an AMQP short string.
    fn meta() -> impl Strategy<Value = (Option<String>, Option<String>)> {
        let content_type = prop_oneof![
            Just("application/json".to_owned()),
            Just("Application/JSON; charset=utf-8".to_owned()),
            ".{0,16}",
        ];
        (option::of(content_type), option::of(text()))
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (0usize..4096, 0usize..12).prop_map(|(max_bytes, max_depth)| Limits {
            max_bytes,
            max_depth,
        })
    }

    /// Pieces of JSON and near-JSON: concatenated at random they make bodies that get past
    /// the first byte and into the depth scanner's and the parser's corners.
    #[rustfmt::skip]
    const JSON_TOKENS: &[&str] = &[
        "{", "}", "[", "]", "\"", "\\", ":", ",", "\"name\"", "\"user_id\"", "\"payload\"",
        "\"id\"", "\"x\"", "1e999", "-0", "null", "\\u0000", "\\ud800", " ",
    ];

    const GENEROUS: Limits = Limits {
        max_bytes: 1 << 20,
        max_depth: 64,
    };

    fn parse_with(
        body: &[u8],
        (content_type, message_id): &(Option<String>, Option<String>),
        limits: Limits,
    ) -> Result<Event, Invalid> {
        let meta = MessageMeta {
            content_type: content_type.as_deref(),
            message_id: message_id.as_deref(),
        };
        parse(body, &meta, limits)
    }

    /// What every accepted event guarantees to the rest of the worker (logs, headers, SQL).
    fn within_contract(event: &Event) -> Result<(), TestCaseError> {
        let fields = [
            ("id", &event.id),
            ("name", &event.name),
            ("user_id", &event.user_id),
        ];
        for (field, value) in fields {
            prop_assert!(!value.trim().is_empty(), "{field} is blank: {value:?}");
            prop_assert!(
                value.chars().count() <= MAX_FIELD_CHARS,
                "{field} has {} characters",
                value.chars().count()
            );
            prop_assert!(
                !value.chars().any(char::is_control),
                "{field} has control characters: {value:?}"
            );
        }
        Ok(())
    }

    /// Nesting depth of a value, counting itself: a scalar is 0, `[]` is 1.
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            body in vec(any::<u8>(), 0..512),
            meta in meta(),
            limits in limits(),
        ) {
            if let Ok(event) = parse_with(&body, &meta, limits) {
                within_contract(&event)?;
            }
        }

        #[test]
        fn json_like_bytes_never_panic(
            tokens in vec(select(JSON_TOKENS), 0..64),
            limits in limits(),
        ) {
            let body = tokens.concat();
            if let Ok(event) = parse_with(body.as_bytes(), &(None, None), limits) {
                within_contract(&event)?;
            }
        }

        #[test]
        fn arbitrary_json_never_panics(
            value in json_value(),
            meta in meta(),
            limits in limits(),
        ) {
            let body = serde_json::to_vec(&value).expect("a Value serializes");
            for limits in [limits, GENEROUS] {
                if let Ok(event) = parse_with(&body, &meta, limits) {
                    within_contract(&event)?;
                }
            }
        }

        #[test]
        fn arbitrary_event_fields_never_panic_and_accepted_ones_keep_the_contract(
            object in event_object(),
            meta in meta(),
        ) {
            let body = serde_json::to_vec(&object).expect("a Value serializes");

            let parsed = parse_with(&body, &meta, GENEROUS);

            if let Ok(event) = parsed {
                within_contract(&event)?;
                // What was accepted is what was sent: compared with serde_json's own reading
                // of the same bytes, since its float parsing may be a unit in the last place
                // off the generated value.
                let sent: Value = serde_json::from_slice(&body).expect("it just parsed");
                prop_assert_eq!(Some(&Value::String(event.name.clone())), sent.get("name"));
                prop_assert_eq!(
                    Some(&Value::String(event.user_id.clone())),
                    sent.get("user_id")
                );
                prop_assert_eq!(
                    Some(&Value::Object(event.payload.clone())),
                    sent.get("payload")
                );
            }
        }

        #[test]
        fn an_id_taken_from_message_id_keeps_the_contract(message_id in text()) {
            let body = br#"{"name":"n","user_id":"u","payload":{}}"#;

            let parsed = parse_with(body, &(None, Some(message_id)), GENEROUS);

            if let Ok(event) = parsed {
                within_contract(&event)?;
            }
        }

        #[test]
        fn a_well_formed_event_is_accepted_as_sent(
            name in "[A-Za-z0-9][A-Za-z0-9 ._:@é🚀-]{0,254}",
            user_id in "[A-Za-z0-9][A-Za-z0-9 ._:@é🚀-]{0,254}",
            id in option::of("[A-Za-z0-9_-]{1,64}"),
            payload in btree_map(text(), exact_json_value(), 0..4),
        ) {
            let mut object = json!({"name": name, "user_id": user_id, "payload": payload});
            if let Some(id) = &id {
                object["id"] = json!(id);
            }
            let body = serde_json::to_vec(&object).expect("serializes");
            let payload: Map<String, Value> = payload.into_iter().collect();

            let event = parse_with(&body, &(None, None), GENEROUS);

            let event = event.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
            prop_assert_eq!(&event.name, &name);
            prop_assert_eq!(&event.user_id, &user_id);
            prop_assert_eq!(&event.payload, &payload);
            match id {
                Some(id) => prop_assert_eq!((event.id, event.id_source), (id, IdSource::Body)),
                None => prop_assert_eq!(event.id_source, IdSource::BodyHash),
            }
        }

        #[test]
        fn the_depth_check_agrees_with_the_json_it_scans(
            value in json_value(),
            limit in 0usize..8,
        ) {
            let body = serde_json::to_vec(&value).expect("serializes");
            prop_assert_eq!(nests_deeper_than(&body, limit), depth(&value) > limit);
        }
    }
}
