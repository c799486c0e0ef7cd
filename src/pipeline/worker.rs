//! The worker: consumes events, runs their workflows, acknowledges only what is durably
//! settled.
//!
//! [`Worker::try_execute`] is one unit of work, returning an [`Outcome`]; [`run`] wraps it in
//! the consume loop. For one message, in order:
//! 1. parse it and its routing headers against the publishing contract (invalid →
//!    dead-letter queue);
//! 2. resolve the user's subscriptions for the event's name or alias (none → acknowledged,
//!    counted);
//!    then check the payload against the app event's example when its payload check is on
//!    (`reject` → the event is dead-lettered once, nothing runs);
//! 3. claim each run in Postgres (already succeeded → skipped; held by another worker →
//!    looked at again later);
//! 4. run the claimed steps concurrently, with quick in-process retries;
//! 5. publish what failed to a retry queue or the dead-letter queue, confirmed;
//! 6. record every run's outcome;
//! 7. acknowledge.
//!
//! Steps 2, 3, 5 and 6 need the database or the broker; when either is down the step is
//! retried with backoff while the message stays unacknowledged, until it succeeds or the
//! process shuts down (the message then goes back to the queue).

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use futures::{FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::catalog::workflows::CompiledWorkflow;
use crate::config::{DatabaseSettings, Settings};
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::event::{self, Event, Invalid, Limits, MessageMeta};
use crate::core::failure::{Failure, FailureKind};
use crate::core::payload_check::{self, Mode};
use crate::integrations::{Integrations, StepOutput};
use crate::interfaces::ops::{self, OpsState};
use crate::observe::health::Health;
use crate::observe::metrics::{Metrics, label, labels2};
use crate::pipeline::batch::Batcher;
use crate::pipeline::refresh::Refresher;
use crate::pipeline::resolve::{MatchedEvent, Resolution, Resolver, Target};
use crate::pipeline::retry::{GiveUp, Next, RetryPolicy};
use crate::pipeline::runs::{self, ClaimRequest, Claimed, RunClaim, RunRecord, RunStatus};
use crate::store::db;
use crate::store::vault::Keyring;
use crate::transport::broker::{self, Recovery};
use crate::transport::dead_letter::{self, DeadLetter, Reason};
use crate::transport::headers;
use crate::transport::publisher::Publisher;
use crate::transport::routing;
use crate::transport::topology::Topology;

/// What became of one message. Whatever the variant, the message is settled and acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Not a valid event: dead-lettered with the reason.
    Invalid(Invalid),
    /// Delivered too many times without being finished: dead-lettered.
    Poison {
        deliveries: i64,
    },
    /// Nothing to run for it.
    Unmatched(Unmatched),
    /// Its payload does not match the app event's example, whose payload check is `reject`:
    /// dead-lettered with this reason, nothing run.
    PayloadMismatch(String),
    Processed(Tally),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    UnknownEvent,
    NoSubscription,
    /// A retry or replay whose workflows the user no longer has on.
    WorkflowsGone,
}

impl Unmatched {
    fn as_str(self) -> &'static str {
        match self {
            Unmatched::UnknownEvent => "unknown_event",
            Unmatched::NoSubscription => "no_subscription",
            Unmatched::WorkflowsGone => "workflows_gone",
        }
    }
}

/// Runs of one message by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub succeeded: u32,
    pub retrying: u32,
    pub dead: u32,
    /// Already succeeded or dead-lettered before: not run again.
    pub skipped: u32,
    /// Held by another worker: looked at again after a delay.
    pub deferred: u32,
}

/// The message could not be settled before shutdown; it is not acknowledged and goes back
/// to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Most runs claimed or recorded in one statement.
const BATCH: usize = 512;
/// Statements of each kind under way at once. One: while it runs, the next batch gathers
/// everything that arrives, so batches grow with load and each costs one round trip (and,
/// for records, one disk flush). More made batches smaller and commits more numerous
/// (measured: 1,913 events/s with four, 2,996 with one).
const BATCHES_IN_FLIGHT: usize = 1;

