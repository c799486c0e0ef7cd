//! The figures of the console's overview, read from the run history and the workers'
//! heartbeats: events per minute, runs by outcome and provider over a window, and the
//! workers alive. Each reads only the window it shows, through the runs' time index.

use std::time::Duration;

use deadpool_postgres::Pool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::db::StoreError;

/// Distinct events that started runs, per minute of the last `minutes` minutes, oldest
/// first; minutes without any are zero. (Events no workflow matched start no run: they are
/// counted in the workers' metrics only.)
pub async fn events_per_minute(
    pool: &Pool,
    minutes: i32,
) -> Result<Vec<(OffsetDateTime, i64)>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "with m as (select generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1), \
             date_trunc('minute', now()), interval '1 minute') as minute), \
             c as (select date_trunc('minute', created_at) as minute, count(distinct (user_id, event_id)) as n \
             from runs where created_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1) \
             group by 1) \
             select m.minute, coalesce(c.n, 0) from m left join c using (minute) order by m.minute",
            &[&minutes],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Runs created in the last `window`, by provider and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcomes {
    pub provider: String,
    pub status: String,
    pub runs: i64,
}

pub async fn outcomes(pool: &Pool, window: Duration) -> Result<Vec<Outcomes>, StoreError> {
    let client = pool.get().await?;
    let secs = window.as_secs_f64();
    let rows = client
        .query(
            "select w.provider, r.status, count(*) from runs r join workflows w on w.id = r.workflow_id \
             where r.created_at >= now() - make_interval(secs => $1) \
             group by 1, 2 order by 1, 2",
            &[&secs],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Outcomes {
                provider: row.try_get(0)?,
                status: row.try_get(1)?,
                runs: row.try_get(2)?,
            })
        })
        .collect()
}

/// A worker whose heartbeat is current.
#[derive(Debug, Clone)]
pub struct LiveWorker {
    pub id: Uuid,
    pub started_at: OffsetDateTime,
    pub alive_until: OffsetDateTime,
}

pub async fn workers(pool: &Pool) -> Result<Vec<LiveWorker>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "select id, started_at, alive_until from workers where alive_until > now() \
             order by started_at",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(LiveWorker {
                id: row.try_get(0)?,
                started_at: row.try_get(1)?,
                alive_until: row.try_get(2)?,
            })
        })
        .collect()
}
