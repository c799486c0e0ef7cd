//! Executing one claimed run: each step's mapping rendered, the provider called with quick
//! in-process retries, and on expired credentials one token refresh and the call again. A
//! one-step workflow is that one call; a workflow of several steps runs them in order
//! (`chain`), recording each.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::event::Event;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::Scope;
use crate::core::provider::Provider;
use crate::integrations::batch_api::{self, BatchKind, RecordAnswer};
use crate::integrations::{Action, Earlier, StepOutput};
use crate::observe::metrics::label;
use crate::pipeline::context::Context;
use crate::pipeline::provider_batch::{self, Coming, Key, Ridden};
use crate::pipeline::resolve::Target;
use crate::pipeline::runs::RunClaim;

/// How far the provider's clock may be behind the database's when looking for what an
/// earlier attempt created "since the run was first claimed".
const CLOCK_SKEW: Duration = Duration::from_secs(60);

impl Context {
    /// Runs the target's step for the event. Returns its result and the provider calls
    /// made, within `worker.run_timeout`.
    /// `paid`: the run's ticket took a call of its account's budget; `coming`: the run's
    /// count towards its batch, when it rides in one.
    pub(crate) async fn run_step(
        &self,
        target: &Target,
        event: &Event,
        claim: &RunClaim,
        paid: bool,
        coming: Coming,
    ) -> (Result<StepOutput, Failure>, u32) {
        let calls = AtomicU32::new(0);
        let rides = coming.rides();
        let coming = Mutex::new(Some(coming));
        let run_timeout = self.run_timeout;
        let attempt = Attempt {
            calls: &calls,
            claimed_before: claim.claims_before > 0,
            since: claim.first_claimed_at - CLOCK_SKEW,
            rides,
            paid,
            coming: &coming,
        };
        let result =
            tokio::time::timeout(run_timeout, self.execute(target, event, &attempt, claim))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::new(
                        FailureKind::Transient,
                        format!("run timed out after {run_timeout:?}"),
                    )
                    .with_code("TIMEOUT"))
                });
        (result, calls.load(Ordering::Relaxed))
    }

    /// The batch a target's runs join, when they go out in batches: a workflow of one step
    /// whose action has a batch endpoint that `batching` leaves on.
    pub(crate) fn ride_key(&self, target: &Target) -> Option<Key> {
        let workflow = target.workflow.as_ref().ok()?;
        let connection = target.connection.as_ref().ok()?;
        let kind = BatchKind::of(&workflow.one_step()?.action)?;
        self.batches.batches(&kind).then_some((connection.id, kind))
    }

    async fn execute(
        &self,
        target: &Target,
        event: &Event,
        attempt: &Attempt<'_>,
        claim: &RunClaim,
    ) -> Result<StepOutput, Failure> {
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
        let current = Mutex::new(connection.clone());
        let Some(step) = workflow.one_step() else {
            return self
                .run_chain(workflow, &current, event, attempt, claim)
                .await;
        };
        let body = step.mapping.render(event);
        self.run_action(
            workflow.provider,
            &step.action,
            &current,
            &body,
            &Scope::event(event),
            attempt,
        )
        .await
    }

    /// One action with the worker's in-process retries and token refresh.
    pub(super) async fn run_action(
        &self,
        provider: Provider,
        action: &Action,
        current: &Mutex<Arc<Connection>>,
        body: &Value,
        scope: &Scope<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<StepOutput, Failure> {
        let (result, _tries) = self
            .policy
            .run_in_process(|| self.try_step(provider, action, current, body, scope, attempt))
            .await;
        result
    }

    /// One in-process try: the step, and on expired credentials a refresh and the step again.
    async fn try_step(
        &self,
        provider: Provider,
        action: &Action,
        current: &Mutex<Arc<Connection>>,
        body: &Value,
        scope: &Scope<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<StepOutput, Failure> {
        let connection = lock(current).clone();
        let first = self
            .call(provider, action, &connection, body, scope, attempt)
            .await;
        let Err(failure) = &first else { return first };
        if failure.kind != FailureKind::ExpiredCredentials {
            return first;
        }
        let refreshed = self
            .refresher
            .refresh(&self.pool, &self.keyring, &self.integrations, &connection)
            .await;
        let outcome = if refreshed.is_ok() {
            "refreshed"
        } else {
            "failed"
        };
        self.metrics
            .token_refreshes
            .get_or_create(&label("result", outcome))
            .inc();
        let refreshed = Arc::new(refreshed?);
        *lock(current) = refreshed.clone();
        match self
            .call(provider, action, &refreshed, body, scope, attempt)
            .await
        {
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
        provider: Provider,
        action: &Action,
        connection: &Connection,
        body: &Value,
        scope: &Scope<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<StepOutput, Failure> {
        let earlier = attempt.earlier();
        attempt.calls.fetch_add(1, Ordering::Relaxed);
        if attempt.rides
            && let Some(kind) = BatchKind::of(action)
            && (earlier.is_none() || kind.repeats_safely())
        {
            let record = batch_api::record(action, &kind, body.clone(), scope)?;
            let coming = lock(attempt.coming).take();
            match self
                .ride(kind, connection, record, attempt.paid, coming)
                .await
            {
                Ridden::Answer(RecordAnswer::Done(output)) => return Ok(output),
                Ridden::Answer(RecordAnswer::Failed(failure)) | Ridden::Failed(failure) => {
                    if failure.throttled_delay().is_some() {
                        // The batch was never sent.
                        attempt.calls.fetch_sub(1, Ordering::Relaxed);
                    }
                    return Err(failure);
                }
                Ridden::Answer(RecordAnswer::Exists(existing)) => {
                    let body = serde_json::json!({ "properties": body });
                    return self
                        .integrations
                        .update_existing_contact(connection, existing, Some(body))
                        .await;
                }
                Ridden::Answer(RecordAnswer::Unanswered) => {
                    return Err(provider_batch::unanswered());
                }
                // Sent alone below: the batch wrote nothing of this record.
                Ridden::Answer(RecordAnswer::Alone) => {}
            }
        }
        let started = Instant::now();
        let result = self
            .integrations
            .execute(action, connection, body.clone(), scope, earlier)
            .await;
        self.answered(provider, started, result.is_ok());
        result
    }

    /// After a provider's answer to a call begun at `started`, single or batch: the crash
    /// failpoint when it succeeded (tests only), and the call's time.
    pub(super) fn answered(&self, provider: Provider, started: Instant, succeeded: bool) {
        if self.crash_after_provider_answer && succeeded {
            // Fault injection (tests only): die as a SIGKILL would, before recording.
            eprintln!("crash_after_provider_answer: exiting after the provider's answer");
            std::process::exit(137);
        }
        self.metrics
            .step_seconds
            .get_or_create(&label("provider", provider.as_str()))
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The attempts of one claim of a run.
pub(super) struct Attempt<'a> {
    /// Provider calls made under this claim.
    pub(super) calls: &'a AtomicU32,
    /// The run was claimed before this claim.
    pub(super) claimed_before: bool,
    pub(super) since: time::OffsetDateTime,
    /// The run's record goes out in a batch with others' (`provider_batch`).
    pub(super) rides: bool,
    /// The run's ticket took a call of its account's budget.
    pub(super) paid: bool,
    /// The run's count towards its batch, until it joins one.
    pub(super) coming: &'a Mutex<Option<Coming>>,
}

impl Attempt<'_> {
    /// Whether an earlier attempt (an earlier claim's, or an earlier call of this claim's)
    /// may have reached the provider.
    fn earlier(&self) -> Option<Earlier> {
        (self.claimed_before || self.calls.load(Ordering::Relaxed) > 0)
            .then_some(Earlier { since: self.since })
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
