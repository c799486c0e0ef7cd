//! Checking a live event's payload against its app event's example payload.
//!
//! Paragon never validates live events: a producer that drops or retypes a field finds out
//! when a CRM record comes out wrong. Here an app event can ask for its events to be checked
//! ([`Mode`]): the expected [`Shape`] is inferred from the example payload, and an event's
//! [`Difference`]s from it are logged and counted (`warn`) or dead-letter the event
//! (`reject`).
//!
//! The inference is deliberately loose, because an example is one instance, not a schema:
//! every key of the example is expected with the example value's JSON type; objects are
//! checked recursively; an array is expected to be an array and, when the example's is not
//! empty, each element to match the example's first element; `null` in the example accepts
//! any type; fields the example does not have are allowed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Differences listed at most in a reason; the rest are counted. Keeps the dead letter's
/// reason header and the log line bounded whatever the payload.
const MAX_LISTED: usize = 10;

/// What to do with an event whose payload does not match the example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Not checked (the default).
    #[default]
    Off,
    /// Processed as usual; logged and counted.
    Warn,
    /// Dead-lettered once, nothing run.
    Reject,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Warn => "warn",
            Mode::Reject => "reject",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Mode::Off),
            "warn" => Ok(Mode::Warn),
            "reject" => Ok(Mode::Reject),
            other => Err(format!(
                "unknown payload check {other:?}: expected off, warn or reject"
            )),
        }
    }
}

/// The JSON type a value is expected to have.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// The example had `null`: anything goes.
    Any,
    Bool,
    Number,
    String,
    /// An array; its elements' shape when the example's array had a first element.
    Array(Option<Box<Shape>>),
    Object(Vec<(String, Shape)>),
}

impl Shape {
    /// The shape `example` has.
    pub fn infer(example: &Value) -> Shape {
        match example {
            Value::Null => Shape::Any,
            Value::Bool(_) => Shape::Bool,
            Value::Number(_) => Shape::Number,
            Value::String(_) => Shape::String,
            Value::Array(items) => Shape::Array(items.first().map(|i| Box::new(Shape::infer(i)))),
            Value::Object(fields) => Shape::Object(
                fields
                    .iter()
                    .map(|(key, value)| (key.clone(), Shape::infer(value)))
                    .collect(),
            ),
        }
    }

    /// How `payload` (an event's payload object) differs from this shape: missing fields
    /// first, then fields of another type, each in path order. Empty when it matches.
    pub fn differences(&self, payload: &Map<String, Value>) -> Vec<Difference> {
        let mut found = Vec::new();
        if let Shape::Object(fields) = self {
            compare_fields(fields, payload, "", &mut found);
        }
        // Stable: paths stay in order within each kind.
        found.sort_by_key(|d| matches!(d, Difference::Type { .. }));
        found
    }

    fn type_name(&self) -> &'static str {
        match self {
            Shape::Any => "any value",
            Shape::Bool => "a boolean",
            Shape::Number => "a number",
            Shape::String => "a string",
            Shape::Array(_) => "an array",
            Shape::Object(_) => "an object",
        }
    }
}

fn compare_fields(
    fields: &[(String, Shape)],
    object: &Map<String, Value>,
    prefix: &str,
    found: &mut Vec<Difference>,
) {
    for (key, shape) in fields {
        let path = format!("{prefix}{key}");
        match object.get(key) {
            None => found.push(Difference::Missing { path }),
            Some(value) => compare(shape, value, path, found),
        }
    }
}

fn compare(shape: &Shape, value: &Value, path: String, found: &mut Vec<Difference>) {
    match (shape, value) {
        (Shape::Any, _)
        | (Shape::Bool, Value::Bool(_))
        | (Shape::Number, Value::Number(_))
        | (Shape::String, Value::String(_)) => {}
        (Shape::Array(element), Value::Array(items)) => {
            if let Some(element) = element {
                for (index, item) in items.iter().enumerate() {
                    compare(element, item, format!("{path}.{index}"), found);
                }
            }
        }
        (Shape::Object(fields), Value::Object(object)) => {
            compare_fields(fields, object, &format!("{path}."), found);
        }
        (expected, value) => found.push(Difference::Type {
            path,
            found: value_type_name(value),
            expected: expected.type_name(),
        }),
    }
}

fn value_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One way a payload differs from the example. Paths join keys and array indexes with dots,
/// as mapping references do (`address.city`, `items.0.sku`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Missing {
        path: String,
    },
    Type {
        path: String,
        found: &'static str,
        expected: &'static str,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing { path } => write!(f, "missing field {path}"),
            Difference::Type {
                path,
                found,
                expected,
            } => write!(f, "field {path} is {found}, expected {expected}"),
        }
    }
}

/// The one-line reason a mismatching event is logged or dead-lettered with:
/// `payload does not match the example of Contact Created: missing field email; field age is
/// a string, expected a number`.
pub fn reason(app_event: &str, differences: &[Difference]) -> String {
    let mut listed: Vec<String> = differences
        .iter()
        .take(MAX_LISTED)
        .map(ToString::to_string)
        .collect();
    if differences.len() > MAX_LISTED {
        listed.push(format!("and {} more", differences.len() - MAX_LISTED));
    }
    format!(
        "payload does not match the example of {app_event}: {}",
        listed.join("; ")
    )
}

/// An app event's check, ready to apply to its events.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadCheck {
    pub mode: Mode,
    /// The example's shape; `None` when the mode is `off` (nothing to compare).
    shape: Option<Shape>,
}

