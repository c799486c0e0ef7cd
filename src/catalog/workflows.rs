//! Workflows: triggered by one app event, an optional condition, and named steps run in
//! order, each an action of the workflow's provider (or an HTTP request) with its field
//! mapping, an optional condition and `for_each`, and what a failure does to the rest.
//!
//! Storage keeps a one-step workflow as it always was (`action`, `options`, `mapping`
//! columns, no `steps`), so existing workflows run unchanged and a one-step run records no
//! more than before. A workflow with more (several steps, a condition, a `for_each`) keeps
//! its whole definition in `steps`, and its first step in the columns too, so a reader of
//! the columns alone (a listing, an old client) sees what the workflow starts with.

use deadpool_postgres::{GenericClient, Pool};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::catalog::app_events;
use crate::core::condition::{Allowed, Condition};
use crate::core::mapping::{Reach, Reference, Template};
use crate::core::provider::Provider;
use crate::integrations::Action;
use crate::store::db::StoreError;

/// The most steps a workflow has.
pub const MAX_STEPS: usize = 20;
/// The most elements a `for_each` runs over; a longer array fails the run permanently.
pub const MAX_FOR_EACH: usize = 100;
/// The name of a one-step workflow's step.
pub const ONE_STEP: &str = "main";

#[derive(Debug, Clone, Serialize)]
pub struct Workflow {
    pub id: Uuid,
    /// The stable key of the file that defines it (`workflow apply`); none for a workflow
    /// made otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub name: String,
    pub app_event_id: Uuid,
    pub event: String,
    pub provider: Provider,
    /// The first step's action, options and mapping (a one-step workflow's only step).
    pub action: String,
    pub options: Value,
    pub mapping: Value,
    /// The workflow's condition on the event: it runs only when this holds.
    #[serde(rename = "when", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Every step, in order; a one-step workflow's is named `main`.
    pub steps: Vec<StepDefinition>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What a failed step does to the rest of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The run fails (retried or dead-lettered as any failure); later steps do not run.
    #[default]
    Fail,
    /// The failure is recorded and the run goes on; the step's output is null.
    Continue,
}

impl OnError {
    fn is_fail(&self) -> bool {
        *self == OnError::Fail
    }
}

/// One step as defined (stored in `steps`, written in a workflow file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    pub name: String,
    pub action: String,
    #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
    pub options: Value,
    #[serde(default = "empty_object")]
    pub mapping: Value,
    /// A CEL condition: the step runs only when it holds (else it is recorded as skipped).
    #[serde(default, rename = "when", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// A path to an array (`payload.items`): the step runs once per element, `item`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    #[serde(default, skip_serializing_if = "OnError::is_fail")]
    pub on_error: OnError,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

fn is_empty_object(value: &Value) -> bool {
    value.as_object().is_some_and(serde_json::Map::is_empty)
}

impl StepDefinition {
    /// The only step of a workflow defined by action, options and mapping.
    pub fn one(action: &str, options: &Value, mapping: &Value) -> StepDefinition {
        StepDefinition {
            name: ONE_STEP.to_owned(),
            action: action.to_owned(),
            options: options.clone(),
            mapping: mapping.clone(),
            condition: None,
            for_each: None,
            on_error: OnError::Fail,
        }
    }

    /// Whether this, as a workflow's only step without a workflow condition, is stored in
    /// the columns alone.
    fn is_plain(&self) -> bool {
        self.name == ONE_STEP
            && self.condition.is_none()
            && self.for_each.is_none()
            && self.on_error == OnError::Fail
    }
}

/// A step ready to run.
#[derive(Debug, Clone)]
pub struct CompiledStep {
    pub name: String,
    pub action: Action,
    pub mapping: Template,
    pub condition: Option<Condition>,
    pub for_each: Option<Reference>,
    pub on_error: OnError,
}

/// A workflow ready to run: its steps parsed, mappings and conditions compiled.
#[derive(Debug, Clone)]
pub struct CompiledWorkflow {
    pub id: Uuid,
    pub name: String,
    pub provider: Provider,
    pub condition: Option<Condition>,
    pub steps: Vec<CompiledStep>,
}