/// What every session of a worker process shares.
pub struct Core {
    pub pool: Pool,
    pub keyring: Arc<Keyring>,
    pub resolver: Arc<Resolver>,
    pub integrations: Integrations,
    pub refresher: Refresher,
    pub policy: RetryPolicy,
    pub topology: Topology,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub limits: Limits,
    pub claim_lease: Duration,
    pub max_deliveries: u32,
    /// Claims of many events in one statement.
    pub claims: Batcher<ClaimRequest, Claimed>,
    /// Outcomes of many runs in one statement; `false` when the claim was lost.
    pub records: Batcher<RunRecord, bool>,
}

impl Core {
    pub fn new(
        settings: &Settings,
        pool: Pool,
        keyring: Arc<Keyring>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Core> {
        let policy = RetryPolicy::from(&settings.retry);
        let lease = settings.worker.claim_lease;
        let claim_pool = db::claims_pool(&settings.database)?;
        let claims = Batcher::spawn(
            BATCH,
            BATCHES_IN_FLIGHT,
            move |requests: Vec<ClaimRequest>| {
                let pool = claim_pool.clone();
                async move {
                    let client = pool.get().await.map_err(db::StoreError::from)?;
                    runs::claim(&client, &requests, lease).await
                }
            },
        );
        let record_pool = pool.clone();
        let records = Batcher::spawn(BATCH, BATCHES_IN_FLIGHT, move |records: Vec<RunRecord>| {
            let pool = record_pool.clone();
            async move {
                let client = pool.get().await.map_err(db::StoreError::from)?;
                let lost = runs::record(&client, &records).await?;
                Ok::<_, db::StoreError>(records.iter().map(|r| !lost.contains(&r.run_id)).collect())
            }
        });
        Ok(Core {
            claims,
            records,
            resolver: Arc::new(Resolver::new(pool.clone(), keyring.clone())),
            integrations: Integrations::new(&settings.http, &settings.salesforce)?,
            refresher: Refresher::default(),
            topology: Topology::new(&settings.amqp, &settings.retry.schedule),
            policy,
            health: Arc::new(Health::new(pool.clone())),
            pool,
            keyring,
            metrics,
            limits: Limits {
                max_bytes: settings.worker.max_message_bytes,
                max_depth: settings.worker.max_json_depth,
            },
            claim_lease: settings.worker.claim_lease,
            max_deliveries: settings.worker.max_deliveries,
        })
    }
}

/// A worker bound to one broker session's publishing channel.
pub struct Worker {
    pub core: Arc<Core>,
    pub publisher: Publisher,
}

/// The message a run belongs to.
struct Message<'a> {
    body: &'a [u8],
    properties: &'a BasicProperties,
    event: &'a Event,
    retries_done: u32,
}

impl Tally {
    fn count(&mut self, next: &Settle) {
        match next {
            Settle::Succeeded => self.succeeded += 1,
            Settle::Retry { .. } => self.retrying += 1,
            Settle::Dead { .. } => self.dead += 1,
            Settle::Defer { .. } => self.deferred += 1,
            Settle::Skip => self.skipped += 1,
        }
    }
}

/// The decision for one run of a message.
struct Settled<'a> {
    target: &'a Target,
    claim: Option<RunClaim>,
    calls: u32,
    output: Option<StepOutput>,
    failure: Option<Failure>,
    next: Settle,
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Succeeded,
    Retry {
        delay: Duration,
    },
    Dead {
        why: &'static str,
    },
    /// Held elsewhere: look again after `delay`, without using an attempt.
    Defer {
        delay: Duration,
    },
    Skip,
}

