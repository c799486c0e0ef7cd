//! The consume loop: broker sessions, one after another until shutdown, each consuming the
//! work queue with bounded concurrency and acknowledging a message only once it is settled.
//!
//! On shutdown it stops taking new messages, lets in-flight ones finish within the grace
//! period, and hands the rest back to the queue.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Settings;
use crate::observe::errors::{report, report_any};
use crate::observe::metrics::label;
use crate::pipeline::context::{Context, Session};
use crate::pipeline::settle::Unsettled;
use crate::transport::acks::Acks;
use crate::transport::broker::{self, Recovery};
use crate::transport::publisher::Publisher;

/// Consumes until `stop`, reconnecting with backoff whenever a broker session ends. `abort`
/// hands in-flight messages back (at the end of the grace period).
pub async fn consume(
    context: &Arc<Context>,
    settings: &Settings,
    stop: &CancellationToken,
    abort: &CancellationToken,
) {
    const FIRST_DELAY: Duration = Duration::from_millis(200);
    let mut delay = FIRST_DELAY;
    while !stop.is_cancelled() {
        let mut consumed = false;
        match session(context, settings, stop, abort, &mut consumed).await {
            Ok(()) => break,
            Err(err) => {
                context.health.set_broker(None);
                context.metrics.consumer_connected.set(0);
                // A session that consumed lost a working connection (its node stopped, say):
                // the next one starts after the shortest delay, with the first node that
                // answers. Only failures to connect back off further.
                if consumed {
                    delay = FIRST_DELAY;
                }
                tracing::error!(error = %report_any(&err), retry_in = ?delay, "broker session ended; reconnecting");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One broker session: consume until `stop`, or until the connection fails beyond recovery.
async fn session(
    context: &Arc<Context>,
    settings: &Settings,
    stop: &CancellationToken,
    abort: &CancellationToken,
    consumed: &mut bool,
) -> anyhow::Result<()> {
    let name = format!("appevents worker {}", std::process::id());
    let connection = broker::connect(
        settings.amqp_url(),
        &settings.amqp.tls_ca_file,
        &name,
        Recovery::Automatic,
    )
    .await
    .map_err(|err| anyhow::anyhow!(broker::connect_failure(settings.amqp_url(), &err)))?;
    context.topology.declare(&connection).await?;
    let channel = connection.create_channel().await?;
    // The broker hands at most `prefetch` unacknowledged messages to this worker: the bound
    // on what it holds in memory.
    channel
        .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(&connection).await?;
    let session = Arc::new(Session {
        context: context.clone(),
        publisher,
    });
    let tag = format!("appevents-{}", Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            context.topology.queue.as_str().into(),
            tag.as_str().into(),
            // Manual acknowledgements: a message is acknowledged only once settled.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    context.health.set_broker(Some(connection.status().clone()));
    context.metrics.consumer_connected.set(1);
    *consumed = true;

    let session_abort = abort.child_token();
    // Acknowledgements go out coalesced, beside the consumer, until every task has finished.
    let acks = Acks::new();
    let acks_stop = CancellationToken::new();
    let acking = tokio::spawn({
        let acks = acks.clone();
        let stop = acks_stop.clone();
        async move { acks.run(stop).await }
    });
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
                acks.received(delivery.delivery_tag, &delivery.acker);
                let session = session.clone();
                let abort = session_abort.clone();
                let acks = acks.clone();
                // Boxed: the delivery (its properties are most of it) is then moved from
                // future to future as a pointer, not copied into each.
                let delivery = Box::new(delivery);
                tasks.spawn(async move {
                    session.handle(delivery, &acks, &abort).await;
                    drop(permit);
                });
            }
            Some(Err(err)) => {
                context.metrics.consumer_connected.set(0);
                tracing::warn!(error = %report(&err), "broker connection lost; waiting for recovery");
                if let Err(err) = channel.wait_for_recovery(err).await {
                    break Err(anyhow::Error::from(err));
                }
                tracing::info!("broker connection recovered; consuming again");
                context.metrics.consumer_connected.set(1);
            }
            None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
        }
    };
    // Stop taking new messages; prefetched ones not yet started go back when the channel
    // closes.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    context.metrics.consumer_connected.set(0);
    // Tasks that finished but were not collected yet are not in flight.
    while tasks.try_join_next().is_some() {}
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
    acks_stop.cancel();
    let _ = acking.await;
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    result
}

impl Session {
    /// Processes a delivery and, once it is settled, hands its tag to the acknowledger
    /// ([`Acks`], which acknowledges it with others, and logs a failed acknowledgement on its
    /// own). Everything it logs is in the event's span; the span is never entered across an
    /// await, where it would become the span of whatever else that thread runs.
    async fn handle(&self, delivery: Box<Delivery>, acks: &Acks, abort: &CancellationToken) {
        let span = tracing::info_span!(
            "event",
            event_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            event_name = tracing::field::Empty
        );
        self.handle_in_span(delivery, acks, abort)
            .instrument(span)
            .await;
    }

    async fn handle_in_span(
        &self,
        delivery: Box<Delivery>,
        acks: &Acks,
        abort: &CancellationToken,
    ) {
        let metrics = &self.context.metrics;
        metrics.events_in_flight.inc();
        let result =
            AssertUnwindSafe(self.try_execute(&delivery.data, &delivery.properties, abort))
                .catch_unwind()
                .await;
        metrics.events_in_flight.dec();
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Err(_panic) => {
                // A bug met this message. Hand it back: its delivery count grows with each
                // try, and past worker.max_deliveries it is dead-lettered as poison.
                tracing::error!("processing panicked; the message goes back to the queue");
                hand_back(&delivery, acks).await;
                return;
            }
            Ok(Err(Unsettled::Shutdown)) => {
                tracing::info!(
                    "shutting down before the event was settled; it goes back to the queue"
                );
                return;
            }
            Ok(Err(Unsettled::HandBack(reason))) => {
                tracing::warn!(%reason, "the event cannot be settled now; handed back to the broker");
                hand_back(&delivery, acks).await;
                return;
            }
        };
        metrics
            .events
            .get_or_create(&label("outcome", outcome.label()))
            .inc();
        acks.settled(delivery.delivery_tag, delivery.acker);
    }
}

/// Nacks a delivery for the broker to requeue, then releases its tag, so that nothing
/// acknowledges it and the messages settled after it are no longer held back. The nack is
/// boxed: it is rare, and its state would otherwise be part of every message's task.
async fn hand_back(delivery: &Delivery, acks: &Acks) {
    let nack = delivery.acker.nack(BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    });
    let _ = Box::pin(nack).await;
    acks.released(delivery.delivery_tag, &delivery.acker);
}
