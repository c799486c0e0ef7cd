//! Run history over time: the daily partitions of `runs` (created ahead, dropped behind)
//! and the deduplication keys in `run_keys` that make a run unique within the retention
//! window across partitions. docs/history.md explains the design.
//!
//! Pruning takes a session advisory lock, so any number of workers (and a cron job) may try
//! at once: one prunes, the others skip. Expired keys go first, in small batches (row locks
//! only); then each expired partition is detached `CONCURRENTLY` (no lock that stops a claim
//! or a record) and dropped once it is no longer part of `runs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseSettings, HistorySettings};
use crate::observe::metrics::{Metrics, label};
use crate::store::db::{self, DbError};

/// Days of partitions kept ready ahead of today, so a worker never writes a run with no
/// partition to hold it, even after a week without pruning.
pub const DAYS_AHEAD: i32 = 7;

/// Any key works as long as every appevents process uses the same one.
const PRUNE_LOCK: i64 = 0x6170_7065_7670_726e; // "appevprn"

/// Expired keys deleted per statement: each statement's locks and WAL stay small.
const KEY_BATCH: i64 = 10_000;

/// The common table expressions every statement that writes a run starts with: the key of
/// each run in `$source` (an alias with `user_id`, `event_id`, `workflow_id` and a new
/// `$id`), inserted when the run is new, and the run's id and partition from `keys`
/// whether it is new or not. A key inserted by another transaction after this statement's
/// snapshot is in neither: its run is left alone (the caller sees it as held).
macro_rules! run_keys {
    ($source:literal, $id:literal) => {
        concat!(
            "new_keys as (insert into run_keys (workflow_id, run_id, created_at, event_id, user_id) \
             select ", $source, ".workflow_id, ", $source, ".", $id, ", now(), ", $source,
            ".event_id, ", $source, ".user_id from ", $source, " on conflict do nothing \
             returning workflow_id, run_id, created_at, event_id, user_id), \
             keys as (select * from new_keys union all \
             select k.workflow_id, k.run_id, k.created_at, k.event_id, k.user_id \
             from run_keys k join ", $source, " on k.event_id = ", $source, ".event_id \
             and k.user_id = ", $source, ".user_id and k.workflow_id = ", $source, ".workflow_id)"
        )
    };
}
pub(crate) use run_keys;

/// What one pruning pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Deduplication keys deleted: their event ids are new events from now on.
    pub keys: u64,
    /// Partitions of runs dropped, oldest first.
    pub partitions: Vec<String>,
    /// Partitions created ahead.
    pub created: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneOutcome {
    Pruned(Pruned),
    /// Another process holds the pruning lock: it is doing this pass.
    Busy,
}

