//! App events: a named event type with an example payload, the test data of its workflows.
//!
//! An app event answers to its current name and to its aliases: the names it had before a
//! rename, kept so producers still publishing under an old name keep running its workflows
//! until an operator removes the alias. A name, current or alias, belongs to one app event
//! only. The `app_event_names` table holds them all; a trigger adds the current name on
//! every create and rename (see `migrations/V2__app_event_aliases_and_payload_checks.sql`).

use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::core::event::MAX_FIELD_CHARS;
use crate::core::payload_check::Mode;
use crate::store::db::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct AppEvent {
    pub id: Uuid,
    pub name: String,
    /// Former names that still route events here, in name order.
    pub aliases: Vec<String>,
    /// The example payload.
    pub schema: Value,
    /// What the worker does with an event whose payload does not match the example.
    pub payload_check: Mode,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What `update` changes; `None` and empty keep the current value.
#[derive(Debug, Clone, Default)]
pub struct AppEventChanges {
    /// A new name; the current one becomes an alias.
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub payload_check: Option<Mode>,
    /// Aliases to remove: events published under them stop matching this app event.
    pub remove_aliases: Vec<String>,
}

impl AppEventChanges {
    /// Whether nothing would change: an update that is almost certainly a mistake.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.schema.is_none()
            && self.payload_check.is_none()
            && self.remove_aliases.is_empty()
    }
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

const SELECT: &str = "select e.id, e.name, e.schema, e.payload_check, e.created_at, e.updated_at, \
     coalesce(array_agg(n.name order by n.name) filter (where n.name <> e.name), '{}') \
     from app_events e left join app_event_names n on n.app_event_id = e.id";

fn from_row(row: &tokio_postgres::Row) -> Result<AppEvent, StoreError> {
    let mode: String = row.try_get(3)?;
    Ok(AppEvent {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        schema: row.try_get(2)?,
        payload_check: mode.parse().map_err(StoreError::Invalid)?,
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        aliases: row.try_get(6)?,
    })
}

/// Refuses `name` when another app event answers to it, naming that app event, so the
/// operator knows where to remove it. (The trigger refuses it too, should two changes race.)
async fn check_name_free(
    client: &impl deadpool_postgres::GenericClient,
    name: &str,
    for_event: Option<Uuid>,
) -> Result<(), StoreError> {
    let owner = client
        .query_opt(
            "select e.name from app_event_names n join app_events e on e.id = n.app_event_id \
             where n.name = $1 and ($2::uuid is null or e.id <> $2)",
            &[&name, &for_event],
        )
        .await?;
    let Some(owner) = owner else { return Ok(()) };
    let owner: String = owner.try_get(0)?;
    if owner == name {
        return Err(StoreError::Conflict(format!(
            "app event {name:?} already exists"
        )));
    }
    Err(StoreError::Conflict(format!(
        "{name:?} is an alias of app event {owner:?} (a name it had before a rename); \
         remove it there first: appevents app-event update {owner:?} --remove-alias {name:?}"
    )))
}

pub async fn create(
    pool: &Pool,
    name: &str,
    schema: &Value,
    payload_check: Mode,
) -> Result<AppEvent, StoreError> {
    check_name(name)?;
    check_schema(schema)?;
    let client = pool.get().await?;
    check_name_free(&client, name, None).await?;
    let id = Uuid::now_v7();
    client
        .execute(
            "insert into app_events (id, name, schema, payload_check) values ($1, $2, $3, $4)",
            &[&id, &name, schema, &payload_check.as_str()],
        )
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("app event {name:?} already exists"))
            }
            other => other,
        })?;
    get_by_id(&client, id).await
}

pub async fn list(pool: &Pool) -> Result<Vec<AppEvent>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(&format!("{SELECT} group by e.id order by e.name"), &[])
        .await?;
    rows.iter().map(from_row).collect()
}

