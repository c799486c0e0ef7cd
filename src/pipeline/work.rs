//! The unit of work: one message, processed to the point where it may be acknowledged.
//!
//! [`Session::try_execute`] returns an [`Outcome`]; the consume loop wraps it. In order:
//! 1. parse the message and its routing headers against the publishing contract (invalid →
//!    dead-letter queue);
//! 2. resolve the user's subscriptions for the event's name or alias (none → acknowledged,
//!    counted); then check the payload against the app event's example when its payload
//!    check is on (`reject` → the event is dead-lettered once, nothing runs);
//! 3. claim each run in Postgres;
//! 4. for each run, concurrently: decide from the claim (already succeeded → skipped; held
//!    by another worker → deferred), else execute the step and decide from its result;
//! 5. settle each decision: republish to a retry queue or the dead-letter queue, confirmed;
//!    record the run's outcome; count it.
//!
//! Steps 2, 3 and 5 need the database or the broker; when either is down the step is
//! retried with backoff while the message stays unacknowledged.

use std::sync::Arc;

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::core::event::{self, Event, Invalid, MessageMeta};
use crate::core::payload_check::{self, Mode};
use crate::integrations::limits::{self, Observer};
use crate::observe::metrics::label;
use crate::pipeline::context::Session;
use crate::pipeline::decision::{self, BeforeRun, Decision, Tally};
use crate::pipeline::provider_batch::Coming;
use crate::pipeline::resolve::{MatchedEvent, Resolution, Target};
use crate::pipeline::runs::{ClaimRequest, Claimed};
use crate::pipeline::settle::{Message, Unsettled};
use crate::pipeline::throttle::{Admission, Ticket};
use crate::transport::dead_letter::{Reason, ReasonCode};
use crate::transport::routing;

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

impl Outcome {
    /// The `outcome` label of `appevents_events_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Invalid(_) => "invalid",
            Outcome::Poison { .. } => "poison",
            Outcome::Unmatched(_) => "unmatched",
            Outcome::PayloadMismatch(_) => "payload_mismatch",
            Outcome::Processed(_) => "processed",
        }
    }
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