impl Worker {
    /// Processes one message to the point where it may be acknowledged.
    pub async fn try_execute(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        abort: &CancellationToken,
    ) -> Result<Outcome, Abandoned> {
        let core = &self.core;
        let meta = MessageMeta {
            content_type: properties.content_type().as_ref().map(|s| s.as_str()),
            message_id: properties.message_id().as_ref().map(|s| s.as_str()),
        };
        let event = match event::parse(body, &meta, core.limits) {
            Ok(event) => event,
            Err(invalid) => {
                return self
                    .dead_letter_invalid(body, properties, invalid, None, abort)
                    .await;
            }
        };

        let span = tracing::Span::current();
        span.record("event_id", event.id.as_str());
        span.record("user_id", event.user_id.as_str());
        span.record("event_name", event.name.as_str());
        let routing = match routing::routing(properties.headers().as_ref()) {
            Ok(routing) => routing,
            // The body is a valid event: the dead letter names it, so operators can find it.
            Err(invalid) => {
                return self
                    .dead_letter_invalid(body, properties, invalid, Some(&event), abort)
                    .await;
            }
        };
        let deliveries = routing.deliveries;
        if deliveries >= i64::from(core.max_deliveries) {
            tracing::error!(
                deliveries,
                "message keeps failing to finish; dead-lettered as poison"
            );
            let reason = Reason {
                code: dead_letter::POISON,
                text: format!(
                    "poison: delivered {deliveries} times without being finished (the worker crashed, timed out or lost its connection each time)"
                ),
            };
            self.dead_letter_event(
                body,
                properties,
                Some(&event),
                reason,
                dead_letter::POISON,
                abort,
            )
            .await?;
            return Ok(Outcome::Poison { deliveries });
        }

        let resolution = self
            .persist(abort, "resolve subscriptions", || {
                core.resolver.resolve(&event.user_id, &event.name)
            })
            .await?;
        let only = routing.workflows.as_deref();
        let targets: Vec<&Target> = resolution
            .targets()
            .iter()
            .filter(|t| only.is_none_or(|ids| ids.contains(&t.workflow_id)))
            .collect();
        if targets.is_empty() {
            let unmatched = match (&resolution, only) {
                (Resolution::UnknownEvent, _) => Unmatched::UnknownEvent,
                (_, Some(_)) => Unmatched::WorkflowsGone,
                _ => Unmatched::NoSubscription,
            };
            tracing::debug!(reason = unmatched.as_str(), "event matched no workflow");
            core.metrics
                .unmatched
                .get_or_create(&label("reason", unmatched.as_str()))
                .inc();
            return Ok(Outcome::Unmatched(unmatched));
        }
        if let Some(app_event) = resolution.app_event() {
            if app_event.name != event.name {
                tracing::debug!(app_event = %app_event.name, "event published under an alias of its app event");
            }
            // A message for named workflows (a retry, a replayed run) was let through when
            // the event first arrived; it is not judged, or counted, again.
            if only.is_none()
                && let Some(rejected) = self
                    .check_payload(body, properties, &event, app_event, abort)
                    .await?
            {
                return Ok(rejected);
            }
        }

        let requests: Vec<ClaimRequest> = targets
            .iter()
            .map(|t| ClaimRequest {
                user_id: event.user_id.clone(),
                event_id: event.id.clone(),
                event_name: event.name.clone(),
                workflow_id: t.workflow_id,
                connection_id: t.connection.as_ref().ok().map(|c| c.id),
                revive_dead: routing.replay,
            })
            .collect();
        let claims = self
            .persist(abort, "claim runs", || {
                futures::future::try_join_all(requests.iter().cloned().map(|r| core.claims.call(r)))
            })
            .await?;

        let message = Message {
            body,
            properties,
            event: &event,
            retries_done: routing.attempt,
        };
        // Each run is settled on its own (executed, republished if it must wait, recorded),
        // so a fast run is recorded without waiting for a slow sibling: a crash then leaves
        // as little as possible unrecorded.
        let work = targets
            .iter()
            .zip(claims)
            .map(|(target, claimed)| self.run_one(&message, target, claimed, abort));
        let mut tally = Tally::default();
        let mut abandoned = false;
        for result in futures::future::join_all(work).await {
            match result {
                Ok(next) => tally.count(&next),
                Err(Abandoned) => abandoned = true,
            }
        }
        if abandoned {
            return Err(Abandoned);
        }
        Ok(Outcome::Processed(tally))
    }

