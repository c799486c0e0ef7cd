//! The fate of one run of a message, decided once.
//!
//! A [`Decision`] is made from the run's claim ([`before_run`]) and, when the run was this
//! worker's to execute, from the step's result and the retry policy ([`after_run`]). Its
//! variants carry what settling them needs, so nothing downstream re-derives the fate from
//! options or strings: `settle` handles it in one match, the run's record is built from it
//! by [`Decision::record`], and [`Tally::count`] counts it. Everything here is pure.

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::core::event::Event;
use crate::core::failure::{Failure, FailureKind};
use crate::integrations::StepOutput;
use crate::pipeline::retry::{DeadReason, Next, RetryPolicy};
use crate::pipeline::runs::{Claimed, RunClaim, RunRecord, RunStatus};

/// What becomes of one run.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Succeeded or dead-lettered before: not run again.
    Skipped,
    /// Held by another worker: looked at again after `delay` (what is left of the holder's
    /// lease), through the held queue, without using a retry.
    Deferred { delay: Duration },
    Succeeded {
        claim: RunClaim,
        /// Provider calls made under this claim.
        calls: u32,
        output: StepOutput,
    },
    /// Republished to the retry queue of `delay`.
    Retry {
        claim: RunClaim,
        calls: u32,
        failure: Failure,
        delay: Duration,
    },
    /// Its batch found no budget for its call: sent through the held queue to come back
    /// after `delay`, using none of its retries; its claim is given up meanwhile.
    Throttled {
        claim: RunClaim,
        calls: u32,
        failure: Failure,
        delay: Duration,
    },
    /// Dead-lettered.
    Dead {
        claim: RunClaim,
        calls: u32,
        failure: Failure,
        reason: DeadReason,
    },
}

/// What the claim alone decides.
#[derive(Debug, Clone, PartialEq)]
pub enum BeforeRun {
    /// The run is this worker's to execute.
    Execute(RunClaim),
    /// Nothing is executed.
    Decided(Decision),
}

/// A held run comes back this long after its holder's lease has lapsed, so that it finds the
/// run free even if the clocks of the database and the broker differ a little.
pub const HOLD_MARGIN: Duration = Duration::from_millis(250);

/// Decides what it can from the claim. `max_abandoned`: takeovers from workers that
/// vanished mid-run after which a run is poison; `lease`: the longest a hold can last.
pub fn before_run(claimed: Claimed, max_abandoned: u32, lease: Duration) -> BeforeRun {
    match claimed {
        Claimed::Run(claim) if i64::from(claim.abandoned) >= i64::from(max_abandoned) => {
            let failure = Failure::new(
                FailureKind::Permanent,
                format!(
                    "the run was abandoned {} times by workers that stopped mid-run",
                    claim.abandoned
                ),
            )
            .with_code("POISON");
            BeforeRun::Decided(Decision::Dead {
                claim,
                calls: 0,
                failure,
                reason: DeadReason::Poison,
            })
        }
        Claimed::Run(claim) => BeforeRun::Execute(claim),
        Claimed::AlreadySucceeded | Claimed::Dead => BeforeRun::Decided(Decision::Skipped),
        // The holder renews a lease at a time: what is left of it is the most it can hold
        // the run without renewing, whatever an older claim's own expiry says.
        Claimed::Held { remaining } => BeforeRun::Decided(Decision::Deferred {
            delay: remaining.min(lease) + HOLD_MARGIN,
        }),
    }
}

/// What the step's result decides, `retries_done` broker-level retries into the schedule.
pub fn after_run(
    claim: RunClaim,
    calls: u32,
    result: Result<StepOutput, Failure>,
    policy: &RetryPolicy,
    retries_done: u32,
) -> Decision {
    let failure = match result {
        Ok(output) => {
            return Decision::Succeeded {
                claim,
                calls,
                output,
            };
        }
        Err(failure) => failure,
    };
    if let Some(delay) = failure.throttled_delay() {
        return Decision::Throttled {
            claim,
            calls,
            failure,
            delay,
        };
    }
    match policy.next(&failure, retries_done) {
        Next::Retry { delay } => Decision::Retry {
            claim,
            calls,
            failure,
            delay,
        },
        Next::DeadLetter(reason) => Decision::Dead {
            claim,
            calls,
            failure,
            reason,
        },
    }
}

