//! RabbitMQ: connections, the topology every process declares, confirmed publishing and the
//! headers appevents adds to messages.
//!
//! Topology (names from `[amqp]`):
//! - `app_events`: durable topic exchange producers publish to, routing key = event name;
//! - `appevents.work`: durable quorum queue bound with `#`, what workers consume;
//! - `appevents.work.retry.<delay>`: one durable quorum queue per delay of the retry
//!   schedule, whose message TTL dead-letters messages back into the work queue;
//! - `appevents.dead`: durable classic queue of what could not be processed.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpSettings;
use crate::retry::RetryPolicy;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue took the message: {0}")]
    Unroutable(String),
}

/// Whether a connection reconnects by itself. Long-running processes recover; one-shot
/// commands fail fast with a clear message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Automatic,
    None,
}

pub async fn connect(
    url: &str,
    tls_ca_file: &str,
    name: &str,
    recovery: Recovery,
) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let properties = match recovery {
        // lapin redials with this backoff and replays exchanges, queues, bindings, qos and
        // consumers; forever, because a worker should outlive any broker outage.
        Recovery::Automatic => properties
            .enable_auto_recover()
            .configure_backoff(|backoff| {
                backoff
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(usize::MAX)
                    .with_jitter()
            }),
        Recovery::None => properties,
    };
    // For amqps://, the broker's certificate is verified against the platform's trust store
    // plus these extra roots; a plain amqp:// URL ignores them.
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: if tls_ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read_to_string(tls_ca_file).map_err(|err| {
                std::io::Error::new(err.kind(), format!("amqp.tls_ca_file {tls_ca_file}: {err}"))
            })?;
            Some(pem)
        },
    };
    Connection::connect_with_config(url, properties, tls, lapin::runtime::default_runtime()?).await
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_queue: String,
    /// (delay, queue name), ascending.
    pub retry_queues: Vec<(Duration, String)>,
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(amqp: &AmqpSettings, retry: &RetryPolicy) -> Topology {
        let retry_queues = retry
            .queue_delays()
            .into_iter()
            .map(|delay| (delay, retry_queue_name(&amqp.queue, delay)))
            .collect();
        Topology {
            exchange: amqp.exchange.clone(),
            queue: amqp.queue.clone(),
            dead_letter_queue: amqp.dead_letter_queue.clone(),
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

    /// Declares everything; idempotent, so every process does it at start-up.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
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
        // A classic queue: operators browse, replay and purge it by taking messages and
        // handing the rest back, and only a classic queue puts handed-back messages back in
        // their place (a quorum queue reorders them, and counts each browse as a delivery).
        // Its traffic is small; its messages are persistent.
        declare_queue(channel, &self.dead_letter_queue, FieldTable::default()).await?;
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

/// A channel in confirm mode: every publish waits for the broker's confirm.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Publisher, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits until the broker has the message durably (quorum majority).
    /// `mandatory`: a message no queue takes comes back and is an error, never lost silently.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(PublishError::Nacked);
        }
        if let Some(returned) = confirm.take_message() {
            return Err(PublishError::Unroutable(format!(
                "{} (exchange {exchange:?}, routing key {routing_key:?})",
                returned.reply_text
            )));
        }
        Ok(())
    }
}

/// Properties of an event message as the contract requires.
pub fn event_properties(event_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        // Persistent: written to disk, survives a broker restart.
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
}

/// Names of the headers appevents adds to messages it republishes.
pub mod header {
    /// Broker-level retries done so far (0 or absent on a first delivery).
    pub const ATTEMPT: &str = "x-appevents-attempt";
    /// Only these workflows (ids) run for this message: a retry or a replay.
    pub const WORKFLOWS: &str = "x-appevents-workflows";
    /// Set on replays from the dead-letter queue: dead runs may run again.
    pub const REPLAY: &str = "x-appevents-replay";
    /// Set by quorum queues on redelivery.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";

    pub const REASON: &str = "x-appevents-reason";
    pub const REASON_CODE: &str = "x-appevents-reason-code";
    pub const EVENT_ID: &str = "x-appevents-event-id";
    pub const EVENT_NAME: &str = "x-appevents-event-name";
    pub const USER_ID: &str = "x-appevents-user-id";
    pub const WORKFLOW_ID: &str = "x-appevents-workflow-id";
    pub const ATTEMPTS: &str = "x-appevents-attempts";
    pub const ERROR_KIND: &str = "x-appevents-error-kind";
    pub const ERROR_STATUS: &str = "x-appevents-error-status";
    pub const ERROR_CODE: &str = "x-appevents-error-code";
    pub const ERROR_MESSAGE: &str = "x-appevents-error-message";
    pub const DEAD_LETTERED_AT: &str = "x-appevents-dead-lettered-at";
    pub const RETRY_AT: &str = "x-appevents-retry-at";
}

/// Typed reads and writes of header values, tolerant of the many integer types clients use.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    let value = headers?.inner().get(key)?;
    match value {
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        other => integer(other),
    }
}

/// The value when it is an AMQP integer of any width, and nothing else: no strings, no
/// timestamps. Clients pick different widths for the same number, so all of them count.
pub fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// The text of a string value (long or short); `None` for anything else or for bytes that
/// are not UTF-8.
pub fn text(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

pub fn set_int(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

pub fn set_bool(table: &mut FieldTable, key: &str, value: bool) {
    table.insert(ShortString::from(key), AMQPValue::Boolean(value));
}

pub fn set_strings(table: &mut FieldTable, key: &str, values: &[String]) {
    let items: Vec<AMQPValue> = values
        .iter()
        .map(|v| AMQPValue::LongString(LongString::from(v.as_str())))
        .collect();
    table.insert(
        ShortString::from(key),
        AMQPValue::FieldArray(FieldArray::from(items)),
    );
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

    #[test]
    fn headers_read_back_what_was_written() {
        let mut table = FieldTable::default();
        set_str(&mut table, "s", "v");
        set_int(&mut table, "i", 3);
        set_bool(&mut table, "b", true);
        set_strings(&mut table, "a", &["x".to_owned(), "y".to_owned()]);
        let t = Some(&table);
        let value = |key: &str| table.inner().get(key);
        assert_eq!(header_str(t, "s").as_deref(), Some("v"));
        assert_eq!(header_int(t, "i"), Some(3));
        assert_eq!(value("b"), Some(&AMQPValue::Boolean(true)));
        let items: Vec<Option<&str>> = match value("a") {
            Some(AMQPValue::FieldArray(items)) => items.as_slice().iter().map(text).collect(),
            other => panic!("not an array: {other:?}"),
        };
        assert_eq!(items, [Some("x"), Some("y")]);
        assert_eq!(header_str(t, "missing"), None);
        assert_eq!(header_int(t, "s"), None);
    }

    #[test]
    fn integers_of_every_width_count_and_nothing_else_does() {
        for value in [
            AMQPValue::ShortShortInt(7),
            AMQPValue::ShortShortUInt(7),
            AMQPValue::ShortInt(7),
            AMQPValue::ShortUInt(7),
            AMQPValue::LongInt(7),
            AMQPValue::LongUInt(7),
            AMQPValue::LongLongInt(7),
        ] {
            assert_eq!(integer(&value), Some(7), "{value:?}");
        }
        for value in [
            AMQPValue::LongString("7".into()),
            AMQPValue::Timestamp(7),
            AMQPValue::Double(7.0),
            AMQPValue::Boolean(true),
            AMQPValue::Void,
        ] {
            assert_eq!(integer(&value), None, "{value:?}");
        }
    }
}