impl CompiledWorkflow {
    /// Compiles a stored workflow. Errors name the step and the field.
    pub fn compile(
        id: Uuid,
        name: String,
        provider: Provider,
        condition: Option<&str>,
        steps: &[StepDefinition],
    ) -> Result<CompiledWorkflow, String> {
        compile(id, name, provider, condition, steps, Action::parse)
    }

    /// The only step of a workflow of one step and no condition: its run row is its whole
    /// record, and it runs the way every workflow ran before steps existed. `None` for a
    /// workflow with more.
    pub fn one_step(&self) -> Option<&CompiledStep> {
        match self.steps.as_slice() {
            [only]
                if self.condition.is_none()
                    && only.condition.is_none()
                    && only.for_each.is_none() =>
            {
                Some(only)
            }
            _ => None,
        }
    }
}

type Parse = fn(Provider, &str, &Value) -> Result<Action, String>;

fn compile(
    id: Uuid,
    name: String,
    provider: Provider,
    condition: Option<&str>,
    definitions: &[StepDefinition],
    parse: Parse,
) -> Result<CompiledWorkflow, String> {
    if definitions.is_empty() {
        return Err("a workflow needs at least one step".into());
    }
    if definitions.len() > MAX_STEPS {
        return Err(format!(
            "a workflow has at most {MAX_STEPS} steps, this one {}",
            definitions.len()
        ));
    }
    let all: Vec<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
    let condition = condition
        .map(|source| {
            Condition::compile(
                source,
                Allowed {
                    earlier: &[],
                    all: &all,
                    item: false,
                },
            )
            .map_err(|e| format!("when: {e}"))
        })
        .transpose()?;
    // A one-step workflow's errors read as they always did, without a step to name.
    let one_step = condition.is_none() && matches!(definitions, [only] if only.is_plain());
    let mut steps = Vec::with_capacity(definitions.len());
    for (index, definition) in definitions.iter().enumerate() {
        let step = compile_step(provider, definition, &all[..index], &all, parse, one_step)
            .map_err(|e| {
                if one_step {
                    e
                } else {
                    format!("step {}: {e}", step_label(definition, index))
                }
            })?;
        steps.push(step);
    }
    Ok(CompiledWorkflow {
        id,
        name,
        provider,
        condition,
        steps,
    })
}

fn step_label(definition: &StepDefinition, index: usize) -> String {
    if definition.name.trim().is_empty() {
        format!("#{}", index + 1)
    } else {
        definition.name.clone()
    }
}

fn compile_step(
    provider: Provider,
    definition: &StepDefinition,
    earlier: &[&str],
    all: &[&str],
    parse: Parse,
    one_step: bool,
) -> Result<CompiledStep, String> {
    let name = definition.name.as_str();
    let identifier = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        return Err(format!(
            "name {name:?}: a step name is letters, digits and _, starting with a letter (it is read as steps.{name} in later steps)"
        ));
    }
    if earlier.contains(&name) {
        return Err(format!("name: two steps are named {name}"));
    }
    let action = parse(provider, &definition.action, &definition.options)
        .map_err(|e| if one_step { e } else { format!("action: {e}") })?;
    let item = definition.for_each.is_some();
    let check = |reaches: Vec<Reach<'_>>, field: &str| -> Result<(), String> {
        for reach in reaches {
            match reach {
                Reach::Item if !item => {
                    return Err(format!(
                        "{field}: item is defined only in a step with for_each"
                    ));
                }
                Reach::Item => {}
                Reach::Step(step, written) if !earlier.contains(&step) => {
                    let why = if all.contains(&step) {
                        "which does not run before this one"
                    } else {
                        "which the workflow does not have"
                    };
                    return Err(format!(
                        "{field}: {{{{{written}}}}} reads step {step}, {why}"
                    ));
                }
                Reach::Step(..) => {}
            }
        }
        Ok(())
    };
    let mapping = Template::compile(&definition.mapping).map_err(|e| format!("mapping: {e}"))?;
    let Some(fields) = definition.mapping.as_object() else {
        return Err("mapping must be a JSON object".into());
    };
    check(mapping.reaches(), "mapping")?;
    for (option, template) in action.templates() {
        check(template.reaches(), &format!("options.{option}"))?;
    }
    if let Action::SalesforceCreate { match_fields, .. } = &action
        && let Some(missing) = match_fields.iter().find(|f| !fields.contains_key(*f))
    {
        return Err(format!(
            "option match_fields names {missing}, which the mapping does not set"
        ));
    }
    if let Action::HubspotCreateCompany {
        match_property: Some(property),
    } = &action
        && !fields.contains_key(property)
    {
        return Err(format!(
            "option match_property names {property}, which the mapping does not set"
        ));
    }
    let for_each = definition
        .for_each
        .as_deref()
        .map(|path| -> Result<Reference, String> {
            let reference = Reference::compile(path).map_err(|e| format!("for_each: {e}"))?;
            if reference.reach() == Some(Reach::Item) {
                return Err("for_each: item is the element of this for_each itself".into());
            }
            check(reference.reach().into_iter().collect(), "for_each")?;
            Ok(reference)
        })
        .transpose()?;
    let condition = definition
        .condition
        .as_deref()
        .map(|source| {
            Condition::compile(source, Allowed { earlier, all, item })
                .map_err(|e| format!("when: {e}"))
        })
        .transpose()?;
    Ok(CompiledStep {
        name: name.to_owned(),
        action,
        mapping,
        condition,
        for_each,
        on_error: definition.on_error,
    })
}

