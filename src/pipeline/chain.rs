//! Running a workflow of several steps: the workflow's condition, then each step in order,
//! its condition, its `for_each`, its call, each outcome recorded in `run_steps` before the
//! next step starts.
//!
//! Resuming: a run claimed before (a retry, a takeover, a replay) first reads what earlier
//! attempts recorded; a step recorded as succeeded or skipped is not run again, and its
//! output is what later steps read. A step that failed runs again. A crash between a
//! provider's answer and the step's record repeats that one step, which each action's own
//! lookup makes harmless (see the README's crash window).
//!
//! A condition that cannot be evaluated on this event, or a `for_each` over something other
//! than an array of at most [`MAX_FOR_EACH`] elements, fails the run permanently with the
//! reason: trying again cannot change the event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::catalog::workflows::{CompiledStep, CompiledWorkflow, MAX_FOR_EACH, OnError};
use crate::core::connection::Connection;
use crate::core::event::Event;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::Scope;
use crate::integrations::StepOutput;
use crate::pipeline::context::Context;
use crate::pipeline::run_steps::{self, StepRecord, StepStatus};
use crate::pipeline::runs::RunClaim;
use crate::pipeline::step::{Attempt, lock};

/// A failure no retry can change: the condition or the data is wrong for this event.
fn permanent(code: &str, message: String) -> Failure {
    Failure::new(FailureKind::Permanent, message).with_code(code)
}

impl Context {
    pub(super) async fn run_chain(
        &self,
        workflow: &CompiledWorkflow,
        current: &Mutex<Arc<Connection>>,
        event: &Event,
        attempt: &Attempt<'_>,
        claim: &RunClaim,
    ) -> Result<StepOutput, Failure> {
        let resumed = claim.claims_before > 0 || claim.calls_before > 0;
        let recorded: HashMap<(String, Option<u32>), StepRecord> = if resumed {
            let client = self.pool.get().await.map_err(store_failure)?;
            run_steps::load(&client, claim.run_id)
                .await
                .map_err(store_failure)?
                .into_iter()
                .map(|r| ((r.step.clone(), r.item), r))
                .collect()
        } else {
            HashMap::new()
        };
        if let Some(condition) = &workflow.condition {
            let holds = condition
                .evaluate(&Scope::event(event))
                .map_err(|e| permanent("CONDITION", format!("when: {e}")))?;
            if !holds {
                tracing::info!(
                    condition = condition.source(),
                    "the workflow's condition does not hold; nothing to run"
                );
                return Ok(StepOutput::default());
            }
        }
        let mut outputs = Map::new();
        let mut last = StepOutput::default();
        for step in &workflow.steps {
            let output = self
                .run_chain_step(
                    workflow, step, current, event, attempt, claim, &recorded, &outputs, &mut last,
                )
                .await?;
            outputs.insert(step.name.clone(), output);
            if self.crash_after_step.as_deref() == Some(step.name.as_str()) {
                // Fault injection (tests only): die as a SIGKILL would, the step recorded.
                eprintln!("crash_after_step: exiting after step {}", step.name);
                std::process::exit(137);
            }
        }
        Ok(last)
    }

