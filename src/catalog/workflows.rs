//! Workflows: triggered by one app event, one integration step with its field mapping.

use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::catalog::app_events;
use crate::core::mapping::Template;
use crate::core::provider::Provider;
use crate::integrations::Action;
use crate::store::db::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct Workflow {
    pub id: Uuid,
    pub name: String,
    pub app_event_id: Uuid,
    pub event: String,
    pub provider: Provider,
    pub action: String,
    pub options: Value,
    pub mapping: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A workflow ready to run: its step parsed, its mapping compiled.
#[derive(Debug, Clone)]
pub struct CompiledWorkflow {
    pub id: Uuid,
    pub name: String,
    pub provider: Provider,
    pub action: Action,
    pub mapping: Template,
}

impl CompiledWorkflow {
    pub fn compile(
        id: Uuid,
        name: String,
        provider: Provider,
        action: &str,
        options: &Value,
        mapping: &Value,
    ) -> Result<CompiledWorkflow, String> {
        let step = Action::parse(provider, action, options)?;
        let template = Template::compile(mapping).map_err(|e| format!("mapping: {e}"))?;
        let Some(fields) = mapping.as_object() else {
            return Err("mapping must be a JSON object".into());
        };
        if let Action::SalesforceCreate { match_fields, .. } = &step
            && let Some(missing) = match_fields.iter().find(|f| !fields.contains_key(*f))
        {
            return Err(format!(
                "option match_fields names {missing}, which the mapping does not set"
            ));
        }
        Ok(CompiledWorkflow {
            id,
            name,
            provider,
            action: step,
            mapping: template,
        })
    }
}

#[derive(Debug, Clone)]
pub struct NewWorkflow {
    pub name: String,
    /// App event name or id.
    pub event: String,
    pub provider: Provider,
    pub action: String,
    pub options: Value,
    pub mapping: Value,
}

/// Fields to change; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct WorkflowChanges {
    pub name: Option<String>,
    pub event: Option<String>,
    pub action: Option<String>,
    pub options: Option<Value>,
    pub mapping: Option<Value>,
}

impl WorkflowChanges {
    /// Whether nothing would change: an update that is almost certainly a mistake.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.event.is_none()
            && self.action.is_none()
            && self.options.is_none()
            && self.mapping.is_none()
    }
}

const SELECT: &str = "select w.id, w.name, w.app_event_id, e.name, w.provider, w.action, \
     w.options, w.mapping, w.created_at, w.updated_at \
     from workflows w join app_events e on e.id = w.app_event_id";

fn from_row(row: &tokio_postgres::Row) -> Result<Workflow, StoreError> {
    let provider: String = row.try_get(4)?;
    Ok(Workflow {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        app_event_id: row.try_get(2)?,
        event: row.try_get(3)?,
        provider: provider.parse().map_err(StoreError::Invalid)?,
        action: row.try_get(5)?,
        options: row.try_get(6)?,
        mapping: row.try_get(7)?,
        created_at: row.try_get(8)?,
        updated_at: row.try_get(9)?,
    })
}

fn validate(
    name: &str,
    provider: Provider,
    action: &str,
    options: &Value,
    mapping: &Value,
) -> Result<(), StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid(
            "workflow name must not be empty".into(),
        ));
    }
    Action::parse_definition(provider, action, options).map_err(StoreError::Invalid)?;
    CompiledWorkflow::compile(
        Uuid::nil(),
        name.to_owned(),
        provider,
        action,
        options,
        mapping,
    )
    .map(|_| ())
    .map_err(StoreError::Invalid)
}

pub async fn create(pool: &Pool, new: &NewWorkflow) -> Result<Workflow, StoreError> {
    validate(
        &new.name,
        new.provider,
        &new.action,
        &new.options,
        &new.mapping,
    )?;
    let event = app_events::get(pool, &new.event).await?;
    let id = Uuid::now_v7();
    let client = pool.get().await?;
    client
        .execute(
            "insert into workflows (id, name, app_event_id, provider, action, options, mapping) \
             values ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &id,
                &new.name,
                &event.id,
                &new.provider.as_str(),
                &new.action,
                &new.options,
                &new.mapping,
            ],
        )
        .await
        .map_err(|err| named(err.into(), &new.name))?;
    get(pool, id).await
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
fn named(err: StoreError, name: &str) -> StoreError {
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
    let action = changes.action.clone().unwrap_or(current.action);
    let options = changes.options.clone().unwrap_or(current.options);
    let mapping = changes.mapping.clone().unwrap_or(current.mapping);
    validate(&name, current.provider, &action, &options, &mapping)?;
    let app_event_id = match &changes.event {
        Some(event) => app_events::get(pool, event).await?.id,
        None => current.app_event_id,
    };
    let client = pool.get().await?;
    client
        .execute(
            "update workflows set name = $2, app_event_id = $3, action = $4, options = $5, \
             mapping = $6, updated_at = now() where id = $1",
            &[&id, &name, &app_event_id, &action, &options, &mapping],
        )
        .await
        .map_err(|err| named(err.into(), &name))?;
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
                "create",
                &json!({"match_fields": ["Email"]}),
                &mapping,
            )
            .map(|_| ())
        };

        assert_eq!(compile(json!({"Email": "{{payload.email}}"})), Ok(()));
        assert_eq!(
            compile(json!({"LastName": "{{payload.last_name}}"})),
            Err("option match_fields names Email, which the mapping does not set".into())
        );
    }
}