#[derive(Debug, Clone)]
pub struct NewWorkflow {
    pub name: String,
    /// App event name or id.
    pub event: String,
    pub provider: Provider,
    /// A one-step workflow's action, options and mapping; empty when `steps` is given.
    pub action: String,
    pub options: Value,
    pub mapping: Value,
    /// The workflow's condition (CEL).
    pub when: Option<String>,
    /// The steps, in order, instead of `action`, `options` and `mapping`.
    pub steps: Vec<StepDefinition>,
}

impl NewWorkflow {
    /// The steps as defined, either given or made of `action`, `options` and `mapping`.
    fn definitions(&self) -> Result<Vec<StepDefinition>, StoreError> {
        steps_of(&self.action, &self.options, &self.mapping, &self.steps)
    }
}

/// A workflow's steps: `steps`, or one step of `action`, `options` and `mapping`; not both.
fn steps_of(
    action: &str,
    options: &Value,
    mapping: &Value,
    steps: &[StepDefinition],
) -> Result<Vec<StepDefinition>, StoreError> {
    if steps.is_empty() {
        return Ok(vec![StepDefinition::one(action, options, mapping)]);
    }
    let one_step_given = !action.is_empty()
        || !(options.is_null() || is_empty_object(options))
        || !(mapping.is_null() || is_empty_object(mapping));
    if one_step_given {
        return Err(StoreError::Invalid(
            "give either steps, or action with options and mapping, not both".into(),
        ));
    }
    Ok(steps.to_vec())
}

/// Fields to change; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct WorkflowChanges {
    pub name: Option<String>,
    pub event: Option<String>,
    /// A one-step workflow's step; refused for a workflow of several steps (change `steps`).
    pub action: Option<String>,
    pub options: Option<Value>,
    pub mapping: Option<Value>,
    /// `Some(None)` removes the condition.
    pub when: Option<Option<String>>,
    pub steps: Option<Vec<StepDefinition>>,
}

impl WorkflowChanges {
    /// Whether nothing would change: an update that is almost certainly a mistake.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.event.is_none()
            && self.action.is_none()
            && self.options.is_none()
            && self.mapping.is_none()
            && self.when.is_none()
            && self.steps.is_none()
    }
}

const SELECT: &str = "select w.id, w.name, w.app_event_id, e.name, w.provider, w.action, \
     w.options, w.mapping, w.created_at, w.updated_at, w.steps, w.condition, w.key \
     from workflows w join app_events e on e.id = w.app_event_id";

/// A workflow's steps from its columns: `steps` when set, else the one step of the others.
pub fn stored_steps(
    action: &str,
    options: &Value,
    mapping: &Value,
    steps: Option<Value>,
) -> Result<Vec<StepDefinition>, String> {
    match steps {
        None | Some(Value::Null) => Ok(vec![StepDefinition::one(action, options, mapping)]),
        Some(steps) => serde_json::from_value(steps).map_err(|e| format!("stored steps: {e}")),
    }
}

