//! Worker liveness: a claim lasts as long as the worker that made it is alive, not a fixed
//! time. Each worker process has a row in `workers` whose `alive_until` it pushes a lease
//! ahead every third of a lease, in one statement whatever the number of runs it holds; a
//! run whose worker stopped renewing (killed, frozen, cut off from Postgres) can be taken
//! over as soon as that time has passed.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::db::StoreError;

const BEAT: &str = "insert into workers as w (id, alive_until) \
     values ($1, now() + make_interval(secs => $2)) \
     on conflict (id) do update set alive_until = excluded.alive_until";

/// On a clean exit, after the worker handed its unfinished runs back: they are free at once.
const RETIRE: &str = "update workers set alive_until = now() where id = $1";

/// Rows of workers long dead. Their runs, if any are still running, fall back to their own
/// lapsed `claimed_until` and stay free to take over.
const FORGET_DEAD: &str = "delete from workers where alive_until < now() - interval '1 day'";

pub struct Liveness {
    pub worker_id: Uuid,
    pub lease: Duration,
    /// A pool of its own, so a renewal never waits behind the runs' queries.
    pool: Pool,
}

impl Liveness {
    pub fn new(pool: Pool, lease: Duration) -> Liveness {
        Liveness {
            worker_id: Uuid::new_v4(),
            lease,
            pool,
        }
    }

    /// How often the liveness is renewed: three chances per lease.
    pub fn interval(&self) -> Duration {
        self.lease / 3
    }

    /// Renews every claim of this worker for one lease.
    pub async fn beat(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(BEAT).await?;
        client
            .execute(&statement, &[&self.worker_id, &self.lease.as_secs_f64()])
            .await?;
        Ok(())
    }

    /// Renews until `stop`. A renewal that fails is tried again at the next interval; if none
    /// succeeds for a whole lease, other workers may take this one's runs over.
    pub async fn keep_alive(&self, stop: CancellationToken) {
        if let Ok(client) = self.pool.get().await
            && let Err(err) = client.execute(FORGET_DEAD, &[]).await
        {
            tracing::debug!(error = %err, "could not remove the rows of long-dead workers");
        }
        let mut failing = false;
        loop {
            match self.beat().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("worker liveness renewed again");
                }
                Ok(()) => {}
                Err(err) => {
                    failing = true;
                    tracing::warn!(error = %err, lease = ?self.lease, "could not renew the worker's liveness; its runs can be taken over once the lease runs out");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval()) => {}
            }
        }
    }

    /// Ends this worker's claims at once (on a clean exit, once nothing is in flight).
    pub async fn retire(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.execute(RETIRE, &[&self.worker_id]).await?;
        Ok(())
    }
}
