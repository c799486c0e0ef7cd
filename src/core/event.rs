//! The publishing contract: turning a message body and its properties into an [`Event`], or
//! into the precise reason it is not one. (The headers appevents reserves for itself are
//! read by `transport::routing`.)

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

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

/// An event of `payload` (an object) for the tests of what reads events.
#[cfg(test)]
pub(crate) fn test_event(payload: serde_json::Value) -> Event {
    let serde_json::Value::Object(payload) = payload else {
        panic!("test payload must be an object")
    };
    Event {
        id: "evt_1".into(),
        id_source: IdSource::Body,
        name: "Contact Created".into(),
        user_id: "user-1".into(),
        payload,
        occurred_at: None,
    }
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

    #[test]
    fn brackets_inside_strings_do_not_count_as_depth() {
        let body = r#"{"name":"n","user_id":"u","payload":{"s":"[[[[[[[[[[[[{{{{{{\"]]]"}}"#;
        assert!(parse_str(body).is_ok());
    }
}

/// Properties over generated input: `parse` is total (never panics, whatever the bytes,
/// JSON, fields, properties or limits), and whatever it accepts respects the contract.
#[cfg(test)]
mod properties;