    /// Applies the app event's payload check. Returns the outcome when the event is rejected
    /// (dead-lettered once for the whole event, no workflow named); `None` to go on.
    async fn check_payload(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        event: &Event,
        app_event: &MatchedEvent,
        abort: &CancellationToken,
    ) -> Result<Option<Outcome>, Abandoned> {
        let differences = app_event.payload_check.differences(&event.payload);
        if differences.is_empty() {
            return Ok(None);
        }
        let reason = payload_check::reason(&app_event.name, &differences);
        let core = &self.core;
        core.metrics
            .payload_mismatches
            .get_or_create(&label("event", app_event.name.as_str()))
            .inc();
        if app_event.payload_check.mode != Mode::Reject {
            tracing::warn!(%reason, "payload does not match its app event's example; processed anyway");
            return Ok(None);
        }
        tracing::warn!(%reason, "payload does not match its app event's example; dead-lettered");
        let letter = Reason {
            code: dead_letter::PAYLOAD_MISMATCH,
            text: reason.clone(),
        };
        self.dead_letter_event(
            body,
            properties,
            Some(event),
            letter,
            dead_letter::PAYLOAD_MISMATCH,
            abort,
        )
        .await?;
        Ok(Some(Outcome::PayloadMismatch(reason)))
    }

    /// Sends a message that is not a valid event to the dead-letter queue with the reason.
    /// `event` is the parsed body when only the headers were at fault.
    async fn dead_letter_invalid(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        invalid: Invalid,
        event: Option<&Event>,
        abort: &CancellationToken,
    ) -> Result<Outcome, Abandoned> {
        tracing::warn!(reason = %invalid, "invalid message dead-lettered");
        let reason = Reason {
            code: dead_letter::INVALID,
            text: format!("invalid event: {invalid}"),
        };
        let metric = format!("invalid:{}", invalid.code());
        self.dead_letter_event(body, properties, event, reason, &metric, abort)
            .await?;
        Ok(Outcome::Invalid(invalid))
    }

    /// Dead-letters a whole message, for no one workflow (invalid, poison, rejected by its
    /// payload check), and counts it under `metric`.
    async fn dead_letter_event(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        event: Option<&Event>,
        reason: Reason,
        metric: &str,
        abort: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let letter = DeadLetter {
            reason,
            event,
            workflow_id: None,
            attempts: None,
            failure: None,
        };
        self.dead_letter(body, properties, &letter, abort).await?;
        self.core
            .metrics
            .dead_letters
            .get_or_create(&label("reason", metric))
            .inc();
        Ok(())
    }

    /// Executes one run per its claim, republishes it if it must wait or is dead, records it.
    async fn run_one(
        &self,
        message: &Message<'_>,
        target: &Target,
        claimed: Claimed,
        abort: &CancellationToken,
    ) -> Result<Settle, Abandoned> {
        let settled = self
            .settle(target, claimed, message.event, message.retries_done)
            .await;
        match settled.next {
            Settle::Retry { delay } => {
                self.publish_retry(message, target, delay, message.retries_done + 1, abort)
                    .await?
            }
            Settle::Defer { delay } => {
                self.publish_retry(message, target, delay, message.retries_done, abort)
                    .await?
            }
            Settle::Dead { why } => {
                self.publish_dead_letter(message, &settled, why, abort)
                    .await?
            }
            Settle::Succeeded | Settle::Skip => {}
        }
        self.record(message, &settled, abort).await?;
        Ok(settled.next)
    }

