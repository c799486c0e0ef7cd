//! Workflows as files in the product team's repository: a YAML or JSON document per
//! workflow, named by a stable `key`. Applying documents is idempotent: each is compared with
//! the workflow of its key and created, updated (naming the fields that change) or left
//! unchanged, all in one transaction, and nothing at all when any document is invalid.
//! Exporting writes the same documents back, so export then apply changes nothing.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::catalog::app_events;
use crate::catalog::workflows::{self, Definition, StepDefinition, Workflow};
use crate::core::provider::Provider;
use crate::store::db::StoreError;

/// One workflow as a file holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowFile {
    /// Stable across renames: what `apply` finds the workflow by.
    pub key: String,
    pub name: String,
    /// The app event that triggers it (its current name, or its id).
    pub event: String,
    pub provider: Provider,
    #[serde(default, rename = "when", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    pub steps: Vec<StepDefinition>,
}

/// The document before its steps are read, so a bad step is named.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    key: String,
    name: String,
    event: String,
    provider: Provider,
    #[serde(default, rename = "when")]
    condition: Option<String>,
    steps: Vec<Value>,
}

/// A document and where it came from (a file's path, or its place in a request).
#[derive(Debug, Clone)]
pub struct Document {
    pub origin: String,
    pub file: WorkflowFile,
}

