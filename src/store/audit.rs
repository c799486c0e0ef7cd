//! The audit log of the operator console: who replayed, purged or retried what, and when.
//! An entry is written before the action starts and completed with its outcome, so an
//! action that never finished (the server stopped) still shows who began it.

use deadpool_postgres::Pool;
use serde::Serialize;
use time::OffsetDateTime;

use crate::store::db::StoreError;

/// What an operator did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Replay,
    Purge,
    Retry,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
            Action::Retry => "retry",
        }
    }
}

/// One entry.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// Records that `actor` begins `action` on `target`; returns the entry's id.
pub async fn begin(
    pool: &Pool,
    actor: &str,
    action: Action,
    target: &str,
) -> Result<i64, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "insert into audit_log (actor, action, target) values ($1, $2, $3) returning id",
            &[&actor, &action.as_str(), &target],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Completes an entry with what came of the action.
pub async fn finish(pool: &Pool, id: i64, outcome: &str) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "update audit_log set outcome = $2, finished_at = now() where id = $1",
            &[&id, &outcome],
        )
        .await?;
    Ok(())
}

/// The latest entries, newest first.
pub async fn latest(pool: &Pool, limit: i64) -> Result<Vec<Entry>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "select id, at, actor, action, target, outcome, finished_at from audit_log \
             order by at desc, id desc limit $1",
            &[&limit],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Entry {
                id: row.try_get(0)?,
                at: row.try_get(1)?,
                actor: row.try_get(2)?,
                action: row.try_get(3)?,
                target: row.try_get(4)?,
                outcome: row.try_get(5)?,
                finished_at: row.try_get(6)?,
            })
        })
        .collect()
}