/// Creates the missing daily partitions from `from` up to [`DAYS_AHEAD`] days after today.
pub async fn create_partitions(
    client: &Client,
    from: time::OffsetDateTime,
) -> Result<i32, DbError> {
    let row = client
        .query_one(
            "select appevents_create_run_partitions($1, $2)",
            &[&from, &DAYS_AHEAD],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// One pass: the coming days' partitions created, history older than `retention` dropped.
pub async fn prune(
    settings: &DatabaseSettings,
    retention: Duration,
) -> Result<PruneOutcome, DbError> {
    let client = db::connect(settings).await?;
    let locked: bool = client
        .query_one("select pg_try_advisory_lock($1)", &[&PRUNE_LOCK])
        .await?
        .try_get(0)?;
    if !locked {
        return Ok(PruneOutcome::Busy);
    }
    let pruned = prune_locked(&client, retention).await;
    // Closing the connection would release the lock too; unlocking says so at once.
    client
        .execute("select pg_advisory_unlock($1)", &[&PRUNE_LOCK])
        .await?;
    Ok(PruneOutcome::Pruned(pruned?))
}

async fn prune_locked(client: &Client, retention: Duration) -> Result<Pruned, DbError> {
    let now: time::OffsetDateTime = client.query_one("select now()", &[]).await?.try_get(0)?;
    let created = create_partitions(client, now).await?;
    let cutoff = now - retention;
    let keys = delete_before(client, "run_keys", "created_at", cutoff).await?;
    let mut partitions = Vec::new();
    for row in client
        .query(
            "select c.relname::text, i.inhdetachpending, b.upper_bound from pg_inherits i \
             join pg_class c on c.oid = i.inhrelid, appevents_run_partition_bounds(i.inhrelid) b \
             where i.inhparent = 'runs'::regclass and b.upper_bound <= $1 \
             order by b.upper_bound",
            &[&cutoff],
        )
        .await?
    {
        let name: String = row.try_get(0)?;
        let pending: bool = row.try_get(1)?;
        let upper: time::OffsetDateTime = row.try_get(2)?;
        // The steps of the partition's runs go with them (rows of their own).
        delete_before(client, "run_steps", "run_created_at", upper).await?;
        let quoted = quote(&name);
        // A detach interrupted earlier (a crash, a cancel) is finished rather than restarted.
        let how = if pending { "finalize" } else { "concurrently" };
        client
            .batch_execute(&format!("alter table runs detach partition {quoted} {how}"))
            .await?;
        client
            .batch_execute(&format!("drop table {quoted}"))
            .await?;
        partitions.push(name);
    }
    partitions.extend(drop_leftovers(client).await?);
    Ok(Pruned {
        keys,
        partitions,
        created,
    })
}

/// Deletes the rows of `table` whose `column` is before `cutoff`, in batches of
/// [`KEY_BATCH`] (row locks only, small WAL per statement). Returns how many.
async fn delete_before(
    client: &Client,
    table: &str,
    column: &str,
    cutoff: time::OffsetDateTime,
) -> Result<u64, DbError> {
    let statement = format!(
        "delete from {table} where ctid = any(array(\
         select ctid from {table} where {column} < $1 limit $2))"
    );
    let mut total = 0;
    loop {
        let deleted = client.execute(&statement, &[&cutoff, &KEY_BATCH]).await?;
        total += deleted;
        if deleted < KEY_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// A partition detached by a pass that stopped before dropping it.
async fn drop_leftovers(client: &Client) -> Result<Vec<String>, DbError> {
    let mut dropped = Vec::new();
    for row in client
        .query(
            "select c.relname::text from pg_class c \
             where c.relnamespace = current_schema()::regnamespace and c.relkind = 'r' \
             and not c.relispartition and c.relname ~ '^runs_([0-9]{8}|legacy)$'",
            &[],
        )
        .await?
    {
        let name: String = row.try_get(0)?;
        client
            .batch_execute(&format!("drop table {}", quote(&name)))
            .await?;
        dropped.push(name);
    }
    Ok(dropped)
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Prunes every `history.prune_interval` until `stop`, the first time at once. A failed
/// pass is logged and counted; the next one tries again.
pub async fn maintain(
    database: DatabaseSettings,
    history: HistorySettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let started = Instant::now();
        let outcome = prune(&database, history.retention).await;
        report(&metrics, &outcome, started.elapsed());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(history.prune_interval) => {}
        }
    }
}

fn report(metrics: &Metrics, outcome: &Result<PruneOutcome, DbError>, took: Duration) {
    let result = match outcome {
        Ok(PruneOutcome::Pruned(pruned)) => {
            metrics.history_pruned_keys.inc_by(pruned.keys);
            metrics
                .history_pruned_partitions
                .inc_by(pruned.partitions.len() as u64);
            tracing::info!(
                keys = pruned.keys,
                partitions = ?pruned.partitions,
                created = pruned.created,
                took_ms = took.as_millis() as u64,
                "run history pruned"
            );
            "pruned"
        }
        Ok(PruneOutcome::Busy) => {
            tracing::debug!("run history pruned by another process");
            "busy"
        }
        Err(err) => {
            tracing::warn!(error = %err, "pruning run history failed; trying again later");
            "failed"
        }
    };
    metrics
        .history_prunes
        .get_or_create(&label("result", result))
        .inc();
}
