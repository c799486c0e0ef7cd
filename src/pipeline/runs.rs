//! Runs: one workflow executed for one event, recorded in Postgres.
//!
//! A worker *claims* a run before calling the provider and *records* its outcome after.
//! The claim is an insert-or-update on the unique (user, event id, workflow) row that only
//! succeeds when the run is new, waiting for a retry, or held by a worker that is no longer
//! alive (its row in `workers`, renewed by [`crate::pipeline::liveness`], has lapsed); so
//! two workers never execute the same run at once, and a succeeded run is never executed
//! again. Both statements take many runs at once (`unnest`), one round trip each.
//!
//! The uniqueness lives in the deduplication keys (`run_keys`, see `store::history`): each
//! statement first inserts the keys of new runs, then writes each run in the partition its
//! key names. History older than `history.retention` is dropped with its keys, so an event
//! id seen again after that is a new event.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::core::failure::Failure;
use crate::store::db::StoreError;
use crate::store::history::run_keys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Retrying,
    Dead,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Retrying => "retrying",
            RunStatus::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Result<RunStatus, String> {
        match text {
            "running" => Ok(RunStatus::Running),
            "succeeded" => Ok(RunStatus::Succeeded),
            "retrying" => Ok(RunStatus::Retrying),
            "dead" => Ok(RunStatus::Dead),
            other => Err(format!(
                "unknown run status {other:?}: expected running, succeeded, retrying or dead"
            )),
        }
    }
}

/// Which run to claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub user_id: String,
    pub event_id: String,
    pub event_name: String,
    pub workflow_id: Uuid,
    pub connection_id: Option<Uuid>,
    /// A replay from the dead-letter queue: a dead run may run again.
    pub revive_dead: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// This worker holds the run until `lease` runs out or it records an outcome.
    Run(RunClaim),
    AlreadySucceeded,
    /// Another worker holds it, alive for `remaining` more unless it renews.
    Held {
        remaining: Duration,
    },
    /// Dead-lettered already; only a replay runs it again.
    Dead,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunClaim {
    pub run_id: Uuid,
    pub token: Uuid,
    /// Times the run was taken over from a worker that vanished mid-run.
    pub abandoned: i32,
    /// Provider calls recorded for the run before this claim.
    pub calls_before: u32,
    /// Times the run was claimed before this claim: when any, an earlier attempt may have
    /// reached the provider without its outcome being recorded.
    pub claims_before: u32,
    /// When the run was first claimed: nothing an earlier attempt made is older. It is the
    /// run's creation time, which with `run_id` is the run's primary key.
    pub first_claimed_at: OffsetDateTime,
}

/// The outcome of a claimed run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub run_id: Uuid,
    /// When the run was created, as its claim returned it: with `run_id`, the run's primary
    /// key, which names its partition.
    pub created_at: OffsetDateTime,
    pub token: Uuid,
    pub user_id: String,
    pub event_id: String,
    pub event_name: String,
    pub workflow_id: Uuid,
    pub connection_id: Option<Uuid>,
    pub status: RunStatus,
    /// Provider calls made under this claim (added to the run's `attempts`).
    pub calls: u32,
    pub provider_id: Option<String>,
    pub last_error: Option<Failure>,
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// A running run may be taken over once its worker's liveness has lapsed; a run whose worker
/// row is gone (or that has no worker) falls back to the lease it was claimed with.
const CLAIM: &str = concat!(
    "with q as (select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], \
     $6::uuid[], $7::uuid[]) as q(run_id, user_id, event_id, event_name, workflow_id, \
     connection_id, token)), ",
    run_keys!("q", "run_id"),
    " insert into runs as r (id, created_at, user_id, event_id, event_name, workflow_id, \
     connection_id, status, claims, claim_token, claimed_until, claimed_by) \
     select k.run_id, k.created_at, q.user_id, q.event_id, q.event_name, q.workflow_id, \
     q.connection_id, 'running', 1, q.token, now() + make_interval(secs => $8), $9 \
     from q join keys k on k.event_id = q.event_id and k.user_id = q.user_id \
     and k.workflow_id = q.workflow_id \
     on conflict (id, created_at) do update set \
     status = 'running', claims = r.claims + 1, \
     abandoned = r.abandoned + case when r.status = 'running' then 1 else 0 end, \
     claim_token = excluded.claim_token, claimed_until = excluded.claimed_until, \
     claimed_by = excluded.claimed_by, connection_id = excluded.connection_id, updated_at = now() \
     where r.status = 'retrying' or (r.status = 'running' and coalesce( \
     (select w.alive_until from workers w where w.id = r.claimed_by), r.claimed_until) < now()) \
     returning r.user_id, r.event_id, r.workflow_id, r.id, r.claim_token, r.abandoned, r.attempts, \
     r.claims, r.created_at"
);