/// How a file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// The format of a file name: `.yaml`, `.yml` or `.json`; `None` for anything else.
    pub fn of(path: &str) -> Option<Format> {
        let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match extension.as_str() {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Reads a document's text. Errors name the origin, the step and the field.
pub fn parse(origin: &str, text: &str, format: Format) -> Result<Document, String> {
    let value: Value = match format {
        Format::Yaml => serde_norway::from_str(text).map_err(|e| format!("{origin}: {e}"))?,
        Format::Json => serde_json::from_str(text).map_err(|e| format!("{origin}: {e}"))?,
    };
    read(origin, value)
}

/// Reads and validates a document as the workflow it defines will be checked.
pub fn read(origin: &str, value: Value) -> Result<Document, String> {
    let fail = |message: String| format!("{origin}: {message}");
    if !value.is_object() {
        return Err(fail(
            "a workflow file is one object (key, name, event, provider, when, steps)".into(),
        ));
    }
    let head: Head = from_value(value).map_err(fail)?;
    check_key(&head.key).map_err(fail)?;
    let mut steps = Vec::with_capacity(head.steps.len());
    for (index, step) in head.steps.into_iter().enumerate() {
        let label = step
            .get("name")
            .and_then(Value::as_str)
            .filter(|name| !name.trim().is_empty())
            .map_or_else(|| format!("#{}", index + 1), str::to_owned);
        let step: StepDefinition =
            from_value(step).map_err(|e| fail(format!("step {label}: {e}")))?;
        steps.push(step);
    }
    let file = WorkflowFile {
        key: head.key,
        name: head.name,
        event: head.event,
        provider: head.provider,
        condition: head.condition,
        steps,
    };
    workflows::validate(
        &file.name,
        file.provider,
        file.condition.as_deref(),
        &file.steps,
    )
    .map_err(|e| fail(named_step(&file.steps, e.to_string())))?;
    Ok(Document {
        origin: origin.to_owned(),
        file,
    })
}

/// A value read as `T`; an error names the field it is about (`on_error: unknown variant …`).
fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // An unknown field's message names it already.
        if path == "." || message.starts_with("unknown field") {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// A one-step workflow's errors are said without its step (as `workflow create` says them);
/// a file names it all the same.
fn named_step(steps: &[StepDefinition], message: String) -> String {
    match steps {
        [only] if !message.starts_with("step ") && !message.starts_with("when: ") => {
            format!("step {}: {message}", only.name)
        }
        _ => message,
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let first = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first && rest && key.len() <= 100 {
        return Ok(());
    }
    Err(format!(
        "key {key:?}: a key is letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100"
    ))
}

/// What applying a document does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", content = "fields", rename_all = "lowercase")]
pub enum Change {
    Created,
    /// The fields that change: `key` (a workflow of that name without a key is taken
    /// over), `name`, `event`, `when`, `steps`.
    Updated(Vec<&'static str>),
    Unchanged,
}

/// One document's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub origin: String,
    pub key: String,
    pub name: String,
    /// The workflow's id; none for one a dry run would create.
    pub id: Option<Uuid>,
    #[serde(flatten)]
    pub change: Change,
}

/// A document resolved against the catalog: its app event, and the workflow it changes.
struct Planned {
    document: Document,
    app_event_id: Uuid,
    current: Option<Uuid>,
    change: Change,
}

/// Applies documents, or with `dry_run` says only what applying would do. Nothing is changed
/// when any document is refused; every refusal is said, each naming its origin.
pub async fn apply(
    pool: &Pool,
    documents: Vec<Document>,
    dry_run: bool,
) -> Result<Vec<Outcome>, StoreError> {
    let planned = plan(pool, documents).await?;
    if !dry_run {
        write(pool, &planned).await?;
    }
    Ok(planned
        .into_iter()
        .map(|p| Outcome {
            origin: p.document.origin,
            key: p.document.file.key,
            name: p.document.file.name,
            id: p.current,
            change: p.change,
        })
        .collect())
}

async fn plan(pool: &Pool, documents: Vec<Document>) -> Result<Vec<Planned>, StoreError> {
    let existing = workflows::list(pool, None, None).await?;
    let mut origins: HashMap<&str, &str> = HashMap::new();
    let mut refused = Vec::new();
    for document in &documents {
        if let Some(first) = origins.insert(&document.file.key, &document.origin) {
            refused.push(format!(
                "{}: key {:?} is also the key of {first}",
                document.origin, document.file.key
            ));
        }
    }
    let mut planned = Vec::with_capacity(documents.len());
    for document in documents.iter().cloned() {
        match resolve(pool, &existing, document).await {
            Ok(p) => planned.push(p),
            Err(StoreError::Invalid(message)) => refused.push(message),
            Err(other) => return Err(other),
        }
    }
    if !refused.is_empty() {
        return Err(StoreError::Invalid(refused.join("; ")));
    }
    Ok(planned)
}

async fn resolve(
    pool: &Pool,
    existing: &[Workflow],
    document: Document,
) -> Result<Planned, StoreError> {
    let origin = &document.origin;
    let file = &document.file;
    let app_event_id = match app_events::get(pool, &file.event).await {
        Ok(event) => event.id,
        Err(StoreError::NotFound(message)) => {
            return Err(StoreError::Invalid(format!("{origin}: event: {message}")));
        }
        Err(other) => return Err(other),
    };
    let by_key = existing
        .iter()
        .find(|w| w.key.as_deref() == Some(&file.key));
    // A workflow made before files, of the same name, is taken over rather than refused.
    let by_name = || {
        existing
            .iter()
            .find(|w| w.key.is_none() && w.name.to_lowercase() == file.name.to_lowercase())
    };
    let Some(current) = by_key.or_else(by_name) else {
        return Ok(Planned {
            document,
            app_event_id,
            current: None,
            change: Change::Created,
        });
    };
    if current.provider != file.provider {
        return Err(StoreError::Invalid(format!(
            "{origin}: provider: the workflow of key {:?} is a {} workflow and stays one (its users' connections are {}'s): give a new key for a {} workflow",
            file.key, current.provider, current.provider, file.provider
        )));
    }
    let differs = [
        ("key", current.key.as_deref() != Some(&file.key)),
        ("name", current.name != file.name),
        ("event", current.app_event_id != app_event_id),
        ("when", current.condition != file.condition),
        ("steps", current.steps != file.steps),
    ];
    let fields: Vec<&'static str> = differs
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect();
    let change = if fields.is_empty() {
        Change::Unchanged
    } else {
        Change::Updated(fields)
    };
    Ok(Planned {
        current: Some(current.id),
        document,
        app_event_id,
        change,
    })
}

/// Writes every change in one transaction: all or nothing.
async fn write(pool: &Pool, planned: &[Planned]) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    for p in planned {
        let file = &p.document.file;
        let definition = Definition {
            key: Some(&file.key),
            name: &file.name,
            app_event_id: p.app_event_id,
            provider: file.provider,
            when: file.condition.as_deref(),
            steps: &file.steps,
        };
        let written = match (&p.change, p.current) {
            (Change::Unchanged, _) => continue,
            (_, Some(id)) => workflows::overwrite(&transaction, id, &definition).await,
            (_, None) => workflows::insert(&transaction, &definition).await.map(drop),
        };
        written.map_err(|err| match workflows::named(err, &file.name) {
            StoreError::Conflict(message) => {
                StoreError::Conflict(format!("{}: name: {message}", p.document.origin))
            }
            other => other,
        })?;
    }
    transaction.commit().await?;
    Ok(())
}

/// The documents of the workflows that have a key (those made by `workflow create` have
/// none until a file takes them over), or of the one of `key`.
pub async fn export(pool: &Pool, key: Option<&str>) -> Result<Vec<WorkflowFile>, StoreError> {
    let documents: Vec<WorkflowFile> = workflows::list(pool, None, None)
        .await?
        .into_iter()
        .filter_map(|w| {
            let own = w.key.clone()?;
            key.is_none_or(|k| k == own).then_some(WorkflowFile {
                key: own,
                name: w.name,
                event: w.event,
                provider: w.provider,
                condition: w.condition,
                steps: w.steps,
            })
        })
        .collect();
    if let (Some(key), true) = (key, documents.is_empty()) {
        return Err(StoreError::NotFound(format!("no workflow of key {key:?}")));
    }
    Ok(documents)
}

/// A document as text, in the format `parse` reads.
pub fn render(file: &WorkflowFile, format: Format) -> Result<String, String> {
    match format {
        Format::Yaml => serde_norway::to_string(file).map_err(|e| e.to_string()),
        Format::Json => serde_json::to_string_pretty(file)
            .map(|text| text + "\n")
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn document() -> Value {
        json!({
            "key": "sf-contact",
            "name": "Contact to Salesforce",
            "event": "Contact Created",
            "provider": "salesforce",
            "steps": [
                {"name": "find", "action": "query", "options": {"soql": "SELECT Id FROM Contact WHERE Email = {{payload.email}}"}},
                {"name": "create", "action": "create", "when": "steps.find.totalSize == 0", "mapping": {"Email": "{{payload.email}}"}}
            ]
        })
    }

    #[test]
    fn a_rendered_document_reads_back_the_same_in_either_format() {
        let read = read("f", document()).expect("valid").file;
        for format in [Format::Yaml, Format::Json] {
            let text = render(&read, format).expect("render");
            assert_eq!(
                parse("f", &text, format).expect("reads").file,
                read,
                "{text}"
            );
        }
    }

    #[test]
    fn errors_name_the_origin_the_step_and_the_field() {
        let mut bad = document();
        bad["steps"][1]["mappin"] = json!({});
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(
            err.starts_with("wf/sf.yaml: step create: unknown field `mappin`"),
            "{err}"
        );

        let mut bad = document();
        bad["steps"][1]["when"] = json!("steps.later.x == 1");
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(err.starts_with("wf/sf.yaml: step create: when: "), "{err}");

        let mut bad = document();
        bad["key"] = json!("no spaces");
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(err.starts_with("wf/sf.yaml: key \"no spaces\""), "{err}");

        let mut bad = document();
        bad["steps"][0]["on_error"] = json!("retry");
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(
            err.starts_with("wf/sf.yaml: step find: on_error: unknown variant `retry`"),
            "{err}"
        );

        let mut bad = document();
        bad["provider"] = json!("salesfarce");
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(
            err.starts_with("wf/sf.yaml: provider: unknown variant `salesfarce`"),
            "{err}"
        );

        let mut bad = document();
        bad["steps"] = json!([{"name": "main", "action": "delete"}]);
        let err = read("wf/sf.yaml", bad).expect_err("refused");
        assert!(err.starts_with("wf/sf.yaml: step main: "), "{err}");

        let err = parse("wf/x.yaml", "key: [", Format::Yaml).expect_err("refused");
        assert!(err.starts_with("wf/x.yaml: "), "{err}");
    }
}
