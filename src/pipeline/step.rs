//! Executing one claimed run's step: the mapping rendered, the provider called with quick
//! in-process retries, and on expired credentials one token refresh and the call again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::catalog::workflows::CompiledWorkflow;
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::event::Event;
use crate::core::failure::{Failure, FailureKind};
use crate::integrations::StepOutput;
use crate::observe::metrics::label;
use crate::pipeline::context::Context;
use crate::pipeline::resolve::Target;

impl Context {
    /// Runs the target's step for the event. Returns its result and the provider calls
    /// made, within `worker.run_timeout`.
    pub(crate) async fn run_step(
        &self,
        target: &Target,
        event: &Event,
    ) -> (Result<StepOutput, Failure>, u32) {
        let calls = AtomicU32::new(0);
        let run_timeout = self.run_timeout;
        let result = tokio::time::timeout(run_timeout, self.execute(target, event, &calls))
            .await
            .unwrap_or_else(|_| {
                Err(Failure::new(
                    FailureKind::Transient,
                    format!("run timed out after {run_timeout:?}"),
                )
                .with_code("TIMEOUT"))
            });
        (result, calls.into_inner())
    }

    async fn execute(
        &self,
        target: &Target,
        event: &Event,
        calls: &AtomicU32,
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
        let body = workflow.mapping.render(event);
        let current = Mutex::new(connection.clone());
        let (result, _tries) = self
            .policy
            .run_in_process(|| self.try_step(workflow, &current, &body, event, calls))
            .await;
        result
    }

    /// One in-process try: the step, and on expired credentials a refresh and the step again.
    async fn try_step(
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
            .integrations
            .execute(&workflow.action, connection, body.clone(), event)
            .await;
        self.metrics
            .step_seconds
            .get_or_create(&label("provider", workflow.provider.as_str()))
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