/// A run is found through its key: the key holds its id and partition.
const REVIVE: &str = "update runs r set status = 'retrying', updated_at = now() \
     from unnest($1::text[], $2::text[], $3::uuid[]) as q(user_id, event_id, workflow_id) \
     join run_keys k on k.user_id = q.user_id and k.event_id = q.event_id \
     and k.workflow_id = q.workflow_id \
     where r.id = k.run_id and r.created_at = k.created_at and r.status = 'dead'";

/// Seconds left of a held run's hold, as the database's clock sees it (workers' clocks may
/// differ from it and from each other).
const STATUS: &str = "select r.user_id, r.event_id, r.workflow_id, r.status, \
     greatest(extract(epoch from coalesce(w.alive_until, r.claimed_until, now()) - now()), 0)::float8 \
     from unnest($1::text[], $2::text[], $3::uuid[]) as q(user_id, event_id, workflow_id) \
     join run_keys k on k.user_id = q.user_id and k.event_id = q.event_id \
     and k.workflow_id = q.workflow_id \
     join runs r on r.id = k.run_id and r.created_at = k.created_at \
     left join workers w on w.id = r.claimed_by";

/// Writes an outcome where the claim is still this worker's, found by the run's primary key
/// (id and creation time, as the claim returned them): one index probe in one partition.
const RECORD: &str = "update runs r set status = u.status, attempts = r.attempts + u.attempts, \
     provider_id = coalesce(u.provider_id, r.provider_id), last_error = u.last_error, \
     next_attempt_at = u.next_attempt_at, claim_token = null, claimed_until = null, \
     claimed_by = null, \
     finished_at = case when u.status in ('succeeded', 'dead') then now() end, updated_at = now() \
     from unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::int4[], $6::text[], \
     $7::jsonb[], $8::timestamptz[]) as u(id, created_at, token, status, attempts, provider_id, \
     last_error, next_attempt_at) \
     where r.id = u.id and r.created_at = u.created_at and r.claim_token = u.token \
     returning r.id";

/// [`RECORD`] for the outcomes it did not write: an upsert through the keys, so the outcome is
/// durable even if the claim itself was lost (claims are committed without waiting for the
/// disk, see `db::claims_pool`, and a Postgres crash can drop the last ones). A run another
/// worker has claimed since is not written here either.
const RECORD_LOST_CLAIM: &str = concat!(
    "with u as (select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], \
     $5::text[], $6::jsonb[], $7::timestamptz[], $8::text[], $9::text[], $10::text[], \
     $11::uuid[], $12::uuid[]) as u(id, token, status, attempts, provider_id, last_error, \
     next_attempt_at, user_id, event_id, event_name, workflow_id, connection_id)), ",
    run_keys!("u", "id"),
    " insert into runs as r (id, created_at, user_id, event_id, event_name, workflow_id, \
     connection_id, status, attempts, provider_id, last_error, next_attempt_at, claims, \
     claim_token, finished_at) \
     select k.run_id, k.created_at, u.user_id, u.event_id, u.event_name, u.workflow_id, \
     u.connection_id, u.status, u.attempts, u.provider_id, u.last_error, u.next_attempt_at, 1, \
     u.token, case when u.status in ('succeeded', 'dead') then now() end \
     from u join keys k on k.event_id = u.event_id and k.user_id = u.user_id \
     and k.workflow_id = u.workflow_id \
     on conflict (id, created_at) do update set status = excluded.status, \
     attempts = r.attempts + excluded.attempts, \
     provider_id = coalesce(excluded.provider_id, r.provider_id), last_error = excluded.last_error, \
     next_attempt_at = excluded.next_attempt_at, claim_token = null, claimed_until = null, \
     claimed_by = null, \
     finished_at = excluded.finished_at, updated_at = now() \
     where r.claim_token = excluded.claim_token \
     returning r.id"
);

