//! App events: a named event type with an example payload, the test data of its workflows.

use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::StoreError;
use crate::envelope::MAX_FIELD_CHARS;

#[derive(Debug, Clone, Serialize)]
pub struct AppEvent {
    pub id: Uuid,
    pub name: String,
    /// The example payload.
    pub schema: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid(
            "app event name must not be empty".into(),
        ));
    }
    if name.chars().count() > MAX_FIELD_CHARS || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "app event name must be at most {MAX_FIELD_CHARS} characters, without control characters"
        )));
    }
    Ok(())
}

fn check_schema(schema: &Value) -> Result<(), StoreError> {
    if schema.is_object() {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "the schema (example payload) must be a JSON object".into(),
        ))
    }
}

const SELECT: &str = "select id, name, schema, created_at, updated_at from app_events";

fn from_row(row: &tokio_postgres::Row) -> Result<AppEvent, StoreError> {
    Ok(AppEvent {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        schema: row.try_get(2)?,
        created_at: row.try_get(3)?,
        updated_at: row.try_get(4)?,
    })
}

pub async fn create(pool: &Pool, name: &str, schema: &Value) -> Result<AppEvent, StoreError> {
    check_name(name)?;
    check_schema(schema)?;
    let client = pool.get().await?;
    let row = client
        .query_one(
            "insert into app_events (id, name, schema) values ($1, $2, $3) \
             returning id, name, schema, created_at, updated_at",
            &[&Uuid::now_v7(), &name, schema],
        )
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("app event {name:?} already exists"))
            }
            other => other,
        })?;
    from_row(&row)
}

pub async fn list(pool: &Pool) -> Result<Vec<AppEvent>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(&format!("{SELECT} order by name"), &[])
        .await?;
    rows.iter().map(from_row).collect()
}

/// Finds an app event by id or by name.
pub async fn get(pool: &Pool, key: &str) -> Result<AppEvent, StoreError> {
    let client = pool.get().await?;
    let id = Uuid::parse_str(key).ok();
    let row = client
        .query_opt(
            &format!("{SELECT} where id = $1 or name = $2"),
            &[&id, &key],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no app event {key:?}")))?;
    from_row(&row)
}

/// Renames and/or replaces the example payload. Workflows reference the app event by id,
/// so a rename keeps them attached.
pub async fn update(
    pool: &Pool,
    key: &str,
    new_name: Option<&str>,
    schema: Option<&Value>,
) -> Result<AppEvent, StoreError> {
    if let Some(name) = new_name {
        check_name(name)?;
    }
    if let Some(schema) = schema {
        check_schema(schema)?;
    }
    let current = get(pool, key).await?;
    let client = pool.get().await?;
    let row = client
        .query_one(
            "update app_events set name = coalesce($2, name), schema = coalesce($3, schema), \
             updated_at = now() where id = $1 returning id, name, schema, created_at, updated_at",
            &[&current.id, &new_name, &schema],
        )
        .await?;
    from_row(&row)
}

/// Deletes an app event that no workflow uses.
pub async fn delete(pool: &Pool, key: &str) -> Result<(), StoreError> {
    let current = get(pool, key).await?;
    let client = pool.get().await?;
    client
        .execute("delete from app_events where id = $1", &[&current.id])
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!(
                "app event {:?} still has workflows; delete them first",
                current.name
            )),
            other => other,
        })?;
    Ok(())
}
