//! Settling: what a run's [`Decision`] and a whole-message dead letter do before the message
//! may be acknowledged. A run is republished to a retry queue or the dead-letter queue
//! (confirmed by the broker), recorded in Postgres, and counted, in that order: a crash in
//! between leaves a duplicate the run records absorb, never a loss.
//!
//! A call to the broker or the database that fails because the dependency is unavailable is
//! retried with backoff while the message waits unacknowledged, until it succeeds or the
//! worker shuts down. Any other failure cannot be fixed by waiting: the message is handed
//! back to the broker at once.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::core::event::Event;
use crate::observe::health::Dependency;
use crate::observe::metrics::{label, labels2};
use crate::pipeline::batch::BatchError;
use crate::pipeline::context::Session;
use crate::pipeline::decision::{Decision, RunOf};
use crate::pipeline::resolve::Target;
use crate::store::db::StoreError;
use crate::transport::dead_letter::{self, DeadLetter, Reason};
use crate::transport::headers;
use crate::transport::publisher::PublishError;

/// The message a run belongs to.
pub(crate) struct Message<'a> {
    pub body: &'a [u8],
    pub properties: &'a BasicProperties,
    pub event: &'a Event,
    /// Broker-level retries already done.
    pub retries_done: u32,
}

/// Why a message was not settled, and so is not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsettled {
    /// The worker is shutting down: the message goes back to the queue when the channel
    /// closes.
    Shutdown,
    /// It cannot be settled now (the reason says why): it is handed back to the broker
    /// (nacked), which redelivers it and counts the delivery, so a message that can never be
    /// settled reaches `worker.max_deliveries` and is dead-lettered as poison.
    HandBack(String),
}

impl Session {
    /// Carries out a run's decision: republishes, records and counts what it calls for.
    pub(crate) async fn settle(
        &self,
        message: &Message<'_>,
        target: &Target,
        decision: &Decision,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let metrics = &self.context.metrics;
        let provider = target.provider.as_str();
        let now = OffsetDateTime::now_utc();
        let run = RunOf {
            event: message.event,
            workflow_id: target.workflow_id,
            connection_id: target.connection.as_ref().ok().map(|c| c.id),
        };
        let count_run = |outcome: &str| {
            metrics
                .runs
                .get_or_create(&labels2("provider", provider, "outcome", outcome))
                .inc();
        };
        match decision {
            Decision::Skipped => count_run("skipped"),
            Decision::Deferred { delay } => {
                tracing::debug!(wait = ?delay, "run deferred: held by another worker, or its account throttled");
                self.publish_held(message, target, *delay, abort).await?;
                count_run("deferred");
            }
            Decision::Succeeded { output, .. } => {
                tracing::info!(
                    provider_id = output.provider_id.as_deref(),
                    status = output.status,
                    "run succeeded"
                );
                self.record(decision, run, now, abort).await?;
                count_run("succeeded");
            }
            Decision::Throttled { delay, .. } => {
                tracing::info!(wait = ?delay, "run deferred: its batch found the account's budget spent");
                self.publish_held(message, target, *delay, abort).await?;
                self.record(decision, run, now, abort).await?;
                count_run("deferred");
            }
            Decision::Retry { failure, delay, .. } => {
                tracing::warn!(error = %failure, retry_in = ?delay, "run failed; retrying later");
                let retries_done = message.retries_done + 1;
                self.publish_retry(message, target, *delay, retries_done, now, abort)
                    .await?;
                metrics
                    .retries
                    .get_or_create(&label("kind", failure.kind.as_str()))
                    .inc();
                self.record(decision, run, now, abort).await?;
                count_run("retry");
            }
            Decision::Dead {
                claim,
                calls,
                failure,
                reason,
            } => {
                tracing::error!(error = %failure, why = reason.describe(), "run failed; dead-lettered");
                // One workflow's share of the message: a replay re-runs only it.
                let letter = DeadLetter {
                    reason: Reason {
                        code: reason.code(),
                        text: format!("{}: {}", reason.describe(), failure.summary()),
                    },
                    event: Some(message.event),
                    workflow_id: Some(target.workflow_id),
                    provider_calls: Some(claim.calls_before + calls),
                    failure: Some(failure),
                };
                self.dead_letter(message.body, message.properties, &letter, abort)
                    .await?;
                metrics
                    .dead_letters
                    .get_or_create(&label("reason", reason.code().as_str()))
                    .inc();
                self.record(decision, run, now, abort).await?;
                count_run("dead");
            }
        }
        Ok(())
    }

