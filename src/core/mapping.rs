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

use crate::core::event::Event;

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
    use crate::core::event::IdSource;
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
mod properties;
