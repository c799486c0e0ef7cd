//! What the units of work share: the process-wide [`Context`] (pools, caches, clients,
//! policy, metrics), and a [`Session`], the context bound to one broker session's
//! publishing channel.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::Settings;
use crate::core::event::Limits;
use crate::integrations::Integrations;
use crate::observe::health::Health;
use crate::observe::metrics::Metrics;
use crate::pipeline::batch::Batcher;
use crate::pipeline::liveness::Liveness;
use crate::pipeline::provider_batch::Batches;
use crate::pipeline::refresh::Refresher;
use crate::pipeline::resolve::Resolver;
use crate::pipeline::retry::RetryPolicy;
use crate::pipeline::runs::{self, ClaimRequest, Claimed, RunRecord};
use crate::pipeline::throttle::Throttle;
use crate::store::db::{self, StoreError};
use crate::store::vault::Keyring;
use crate::transport::publisher::Publisher;
use crate::transport::topology::Topology;

/// Most runs claimed or recorded in one statement.
const BATCH: usize = 512;
/// Statements of each kind under way at once. One: while it runs, the next batch gathers
/// everything that arrives, so batches grow with load and each costs one round trip (and,
/// for records, one disk flush). More made batches smaller and commits more numerous
/// (measured: 1,913 events/s with four, 2,996 with one).
const BATCHES_IN_FLIGHT: usize = 1;

/// What every session of a worker process shares.
pub struct Context {
    pub pool: Pool,
    pub keyring: Arc<Keyring>,
    pub resolver: Arc<Resolver>,
    pub integrations: Integrations,
    pub refresher: Refresher,
    pub policy: RetryPolicy,
    /// Per-account rate limits and the per-connection in-flight cap.
    pub(crate) throttle: Throttle,
    /// Runs gathered into the providers' batch calls.
    pub(crate) batches: Arc<Batches>,
    pub topology: Topology,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub limits: Limits,
    /// How long a claim outlives its worker's last renewal.
    pub claim_lease: Duration,
    /// Longest a run may take before it is given up as timed out.
    pub run_timeout: Duration,
    /// Fault injection for tests: exit right after a provider's answer.
    pub crash_after_provider_answer: bool,
    /// Fault injection (tests only): exit after recording the step of this name.
    pub crash_after_step: Option<String>,
    pub max_deliveries: u32,
    /// This worker's liveness, which keeps its claims.
    pub liveness: Arc<Liveness>,
    /// Claims of many events in one statement.
    pub claims: Batcher<ClaimRequest, Claimed, StoreError>,
    /// Outcomes of many runs in one statement; `false` when the claim was lost.
    pub records: Batcher<RunRecord, bool, StoreError>,
}

impl Context {
    pub fn new(
        settings: &Settings,
        pool: Pool,
        keyring: Arc<Keyring>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Context> {
        let lease = settings.worker.claim_lease;
        let liveness = Arc::new(Liveness::new(db::own_pool(&settings.database, 1)?, lease));
        let worker_id = liveness.worker_id;
        let claim_pool = db::claims_pool(&settings.database)?;
        let claims = Batcher::spawn(
            BATCH,
            BATCHES_IN_FLIGHT,
            move |requests: Vec<ClaimRequest>| {
                let pool = claim_pool.clone();
                async move {
                    let client = pool.get().await.map_err(StoreError::from)?;
                    runs::claim(&client, &requests, worker_id, lease).await
                }
            },
        );
        let record_pool = db::records_pool(&settings.database)?;
        let records = Batcher::spawn(BATCH, BATCHES_IN_FLIGHT, move |records: Vec<RunRecord>| {
            let pool = record_pool.clone();
            async move {
                let client = pool.get().await.map_err(StoreError::from)?;
                let lost = runs::record(&client, &records).await?;
                Ok::<_, StoreError>(records.iter().map(|r| !lost.contains(&r.run_id)).collect())
            }
        });
        let throttle = Throttle::new(pool.clone(), &settings.rate_limits, metrics.clone())
            .map_err(anyhow::Error::msg)?;
        Ok(Context {
            throttle,
            batches: Arc::new(Batches::new(&settings.batching)),
            claims,
            records,
            resolver: Arc::new(Resolver::new(pool.clone(), keyring.clone())),
            integrations: Integrations::new(&settings.http, &settings.salesforce)?,
            refresher: Refresher::default(),
            topology: Topology::new(&settings.amqp, &settings.retry.schedule),
            policy: RetryPolicy::from(&settings.retry),
            health: Arc::new(Health::new(pool.clone())),
            pool,
            keyring,
            metrics,
            limits: Limits {
                max_bytes: settings.worker.max_message_bytes,
                max_depth: settings.worker.max_json_depth,
            },
            claim_lease: settings.worker.claim_lease,
            run_timeout: settings.worker.run_timeout,
            crash_after_provider_answer: settings.worker.crash_after_provider_answer,
            crash_after_step: Some(settings.worker.crash_after_step.clone())
                .filter(|name| !name.is_empty()),
            liveness,
            max_deliveries: settings.worker.max_deliveries,
        })
    }
}

/// The context bound to one broker session's publishing channel: what settles messages.
pub struct Session {
    pub context: Arc<Context>,
    pub publisher: Publisher,
}