/// The statements [`claim`] and [`record`] run for every run, each reaching its rows through
/// their keys: what the run statement pools (`db::claims_pool`, `db::records_pool`) are tuned
/// for, and what a test holds to index lookups.
pub const HOT_STATEMENTS: [&str; 5] = [CLAIM, REVIVE, STATUS, RECORD, RECORD_LOST_CLAIM];

type Key = (String, String, Uuid);

/// Claims runs for the worker `worker_id`; the answer is in the order of `requests`. `lease`
/// is how long the claim lasts should the worker never renew its liveness.
pub async fn claim(
    client: &impl GenericClient,
    requests: &[ClaimRequest],
    worker_id: Uuid,
    lease: Duration,
) -> Result<Vec<Claimed>, StoreError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let revive: Vec<&ClaimRequest> = requests.iter().filter(|r| r.revive_dead).collect();
    if !revive.is_empty() {
        let users: Vec<&str> = revive.iter().map(|r| r.user_id.as_str()).collect();
        let events: Vec<&str> = revive.iter().map(|r| r.event_id.as_str()).collect();
        let workflows: Vec<Uuid> = revive.iter().map(|r| r.workflow_id).collect();
        let statement = client.prepare_cached(REVIVE).await?;
        client
            .execute(&statement, &[&users, &events, &workflows])
            .await?;
    }
    // The same run twice in one statement would make ON CONFLICT touch a row twice (an
    // error): only the first copy is claimed; the others find it held, as a second worker
    // would.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&ClaimRequest> = requests
        .iter()
        .filter(|r| seen.insert((r.user_id.as_str(), r.event_id.as_str(), r.workflow_id)))
        .collect();
    let run_ids: Vec<Uuid> = unique.iter().map(|_| Uuid::now_v7()).collect();
    let tokens: Vec<Uuid> = unique.iter().map(|_| Uuid::new_v4()).collect();
    let users: Vec<&str> = unique.iter().map(|r| r.user_id.as_str()).collect();
    let events: Vec<&str> = unique.iter().map(|r| r.event_id.as_str()).collect();
    let names: Vec<&str> = unique.iter().map(|r| r.event_name.as_str()).collect();
    let workflows: Vec<Uuid> = unique.iter().map(|r| r.workflow_id).collect();
    let connections: Vec<Option<Uuid>> = unique.iter().map(|r| r.connection_id).collect();
    let lease_secs = lease.as_secs_f64();
    let statement = client.prepare_cached(CLAIM).await?;
    let rows = client
        .query(
            &statement,
            &[
                &run_ids,
                &users,
                &events,
                &names,
                &workflows,
                &connections,
                &tokens,
                &lease_secs,
                &worker_id,
            ],
        )
        .await?;
    let mut claimed: std::collections::HashMap<Key, Claimed> = std::collections::HashMap::new();
    for row in rows {
        let key: Key = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        claimed.insert(
            key,
            Claimed::Run(RunClaim {
                run_id: row.try_get(3)?,
                token: row.try_get(4)?,
                abandoned: row.try_get(5)?,
                calls_before: u32::try_from(row.try_get::<_, i32>(6)?).unwrap_or(0),
                claims_before: u32::try_from(row.try_get::<_, i32>(7)? - 1).unwrap_or(0),
                first_claimed_at: row.try_get(8)?,
            }),
        );
    }
    if claimed.len() < unique.len() {
        let statement = client.prepare_cached(STATUS).await?;
        for row in client
            .query(&statement, &[&users, &events, &workflows])
            .await?
        {
            let key: Key = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if claimed.contains_key(&key) {
                continue;
            }
            let status: String = row.try_get(3)?;
            let state = match status.as_str() {
                "succeeded" => Claimed::AlreadySucceeded,
                "dead" => Claimed::Dead,
                _ => Claimed::Held {
                    remaining: Duration::try_from_secs_f64(row.try_get::<_, f64>(4)?)
                        .unwrap_or_default(),
                },
            };
            claimed.insert(key, state);
        }
    }
    requests
        .iter()
        .map(|r| {
            let key = (r.user_id.clone(), r.event_id.clone(), r.workflow_id);
            // A later copy of a run claimed above, or a row that vanished between the two
            // statements (its workflow was deleted), is held: looked at again later.
            Ok(claimed
                .remove(&key)
                .unwrap_or(Claimed::Held { remaining: lease }))
        })
        .collect()
}