impl Session {
    /// Processes one message to the point where it may be acknowledged.
    pub(crate) async fn try_execute(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        abort: &CancellationToken,
    ) -> Result<Outcome, Unsettled> {
        let context = &self.context;
        let meta = MessageMeta {
            content_type: properties.content_type().as_ref().map(|s| s.as_str()),
            message_id: properties.message_id().as_ref().map(|s| s.as_str()),
        };
        let event = match event::parse(body, &meta, context.limits) {
            Ok(event) => event,
            Err(invalid) => {
                return Box::pin(self.dead_letter_invalid(body, properties, invalid, None, abort))
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
                return Box::pin(self.dead_letter_invalid(
                    body,
                    properties,
                    invalid,
                    Some(&event),
                    abort,
                ))
                .await;
            }
        };
        let deliveries = routing.deliveries;
        if deliveries >= i64::from(context.max_deliveries) {
            tracing::error!(
                deliveries,
                "message keeps failing to finish; dead-lettered as poison"
            );
            let reason = Reason {
                code: ReasonCode::Poison,
                text: format!(
                    "poison: delivered {deliveries} times without being finished (the worker crashed, timed out or lost its connection each time)"
                ),
            };
            Box::pin(self.dead_letter_message(body, properties, Some(&event), reason, None, abort))
                .await?;
            return Ok(Outcome::Poison { deliveries });
        }

        let resolution = self
            .persist(abort, "resolve subscriptions", || {
                context.resolver.resolve(&event.user_id, &event.name)
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
            context
                .metrics
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

        let message = Message {
            body,
            properties,
            event: &event,
            retries_done: routing.retries_done,
        };
        // Each account's limit first: a run that must wait longer than it may is deferred
        // before it is claimed, and uses none of its retries.
        let ride_keys: Vec<_> = targets.iter().map(|t| context.ride_key(t)).collect();
        let admissions = futures::future::join_all(
            targets
                .iter()
                .zip(&ride_keys)
                .map(|(t, key)| context.throttle.admit(t, key.is_some())),
        )
        .await;
        let mut admitted = Vec::new();
        let mut deferred = Vec::new();
        for ((target, admission), key) in targets.iter().zip(admissions).zip(ride_keys) {
            match admission {
                // Counted from now towards its batch, if it rides: the batch waits for it.
                Admission::Go(ticket) => {
                    admitted.push((*target, ticket, context.batches.expect(key)));
                }
                Admission::Defer { delay } => deferred.push((*target, delay)),
            }
        }

        let requests: Vec<ClaimRequest> = admitted
            .iter()
            .map(|(t, _, _)| ClaimRequest {
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
                futures::future::try_join_all(
                    requests.iter().cloned().map(|r| context.claims.call(r)),
                )
            })
            .await?;

        // Each run is decided and settled on its own, so a fast run is recorded without
        // waiting for a slow sibling: a crash then leaves as little as possible unrecorded.
        let work = admitted
            .into_iter()
            .zip(claims)
            .map(|((target, ticket, coming), claimed)| {
                self.run_one(&message, target, claimed, ticket, coming, abort)
            });
        let deferrals = deferred.into_iter().map(|(target, delay)| {
            let message = &message;
            async move {
                let decision = Decision::Deferred { delay };
                self.settle(message, target, &decision, abort).await?;
                Ok(decision)
            }
        });
        let (ran, deferred) = futures::future::join(
            futures::future::join_all(work),
            futures::future::join_all(deferrals),
        )
        .await;
        let mut tally = Tally::default();
        let mut unsettled = None;
        for result in ran.into_iter().chain(deferred) {
            match result {
                Ok(decision) => tally.count(&decision),
                // Handing the message back wins over shutting down: either returns it to
                // the queue, and the hand-back says why.
                Err(Unsettled::Shutdown) => {
                    unsettled.get_or_insert(Unsettled::Shutdown);
                }
                Err(handed_back) => unsettled = Some(handed_back),
            }
        }
        match unsettled {
            Some(unsettled) => Err(unsettled),
            None => Ok(Outcome::Processed(tally)),
        }
    }

    /// Decides one run (from its claim, or by executing its step) and settles the decision.
    async fn run_one(
        &self,
        message: &Message<'_>,
        target: &Target,
        claimed: Claimed,
        ticket: Ticket,
        coming: Coming,
        abort: &CancellationToken,
    ) -> Result<Decision, Unsettled> {
        let context = &self.context;
        let span = tracing::info_span!(
            "run",
            workflow_id = %target.workflow_id,
            run_id = tracing::field::Empty
        );
        let decision =
            match decision::before_run(claimed, context.max_deliveries, context.claim_lease) {
                BeforeRun::Decided(decision) => {
                    context.throttle.finish(ticket, None);
                    decision
                }
                BeforeRun::Execute(claim) => {
                    span.record("run_id", tracing::field::display(claim.run_id));
                    let observer = Arc::new(Observer::default());
                    // Boxed: the step's state is most of a message's, and the futures that
                    // hold it (the run, the message's task) are moved as they start and end.
                    let step = Box::pin(context.run_step(
                        target,
                        message.event,
                        &claim,
                        ticket.paid(),
                        coming,
                    ));
                    let (result, calls) = limits::observe(observer.clone(), step)
                        .instrument(span.clone())
                        .await;
                    context.throttle.finish(ticket, Some(&observer));
                    decision::after_run(claim, calls, result, &context.policy, message.retries_done)
                }
            };
        self.settle(message, target, &decision, abort)
            .instrument(span)
            .await?;
        Ok(decision)
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
    ) -> Result<Option<Outcome>, Unsettled> {
        let differences = app_event.payload_check.differences(&event.payload);
        if differences.is_empty() {
            return Ok(None);
        }
        let reason = payload_check::reason(&app_event.name, &differences);
        self.context
            .metrics
            .payload_mismatches
            .get_or_create(&label("event", app_event.name.as_str()))
            .inc();
        if app_event.payload_check.mode != Mode::Reject {
            tracing::warn!(%reason, "payload does not match its app event's example; processed anyway");
            return Ok(None);
        }
        tracing::warn!(%reason, "payload does not match its app event's example; dead-lettered");
        let letter = Reason {
            code: ReasonCode::PayloadMismatch,
            text: reason.clone(),
        };
        Box::pin(self.dead_letter_message(body, properties, Some(event), letter, None, abort))
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
    ) -> Result<Outcome, Unsettled> {
        tracing::warn!(reason = %invalid, "invalid message dead-lettered");
        let reason = Reason {
            code: ReasonCode::Invalid,
            text: format!("invalid event: {invalid}"),
        };
        let detail = invalid.code();
        self.dead_letter_message(body, properties, event, reason, Some(detail), abort)
            .await?;
        Ok(Outcome::Invalid(invalid))
    }
}
