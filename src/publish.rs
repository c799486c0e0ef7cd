//! Publishing events, as the command line and the HTTP ingest do: validated against the
//! contract before they leave, published persistent and mandatory, confirmed by the broker.

use lapin::Connection;
use serde_json::{Map, Value, json};

use crate::broker::{self, PublishError, Publisher, Recovery, Topology};
use crate::config::Settings;
use crate::envelope::{self, Invalid, Limits, MessageMeta};
use crate::retry::RetryPolicy;

/// An event to publish; without an id, one is assigned (a UUIDv7, time-ordered).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Option<String>,
    pub name: String,
    pub user_id: String,
    pub payload: Value,
    pub occurred_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("invalid event: {0}")]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Broker(#[from] PublishError),
}

pub struct EventPublisher {
    connection: Connection,
    publisher: Publisher,
    exchange: String,
    limits: Limits,
}

impl EventPublisher {
    /// Connects and declares the topology, so events published before any worker ever ran
    /// are queued, not dropped by a missing exchange.
    pub async fn connect(
        settings: &Settings,
        recovery: Recovery,
    ) -> Result<EventPublisher, lapin::Error> {
        let name = format!("appevents publisher {}", std::process::id());
        let connection = broker::connect(
            settings.amqp_url(),
            &settings.amqp.tls_ca_file,
            &name,
            recovery,
        )
        .await?;
        let channel = connection.create_channel().await?;
        Topology::new(&settings.amqp, &RetryPolicy::from(&settings.retry))
            .declare(&channel)
            .await?;
        let _ = channel.close(200, "declared".into()).await;
        let publisher = Publisher::open(&connection).await?;
        Ok(EventPublisher {
            connection,
            publisher,
            exchange: settings.amqp.exchange.clone(),
            limits: Limits {
                max_bytes: settings.worker.max_message_bytes,
                max_depth: settings.worker.max_json_depth,
            },
        })
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// The connection's state, for readiness.
    pub fn status(&self) -> lapin::ConnectionStatus {
        self.connection.status().clone()
    }

    /// Builds the message body, checks it as a worker would, publishes and waits for the
    /// broker's confirm. Returns the event id.
    pub async fn publish(&self, event: &NewEvent) -> Result<String, PublishFailure> {
        let (id, body) = encode(event, self.limits)?;
        self.publisher
            .publish(
                &self.exchange,
                &event.name,
                &body,
                broker::event_properties(&id),
            )
            .await?;
        Ok(id)
    }

    /// Publishes a body exactly as given, unchecked: a testing tool for what careless
    /// producers send.
    pub async fn publish_unchecked(
        &self,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publisher
            .publish(&self.exchange, routing_key, body, properties)
            .await
    }

    pub async fn close(&self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// The body of an event as the contract describes it, validated with the worker's own parser.
pub fn encode(event: &NewEvent, limits: Limits) -> Result<(String, Vec<u8>), Invalid> {
    let id = event
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let mut body = Map::new();
    body.insert("id".into(), json!(id));
    body.insert("name".into(), json!(event.name));
    body.insert("user_id".into(), json!(event.user_id));
    body.insert("payload".into(), event.payload.clone());
    if let Some(at) = &event.occurred_at {
        body.insert("occurred_at".into(), json!(at));
    }
    let bytes =
        serde_json::to_vec(&Value::Object(body)).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let meta = MessageMeta {
        content_type: Some("application/json"),
        message_id: Some(&id),
    };
    envelope::parse(&bytes, &meta, limits)?;
    Ok((id, bytes))
}