    /// Runs one claimed workflow (or not, per its claim) and decides what follows.
    async fn settle<'a>(
        &self,
        target: &'a Target,
        claimed: Claimed,
        event: &Event,
        retries_done: u32,
    ) -> Settled<'a> {
        let core = &self.core;
        let settled = |claim, calls, next| Settled {
            target,
            claim,
            calls,
            output: None,
            failure: None,
            next,
        };
        let claim = match claimed {
            Claimed::Run(claim) => claim,
            Claimed::AlreadySucceeded | Claimed::Dead => return settled(None, 0, Settle::Skip),
            Claimed::Held { until } => {
                let wait = (until - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                let wanted = Duration::try_from(wait).unwrap_or_default();
                let delay = core
                    .policy
                    .queue_delays()
                    .into_iter()
                    .find(|d| *d >= wanted)
                    .or_else(|| core.policy.queue_delays().last().copied())
                    .unwrap_or(Duration::from_secs(10));
                return settled(None, 0, Settle::Defer { delay });
            }
        };
        let span =
            tracing::info_span!("run", workflow_id = %target.workflow_id, run_id = %claim.run_id);
        if claim.abandoned >= i32::try_from(core.max_deliveries).unwrap_or(i32::MAX) {
            let failure = Failure::new(
                FailureKind::Permanent,
                format!(
                    "the run was abandoned {} times by workers that stopped mid-run",
                    claim.abandoned
                ),
            )
            .with_code("POISON");
            span.in_scope(|| tracing::error!(error = %failure, "poison run dead-lettered"));
            return Settled {
                failure: Some(failure),
                ..settled(
                    Some(claim),
                    0,
                    Settle::Dead {
                        why: dead_letter::POISON,
                    },
                )
            };
        }
        let calls = AtomicU32::new(0);
        // A run must end well inside its lease, or another worker could take it over while
        // it is still calling the provider.
        let run_timeout = core.claim_lease * 3 / 4;
        let result = tokio::time::timeout(
            run_timeout,
            self.execute_run(target, event, &calls)
                .instrument(span.clone()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Failure::new(
                FailureKind::Transient,
                format!("run timed out after {run_timeout:?}"),
            )
            .with_code("TIMEOUT"))
        });
        let calls = calls.into_inner();
        let _entered = span.enter();
        match result {
            Ok(output) => {
                tracing::info!(provider_id = ?output.provider_id, status = output.status, "run succeeded");
                Settled {
                    output: Some(output),
                    ..settled(Some(claim), calls, Settle::Succeeded)
                }
            }
            Err(failure) => {
                let next = match core.policy.next(&failure, retries_done) {
                    Next::Retry { delay } => {
                        tracing::warn!(error = %failure, retry_in = ?delay, "run failed; retrying later");
                        Settle::Retry { delay }
                    }
                    Next::DeadLetter { why } => {
                        tracing::error!(error = %failure, why = why.as_str(), "run failed; dead-lettered");
                        Settle::Dead {
                            why: match why {
                                GiveUp::Permanent => dead_letter::PERMANENT,
                                GiveUp::Exhausted => dead_letter::EXHAUSTED,
                            },
                        }
                    }
                };
                Settled {
                    failure: Some(failure),
                    ..settled(Some(claim), calls, next)
                }
            }
        }
    }

    async fn execute_run(
        &self,
        target: &Target,
        event: &Event,
        calls: &AtomicU32,
    ) -> Result<StepOutput, Failure> {
        let core = &self.core;
        let workflow = target.workflow.as_ref().map_err(|e| {
            Failure::new(FailureKind::Permanent, format!("workflow cannot run: {e}"))
        })?;
        let connection = target
            .connection
            .as_ref()
            .map_err(|e| Failure::new(FailureKind::Permanent, e.clone()))?;
        if connection.status == ConnectionStatus::NeedsReauth {
            return Err(connection.needs_reauth());
        }
        let body = workflow.mapping.render(event);
        let current = Mutex::new(connection.clone());
        let (result, _tries) = core
            .policy
            .run_in_process(|| self.attempt(workflow, &current, &body, event, calls))
            .await;
        result
    }

    /// One in-process try: the step, and on expired credentials a refresh and the step again.
    async fn attempt(
        &self,
        workflow: &CompiledWorkflow,
        current: &Mutex<Arc<Connection>>,
        body: &Value,
        event: &Event,
        calls: &AtomicU32,
    ) -> Result<StepOutput, Failure> {
        let connection = lock(current).clone();
        let first = self.call(workflow, &connection, body, event, calls).await;
        let Err(failure) = &first else { return first };
        if failure.kind != FailureKind::ExpiredCredentials {
            return first;
        }
        let core = &self.core;
        let refreshed = core
            .refresher
            .refresh(&core.pool, &core.keyring, &core.integrations, &connection)
            .await;
        let outcome = if refreshed.is_ok() {
            "refreshed"
        } else {
            "failed"
        };
        core.metrics
            .token_refreshes
            .get_or_create(&label("result", outcome))
            .inc();
        let refreshed = Arc::new(refreshed?);
        *lock(current) = refreshed.clone();
        match self.call(workflow, &refreshed, body, event, calls).await {
            Err(failure) if failure.kind == FailureKind::ExpiredCredentials => Err(Failure {
                kind: FailureKind::Permanent,
                message: format!(
                    "credentials rejected right after a refresh: {}",
                    failure.message
                ),
                ..failure
            }),
            other => other,
        }
    }

    async fn call(
        &self,
        workflow: &CompiledWorkflow,
        connection: &Connection,
        body: &Value,
        event: &Event,
        calls: &AtomicU32,
    ) -> Result<StepOutput, Failure> {
        calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self
            .core
            .integrations
            .execute(&workflow.action, connection, body.clone(), event)
            .await;
        self.core
            .metrics
            .step_seconds
            .get_or_create(&label("provider", workflow.provider.as_str()))
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Sends the message to the retry queue of `delay`, for this workflow only.
    async fn publish_retry(
        &self,
        message: &Message<'_>,
        target: &Target,
        delay: Duration,
        attempt: u32,
        abort: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let Some(queue) = self.core.topology.retry_queue(delay) else {
            // Delays always come from the schedule, whose queues were declared.
            tracing::error!(
                ?delay,
                "no retry queue for this delay; the message is redelivered instead"
            );
            return Err(Abandoned);
        };
        let mut headers = dead_letter::carried_headers(message.properties.headers().as_ref());
        headers::set_int(&mut headers, headers::ATTEMPT, i64::from(attempt));
        headers::set_strings(
            &mut headers,
            headers::WORKFLOWS,
            &[target.workflow_id.to_string()],
        );
        let retry_at = OffsetDateTime::now_utc() + delay;
        if let Ok(at) = retry_at.format(&time::format_description::well_known::Rfc3339) {
            headers::set_str(&mut headers, headers::RETRY_AT, &at);
        }
        let props = republished(message.properties, headers, &message.event.id);
        self.persist(abort, "publish retry", || {
            self.publisher
                .publish("", queue, message.body, props.clone())
        })
        .await
    }

    async fn publish_dead_letter(
        &self,
        message: &Message<'_>,
        run: &Settled<'_>,
        why: &'static str,
        abort: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let failure = run.failure.as_ref();
        let attempts = run
            .claim
            .as_ref()
            .map(|c| u32::try_from(c.attempts).unwrap_or(0) + run.calls);
        let letter = DeadLetter {
            reason: Reason {
                code: why,
                text: match failure {
                    Some(f) => format!("{}: {}", describe(why), f.summary()),
                    None => describe(why).to_owned(),
                },
            },
            event: Some(message.event),
            workflow_id: Some(run.target.workflow_id),
            attempts,
            failure,
        };
        self.dead_letter(message.body, message.properties, &letter, abort)
            .await?;
        self.core
            .metrics
            .dead_letters
            .get_or_create(&label("reason", why))
            .inc();
        Ok(())
    }

    async fn dead_letter(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        letter: &DeadLetter<'_>,
        abort: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let props = dead_letter::properties(properties, letter);
        let queue = self.core.topology.dead_letter_queue.as_str();
        self.persist(abort, "publish dead letter", || {
            self.publisher.publish("", queue, body, props.clone())
        })
        .await
    }

    async fn record(
        &self,
        message: &Message<'_>,
        run: &Settled<'_>,
        abort: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let provider = run.target.provider.as_str();
        let (status, outcome, next_attempt_at) = match run.next {
            Settle::Skip => {
                self.core
                    .metrics
                    .runs
                    .get_or_create(&labels2("provider", provider, "outcome", "skipped"))
                    .inc();
                return Ok(());
            }
            Settle::Defer { .. } => return Ok(()),
            Settle::Succeeded => (RunStatus::Succeeded, "succeeded", None),
            Settle::Retry { delay } => {
                if let Some(f) = &run.failure {
                    self.core
                        .metrics
                        .retries
                        .get_or_create(&label("kind", f.kind.as_str()))
                        .inc();
                }
                (
                    RunStatus::Retrying,
                    "retry",
                    Some(OffsetDateTime::now_utc() + delay),
                )
            }
            Settle::Dead { .. } => (RunStatus::Dead, "dead", None),
        };
        let Some(claim) = &run.claim else {
            return Ok(());
        };
        let record = RunRecord {
            run_id: claim.run_id,
            token: claim.token,
            user_id: message.event.user_id.clone(),
            event_id: message.event.id.clone(),
            event_name: message.event.name.clone(),
            workflow_id: run.target.workflow_id,
            connection_id: run.target.connection.as_ref().ok().map(|c| c.id),
            status,
            attempts: run.calls,
            provider_id: run.output.as_ref().and_then(|o| o.provider_id.clone()),
            last_error: run.failure.clone(),
            next_attempt_at,
        };
        let core = &self.core;
        let written = self
            .persist(abort, "record run", || core.records.call(record.clone()))
            .await?;
        if !written {
            tracing::warn!(run_id = %claim.run_id, "run was taken over by another worker before its outcome was recorded");
        }
        self.core
            .metrics
            .runs
            .get_or_create(&labels2("provider", provider, "outcome", outcome))
            .inc();
        Ok(())
    }

    /// Retries an operation on the database or broker with backoff until it succeeds or
    /// `abort` fires. Logs once when a dependency starts failing and once when it recovers.
    async fn persist<T, E, F, Fut>(
        &self,
        abort: &CancellationToken,
        what: &'static str,
        op: F,
    ) -> Result<T, Abandoned>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let health = &self.core.health;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(usize::MAX)
            .with_jitter();
        let attempt = op
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .notify(|err: &E, wait: Duration| {
                if health.database_failed(format!("{what}: {err}")) {
                    tracing::warn!(error = %err, %what, ?wait, "dependency unavailable; holding the message and retrying");
                } else {
                    tracing::debug!(error = %err, %what, ?wait, "still unavailable");
                }
            });
        tokio::select! {
            result = attempt => {
                let value = result.map_err(|_| Abandoned)?;
                if health.database_ok() {
                    tracing::info!(%what, "dependency available again; resuming");
                }
                Ok(value)
            }
            _ = abort.cancelled() => Err(Abandoned),
        }
    }

    /// Processes a delivery and acknowledges it when settled.
    async fn handle(&self, delivery: Delivery, abort: &CancellationToken) {
        let metrics = &self.core.metrics;
        metrics.events_in_flight.inc();
        let span = tracing::info_span!(
            "event",
            event_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            event_name = tracing::field::Empty
        );
        let result = AssertUnwindSafe(
            self.try_execute(&delivery.data, &delivery.properties, abort)
                .instrument(span.clone()),
        )
        .catch_unwind()
        .await;
        metrics.events_in_flight.dec();
        let _entered = span.enter();
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Err(_panic) => {
                // A bug met this message. Hand it back: its delivery count grows with each
                // try, and past worker.max_deliveries it is dead-lettered as poison.
                tracing::error!("processing panicked; the message goes back to the queue");
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
                return;
            }
            Ok(Err(Abandoned)) => {
                tracing::info!(
                    "shutting down before the event was settled; it goes back to the queue"
                );
                return;
            }
        };
        let label_value = match &outcome {
            Outcome::Invalid(_) => "invalid",
            Outcome::Poison { .. } => "poison",
            Outcome::Unmatched(_) => "unmatched",
            Outcome::PayloadMismatch(_) => "payload_mismatch",
            Outcome::Processed(_) => "processed",
        };
        metrics
            .events
            .get_or_create(&label("outcome", label_value))
            .inc();
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!(
                "channel was recovered since delivery; the broker redelivers and the run records absorb it"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "acknowledgement failed; the broker redelivers and the run records absorb it")
            }
        }
    }
}

