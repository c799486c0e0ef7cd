//! Publishing events, as the command line and the HTTP ingest do: validated against the
//! contract before they leave, published persistent and mandatory, confirmed by the broker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lapin::Connection;
use serde_json::{Map, Value, json};

use crate::config::Settings;
use crate::core::event::{self, Invalid, Limits, MessageMeta};
use crate::transport::broker::{self, Recovery};
use crate::transport::publisher::{self, PublishError, Publisher};

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
    /// Connects and checks that the exchange exists. A publisher declares nothing: the work
    /// queue and its binding are the consumers' (`appevents migrate` and every starting
    /// worker declare them), so a mistyped virtual host or exchange fails here, or as
    /// unroutable when no queue is bound, instead of stranding events in a queue no worker
    /// reads.
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
        channel
            .exchange_declare(
                settings.amqp.exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                // Passive: only whether it exists; a missing exchange closes the channel.
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..lapin::options::ExchangeDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "checked".into()).await;
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
                publisher::event_properties(&id),
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
    event::parse(&bytes, &meta, limits)?;
    Ok((id, bytes))
}

/// Why [`SharedPublisher::publish`] did not publish an event.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("invalid event: {0}")]
    Invalid(Invalid),
    /// The broker is unreachable or did not take the event; the text says which.
    #[error("{0}")]
    Unavailable(String),
}

/// One publisher shared by everyone who publishes through it (HTTP ingest): connected on
/// first use, connected again after a failure. No lock is held while connecting: callers
/// wait for the connect under way rather than each starting one, and while the broker is
/// known to be down they are refused at once, a reconnect (at most one a second) going on
/// in the background.
pub struct SharedPublisher {
    settings: Settings,
    link: Arc<Mutex<Link>>,
}

/// The connection's state; only touched in short critical sections, never across an await.
#[derive(Default)]
struct Link {
    publisher: Option<Arc<EventPublisher>>,
    /// The connect under way, if any.
    connecting: Option<Connecting>,
    /// When the last connect failed: the broker is down until one succeeds.
    last_failure: Option<Instant>,
}

/// A connect under way, awaited by every caller that needs it.
type Connecting = Shared<BoxFuture<'static, Result<Arc<EventPublisher>, String>>>;

impl SharedPublisher {
    pub fn new(settings: Settings) -> SharedPublisher {
        SharedPublisher {
            settings,
            link: Arc::default(),
        }
    }

    /// The connected publisher, connecting if there is none.
    pub async fn publisher(&self) -> Result<Arc<EventPublisher>, SendError> {
        let connecting = {
            let mut link = lock(&self.link);
            if let Some(publisher) = link.publisher.as_ref().filter(|p| p.is_connected()) {
                return Ok(publisher.clone());
            }
            let down = link.last_failure;
            if down.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return Err(unavailable("the broker is unavailable"));
            }
            let connecting = match &link.connecting {
                Some(connecting) => connecting.clone(),
                None => link.connecting.insert(self.connect()).clone(),
            };
            if down.is_some() {
                return Err(unavailable("the broker is unavailable"));
            }
            connecting
        };
        connecting.await.map_err(SendError::Unavailable)
    }

    /// Starts a connect in its own task, which records its outcome in the link (after the
    /// caller, who holds the link's lock, has put it in place) whether or not anyone waits.
    fn connect(&self) -> Connecting {
        let settings = self.settings.clone();
        let link = self.link.clone();
        let task = tokio::spawn(async move {
            let connect = EventPublisher::connect(&settings, Recovery::None);
            let result = match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(publisher)) => Ok(Arc::new(publisher)),
                Ok(Err(err)) => Err(format!("the broker is unavailable: {err}")),
                Err(_) => Err("the broker did not answer within 5s".to_owned()),
            };
            let mut link = lock(&link);
            link.connecting = None;
            match &result {
                Ok(publisher) => {
                    link.publisher = Some(publisher.clone());
                    link.last_failure = None;
                }
                Err(_) => link.last_failure = Some(Instant::now()),
            }
            result
        });
        async move {
            task.await
                .unwrap_or_else(|err| Err(format!("the broker is unavailable: {err}")))
        }
        .boxed()
        .shared()
    }

    /// Publishes one event and waits for the broker's confirm. Returns the event id.
    pub async fn publish(&self, event: &NewEvent) -> Result<String, SendError> {
        let publisher = self.publisher().await?;
        match publisher.publish(event).await {
            Ok(id) => Ok(id),
            Err(PublishFailure::Invalid(invalid)) => Err(SendError::Invalid(invalid)),
            Err(PublishFailure::Broker(err)) => {
                // Forget the connection, unless another caller already replaced it: the
                // next request makes a new one.
                let mut link = lock(&self.link);
                if link
                    .publisher
                    .as_ref()
                    .is_some_and(|current| Arc::ptr_eq(current, &publisher))
                {
                    link.publisher = None;
                }
                Err(unavailable(&format!(
                    "the broker did not take the event: {err}"
                )))
            }
        }
    }

    /// The connection's state, for readiness; `None` while there is no connection.
    pub fn status(&self) -> Option<lapin::ConnectionStatus> {
        lock(&self.link).publisher.as_ref().map(|p| p.status())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unavailable(message: &str) -> SendError {
    SendError::Unavailable(message.to_owned())
}