impl PayloadCheck {
    pub fn off() -> PayloadCheck {
        PayloadCheck {
            mode: Mode::Off,
            shape: None,
        }
    }

    /// `example` may be `None` when the mode is off (the resolve query skips it then).
    pub fn new(mode: Mode, example: Option<&Value>) -> PayloadCheck {
        match (mode, example) {
            (Mode::Off, _) | (_, None) => PayloadCheck::off(),
            (mode, Some(example)) => PayloadCheck {
                mode,
                shape: Some(Shape::infer(example)),
            },
        }
    }

    /// The payload's differences from the example; empty when it matches or the check is off.
    pub fn differences(&self, payload: &Map<String, Value>) -> Vec<Difference> {
        match &self.shape {
            Some(shape) => shape.differences(payload),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test payload must be an object, not {other}"),
        }
    }

    fn differences(example: Value, live: Value) -> Vec<String> {
        Shape::infer(&example)
            .differences(&payload(live))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_payload_like_the_example_matches() {
        // Arrange
        let example = json!({"email": "ada@example.com", "age": 36, "vip": true});
        // Act
        let found = differences(
            example,
            json!({"email": "b@x.io", "age": 1.5, "vip": false}),
        );
        // Assert
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn missing_fields_and_other_types_are_differences() {
        let example = json!({"email": "ada@example.com", "age": 36});

        let found = differences(example, json!({"age": "36"}));

        assert_eq!(
            found,
            [
                "missing field email",
                "field age is a string, expected a number"
            ]
        );
    }

    #[test]
    fn extra_fields_are_allowed() {
        let found = differences(json!({"email": "a"}), json!({"email": "b", "plan": "pro"}));

        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn null_in_the_example_accepts_any_type_but_not_absence() {
        let example = json!({"note": null});

        assert!(differences(example.clone(), json!({"note": [1]})).is_empty());
        assert!(differences(example.clone(), json!({"note": null})).is_empty());
        assert_eq!(differences(example, json!({})), ["missing field note"]);
    }

    #[test]
    fn null_in_the_payload_is_a_type_like_any_other() {
        let found = differences(json!({"email": "a"}), json!({"email": null}));

        assert_eq!(found, ["field email is null, expected a string"]);
    }

    #[test]
    fn nested_objects_are_checked_with_dotted_paths() {
        let example = json!({"address": {"city": "London", "geo": {"lat": 51.5}}});

        let found = differences(
            example,
            json!({"address": {"geo": {"lat": "51.5"}, "zip": "N1"}}),
        );

        assert_eq!(
            found,
            [
                "missing field address.city",
                "field address.geo.lat is a string, expected a number"
            ]
        );
    }

    #[test]
    fn an_object_where_a_scalar_was_expected_is_not_looked_into() {
        let found = differences(json!({"address": {"city": "x"}}), json!({"address": "N1"}));

        assert_eq!(found, ["field address is a string, expected an object"]);
    }

    #[test]
    fn array_elements_are_checked_against_the_first_example_element() {
        let example = json!({"items": [{"sku": "A1", "qty": 1}, {"other": true}]});

        let found = differences(
            example,
            json!({"items": [{"sku": "B2", "qty": 2}, {"sku": 3, "qty": 1}, {"qty": 1}]}),
        );

        assert_eq!(
            found,
            [
                "missing field items.2.sku",
                "field items.1.sku is a number, expected a string"
            ]
        );
    }

    #[test]
    fn an_empty_example_array_only_asks_for_an_array() {
        let example = json!({"tags": []});

        assert!(differences(example.clone(), json!({"tags": [1, "a", null]})).is_empty());
        assert_eq!(
            differences(example, json!({"tags": "a,b"})),
            ["field tags is a string, expected an array"]
        );
    }

    #[test]
    fn the_reason_names_the_app_event_and_every_difference() {
        let found = Shape::infer(&json!({"email": "a", "age": 1}))
            .differences(&payload(json!({"age": "36"})));

        let text = reason("Contact Created", &found);

        assert_eq!(
            text,
            "payload does not match the example of Contact Created: missing field email; field age is a string, expected a number"
        );
    }

    #[test]
    fn a_long_list_of_differences_is_cut_short() {
        let example: Map<String, Value> = (0..25).map(|i| (format!("f{i:02}"), json!(1))).collect();

        let found = Shape::infer(&Value::Object(example)).differences(&Map::new());
        let text = reason("E", &found);

        assert_eq!(found.len(), 25);
        assert!(text.ends_with("missing field f09; and 15 more"), "{text}");
    }

    #[test]
    fn a_check_that_is_off_finds_nothing() {
        let check = PayloadCheck::new(Mode::Off, Some(&json!({"email": "a"})));

        assert!(check.differences(&Map::new()).is_empty());
        assert_eq!(check, PayloadCheck::off());
    }

    #[test]
    fn a_check_that_is_on_compares_with_the_example() {
        let check = PayloadCheck::new(Mode::Reject, Some(&json!({"email": "a"})));

        assert_eq!(check.differences(&Map::new()).len(), 1);
        assert_eq!(check.mode, Mode::Reject);
    }

    #[test]
    fn modes_parse_from_their_names() {
        assert_eq!("warn".parse::<Mode>(), Ok(Mode::Warn));
        assert_eq!(Mode::Reject.to_string(), "reject");
        assert!("strict".parse::<Mode>().is_err());
    }
}