async fn get_by_id(
    client: &impl deadpool_postgres::GenericClient,
    id: Uuid,
) -> Result<AppEvent, StoreError> {
    let row = client
        .query_opt(&format!("{SELECT} where e.id = $1 group by e.id"), &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no app event {id}")))?;
    from_row(&row)
}

/// Finds an app event by id or by its current name. Managing an app event takes its
/// current name, so a command never acts on the wrong one through a forgotten alias; the
/// message says when the key is an alias.
/// Whether an app event answers to `name`, as its current name or an alias (exactly: names
/// are case-sensitive, as the worker matches them).
pub async fn is_known_name(pool: &Pool, name: &str) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt("select 1 from app_event_names where name = $1", &[&name])
        .await?;
    Ok(row.is_some())
}

pub async fn get(pool: &Pool, key: &str) -> Result<AppEvent, StoreError> {
    let client = pool.get().await?;
    find(&client, key).await
}

async fn find(
    client: &impl deadpool_postgres::GenericClient,
    key: &str,
) -> Result<AppEvent, StoreError> {
    let id = Uuid::parse_str(key).ok();
    let row = client
        .query_opt(
            &format!("{SELECT} where e.id = $1 or e.name = $2 group by e.id"),
            &[&id, &key],
        )
        .await?;
    match row {
        Some(row) => from_row(&row),
        None => Err(not_found(client, key).await),
    }
}

async fn not_found(client: &impl deadpool_postgres::GenericClient, key: &str) -> StoreError {
    let owner = client
        .query_opt(
            "select e.name from app_event_names n join app_events e on e.id = n.app_event_id \
             where n.name = $1",
            &[&key],
        )
        .await;
    match owner
        .ok()
        .flatten()
        .and_then(|row| row.try_get::<_, String>(0).ok())
    {
        Some(owner) => StoreError::NotFound(format!(
            "no app event {key:?}: it is an alias of {owner:?}, which it was renamed to"
        )),
        None => StoreError::NotFound(format!("no app event {key:?}")),
    }
}

/// Renames, replaces the example payload, sets the payload check and removes aliases, in
/// one transaction. Workflows reference the app event by id, so a rename keeps them
/// attached, and the old name stays as an alias.
pub async fn update(
    pool: &Pool,
    key: &str,
    changes: &AppEventChanges,
) -> Result<AppEvent, StoreError> {
    if let Some(name) = &changes.name {
        check_name(name)?;
    }
    if let Some(schema) = &changes.schema {
        check_schema(schema)?;
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let current = find(&tx, key).await?;
    if let Some(name) = &changes.name {
        check_name_free(&tx, name, Some(current.id)).await?;
    }
    tx.execute(
        "update app_events set name = coalesce($2, name), schema = coalesce($3, schema), \
         payload_check = coalesce($4, payload_check), updated_at = now() where id = $1",
        &[
            &current.id,
            &changes.name,
            &changes.schema,
            &changes.payload_check.map(Mode::as_str),
        ],
    )
    .await?;
    let name = changes.name.as_deref().unwrap_or(&current.name);
    for alias in &changes.remove_aliases {
        remove_alias(&tx, current.id, name, alias).await?;
    }
    let updated = get_by_id(&tx, current.id).await?;
    tx.commit().await?;
    Ok(updated)
}

async fn remove_alias(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    name: &str,
    alias: &str,
) -> Result<(), StoreError> {
    if alias == name {
        return Err(StoreError::Invalid(format!(
            "{alias:?} is the app event's current name, not an alias; rename it instead"
        )));
    }
    let removed = tx
        .execute(
            "delete from app_event_names where name = $1 and app_event_id = $2",
            &[&alias, &id],
        )
        .await?;
    if removed == 0 {
        return Err(StoreError::NotFound(format!(
            "{alias:?} is not an alias of app event {name:?}"
        )));
    }
    Ok(())
}

/// Deletes an app event that no workflow uses, with its aliases.
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