    /// Runs one step (every element of its `for_each`) and returns its output: what the
    /// provider answered, an array of them for a `for_each`, null when skipped or failed
    /// with `on_error: continue`.
    #[allow(clippy::too_many_arguments)]
    async fn run_chain_step(
        &self,
        workflow: &CompiledWorkflow,
        step: &CompiledStep,
        current: &Mutex<Arc<Connection>>,
        event: &Event,
        attempt: &Attempt<'_>,
        claim: &RunClaim,
        recorded: &HashMap<(String, Option<u32>), StepRecord>,
        outputs: &Map<String, Value>,
        last: &mut StepOutput,
    ) -> Result<Value, Failure> {
        let scope = Scope {
            event,
            steps: Some(outputs),
            item: None,
        };
        let Some(for_each) = &step.for_each else {
            return self
                .run_element(
                    workflow, step, current, &scope, None, attempt, claim, recorded, last,
                )
                .await;
        };
        let items = match for_each.lookup(&scope) {
            Some(Value::Array(items)) => items,
            // Nothing to iterate over: the step has nothing to do.
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(permanent(
                    "FOR_EACH",
                    format!(
                        "step {}: for_each {} is not an array",
                        step.name,
                        for_each.as_str()
                    ),
                ));
            }
        };
        if items.len() > MAX_FOR_EACH {
            return Err(permanent(
                "FOR_EACH",
                format!(
                    "step {}: for_each {} has {} elements, more than {MAX_FOR_EACH}",
                    step.name,
                    for_each.as_str(),
                    items.len()
                ),
            ));
        }
        let mut results = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let scope = Scope {
                item: Some(item),
                ..scope
            };
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            results.push(
                self.run_element(
                    workflow,
                    step,
                    current,
                    &scope,
                    Some(index),
                    attempt,
                    claim,
                    recorded,
                    last,
                )
                .await?,
            );
        }
        Ok(Value::Array(results))
    }

    /// One step for one element (or the step without `for_each`): skipped when recorded
    /// as done, else its condition, its call and its record.
    #[allow(clippy::too_many_arguments)]
    async fn run_element(
        &self,
        workflow: &CompiledWorkflow,
        step: &CompiledStep,
        current: &Mutex<Arc<Connection>>,
        scope: &Scope<'_>,
        item: Option<u32>,
        attempt: &Attempt<'_>,
        claim: &RunClaim,
        recorded: &HashMap<(String, Option<u32>), StepRecord>,
        last: &mut StepOutput,
    ) -> Result<Value, Failure> {
        if let Some(done) = recorded.get(&(step.name.clone(), item)) {
            match done.status {
                StepStatus::Succeeded | StepStatus::Skipped => {
                    tracing::debug!(step = %step.name, ?item, "recorded by an earlier attempt; not run again");
                    return Ok(done.output.clone().unwrap_or(Value::Null));
                }
                StepStatus::Failed => {}
            }
        }
        let started_at = OffsetDateTime::now_utc();
        let record = |status, attempts, request, output, error| StepRecord {
            step: step.name.clone(),
            item,
            status,
            attempts,
            started_at,
            finished_at: OffsetDateTime::now_utc(),
            request,
            output,
            error,
        };
        if let Some(condition) = &step.condition {
            let holds = condition
                .evaluate(scope)
                .map_err(|e| permanent("CONDITION", format!("step {}: when: {e}", step.name)))?;
            if !holds {
                self.record_step(claim, &record(StepStatus::Skipped, 0, None, None, None))
                    .await?;
                return Ok(Value::Null);
            }
        }
        let body = step.mapping.render_in(scope);
        let request = {
            let connection = lock(current).clone();
            self.integrations
                .prepare(&step.action, &connection, body.clone(), scope)
                .ok()
                .map(|r| json!({"method": r.method.as_str(), "url": r.url, "body": r.body}))
        };
        let calls = AtomicU32::new(0);
        let no_batch = Mutex::new(None);
        let step_attempt = Attempt {
            calls: &calls,
            claimed_before: attempt.claimed_before,
            since: attempt.since,
            rides: false,
            paid: attempt.paid,
            coming: &no_batch,
        };
        let result = self
            .run_action(
                step.action.provider(workflow.provider),
                &step.action,
                current,
                &body,
                scope,
                &step_attempt,
            )
            .await;
        let made = calls.load(Ordering::Relaxed);
        attempt.calls.fetch_add(made, Ordering::Relaxed);
        let attempts = i32::try_from(made).unwrap_or(i32::MAX);
        match result {
            Ok(output) => {
                let value = output.output();
                self.record_step(
                    claim,
                    &record(
                        StepStatus::Succeeded,
                        attempts,
                        request,
                        Some(value.clone()),
                        None,
                    ),
                )
                .await?;
                if output.provider_id.is_some() {
                    *last = output;
                }
                Ok(value)
            }
            Err(failure) => {
                self.record_step(
                    claim,
                    &record(
                        StepStatus::Failed,
                        attempts,
                        request,
                        None,
                        run_steps::error_json(&failure),
                    ),
                )
                .await?;
                if step.on_error == OnError::Continue {
                    tracing::warn!(step = %step.name, ?item, error = %failure.summary(), "step failed; the run goes on (on_error: continue)");
                    return Ok(Value::Null);
                }
                Err(Failure {
                    message: format!("step {}: {}", step.name, failure.message),
                    ..failure
                })
            }
        }
    }

    /// Writes a step's outcome before the next step starts. If the database cannot take
    /// it, the run fails transiently and is retried: it resumes from what was recorded.
    async fn record_step(&self, claim: &RunClaim, record: &StepRecord) -> Result<(), Failure> {
        let client = self.pool.get().await.map_err(store_failure)?;
        run_steps::record(&client, claim.run_id, claim.first_claimed_at, record)
            .await
            .map_err(store_failure)
    }
}

fn store_failure(err: impl std::fmt::Display) -> Failure {
    Failure::new(
        FailureKind::Transient,
        format!("recording the run's steps failed: {err}"),
    )
    .with_code("STORE")
}
