//! The topology every process declares (names from `[amqp]`):
//! - `app_events`: durable topic exchange producers publish to, routing key = event name;
//! - `appevents.work`: durable quorum queue bound with `#`, what workers consume;
//! - `appevents.work.retry.<delay>`: one durable quorum queue per delay of the retry
//!   schedule, whose message TTL dead-letters messages back into the work queue;
//! - `appevents.work.held`: durable quorum queue where a message whose run another worker
//!   holds waits what is left of that worker's lease (each message's own expiration), then
//!   goes back to the work queue;
//! - `appevents.dead`: durable classic queue of what could not be processed.
//!
//! On a cluster the quorum queues have a replica on every node; the classic dead-letter queue
//! lives on one node, and while that node is down the rest is declared and used without it.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::AmqpSettings;

#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_queue: String,
    /// Where a held run's message waits for its holder's lease to lapse.
    pub held_queue: String,
    /// (delay, queue name), ascending.
    pub retry_queues: Vec<(Duration, String)>,
    pub delivery_limit: u32,
}

/// The distinct delays of a retry schedule, ascending: one retry queue each.
pub fn retry_delays(schedule: &[Duration]) -> Vec<Duration> {
    let mut delays = schedule.to_vec();
    delays.sort();
    delays.dedup();
    delays
}

impl Topology {
    /// The names from `[amqp]`, and a retry queue per distinct delay of `retry_schedule`.
    pub fn new(amqp: &AmqpSettings, retry_schedule: &[Duration]) -> Topology {
        let retry_queues = retry_delays(retry_schedule)
            .into_iter()
            .map(|delay| (delay, retry_queue_name(&amqp.queue, delay)))
            .collect();
        Topology {
            exchange: amqp.exchange.clone(),
            queue: amqp.queue.clone(),
            dead_letter_queue: amqp.dead_letter_queue.clone(),
            held_queue: format!("{}.held", amqp.queue),
            retry_queues,
            delivery_limit: amqp.delivery_limit,
        }
    }

    pub fn retry_queue(&self, delay: Duration) -> Option<&str> {
        self.retry_queues
            .iter()
            .find(|(d, _)| *d == delay)
            .map(|(_, name)| name.as_str())
    }

    /// Declares everything; idempotent, so every process does it at start-up. A dead-letter
    /// queue whose cluster node is down is left as it is: the work goes on without it.
    pub async fn declare(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        self.declare_work(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        // A channel of its own: the broker closes the channel of a failed declaration.
        let channel = connection.create_channel().await?;
        // A classic queue: operators browse, replay and purge it by taking messages and
        // handing the rest back, and only a classic queue puts handed-back messages back in
        // their place (a quorum queue reorders them, and counts each browse as a delivery).
        // Its traffic is small; its messages are persistent.
        match declare_queue(&channel, &self.dead_letter_queue, FieldTable::default()).await {
            Ok(()) => {
                let _ = channel.close(200, "declared".into()).await;
                Ok(())
            }
            Err(err) if home_node_down(&err) => {
                tracing::warn!(queue = %self.dead_letter_queue, error = %err, "the dead-letter queue's node is down; going on without it");
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    async fn declare_work(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                // Durable: the exchange survives a broker restart with its bindings.
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut work = quorum();
        // Broker-side poison backstop: after this many deliveries the queue dead-letters
        // the message to the dead-letter queue itself (the worker's own check fires first).
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        dead_letter_to(&mut work, &self.dead_letter_queue);
        declare_queue(channel, &self.queue, work).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                // Every event name: the worker resolves names itself, and an unknown name is
                // counted, not lost in the exchange.
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Each message carries its own expiration (what is left of a lease, at most one
        // lease): a later message's shorter wait can be held up behind an earlier one's by
        // no more than that.
        let mut held = quorum();
        dead_letter_to(&mut held, &self.queue);
        declare_queue(channel, &self.held_queue, held).await?;
        for (delay, name) in &self.retry_queues {
            let mut args = quorum();
            // Every message in this queue waits the same time, so expiry order is queue
            // order and the head is always the next to go back.
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            dead_letter_to(&mut args, &self.queue);
            declare_queue(channel, name, args).await?;
        }
        Ok(())
    }
}

/// The broker's answer to declaring a classic queue whose cluster node is down.
fn home_node_down(err: &lapin::Error) -> bool {
    let text = err.to_string();
    text.contains("NOT_FOUND") && text.contains("is down or inaccessible")
}

/// `appevents.work.retry.10s`, `…retry.5m`: named by delay, so a changed schedule adds
/// queues instead of colliding with the arguments of existing ones.
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    let secs = delay.as_secs();
    let label = if delay.subsec_millis() != 0 || secs == 0 {
        format!("{}ms", delay.as_millis())
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    };
    format!("{queue}.retry.{label}")
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum queues replicate across the cluster and confirm only what a majority stored.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Messages this queue dead-letters (delivery limit, TTL) go to `target` through the
/// default exchange, at least once: RabbitMQ keeps them until the target confirms, which
/// needs `reject-publish` overflow.
fn dead_letter_to(args: &mut FieldTable, target: &str) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(target.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            // Durable: survives a broker restart (quorum queues are always durable).
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queues_are_named_by_their_delay() {
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(10)),
            "q.retry.10s"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(300)),
            "q.retry.5m"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(7200)),
            "q.retry.2h"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_millis(50)),
            "q.retry.50ms"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_millis(1500)),
            "q.retry.1500ms"
        );
    }
}
