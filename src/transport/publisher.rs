//! Confirmed publishing: a channel in confirm mode, where a publish returns once the broker
//! holds the message durably, or says why it does not.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue took the message: {0}")]
    Unroutable(String),
}

impl PublishError {
    /// Whether the broker was unavailable (a lost channel or connection, a refused message
    /// under pressure), so publishing again may succeed. A message no queue takes is
    /// refused again however often it is retried.
    pub fn is_unavailable(&self) -> bool {
        match self {
            PublishError::Broker(_) | PublishError::Nacked => true,
            PublishError::Unroutable(_) => false,
        }
    }
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
                "{} (exchange {exchange:?}, routing key {routing_key:?}): no work queue is bound; \
                 `appevents migrate` or a starting worker declares it",
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