fn from_row(row: &tokio_postgres::Row) -> Result<Workflow, StoreError> {
    let provider: String = row.try_get(4)?;
    let action: String = row.try_get(5)?;
    let options: Value = row.try_get(6)?;
    let mapping: Value = row.try_get(7)?;
    let steps =
        stored_steps(&action, &options, &mapping, row.try_get(10)?).map_err(StoreError::Invalid)?;
    Ok(Workflow {
        id: row.try_get(0)?,
        key: row.try_get(12)?,
        name: row.try_get(1)?,
        app_event_id: row.try_get(2)?,
        event: row.try_get(3)?,
        provider: provider.parse().map_err(StoreError::Invalid)?,
        action,
        options,
        mapping,
        condition: row.try_get(11)?,
        steps,
        created_at: row.try_get(8)?,
        updated_at: row.try_get(9)?,
    })
}

/// Checks a definition the way it will run, and more strictly: options an action does not
/// take are refused too. Errors name the step and the field.
pub fn validate(
    name: &str,
    provider: Provider,
    when: Option<&str>,
    steps: &[StepDefinition],
) -> Result<CompiledWorkflow, StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid(
            "workflow name must not be empty".into(),
        ));
    }
    compile(
        Uuid::nil(),
        name.to_owned(),
        provider,
        when,
        steps,
        Action::parse_definition,
    )
    .map_err(StoreError::Invalid)
}

/// The columns a definition is stored in: the first step's action, options and mapping, and
/// `steps` only when the workflow is more than that one step.
struct Columns<'a> {
    action: &'a str,
    options: &'a Value,
    mapping: &'a Value,
    steps: Option<Value>,
}

fn columns<'a>(when: Option<&str>, steps: &'a [StepDefinition]) -> Result<Columns<'a>, StoreError> {
    let first = steps
        .first()
        .ok_or_else(|| StoreError::Invalid("a workflow needs at least one step".into()))?;
    let plain = when.is_none() && steps.len() == 1 && first.is_plain();
    let steps = if plain {
        None
    } else {
        Some(serde_json::to_value(steps).map_err(|e| StoreError::Invalid(e.to_string()))?)
    };
    Ok(Columns {
        action: &first.action,
        options: &first.options,
        mapping: &first.mapping,
        steps,
    })
}

pub async fn create(pool: &Pool, new: &NewWorkflow) -> Result<Workflow, StoreError> {
    let steps = new.definitions()?;
    let when = new.when.as_deref();
    validate(&new.name, new.provider, when, &steps)?;
    let event = app_events::get(pool, &new.event).await?;
    let definition = Definition {
        key: None,
        name: &new.name,
        app_event_id: event.id,
        provider: new.provider,
        when,
        steps: &steps,
    };
    let client = pool.get().await?;
    let id = insert(&client, &definition)
        .await
        .map_err(|err| named(err, &new.name))?;
    get(pool, id).await
}

/// A validated definition as it is written.
pub(crate) struct Definition<'a> {
    pub key: Option<&'a str>,
    pub name: &'a str,
    pub app_event_id: Uuid,
    pub provider: Provider,
    pub when: Option<&'a str>,
    pub steps: &'a [StepDefinition],
}

/// Writes a new workflow; returns its id.
pub(crate) async fn insert(
    client: &impl GenericClient,
    definition: &Definition<'_>,
) -> Result<Uuid, StoreError> {
    let stored = columns(definition.when, definition.steps)?;
    let id = Uuid::now_v7();
    client
        .execute(
            "insert into workflows (id, name, app_event_id, provider, action, options, mapping, \
             steps, condition, key) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &id,
                &definition.name,
                &definition.app_event_id,
                &definition.provider.as_str(),
                &stored.action,
                &stored.options,
                &stored.mapping,
                &stored.steps,
                &definition.when,
                &definition.key,
            ],
        )
        .await?;
    Ok(id)
}

