//! Properties of `parse` over generated input.

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