/// The run a decision is about: the event, the workflow and the connection it ran with.
#[derive(Debug, Clone, Copy)]
pub struct RunOf<'a> {
    pub event: &'a Event,
    pub workflow_id: Uuid,
    pub connection_id: Option<Uuid>,
}

impl Decision {
    /// The outcome to record, or `None` when the decision changes nothing in the run's row
    /// (skipped, deferred). `now` is when a retry's delay starts.
    pub fn record(&self, run: RunOf<'_>, now: OffsetDateTime) -> Option<RunRecord> {
        let (claim, calls, status, provider_id, last_error, next_attempt_at) = match self {
            Decision::Skipped | Decision::Deferred { .. } => return None,
            Decision::Succeeded {
                claim,
                calls,
                output,
            } => (
                claim,
                calls,
                RunStatus::Succeeded,
                output.provider_id.clone(),
                None,
                None,
            ),
            Decision::Retry {
                claim,
                calls,
                failure,
                delay,
            }
            | Decision::Throttled {
                claim,
                calls,
                failure,
                delay,
            } => (
                claim,
                calls,
                RunStatus::Retrying,
                None,
                Some(failure.clone()),
                Some(now + *delay),
            ),
            Decision::Dead {
                claim,
                calls,
                failure,
                ..
            } => (
                claim,
                calls,
                RunStatus::Dead,
                None,
                Some(failure.clone()),
                None,
            ),
        };
        Some(RunRecord {
            run_id: claim.run_id,
            created_at: claim.first_claimed_at,
            token: claim.token,
            user_id: run.event.user_id.clone(),
            event_id: run.event.id.clone(),
            event_name: run.event.name.clone(),
            workflow_id: run.workflow_id,
            connection_id: run.connection_id,
            status,
            calls: *calls,
            provider_id,
            last_error,
            next_attempt_at,
        })
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

impl Tally {
    pub fn count(&mut self, decision: &Decision) {
        let counter = match decision {
            Decision::Skipped => &mut self.skipped,
            Decision::Deferred { .. } | Decision::Throttled { .. } => &mut self.deferred,
            Decision::Succeeded { .. } => &mut self.succeeded,
            Decision::Retry { .. } => &mut self.retrying,
            Decision::Dead { .. } => &mut self.dead,
        };
        *counter += 1;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;
    use crate::core::event::IdSource;

    fn policy(schedule: &[u64]) -> RetryPolicy {
        RetryPolicy {
            in_process_tries: 3,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            max_in_process_wait: Duration::from_secs(5),
            schedule: schedule.iter().map(|s| Duration::from_secs(*s)).collect(),
            rate_limited_min_delay: Duration::from_secs(300),
        }
    }

    fn claim(abandoned: i32) -> RunClaim {
        RunClaim {
            run_id: Uuid::from_u128(1),
            token: Uuid::from_u128(2),
            abandoned,
            calls_before: 4,
            claims_before: 0,
            first_claimed_at: now(),
        }
    }

    const LEASE: Duration = Duration::from_secs(15);

    fn event() -> Event {
        Event {
            id: "evt-1".into(),
            id_source: IdSource::Body,
            name: "Contact Created".into(),
            user_id: "u".into(),
            payload: Map::new(),
            occurred_at: None,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000)
    }

    fn run(event: &Event) -> RunOf<'_> {
        RunOf {
            event,
            workflow_id: Uuid::from_u128(3),
            connection_id: Some(Uuid::from_u128(4)),
        }
    }

    fn transient() -> Failure {
        Failure::new(FailureKind::Transient, "503")
    }

    #[test]
    fn a_run_that_succeeded_or_died_before_is_skipped_and_recorded_nowhere() {
        for claimed in [Claimed::AlreadySucceeded, Claimed::Dead] {
            let decided = before_run(claimed, 10, LEASE);

            assert_eq!(decided, BeforeRun::Decided(Decision::Skipped));
            assert_eq!(Decision::Skipped.record(run(&event()), now()), None);
        }
    }

    #[test]
    fn a_held_run_waits_what_is_left_of_its_holder_s_lease_and_no_longer() {
        let deferred = |remaining: u64| match before_run(
            Claimed::Held {
                remaining: Duration::from_secs(remaining),
            },
            10,
            LEASE,
        ) {
            BeforeRun::Decided(Decision::Deferred { delay }) => delay,
            other => panic!("not deferred: {other:?}"),
        };

        assert_eq!(deferred(7), Duration::from_secs(7) + HOLD_MARGIN);
        assert_eq!(deferred(0), HOLD_MARGIN, "hold ran out");
        assert_eq!(
            deferred(7200),
            LEASE + HOLD_MARGIN,
            "an older claim's own expiry is capped at one lease"
        );
        assert_eq!(
            Decision::Deferred {
                delay: Duration::from_secs(10)
            }
            .record(run(&event()), now()),
            None,
            "a deferral uses no retry and records nothing"
        );
    }

    #[test]
    fn a_run_abandoned_too_often_is_dead_as_poison_without_running() {
        let decided = before_run(Claimed::Run(claim(10)), 10, LEASE);

        let BeforeRun::Decided(Decision::Dead {
            calls,
            failure,
            reason,
            ..
        }) = decided
        else {
            panic!("not dead: {decided:?}");
        };
        assert_eq!((calls, reason), (0, DeadReason::Poison));
        assert_eq!(failure.code.as_deref(), Some("POISON"));
        assert_eq!(
            before_run(Claimed::Run(claim(9)), 10, LEASE),
            BeforeRun::Execute(claim(9)),
            "below the limit it runs"
        );
    }

    #[test]
    fn a_success_is_recorded_with_its_claim_calls_and_provider_id() {
        let output = StepOutput {
            provider_id: Some("003A".into()),
            status: 201,
            body: None,
        };

        let decision = after_run(claim(0), 2, Ok(output), &policy(&[10]), 0);
        let record = decision.record(run(&event()), now()).expect("recorded");

        assert!(matches!(decision, Decision::Succeeded { calls: 2, .. }));
        assert_eq!(record.status, RunStatus::Succeeded);
        assert_eq!(
            (record.run_id, record.token),
            (claim(0).run_id, claim(0).token)
        );
        assert_eq!(record.calls, 2);
        assert_eq!(record.provider_id.as_deref(), Some("003A"));
        assert_eq!((record.last_error, record.next_attempt_at), (None, None));
        assert_eq!(
            (record.event_id.as_str(), record.workflow_id),
            ("evt-1", Uuid::from_u128(3))
        );
    }

    #[test]
    fn a_transient_failure_with_retries_left_waits_its_scheduled_delay() {
        let decision = after_run(claim(0), 3, Err(transient()), &policy(&[10, 60]), 1);
        let record = decision.record(run(&event()), now()).expect("recorded");

        assert_eq!(
            decision,
            Decision::Retry {
                claim: claim(0),
                calls: 3,
                failure: transient(),
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(record.status, RunStatus::Retrying);
        assert_eq!(
            record.next_attempt_at,
            Some(now() + Duration::from_secs(60))
        );
        assert_eq!(record.last_error, Some(transient()));
    }

    #[test]
    fn failures_that_cannot_be_retried_are_dead_with_their_reason() {
        let permanent = Failure::new(FailureKind::Permanent, "400");
        let cases = [
            (permanent.clone(), 0, DeadReason::Permanent),
            (transient(), 2, DeadReason::Exhausted),
        ];
        for (failure, retries_done, expected) in cases {
            let decision = after_run(
                claim(0),
                1,
                Err(failure.clone()),
                &policy(&[10, 60]),
                retries_done,
            );
            let record = decision.record(run(&event()), now()).expect("recorded");

            assert!(
                matches!(&decision, Decision::Dead { reason, .. } if *reason == expected),
                "{decision:?}"
            );
            assert_eq!(record.status, RunStatus::Dead);
            assert_eq!(record.last_error, Some(failure));
            assert_eq!(record.next_attempt_at, None);
        }
    }

    #[test]
    fn the_tally_counts_each_decision_once_in_its_own_column() {
        let mut tally = Tally::default();
        let decisions = [
            Decision::Skipped,
            Decision::Deferred {
                delay: Duration::from_secs(10),
            },
            after_run(claim(0), 1, Ok(StepOutput::default()), &policy(&[10]), 0),
            after_run(claim(0), 1, Err(transient()), &policy(&[10]), 0),
            after_run(claim(0), 1, Err(transient()), &policy(&[10]), 1),
        ];

        for decision in &decisions {
            tally.count(decision);
        }

        assert_eq!(
            tally,
            Tally {
                succeeded: 1,
                retrying: 1,
                dead: 1,
                skipped: 1,
                deferred: 1
            }
        );
    }
}