/// Overwrites a workflow's definition (its provider stays: its subscriptions' connections
/// are of that provider); a key given is set, none keeps the one it has.
pub(crate) async fn overwrite(
    client: &impl GenericClient,
    id: Uuid,
    definition: &Definition<'_>,
) -> Result<(), StoreError> {
    let stored = columns(definition.when, definition.steps)?;
    client
        .execute(
            "update workflows set name = $2, app_event_id = $3, action = $4, options = $5, \
             mapping = $6, steps = $7, condition = $8, key = coalesce($9, key), \
             updated_at = now() where id = $1",
            &[
                &id,
                &definition.name,
                &definition.app_event_id,
                &stored.action,
                &stored.options,
                &stored.mapping,
                &stored.steps,
                &definition.when,
                &definition.key,
            ],
        )
        .await?;
    Ok(())
}

pub async fn get(pool: &Pool, id: Uuid) -> Result<Workflow, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(&format!("{SELECT} where w.id = $1"), &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no workflow {id}")))?;
    from_row(&row)
}

/// All workflows, or those of one app event (by name or id), or the one of a name (names are
/// unique, ignoring case).
pub async fn list(
    pool: &Pool,
    event: Option<&str>,
    name: Option<&str>,
) -> Result<Vec<Workflow>, StoreError> {
    let client = pool.get().await?;
    let event_id = event.and_then(|e| Uuid::parse_str(e).ok());
    let rows = client
        .query(
            &format!(
                "{SELECT} where ($1::text is null or e.name = $1 or e.id = $2) \
                 and ($3::text is null or lower(w.name) = lower($3)) order by w.created_at"
            ),
            &[&event, &event_id, &name],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

/// A duplicate name, said in the user's terms.
pub(crate) fn named(err: StoreError, name: &str) -> StoreError {
    match err {
        StoreError::Conflict(detail) if detail.contains("lower(name)") => StoreError::Conflict(
            format!("a workflow named {name:?} exists already (names are unique, ignoring case)"),
        ),
        other => other,
    }
}

/// Workflow names by id (as text), for listings that show a name where they hold an id;
/// empty when the catalog cannot be read, so the ids are shown instead.
pub async fn names(pool: &Pool) -> std::collections::HashMap<String, String> {
    list(pool, None, None)
        .await
        .map(|list| {
            list.into_iter()
                .map(|w| (w.id.to_string(), w.name))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn update(
    pool: &Pool,
    id: Uuid,
    changes: &WorkflowChanges,
) -> Result<Workflow, StoreError> {
    let current = get(pool, id).await?;
    let name = changes.name.clone().unwrap_or(current.name);
    let when = match &changes.when {
        Some(when) => when.clone(),
        None => current.condition,
    };
    let one_step_change =
        changes.action.is_some() || changes.options.is_some() || changes.mapping.is_some();
    let steps = match (&changes.steps, one_step_change) {
        (Some(_), true) => {
            return Err(StoreError::Invalid(
                "give either steps, or action, options and mapping, not both".into(),
            ));
        }
        (Some(steps), false) => steps.clone(),
        (None, true) => match current.steps.as_slice() {
            [only] => vec![StepDefinition {
                action: changes.action.clone().unwrap_or(only.action.clone()),
                options: changes.options.clone().unwrap_or(only.options.clone()),
                mapping: changes.mapping.clone().unwrap_or(only.mapping.clone()),
                ..only.clone()
            }],
            many => {
                return Err(StoreError::Invalid(format!(
                    "this workflow has {} steps: change them with steps, not action, options or mapping",
                    many.len()
                )));
            }
        },
        (None, false) => current.steps,
    };
    validate(&name, current.provider, when.as_deref(), &steps)?;
    let app_event_id = match &changes.event {
        Some(event) => app_events::get(pool, event).await?.id,
        None => current.app_event_id,
    };
    let definition = Definition {
        key: None,
        name: &name,
        app_event_id,
        provider: current.provider,
        when: when.as_deref(),
        steps: &steps,
    };
    let client = pool.get().await?;
    overwrite(&client, id, &definition)
        .await
        .map_err(|err| named(err, &name))?;
    get(pool, id).await
}

/// Deletes a workflow with its subscriptions and run history.
pub async fn delete(pool: &Pool, id: Uuid) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let deleted = client
        .execute("delete from workflows where id = $1", &[&id])
        .await?;
    if deleted == 0 {
        return Err(StoreError::NotFound(format!("no workflow {id}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_create_s_match_fields_must_be_fields_its_mapping_sets() {
        let compile = |mapping: Value| {
            CompiledWorkflow::compile(
                Uuid::nil(),
                "w".into(),
                Provider::Salesforce,
                None,
                &[StepDefinition::one(
                    "create",
                    &json!({"match_fields": ["Email"]}),
                    &mapping,
                )],
            )
            .map(|_| ())
        };

        assert_eq!(compile(json!({"Email": "{{payload.email}}"})), Ok(()));
        assert_eq!(
            compile(json!({"LastName": "{{payload.last_name}}"})),
            Err("option match_fields names Email, which the mapping does not set".into())
        );
    }

    fn check(when: Option<&str>, steps: Value) -> Result<(), String> {
        let steps: Vec<StepDefinition> = serde_json::from_value(steps).expect("steps");
        validate("w", Provider::Salesforce, when, &steps)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn find_then_create(create_mapping: Value) -> Value {
        json!([
            {"name": "find", "action": "create", "mapping": {"LastName": "x"}},
            {"name": "create", "action": "create", "mapping": create_mapping}
        ])
    }

    #[test]
    fn every_kind_of_bad_definition_is_refused_naming_the_step_and_the_field() {
        let refused = |when: Option<&str>, steps: Value| check(when, steps).expect_err("refused");

        let err = refused(None, find_then_create(json!({"Id": "{{steps.later.id}}"})));
        assert!(err.contains("step create: mapping: {{steps.later.id}} reads step later, which the workflow does not have"), "{err}");

        let err = refused(
            None,
            json!([
                {"name": "first", "action": "create", "mapping": {"Id": "{{steps.second.id}}"}},
                {"name": "second", "action": "create", "mapping": {}}
            ]),
        );
        assert!(err.contains("step first: mapping: {{steps.second.id}} reads step second, which does not run before this one"), "{err}");

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "mapping": {"X": "{{item.x}}"}}]),
        );
        assert!(
            err.contains("step a: mapping: item is defined only in a step with for_each"),
            "{err}"
        );

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "when": "payload.x ==", "mapping": {}}]),
        );
        assert!(
            err.starts_with("step a: when: \"payload.x ==\" is not a valid CEL expression"),
            "{err}"
        );

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "when": "steps.b.id == 1", "mapping": {}}, {"name": "b", "action": "create", "mapping": {}}]),
        );
        assert!(
            err.contains(
                "step a: when: \"steps.b.id == 1\" reads step b, which does not run before it"
            ),
            "{err}"
        );

        let err = refused(
            Some("steps.find.totalSize == 0"),
            find_then_create(json!({})),
        );
        assert!(
            err.contains(
                "when: \"steps.find.totalSize == 0\" reads step find, which does not run before it"
            ),
            "{err}"
        );

        let err = refused(
            None,
            json!([{"name": "a-b", "action": "create", "mapping": {}}]),
        );
        assert!(err.contains("step a-b: name \"a-b\""), "{err}");

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "mapping": {}}, {"name": "a", "action": "create", "mapping": {}}]),
        );
        assert!(err.contains("step a: name: two steps are named a"), "{err}");

        let err = refused(
            None,
            json!([{"name": "a", "action": "delete", "mapping": {}}]),
        );
        assert!(
            err.contains("step a: action: unknown action \"delete\""),
            "{err}"
        );

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "options": {"id_property": "x"}, "mapping": {}}]),
        );
        assert!(
            err.contains("step a: action: salesforce create does not take option id_property"),
            "{err}"
        );

        let err = refused(
            None,
            json!([{"name": "a", "action": "create", "for_each": "env.items", "mapping": {}}]),
        );
        assert!(
            err.contains("step a: for_each: `env.items` is not part of the event"),
            "{err}"
        );

        let err = refused(None, json!([]));
        assert!(err.contains("at least one step"), "{err}");

        let many: Vec<Value> = (0..=MAX_STEPS)
            .map(|i| json!({"name": format!("s{i}"), "action": "create", "mapping": {}}))
            .collect();
        assert!(refused(None, Value::Array(many)).contains("at most 20 steps"));
    }

    fn check_of(provider: Provider, steps: Value) -> Result<(), String> {
        let steps: Vec<StepDefinition> = serde_json::from_value(steps).expect("steps");
        validate("w", provider, None, &steps)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_http_step_of_a_crm_workflow_is_checked_naming_the_step_and_the_field() {
        let http_step = |options: Value| {
            json!([
                {"name": "find", "action": "query", "options": {"soql": "SELECT Id FROM Contact"}},
                {"name": "notify", "action": "http.request", "options": options,
                 "mapping": {"id": "{{steps.find.records.0.Id}}"}}
            ])
        };
        let refused = |options: Value| {
            check_of(Provider::Salesforce, http_step(options)).expect_err("refused")
        };

        assert_eq!(
            check_of(
                Provider::Salesforce,
                http_step(
                    json!({"url": "https://hooks.example/{{steps.find.totalSize}}",
                                 "method": "put", "headers": {"x-key": "k"}})
                )
            ),
            Ok(())
        );
        assert_eq!(
            refused(json!({"url": "/hooks/x"})),
            "step notify: action: option url \"/hooks/x\" is not absolute: a salesforce or hubspot workflow's http.request has no base URL, so its URL starts with https:// or http://"
        );
        assert!(
            refused(json!({"url": "{{payload.url}}"})).contains("is not absolute"),
            "a URL that is all reference has no known scheme"
        );
        assert_eq!(
            refused(json!({"url": "https://x.example", "timeout": 3})),
            "step notify: action: salesforce http.request does not take option timeout: it takes only url, method, headers"
        );
        assert_eq!(
            refused(json!({"url": "https://x.example", "method": "TRACE"})),
            "step notify: action: option method \"TRACE\": expected GET, POST, PUT, PATCH or DELETE"
        );
        assert_eq!(
            refused(json!({})),
            "step notify: action: option url: required, a string"
        );
        assert_eq!(
            refused(
                json!({"url": "https://x.example", "headers": {"x-id": "{{steps.notify.id}}"}})
            ),
            "step notify: options.headers.x-id: {{steps.notify.id}} reads step notify, which does not run before this one"
        );
        let err = check_of(
            Provider::Http,
            json!([{"name": "a", "action": "http.request", "options": {"url": "https://x.example"}}]),
        )
        .expect_err("refused");
        assert!(
            err.contains("an http workflow's step is action request"),
            "{err}"
        );
    }

    #[test]
    fn a_company_s_match_property_must_be_a_property_its_mapping_sets() {
        let company = |options: Value, mapping: Value| {
            check_of(
                Provider::Hubspot,
                json!([{"name": "company", "action": "create-company",
                        "options": options, "mapping": mapping}]),
            )
        };

        assert_eq!(company(json!({}), json!({"name": "Acme"})), Ok(()));
        assert_eq!(
            company(json!({"match_property": "name"}), json!({"name": "Acme"})),
            Ok(())
        );
        assert_eq!(
            company(json!({"match_property": "domain"}), json!({"name": "Acme"})),
            Err(
                "step company: option match_property names domain, which the mapping does not set"
                    .into()
            )
        );
        assert!(
            company(
                json!({"match_property": "Domain Name"}),
                json!({"name": "Acme"})
            )
            .is_err_and(|e| e.contains("is not a HubSpot property name"))
        );
    }

    #[test]
    fn good_definitions_compile() {
        assert_eq!(
            check(
                Some("payload.plan == \"pro\""),
                json!([
                    {"name": "find", "action": "create", "mapping": {"LastName": "x"}},
                    {"name": "each", "action": "create", "for_each": "payload.people",
                     "when": "steps.find.success && item.vip", "on_error": "continue",
                     "mapping": {"LastName": "{{item.name}}", "AccountId": "{{steps.find.id}}"}}
                ])
            ),
            Ok(())
        );
    }

    #[test]
    fn a_one_step_workflow_is_stored_in_the_columns_alone() {
        let one = [StepDefinition::one(
            "create",
            &json!({}),
            &json!({"LastName": "x"}),
        )];
        assert!(columns(None, &one).expect("columns").steps.is_none());
        assert!(
            columns(Some("true"), &one)
                .expect("columns")
                .steps
                .is_some()
        );
        let named = [StepDefinition {
            name: "create".into(),
            ..one[0].clone()
        }];
        assert!(columns(None, &named).expect("columns").steps.is_some());
    }
}
