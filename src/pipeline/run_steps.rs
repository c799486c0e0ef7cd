//! The steps of a run of a workflow of several steps, recorded in `run_steps` as each one
//! ends: a retry, a takeover after a crash or a dead-letter replay reads them back and
//! resumes at the step that failed, with the outputs of those before it.
//!
//! A step recorded as succeeded is never written again (the upsert skips it), so no later
//! attempt can turn it back. A one-step workflow writes nothing here: its run row is its
//! record, and [`list`] shows that row as its only step.

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::core::failure::Failure;
use crate::pipeline::runs::{self, Run};
use crate::store::db::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    /// Its condition did not hold.
    Skipped,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
        }
    }

    fn parse(text: &str) -> Result<StepStatus, String> {
        match text {
            "succeeded" => Ok(StepStatus::Succeeded),
            "failed" => Ok(StepStatus::Failed),
            "skipped" => Ok(StepStatus::Skipped),
            other => Err(format!("unknown step status {other:?}")),
        }
    }
}

/// One step's (or one `for_each` element's) outcome.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: String,
    /// The `for_each` element, or `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub status: StepStatus,
    /// Provider calls made for it, over every attempt of the run.
    pub attempts: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Method and URL of what was sent (never a header: they carry the credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

fn item_column(item: Option<u32>) -> i32 {
    item.and_then(|i| i32::try_from(i).ok()).unwrap_or(-1)
}

/// Records one step's outcome. A step already recorded as succeeded stays as it is.
pub async fn record(
    client: &impl GenericClient,
    run_id: Uuid,
    run_created_at: OffsetDateTime,
    record: &StepRecord,
) -> Result<(), StoreError> {
    let statement = client
        .prepare_cached(
            "insert into run_steps as s (run_id, run_created_at, step, item, status, attempts, \
             started_at, finished_at, request, output, error) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             on conflict (run_id, step, item) do update set status = excluded.status, \
             attempts = s.attempts + excluded.attempts, started_at = excluded.started_at, \
             finished_at = excluded.finished_at, request = excluded.request, \
             output = excluded.output, error = excluded.error \
             where s.status <> 'succeeded'",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &run_id,
                &run_created_at,
                &record.step,
                &item_column(record.item),
                &record.status.as_str(),
                &record.attempts,
                &record.started_at,
                &record.finished_at,
                &record.request,
                &record.output,
                &record.error,
            ],
        )
        .await?;
    Ok(())
}

/// The recorded steps of a run, in the order they were first run.
pub async fn load(
    client: &impl GenericClient,
    run_id: Uuid,
) -> Result<Vec<StepRecord>, StoreError> {
    let statement = client
        .prepare_cached(
            "select step, item, status, attempts, started_at, finished_at, request, output, error \
             from run_steps where run_id = $1 order by started_at, item",
        )
        .await?;
    let rows = client.query(&statement, &[&run_id]).await?;
    rows.iter()
        .map(|row| {
            let status: String = row.try_get(2)?;
            let item: i32 = row.try_get(1)?;
            Ok(StepRecord {
                step: row.try_get(0)?,
                item: u32::try_from(item).ok(),
                status: StepStatus::parse(&status).map_err(StoreError::Invalid)?,
                attempts: row.try_get(3)?,
                started_at: row.try_get(4)?,
                finished_at: row.try_get(5)?,
                request: row.try_get(6)?,
                output: row.try_get(7)?,
                error: row.try_get(8)?,
            })
        })
        .collect()
}

/// A run with its steps, as `runs show` and the API show it.
#[derive(Debug, Clone, Serialize)]
pub struct RunWithSteps {
    #[serde(flatten)]
    pub run: Run,
    /// Each step's outcome; empty for a one-step workflow, whose run is its only step.
    pub steps: Vec<StepRecord>,
}

pub async fn show(pool: &Pool, run_id: Uuid) -> Result<RunWithSteps, StoreError> {
    let run = runs::get(pool, run_id).await?;
    let client = pool.get().await?;
    let steps = load(&client, run_id).await?;
    Ok(RunWithSteps { run, steps })
}

/// A failure as a step's recorded error.
pub fn error_json(failure: &Failure) -> Option<Value> {
    serde_json::to_value(failure).ok()
}
