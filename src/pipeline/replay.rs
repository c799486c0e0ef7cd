//! Retrying one dead run: its dead letter goes back to the work queue, for that workflow
//! only and with a fresh attempt budget, as `dlq replay` moves it. What `runs retry` and the
//! console's retry button both do.

use uuid::Uuid;

use crate::pipeline::runs::{self, Run, RunStatus};
use crate::store::db::StoreError;
use crate::transport::dead_letter::{self, Action};
use crate::transport::publisher::PublishError;
use crate::transport::topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {id} is {status}, not dead: nothing to retry")]
    NotDead { id: Uuid, status: &'static str },
    #[error(
        "run {id} has no dead letter to replay (purged?); publish event {event_id} again to run it"
    )]
    NoLetter { id: Uuid, event_id: String },
    #[error("the dead letter could not be moved: {0}")]
    Broker(#[from] PublishError),
}

/// Replays the dead letter of the dead run `id`; returns the run as it was.
pub async fn retry_dead_run(
    pool: &deadpool_postgres::Pool,
    connection: &lapin::Connection,
    topology: &Topology,
    id: Uuid,
) -> Result<Run, RetryError> {
    let found = runs::get(pool, id).await?;
    if found.status != RunStatus::Dead {
        return Err(RetryError::NotDead {
            id,
            status: found.status.as_str(),
        });
    }
    let report = dead_letter::walk(
        connection,
        topology,
        &letter_of(&found),
        Action::Replay,
        |_| {},
    )
    .await?;
    if report.moved == 0 {
        return Err(RetryError::NoLetter {
            id,
            event_id: found.event_id,
        });
    }
    Ok(found)
}

/// The filter that finds a run's dead letter: its event, user and workflow.
pub fn letter_of(run: &Run) -> dead_letter::Filter {
    dead_letter::Filter {
        event_id: Some(run.event_id.clone()),
        user_id: Some(run.user_id.clone()),
        workflow_id: Some(run.workflow_id),
        ..dead_letter::Filter::default()
    }
}