    /// Writes the run's outcome (through the batcher: one statement for many runs).
    async fn record(
        &self,
        decision: &Decision,
        run: RunOf<'_>,
        now: OffsetDateTime,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let Some(record) = decision.record(run, now) else {
            return Ok(());
        };
        let records = &self.context.records;
        let written = self
            .persist(abort, "record run", || records.call(record.clone()))
            .await?;
        if !written {
            tracing::warn!(run_id = %record.run_id, "run was taken over by another worker before its outcome was recorded");
        }
        Ok(())
    }

    /// Sends the message to the retry queue of `delay`, for this workflow only, marked with
    /// the broker-level retries done when it comes back.
    async fn publish_retry(
        &self,
        message: &Message<'_>,
        target: &Target,
        delay: Duration,
        retries_done: u32,
        now: OffsetDateTime,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let Some(queue) = self.context.topology.retry_queue(delay) else {
            // Delays come from the schedule, whose queues were declared.
            return Err(Unsettled::HandBack(format!(
                "no retry queue for a delay of {delay:?}"
            )));
        };
        let mut headers = for_one_workflow(message, target, retries_done);
        if let Ok(at) = (now + delay).format(&time::format_description::well_known::Rfc3339) {
            headers::set_str(&mut headers, headers::RETRY_AT, &at);
        }
        let props = republished(message.properties, headers, &message.event.id);
        self.persist(abort, "publish retry", || {
            self.publisher
                .publish("", queue, message.body, props.clone())
        })
        .await
    }

    /// Sends the message, for this workflow only, to the held queue, where it waits `delay`
    /// (its own expiration) before going back to the work queue. It uses no retry.
    async fn publish_held(
        &self,
        message: &Message<'_>,
        target: &Target,
        delay: Duration,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let headers = for_one_workflow(message, target, message.retries_done);
        let props = republished(message.properties, headers, &message.event.id)
            .with_expiration(delay.as_millis().to_string().into());
        let queue = self.context.topology.held_queue.as_str();
        self.persist(abort, "publish held", || {
            self.publisher
                .publish("", queue, message.body, props.clone())
        })
        .await
    }

    /// Dead-letters a whole message, for no one workflow (invalid, poison, rejected by its
    /// payload check), and counts it under its reason code (the `x-appevents-reason-code`
    /// header's value) and, for an invalid message, what was wrong (`detail`).
    pub(crate) async fn dead_letter_message(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        event: Option<&Event>,
        reason: Reason,
        detail: Option<&str>,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let mut labels = label("reason", reason.code.as_str());
        if let Some(detail) = detail {
            labels.push(("detail", detail.to_owned()));
        }
        let letter = DeadLetter {
            reason,
            event,
            workflow_id: None,
            provider_calls: None,
            failure: None,
        };
        self.dead_letter(body, properties, &letter, abort).await?;
        self.context
            .metrics
            .dead_letters
            .get_or_create(&labels)
            .inc();
        Ok(())
    }

    async fn dead_letter(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        letter: &DeadLetter<'_>,
        abort: &CancellationToken,
    ) -> Result<(), Unsettled> {
        let props = dead_letter::properties(properties, letter);
        let queue = self.context.topology.dead_letter_queue.as_str();
        self.persist(abort, "publish dead letter", || {
            self.publisher.publish("", queue, body, props.clone())
        })
        .await
    }