/// Records outcomes. Returns the runs whose claim was no longer this worker's (another
/// worker took it over after the lease ran out); their outcome is not written.
pub async fn record(
    client: &impl GenericClient,
    records: &[RunRecord],
) -> Result<Vec<Uuid>, StoreError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    // One outcome per run in a statement (a second would be a conflict on the same row).
    let mut seen = std::collections::HashSet::new();
    let records: Vec<&RunRecord> = records.iter().filter(|r| seen.insert(r.run_id)).collect();
    let fields = RecordFields::of(&records);
    let created: Vec<OffsetDateTime> = records.iter().map(|r| r.created_at).collect();
    let statement = client.prepare_cached(RECORD).await?;
    let rows = client
        .query(
            &statement,
            &[
                &fields.ids,
                &created,
                &fields.tokens,
                &fields.statuses,
                &fields.calls,
                &fields.provider_ids,
                &fields.errors,
                &fields.next,
            ],
        )
        .await?;
    let written: std::collections::HashSet<Uuid> =
        rows.iter().filter_map(|row| row.try_get(0).ok()).collect();
    if written.len() == records.len() {
        return Ok(Vec::new());
    }
    let unwritten: Vec<&RunRecord> = records
        .into_iter()
        .filter(|r| !written.contains(&r.run_id))
        .collect();
    let fields = RecordFields::of(&unwritten);
    let users: Vec<&str> = unwritten.iter().map(|r| r.user_id.as_str()).collect();
    let events: Vec<&str> = unwritten.iter().map(|r| r.event_id.as_str()).collect();
    let names: Vec<&str> = unwritten.iter().map(|r| r.event_name.as_str()).collect();
    let workflows: Vec<Uuid> = unwritten.iter().map(|r| r.workflow_id).collect();
    let connections: Vec<Option<Uuid>> = unwritten.iter().map(|r| r.connection_id).collect();
    let statement = client.prepare_cached(RECORD_LOST_CLAIM).await?;
    let rows = client
        .query(
            &statement,
            &[
                &fields.ids,
                &fields.tokens,
                &fields.statuses,
                &fields.calls,
                &fields.provider_ids,
                &fields.errors,
                &fields.next,
                &users,
                &events,
                &names,
                &workflows,
                &connections,
            ],
        )
        .await?;
    let written: std::collections::HashSet<Uuid> =
        rows.iter().filter_map(|row| row.try_get(0).ok()).collect();
    Ok(fields
        .ids
        .into_iter()
        .filter(|id| !written.contains(id))
        .collect())
}

/// The columns of outcomes both record statements write, one array each.
struct RecordFields<'a> {
    ids: Vec<Uuid>,
    tokens: Vec<Uuid>,
    statuses: Vec<&'static str>,
    calls: Vec<i32>,
    provider_ids: Vec<Option<&'a str>>,
    errors: Vec<Option<Value>>,
    next: Vec<Option<OffsetDateTime>>,
}

