//! Field mapping templates: JSON whose string values may reference the event.
//!
//! Rules (documented in docs/mapping.md):
//! - `{{path}}` names a value of the event: `id`, `name`, `user_id`, `occurred_at`, or
//!   `payload.a.b` (a number indexes an array: `payload.tags.0`). Nothing else is reachable.
//! - A string that is exactly one reference takes the referenced value with its JSON type.
//! - A string with text around references renders them as text (strings as they are,
//!   numbers and booleans as written, null as nothing, objects and arrays as JSON).
//! - A reference to a missing path: a whole-value reference leaves its key out of the object
//!   (or its element out of the array), so the provider's field is not touched; inside
//!   longer text it renders as the empty string.
//! - Keys and values without `{{` are copied as they are.

use serde_json::{Map, Value};

use crate::envelope::Event;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{{{` at byte {0} is never closed with `}}}}`")]
    Unclosed(usize),
    #[error("empty reference `{{{{}}}}`")]
    Empty,
    #[error(
        "`{0}` is not part of the event: a path starts with id, name, user_id, occurred_at or payload"
    )]
    UnknownRoot(String),
    #[error("`{0}` has an empty segment")]
    EmptySegment(String),
    #[error("`{0}` is a text field and has no fields below it")]
    NotAnObject(String),
}

/// A compiled template for a whole JSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    root: Node,
}

/// A compiled template for one string (an HTTP step's URL or header value).
#[derive(Debug, Clone, PartialEq)]
pub struct TextTemplate {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Literal(Value),
    Reference(Path),
    Text(Vec<Piece>),
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Reference(Path),
}

#[derive(Debug, Clone, PartialEq)]
struct Path {
    root: Root,
    fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    Id,
    Name,
    UserId,
    OccurredAt,
    Payload,
}

impl Template {
    pub fn compile(template: &Value) -> Result<Template, TemplateError> {
        Ok(Template {
            root: compile_node(template)?,
        })
    }

    /// Renders the template for one event. A top-level reference to a missing path is null.
    pub fn render(&self, event: &Event) -> Value {
        render_node(&self.root, event).unwrap_or(Value::Null)
    }
}

impl TextTemplate {
    pub fn compile(text: &str) -> Result<TextTemplate, TemplateError> {
        Ok(TextTemplate {
            pieces: compile_pieces(text)?,
        })
    }

    /// Renders to a string; each referenced value passes through `escape` (identity for
    /// headers, percent-encoding for URLs).
    pub fn render_with(&self, event: &Event, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Reference(path) => {
                    if let Some(value) = lookup(path, event) {
                        out.push_str(&escape(&as_text(&value)));
                    }
                }
            }
        }
        out
    }
}

fn compile_node(value: &Value) -> Result<Node, TemplateError> {
    Ok(match value {
        Value::String(text) => compile_string(text)?,
        Value::Array(items) => {
            Node::Array(items.iter().map(compile_node).collect::<Result<_, _>>()?)
        }
        Value::Object(fields) => Node::Object(
            fields
                .iter()
                .map(|(key, value)| Ok((key.clone(), compile_node(value)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => Node::Literal(other.clone()),
    })
}

fn compile_string(text: &str) -> Result<Node, TemplateError> {
    let mut pieces = compile_pieces(text)?;
    Ok(match pieces.as_slice() {
        [] => Node::Literal(Value::String(String::new())),
        [Piece::Text(_)] => Node::Literal(Value::String(text.to_owned())),
        [Piece::Reference(_)] => match pieces.pop() {
            Some(Piece::Reference(path)) => Node::Reference(path),
            _ => Node::Text(pieces),
        },
        _ => Node::Text(pieces),
    })
}

fn compile_pieces(text: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_owned()));
        }
        let after_open = &rest[open + 2..];
        let close = after_open
            .find("}}")
            .ok_or(TemplateError::Unclosed(offset + open))?;
        pieces.push(Piece::Reference(compile_path(&after_open[..close])?));
        let consumed = open + 2 + close + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

fn compile_path(reference: &str) -> Result<Path, TemplateError> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Err(TemplateError::Empty);
    }
    let mut segments = reference.split('.').map(str::trim);
    let first = segments.next().unwrap_or_default();
    let root = match first {
        "id" => Root::Id,
        "name" => Root::Name,
        "user_id" => Root::UserId,
        "occurred_at" => Root::OccurredAt,
        "payload" => Root::Payload,
        _ => return Err(TemplateError::UnknownRoot(reference.to_owned())),
    };
    let fields: Vec<String> = segments.map(str::to_owned).collect();
    if fields.iter().any(String::is_empty) {
        return Err(TemplateError::EmptySegment(reference.to_owned()));
    }
    if root != Root::Payload && !fields.is_empty() {
        return Err(TemplateError::NotAnObject(reference.to_owned()));
    }
    Ok(Path { root, fields })
}

/// `None` when the path does not exist in this event.
fn render_node(node: &Node, event: &Event) -> Option<Value> {
    match node {
        Node::Literal(value) => Some(value.clone()),
        Node::Reference(path) => lookup(path, event),
        Node::Text(pieces) => {
            let mut out = String::new();
            for piece in pieces {
                match piece {
                    Piece::Text(text) => out.push_str(text),
                    Piece::Reference(path) => {
                        if let Some(value) = lookup(path, event) {
                            out.push_str(&as_text(&value));
                        }
                    }
                }
            }
            Some(Value::String(out))
        }
        Node::Object(fields) => {
            let mut out = Map::with_capacity(fields.len());
            for (key, node) in fields {
                if let Some(value) = render_node(node, event) {
                    out.insert(key.clone(), value);
                }
            }
            Some(Value::Object(out))
        }
        Node::Array(items) => Some(Value::Array(
            items
                .iter()
                .filter_map(|node| render_node(node, event))
                .collect(),
        )),
    }
}

fn lookup(path: &Path, event: &Event) -> Option<Value> {
    let text = |s: &str| Some(Value::String(s.to_owned()));
    match path.root {
        Root::Id => text(&event.id),
        Root::Name => text(&event.name),
        Root::UserId => text(&event.user_id),
        Root::OccurredAt => event.occurred_at.as_deref().and_then(text),
        Root::Payload => {
            let Some((first, rest)) = path.fields.split_first() else {
                return Some(Value::Object(event.payload.clone()));
            };
            let mut current = event.payload.get(first)?;
            for field in rest {
                current = match current {
                    Value::Object(map) => map.get(field)?,
                    Value::Array(items) => items.get(field.parse::<usize>().ok()?)?,
                    _ => return None,
                };
            }
            Some(current.clone())
        }
    }
}

fn as_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::IdSource;
    use serde_json::json;

    fn event(payload: Value) -> Event {
        let Value::Object(payload) = payload else {
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

    fn render(template: Value, payload: Value) -> Value {
        Template::compile(&template)
            .expect("compiles")
            .render(&event(payload))
    }

    #[test]
    fn whole_references_keep_their_type() {
        let out = render(
            json!({"Email": "{{payload.email}}", "Age": "{{ payload.age }}", "Tags": "{{payload.tags}}", "Source": "appevents"}),
            json!({"email": "ada@example.com", "age": 36, "tags": ["a", "b"]}),
        );
        assert_eq!(
            out,
            json!({"Email": "ada@example.com", "Age": 36, "Tags": ["a", "b"], "Source": "appevents"})
        );
    }

    #[test]
    fn references_inside_text_render_as_text() {
        let out = render(
            json!({"Description": "{{name}} for {{user_id}}: {{payload.n}} {{payload.ok}} [{{payload.none}}]"}),
            json!({"n": 3, "ok": true, "none": null}),
        );
        assert_eq!(
            out,
            json!({"Description": "Contact Created for user-1: 3 true []"})
        );
    }

    #[test]
    fn a_missing_path_leaves_the_key_out_or_renders_empty_in_text() {
        let out = render(
            json!({"LastName": "{{payload.last_name}}", "Title": "Dr {{payload.last_name}}", "List": ["{{payload.x}}", 1]}),
            json!({}),
        );
        assert_eq!(out, json!({"Title": "Dr ", "List": [1]}));
    }

    #[test]
    fn nested_paths_and_array_indexes_resolve() {
        let out = render(
            json!({"City": "{{payload.address.city}}", "First": "{{payload.tags.0}}", "Bad": "{{payload.tags.x}}"}),
            json!({"address": {"city": "London"}, "tags": ["vip"]}),
        );
        assert_eq!(out, json!({"City": "London", "First": "vip"}));
    }

    #[test]
    fn a_present_null_is_kept_as_null() {
        let out = render(
            json!({"Phone": "{{payload.phone}}"}),
            json!({"phone": null}),
        );
        assert_eq!(out, json!({"Phone": null}));
    }

    #[test]
    fn templates_cannot_reach_outside_the_event() {
        for bad in [
            "{{env.HOME}}",
            "{{ }}",
            "{{payload..x}}",
            "{{id.x}}",
            "open {{payload.x",
        ] {
            assert!(Template::compile(&json!({"k": bad})).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_templates_escape_only_referenced_values() {
        let template =
            TextTemplate::compile("https://x.test/c/{{payload.email}}?s=1").expect("compiles");
        let url = template.render_with(&event(json!({"email": "a b"})), |v| v.replace(' ', "%20"));
        assert_eq!(url, "https://x.test/c/a%20b?s=1");
    }
}

/// Properties over generated templates and events: compiling and rendering are total, and a
/// rendered value holds nothing but the template's own literals and the event's data.
#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::json;

    use super::*;
    use crate::envelope::IdSource;

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

            let rendered = compiled.render_with(&event, str::to_owned);

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
}
