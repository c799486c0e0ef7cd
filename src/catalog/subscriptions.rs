//! Subscriptions: a user has switched a workflow on, bound to one of that user's own
//! connections. The database refuses a connection of another user (composite foreign key).

use deadpool_postgres::Pool;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::db::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub id: Uuid,
    pub user_id: String,
    pub workflow_id: Uuid,
    pub workflow: String,
    pub event: String,
    pub connection_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const SELECT: &str = "select s.id, s.user_id, s.workflow_id, w.name, e.name, s.connection_id, s.created_at \
     from subscriptions s join workflows w on w.id = s.workflow_id \
     join app_events e on e.id = w.app_event_id";

fn from_row(row: &tokio_postgres::Row) -> Result<Subscription, StoreError> {
    Ok(Subscription {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        workflow_id: row.try_get(2)?,
        workflow: row.try_get(3)?,
        event: row.try_get(4)?,
        connection_id: row.try_get(5)?,
        created_at: row.try_get(6)?,
    })
}

/// Switches `workflow` on for `user`, bound to `connection`. Switching on again rebinds it.
pub async fn create(
    pool: &Pool,
    user: &str,
    workflow: Uuid,
    connection: Uuid,
) -> Result<Subscription, StoreError> {
    if user.trim().is_empty() {
        return Err(StoreError::Invalid("user must not be empty".into()));
    }
    let client = pool.get().await?;
    let provider_match = client
        .query_opt(
            "select w.provider = c.provider from workflows w, connections c \
             where w.id = $1 and c.id = $2 and c.user_id = $3",
            &[&workflow, &connection, &user],
        )
        .await?;
    match provider_match {
        None => {
            return Err(StoreError::NotFound(format!(
                "no workflow {workflow}, or no connection {connection} of user {user:?}"
            )));
        }
        Some(row) if !row.try_get::<_, bool>(0)? => {
            return Err(StoreError::Invalid(
                "the connection is for another provider than the workflow".into(),
            ));
        }
        Some(_) => {}
    }
    let row = client
        .query_one(
            "insert into subscriptions (id, user_id, workflow_id, connection_id) values ($1, $2, $3, $4) \
             on conflict (user_id, workflow_id) do update set connection_id = excluded.connection_id \
             returning id",
            &[&Uuid::now_v7(), &user, &workflow, &connection],
        )
        .await?;
    let id: Uuid = row.try_get(0)?;
    let row = client
        .query_one(&format!("{SELECT} where s.id = $1"), &[&id])
        .await?;
    from_row(&row)
}

pub async fn list(
    pool: &Pool,
    user: Option<&str>,
    workflow: Option<Uuid>,
) -> Result<Vec<Subscription>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "{SELECT} where ($1::text is null or s.user_id = $1) \
                 and ($2::uuid is null or s.workflow_id = $2) order by s.created_at"
            ),
            &[&user, &workflow],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

/// Switches a workflow off for a user.
pub async fn delete(pool: &Pool, user: &str, workflow: Uuid) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let deleted = client
        .execute(
            "delete from subscriptions where user_id = $1 and workflow_id = $2",
            &[&user, &workflow],
        )
        .await?;
    if deleted == 0 {
        return Err(StoreError::NotFound(format!(
            "workflow {workflow} is not on for user {user:?}"
        )));
    }
    Ok(())
}

/// The connection `user`'s subscription to `workflow` is bound to, if the user has it on.
pub async fn connection_of(
    pool: &Pool,
    user: &str,
    workflow: Uuid,
) -> Result<Option<Uuid>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "select connection_id from subscriptions where user_id = $1 and workflow_id = $2",
            &[&user, &workflow],
        )
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}
