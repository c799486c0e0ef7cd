//! Properties of compiling and rendering mappings over generated input.

use std::collections::BTreeSet;

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::json;

use super::*;
use crate::core::event::IdSource;

/// Every string of a generated event starts with it, and no template contains it, so an
/// output string with it came from the event.
const MARK: char = '§';
const ROOTS: &[&str] = &["id", "name", "user_id", "occurred_at", "payload"];
/// What follows a refused root, and what surrounds the reference.
const BELOW: &[&str] = &["", ".x", ".0", ".a.b"];
const AROUND: &[&str] = &["", "Dear ", " "];
/// Keys of generated payloads, which templates reference too.
const KEYS: &[&str] = &["a", "b", "0", "1", "x y"];
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    "{{", "}}", "{", "}", " ", ".", "..", "payload", "id", "name", "user_id", "occurred_at",
    "env", "HOME", "a", "b", "0", "1",
];

/// Text without the mark (nor braces, so it never forms a reference by itself).
fn plain() -> impl Strategy<Value = String> {
    "[^{}§]{0,4}"
}

/// A well-formed reference, sometimes to a path the event does not have.
fn reference() -> impl Strategy<Value = String> {
    (select(ROOTS), vec(select(KEYS), 0..3), " ?", " ?").prop_map(
        |(root, fields, before, after)| {
            let path: Vec<&str> = std::iter::once(root).chain(fields).collect();
            format!("{{{{{before}{}{after}}}}}", path.join("."))
        },
    )
}

/// A template string: mostly text and references that compile, sometimes fragments of
/// `{{`, `}}` and names thrown together.
fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![reference(), plain()];
    let token = prop_oneof![3 => select(TOKENS).prop_map(str::to_owned), 1 => plain()];
    prop_oneof![
        3 => vec(piece, 0..4).prop_map(|pieces| pieces.concat()),
        2 => vec(token, 0..8).prop_map(|tokens| tokens.concat()),
    ]
}

fn template() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => template_text().prop_map(Value::String),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => any::<i32>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(template_text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn marked() -> impl Strategy<Value = String> {
    plain().prop_map(|text| format!("{MARK}{text}"))
}

/// Payload values: marked strings in non-empty arrays and objects, so whatever part of
/// the payload a template renders, as a value or as text, carries the mark.
fn payload_value() -> impl Strategy<Value = Value> {
    marked()
        .prop_map(Value::String)
        .prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                vec(inner.clone(), 1..3).prop_map(Value::Array),
                btree_map(select(KEYS).prop_map(str::to_owned), inner, 1..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
}

fn event() -> impl Strategy<Value = Event> {
    (
        marked(),
        marked(),
        marked(),
        option::of(marked()),
        btree_map(select(KEYS).prop_map(str::to_owned), payload_value(), 1..4),
    )
        .prop_map(|(id, name, user_id, occurred_at, payload)| Event {
            id,
            id_source: IdSource::Body,
            name,
            user_id,
            payload: payload.into_iter().collect(),
            occurred_at,
        })
}

/// The template's string with every `{{…}}` left out: what a text renders to when all
/// its references are missing.
fn without_references(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return out + rest;
        };
        rest = &after[close + 2..];
    }
    out + rest
}

/// Everything a template could put in a rendering by itself.
#[derive(Default)]
struct Literals {
    strings: BTreeSet<String>,
    keys: BTreeSet<String>,
    scalars: Vec<Value>,
}

fn literals(template: &Value, into: &mut Literals) {
    match template {
        Value::String(text) => {
            into.strings.insert(text.clone());
            into.strings.insert(without_references(text));
        }
        Value::Array(items) => items.iter().for_each(|item| literals(item, into)),
        Value::Object(fields) => {
            for (key, value) in fields {
                into.keys.insert(key.clone());
                literals(value, into);
            }
        }
        scalar => into.scalars.push(scalar.clone()),
    }
}

fn payload_keys(value: &Value, into: &mut BTreeSet<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| payload_keys(item, into)),
        Value::Object(fields) => {
            for (key, value) in fields {
                into.insert(key.clone());
                payload_keys(value, into);
            }
        }
        _ => {}
    }
}

/// Every part of `rendered` is a template literal or carries the event's mark.
fn only_template_or_event(
    rendered: &Value,
    literals: &Literals,
    event_keys: &BTreeSet<String>,
) -> Result<(), TestCaseError> {
    match rendered {
        Value::String(text) => prop_assert!(
            text.contains(MARK) || literals.strings.contains(text),
            "{text:?} is neither the event's nor the template's"
        ),
        Value::Array(items) => {
            for item in items {
                only_template_or_event(item, literals, event_keys)?;
            }
        }
        Value::Object(fields) => {
            for (key, value) in fields {
                prop_assert!(
                    literals.keys.contains(key) || event_keys.contains(key),
                    "key {key:?} is neither the event's nor the template's"
                );
                only_template_or_event(value, literals, event_keys)?;
            }
        }
        // A top-level reference to a missing path renders as null.
        Value::Null => {}
        scalar => prop_assert!(
            literals.scalars.contains(scalar),
            "{scalar} is not in the template (the event has no numbers or booleans)"
        ),
    }
    Ok(())
}

proptest! {
    #[test]
    fn compiling_and_rendering_never_panic(template in template(), event in event()) {
        if let Ok(compiled) = Template::compile(&template) {
            let _ = compiled.render(&event);
        }
    }

    #[test]
    fn a_rendering_holds_only_template_literals_and_event_data(
        template in template(),
        event in event(),
    ) {
        let Ok(compiled) = Template::compile(&template) else {
            return Ok(());
        };
        let mut known = Literals::default();
        literals(&template, &mut known);
        let mut event_keys = BTreeSet::new();
        payload_keys(&Value::Object(event.payload.clone()), &mut event_keys);

        let rendered = compiled.render(&event);

        only_template_or_event(&rendered, &known, &event_keys)?;
    }

    #[test]
    fn a_text_template_renders_only_its_text_and_event_data(
        text in template_text(),
        event in event(),
    ) {
        let Ok(compiled) = TextTemplate::compile(&text) else {
            return Ok(());
        };

        let rendered = compiled.render_with(&Scope::event(&event), str::to_owned);

        prop_assert!(
            rendered.contains(MARK) || rendered == without_references(&text),
            "{rendered:?} from {text:?}"
        );
    }

    #[test]
    fn a_reference_to_anything_but_the_event_is_refused_when_compiled(
        root in "[^{}.]{0,12}",
        below in select(BELOW),
        around in select(AROUND),
    ) {
        prop_assume!(!ROOTS.contains(&root.trim()));
        let reference = format!("{around}{{{{{root}{below}}}}}{around}");

        let whole = Template::compile(&json!({"field": reference}));
        let text = TextTemplate::compile(&reference);

        prop_assert!(whole.is_err(), "{reference:?} compiled");
        prop_assert!(text.is_err(), "{reference:?} compiled as text");
    }
}