    /// Retries an operation on the database or broker with backoff while its dependency is
    /// unavailable, until it succeeds or `abort` fires; any other error hands the message
    /// back. Logs once when a dependency starts failing and once when it recovers.
    pub(crate) async fn persist<T, E, F, Fut>(
        &self,
        abort: &CancellationToken,
        what: &'static str,
        op: F,
    ) -> Result<T, Unsettled>
    where
        E: DependencyError,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let health = &self.context.health;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(usize::MAX)
            .with_jitter();
        let retried = op
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|err: &E| err.is_unavailable())
            .notify(|err: &E, wait: Duration| {
                if health.failed(E::DEPENDENCY, format!("{what}: {err}")) {
                    tracing::warn!(error = %err, %what, ?wait, "dependency unavailable; holding the message and retrying");
                } else {
                    tracing::debug!(error = %err, %what, ?wait, "still unavailable");
                }
            });
        tokio::select! {
            result = retried => {
                let value = result.map_err(|err| Unsettled::HandBack(format!("{what}: {err}")))?;
                if health.recovered(E::DEPENDENCY) {
                    tracing::info!(%what, "dependency available again; resuming");
                }
                Ok(value)
            }
            _ = abort.cancelled() => Err(Unsettled::Shutdown),
        }
    }
}

/// An error of the database or the broker.
pub(crate) trait DependencyError: Display {
    /// Which one: the health readiness reads is kept per dependency.
    const DEPENDENCY: Dependency;

    /// Whether the dependency was unavailable, so the same call may succeed later.
    fn is_unavailable(&self) -> bool;
}

impl DependencyError for StoreError {
    const DEPENDENCY: Dependency = Dependency::Database;

    fn is_unavailable(&self) -> bool {
        StoreError::is_unavailable(self)
    }
}

impl DependencyError for PublishError {
    const DEPENDENCY: Dependency = Dependency::Broker;

    fn is_unavailable(&self) -> bool {
        PublishError::is_unavailable(self)
    }
}

impl<E: DependencyError> DependencyError for BatchError<E> {
    const DEPENDENCY: Dependency = E::DEPENDENCY;

    fn is_unavailable(&self) -> bool {
        match self {
            BatchError::Failed(err) => err.is_unavailable(),
            BatchError::Mismatch { .. } | BatchError::Stopped => false,
        }
    }
}

/// The headers of a message sent on for `target`'s workflow only (to a retry or the held
/// queue): the original's carried headers, the retries done so far and that one workflow.
fn for_one_workflow(message: &Message<'_>, target: &Target, retries_done: u32) -> FieldTable {
    let mut headers = dead_letter::carried_headers(message.properties.headers().as_ref());
    headers::set_int(&mut headers, headers::RETRIES_DONE, i64::from(retries_done));
    headers::set_strings(
        &mut headers,
        headers::WORKFLOWS,
        &[target.workflow_id.to_string()],
    );
    headers
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deadpool_postgres::{PoolError, TimeoutType};

    use super::*;
    use crate::store::db::DbError;

    #[test]
    fn a_batched_error_keeps_whether_the_database_was_unavailable() {
        let timeout = StoreError::Db(DbError::Pool(PoolError::Timeout(TimeoutType::Wait)));
        let refused = StoreError::Conflict("violates foreign key constraint".into());

        assert!(BatchError::Failed(Arc::new(timeout)).is_unavailable());
        assert!(!BatchError::Failed(Arc::new(refused)).is_unavailable());
        assert!(!BatchError::<StoreError>::Stopped.is_unavailable());
    }

    #[test]
    fn a_message_no_queue_takes_is_not_retried_but_a_nack_is() {
        assert!(!PublishError::Unroutable("NO_ROUTE".into()).is_unavailable());
        assert!(PublishError::Nacked.is_unavailable());
    }
}