fn describe(code: &str) -> &'static str {
    match code {
        dead_letter::PERMANENT => "permanent error",
        dead_letter::EXHAUSTED => "retries exhausted",
        dead_letter::POISON => "poison",
        _ => "failed",
    }
}

/// Properties of a message the worker republishes: the original's, with new headers and the
/// event id as `message_id` (so an id derived from the body survives).
fn republished(original: &BasicProperties, headers: FieldTable, event_id: &str) -> BasicProperties {
    original
        .clone()
        .with_headers(headers)
        .with_message_id(event_id.into())
        .with_delivery_mode(2)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running worker's handles, for the binary and for tests.
pub struct Running {
    pub core: Arc<Core>,
    pub ops_addr: std::net::SocketAddr,
}

/// Runs a worker until `shutdown` resolves: migrate, serve the ops endpoints, consume.
/// On shutdown it stops consuming, lets in-flight events finish within the grace period,
/// hands the rest back, and returns.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let keyring = Arc::new(Keyring::from_settings(&settings.secrets)?);
    let pool = db::pool(&settings.database)?;
    wait_for_migrations(&settings.database, &stop).await?;
    let metrics = Arc::new(Metrics::new());
    let core = Arc::new(Core::new(&settings, pool, keyring, metrics.clone())?);

    let listener = tokio::net::TcpListener::bind(&settings.worker.ops_listen).await?;
    let ops_addr = listener.local_addr()?;
    let router = ops::router(OpsState {
        metrics,
        health: core.health.clone(),
    });
    let ops_stop = abort.clone();
    let ops_task = tokio::spawn(ops::serve(listener, router, async move {
        ops_stop.cancelled().await
    }));
    let listen_stop = abort.clone();
    let listener_task = tokio::spawn(
        core.resolver
            .clone()
            .listen(settings.database.clone(), listen_stop),
    );
    if let Some(started) = started {
        let _ = started.send(Running {
            core: core.clone(),
            ops_addr,
        });
    }
    tracing::info!(queue = %core.topology.queue, %ops_addr, "worker started");

    let mut delay = Duration::from_millis(200);
    while !stop.is_cancelled() {
        match consume(&core, &settings, &stop, &abort).await {
            Ok(()) => break,
            Err(err) => {
                core.health.set_broker(None);
                core.metrics.consumer_connected.set(0);
                tracing::error!(error = %err, retry_in = ?delay, "broker session ended; reconnecting");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    abort.cancel();
    let _ = listener_task.await;
    let _ = ops_task.await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Applies migrations, waiting for the database if it is not up yet (no crash loop when
/// workers start before Postgres).
async fn wait_for_migrations(
    settings: &DatabaseSettings,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match db::migrate(settings).await {
            Ok(applied) => {
                for name in applied {
                    tracing::info!(migration = %name, "migration applied");
                }
                return Ok(());
            }
            Err(db::DbError::Migration(err)) => return Err(err.into()),
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, "database not ready; waiting")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("stopped while waiting for the database"),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// One broker session: consume until `stop`, or until the connection fails beyond recovery.
async fn consume(
    core: &Arc<Core>,
    settings: &Settings,
    stop: &CancellationToken,
    abort: &CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("appevents worker {}", std::process::id());
    let connection = broker::connect(
        settings.amqp_url(),
        &settings.amqp.tls_ca_file,
        &name,
        Recovery::Automatic,
    )
    .await?;
    let channel = connection.create_channel().await?;
    core.topology.declare(&channel).await?;
    // The broker hands at most `prefetch` unacknowledged messages to this worker: the bound
    // on what it holds in memory.
    channel
        .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(&connection).await?;
    let worker = Arc::new(Worker {
        core: core.clone(),
        publisher,
    });
    let tag = format!("appevents-{}", Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            core.topology.queue.as_str().into(),
            tag.as_str().into(),
            // Manual acknowledgements: a message is acknowledged only once settled.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    core.health.set_broker(Some(connection.status().clone()));
    core.metrics.consumer_connected.set(1);

    let session_abort = abort.child_token();
    let semaphore = Arc::new(Semaphore::new(settings.worker.concurrency));
    let mut tasks = JoinSet::new();
    let result = loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            permit = semaphore.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let worker = worker.clone();
                let abort = session_abort.clone();
                tasks.spawn(async move {
                    worker.handle(delivery, &abort).await;
                    drop(permit);
                });
            }
            Some(Err(err)) => {
                core.metrics.consumer_connected.set(0);
                tracing::warn!(error = %err, "broker connection lost; waiting for recovery");
                if let Err(err) = channel.wait_for_recovery(err).await {
                    break Err(anyhow::Error::from(err));
                }
                tracing::info!("broker connection recovered; consuming again");
                core.metrics.consumer_connected.set(1);
            }
            None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
        }
    };
    // Stop taking new messages; prefetched ones not yet started go back when the channel
    // closes.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    core.metrics.consumer_connected.set(0);
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(in_flight, grace = ?settings.worker.shutdown_grace, "finishing in-flight events");
    }
    let drained = tokio::time::timeout(settings.worker.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "grace period over; handing unfinished events back"
        );
        session_abort.cancel();
        while tasks.join_next().await.is_some() {}
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    result
}
