//! Field mapping templates: JSON whose string values may reference the event and, in a
//! workflow of several steps, the outputs of earlier steps.
//!
//! Rules (documented in docs/mapping.md):
//! - `{{path}}` names a value of the event: `id`, `name`, `user_id`, `occurred_at`, or
//!   `payload.a.b` (a number indexes an array: `payload.tags.0`); `steps.NAME.a.b`, the
//!   output of an earlier step; `item.a`, the element of a step's `for_each`. Nothing else
//!   is reachable. Which step names and whether `item` are allowed is the workflow's check.
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
        "`{0}` is not part of the event: a path starts with id, name, user_id, occurred_at, payload, steps or item"
    )]
    UnknownRoot(String),
    #[error("`{0}` names no step: write steps.NAME.field")]
    NoStep(String),
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
    /// The reference as written, for errors.
    written: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    Id,
    Name,
    UserId,
    OccurredAt,
    Payload,
    /// `steps.NAME...`: the first field is the step's name.
    Steps,
    /// `item...`: the element of the step's `for_each`.
    Item,
}

/// What a template may read: the event, the outputs of the steps run so far (by name), and
/// the element of a `for_each`.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub event: &'a Event,
    pub steps: Option<&'a Map<String, Value>>,
    pub item: Option<&'a Value>,
}

impl<'a> Scope<'a> {
    /// The event alone: what a one-step workflow's mapping sees.
    pub fn event(event: &'a Event) -> Scope<'a> {
        Scope {
            event,
            steps: None,
            item: None,
        }
    }
}

/// A reference a template makes outside the event, for the workflow's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// `steps.NAME...`, with the whole reference as written.
    Step(&'a str, &'a str),
    Item,
}

impl Template {
    pub fn compile(template: &Value) -> Result<Template, TemplateError> {
        Ok(Template {
            root: compile_node(template)?,
        })
    }

    /// Renders the template for one event. A top-level reference to a missing path is null.
    pub fn render(&self, event: &Event) -> Value {
        self.render_in(&Scope::event(event))
    }

    /// Renders the template with the outputs of earlier steps and a `for_each` element.
    pub fn render_in(&self, scope: &Scope<'_>) -> Value {
        render_node(&self.root, scope).unwrap_or(Value::Null)
    }

    /// The references outside the event: earlier steps' outputs and `item`.
    pub fn reaches(&self) -> Vec<Reach<'_>> {
        let mut out = Vec::new();
        node_reaches(&self.root, &mut out);
        out
    }
}

fn node_reaches<'a>(node: &'a Node, out: &mut Vec<Reach<'a>>) {
    match node {
        Node::Literal(_) => {}
        Node::Reference(path) => out.extend(path.reach()),
        Node::Text(pieces) => out.extend(pieces.iter().filter_map(Piece::reach)),
        Node::Object(fields) => fields.iter().for_each(|(_, n)| node_reaches(n, out)),
        Node::Array(items) => items.iter().for_each(|n| node_reaches(n, out)),
    }
}

impl Piece {
    fn reach(&self) -> Option<Reach<'_>> {
        match self {
            Piece::Text(_) => None,
            Piece::Reference(path) => path.reach(),
        }
    }
}

impl Path {
    fn reach(&self) -> Option<Reach<'_>> {
        match self.root {
            Root::Steps => self
                .fields
                .first()
                .map(|step| Reach::Step(step.as_str(), self.written.as_str())),
            Root::Item => Some(Reach::Item),
            _ => None,
        }
    }
}

/// A path reference (`payload.items`, `steps.find.records`) compiled on its own: what a
/// `for_each` iterates over.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    path: Path,
}

impl Reference {
    /// Compiles `payload.items` or `{{payload.items}}`.
    pub fn compile(text: &str) -> Result<Reference, TemplateError> {
        let text = text.trim();
        let inner = text
            .strip_prefix("{{")
            .and_then(|t| t.strip_suffix("}}"))
            .unwrap_or(text);
        Ok(Reference {
            path: compile_path(inner)?,
        })
    }

