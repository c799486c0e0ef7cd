//! A run's record sent in a batch call: the run joins its connection's open batch of the
//! action (`provider_batch`); the batch's first run waits for the runs on their way (the
//! window at most), takes one call of the account's budget, sends, and hands each run its
//! record's answer.

use std::time::Instant;

use tokio::sync::oneshot;

use crate::core::connection::Connection;
use crate::core::failure::Failure;
use crate::integrations::batch_api::{self, BatchKind, BatchRecord, RecordAnswer};
use crate::observe::metrics::label;
use crate::pipeline::context::Context;
use crate::pipeline::provider_batch::{Coming, Ridden, Rider, Seat};

impl Context {
    /// Sends the run's record in a batch with others of its connection and action, and
    /// returns what the batch said of it. `paid`: the run's ticket took a call of budget,
    /// which then pays for the batch's call if it leads it.
    pub(super) async fn ride(
        &self,
        kind: BatchKind,
        connection: &Connection,
        record: BatchRecord,
        paid: bool,
        coming: Option<Coming>,
    ) -> Ridden {
        let (answer, answered) = oneshot::channel();
        let key = (connection.id, kind);
        match self.batches.join(key.clone(), record, answer, coming) {
            Seat::Follower => {}
            Seat::Alone => return Ridden::Answer(RecordAnswer::Alone),
            Seat::Leader {
                id,
                riders,
                full,
                wait,
            } => {
                let riders = self.batches.gather(&key, id, &riders, &full, wait).await;
                self.send_batch(&key.1, connection, riders, paid).await;
            }
        }
        // An error: the leader's run ended before answering (its run timed out). Nothing
        // says the record was written, and it is tried again.
        answered
            .await
            .unwrap_or(Ridden::Answer(RecordAnswer::Unanswered))
    }

    async fn send_batch(
        &self,
        kind: &BatchKind,
        connection: &Connection,
        riders: Vec<Rider>,
        paid: bool,
    ) {
        let provider = kind.provider();
        self.metrics
            .batch_records
            .get_or_create(&label("action", kind.name()))
            .observe(riders.len() as f64);
        if !paid && let Err(delay) = self.throttle.take_call(connection.id, provider).await {
            fail_all(riders, &Failure::throttled(delay));
            return;
        }
        let records: Vec<&BatchRecord> = riders.iter().map(|r| &r.record).collect();
        let request = batch_api::request(&self.integrations.salesforce, kind, connection, &records);
        let started = Instant::now();
        let response = self.integrations.send_raw(&request, provider).await;
        self.answered(
            provider,
            started,
            response.as_ref().is_ok_and(|r| r.is_success()),
        );
        let answers = response.and_then(|response| batch_api::answers(kind, &response, &records));
        match answers {
            Ok(answers) => {
                let unanswered = answers
                    .iter()
                    .filter(|a| **a == RecordAnswer::Unanswered)
                    .count();
                if unanswered > 0 {
                    tracing::warn!(
                        unanswered,
                        records = riders.len(),
                        "the batch's answer says nothing of some records; they are tried again"
                    );
                }
                for (rider, answer) in riders.into_iter().zip(answers) {
                    let _ = rider.answer.send(Ridden::Answer(answer));
                }
            }
            Err(failure) => fail_all(riders, &failure),
        }
    }
}

/// The whole batch failed as one call would have: every run gets the failure.
fn fail_all(riders: Vec<Rider>, failure: &Failure) {
    for rider in riders {
        let _ = rider.answer.send(Ridden::Failed(failure.clone()));
    }
}