impl<'a> RecordFields<'a> {
    fn of(records: &[&'a RunRecord]) -> RecordFields<'a> {
        RecordFields {
            ids: records.iter().map(|r| r.run_id).collect(),
            tokens: records.iter().map(|r| r.token).collect(),
            statuses: records.iter().map(|r| r.status.as_str()).collect(),
            calls: records
                .iter()
                .map(|r| i32::try_from(r.calls).unwrap_or(i32::MAX))
                .collect(),
            provider_ids: records.iter().map(|r| r.provider_id.as_deref()).collect(),
            errors: records
                .iter()
                .map(|r| {
                    r.last_error
                        .as_ref()
                        .and_then(|f| serde_json::to_value(f).ok())
                })
                .collect(),
            next: records.iter().map(|r| r.next_attempt_at).collect(),
        }
    }
}

/// A run as history shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: Uuid,
    pub event_id: String,
    pub event_name: String,
    pub user_id: String,
    pub workflow_id: Uuid,
    pub workflow: String,
    pub connection_id: Option<Uuid>,
    pub status: RunStatus,
    pub attempts: i32,
    pub claims: i32,
    pub abandoned: i32,
    pub provider_id: Option<String>,
    pub last_error: Option<Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// Filters of the run history; all optional.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub user_id: Option<String>,
    pub workflow_id: Option<Uuid>,
    pub status: Option<RunStatus>,
    pub event_id: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    /// Keyset pagination: only runs older than this run (its creation time and id), so a
    /// page deep in a large history costs what the first one does.
    pub before: Option<(OffsetDateTime, Uuid)>,
    pub limit: i64,
}

const SELECT_RUN_COLUMNS: &str = "select r.id, r.event_id, r.event_name, r.user_id, r.workflow_id, \
     w.name, r.connection_id, r.status, r.attempts, r.claims, r.abandoned, r.provider_id, \
     r.last_error, r.next_attempt_at, r.created_at, r.updated_at, r.finished_at";

fn run_from_row(row: &tokio_postgres::Row) -> Result<Run, StoreError> {
    let status: String = row.try_get(7)?;
    Ok(Run {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        event_name: row.try_get(2)?,
        user_id: row.try_get(3)?,
        workflow_id: row.try_get(4)?,
        workflow: row.try_get(5)?,
        connection_id: row.try_get(6)?,
        status: RunStatus::parse(&status).map_err(StoreError::Invalid)?,
        attempts: row.try_get(8)?,
        claims: row.try_get(9)?,
        abandoned: row.try_get(10)?,
        provider_id: row.try_get(11)?,
        last_error: row.try_get(12)?,
        next_attempt_at: row.try_get(13)?,
        created_at: row.try_get(14)?,
        updated_at: row.try_get(15)?,
        finished_at: row.try_get(16)?,
    })
}

/// Newest first.
pub async fn list(pool: &Pool, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
    let client = pool.get().await?;
    let status = filter.status.map(RunStatus::as_str);
    // An event's runs are found from its keys (a handful of rows), never by walking the
    // history newest first and testing each run against them.
    let (from, event) = if filter.event_id.is_some() {
        (
            "from run_keys k join runs r on r.id = k.run_id and r.created_at = k.created_at \
             join workflows w on w.id = r.workflow_id where k.event_id = $4",
            "",
        )
    } else {
        (
            "from runs r join workflows w on w.id = r.workflow_id where true",
            "and $4::text is null",
        )
    };
    let rows = client
        .query(
            &format!(
                "{SELECT_RUN_COLUMNS} {from} {event} and ($1::text is null or r.user_id = $1) \
                 and ($2::uuid is null or r.workflow_id = $2) \
                 and ($3::text is null or r.status = $3) \
                 and ($5::timestamptz is null or r.created_at >= $5) \
                 and ($6::timestamptz is null or r.created_at < $6) \
                 and ($8::timestamptz is null or (r.created_at, r.id) < ($8, $9::uuid)) \
                 order by r.created_at desc, r.id desc limit $7"
            ),
            &[
                &filter.user_id,
                &filter.workflow_id,
                &status,
                &filter.event_id,
                &filter.since,
                &filter.until,
                &filter.limit,
                &filter.before.map(|(at, _)| at),
                &filter.before.map(|(_, id)| id),
            ],
        )
        .await?;
    rows.iter().map(run_from_row).collect()
}

pub async fn get(pool: &Pool, id: Uuid) -> Result<Run, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "{SELECT_RUN_COLUMNS} from runs r join workflows w on w.id = r.workflow_id \
                 where r.id = $1"
            ),
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no run {id}")))?;
    run_from_row(&row)
}