    pub fn lookup(&self, scope: &Scope<'_>) -> Option<Value> {
        lookup(&self.path, scope)
    }

    pub fn reach(&self) -> Option<Reach<'_>> {
        self.path.reach()
    }

    pub fn as_str(&self) -> &str {
        &self.path.written
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
    pub fn render_with(&self, scope: &Scope<'_>, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Reference(path) => {
                    if let Some(value) = lookup(path, scope) {
                        out.push_str(&escape(&as_text(&value)));
                    }
                }
            }
        }
        out
    }

    /// The references outside the event: earlier steps' outputs and `item`.
    pub fn reaches(&self) -> Vec<Reach<'_>> {
        self.pieces.iter().filter_map(Piece::reach).collect()
    }

    /// Renders each referenced value (or `None` for a missing path) through `literal`: a
    /// query language's literal, so a value can never become part of the query itself.
    pub fn render_literals(
        &self,
        scope: &Scope<'_>,
        literal: impl Fn(Option<&Value>) -> String,
    ) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Reference(path) => out.push_str(&literal(lookup(path, scope).as_ref())),
            }
        }
        out
    }

    /// The literal text up to the first reference.
    pub fn text_before_first_reference(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Text(text)) => text,
            _ => "",
        }
    }

    /// Whether a reference sits inside a `quote`-delimited literal of the text around it
    /// (`'{{payload.email}}'`), where a rendered literal would not belong. A quote preceded
    /// by a backslash is escaped.
    pub fn reference_inside_quotes(&self, quote: char) -> bool {
        let mut inside = false;
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => {
                    let mut escaped = false;
                    for c in text.chars() {
                        if c == quote && !escaped {
                            inside = !inside;
                        }
                        escaped = c == '\\' && !escaped;
                    }
                }
                Piece::Reference(_) if inside => return true,
                Piece::Reference(_) => {}
            }
        }
        false
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
        "steps" => Root::Steps,
        "item" => Root::Item,
        _ => return Err(TemplateError::UnknownRoot(reference.to_owned())),
    };
    let fields: Vec<String> = segments.map(str::to_owned).collect();
    if fields.iter().any(String::is_empty) {
        return Err(TemplateError::EmptySegment(reference.to_owned()));
    }
    if !matches!(root, Root::Payload | Root::Steps | Root::Item) && !fields.is_empty() {
        return Err(TemplateError::NotAnObject(reference.to_owned()));
    }
    if root == Root::Steps && fields.is_empty() {
        return Err(TemplateError::NoStep(reference.to_owned()));
    }
    Ok(Path {
        root,
        fields,
        written: reference.to_owned(),
    })
}

/// `None` when the path does not exist in this event.
fn render_node(node: &Node, event: &Scope<'_>) -> Option<Value> {
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

fn lookup(path: &Path, scope: &Scope<'_>) -> Option<Value> {
    let event = scope.event;
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
            descend(event.payload.get(first)?, rest)
        }
        Root::Steps => {
            let (step, rest) = path.fields.split_first()?;
            descend(scope.steps?.get(step)?, rest)
        }
        Root::Item => descend(scope.item?, &path.fields),
    }
}

fn descend(mut current: &Value, fields: &[String]) -> Option<Value> {
    for field in fields {
        current = match current {
            Value::Object(map) => map.get(field)?,
            Value::Array(items) => items.get(field.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current.clone())
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
    use serde_json::json;

    use crate::core::event::test_event as event;

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
        let event = event(json!({"email": "a b"}));
        let url = template.render_with(&Scope::event(&event), |v| v.replace(' ', "%20"));
        assert_eq!(url, "https://x.test/c/a%20b?s=1");
    }
}

/// Properties over generated templates and events: compiling and rendering are total, and a
/// rendered value holds nothing but the template's own literals and the event's data.
#[cfg(test)]
mod properties;
