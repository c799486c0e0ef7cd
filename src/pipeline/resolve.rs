//! Resolving an event to the workflows it runs: which subscriptions the event's user has for
//! the event's name, with their compiled workflows and opened connections, and the app
//! event's payload check.
//!
//! One indexed query answers it: the name is looked up in `app_event_names`, so an event
//! published under an app event's current name or under one of its aliases (a name from
//! before a rename) resolves the same way. Answers are cached per (user, event name) while a
//! `LISTEN appevents_config` connection is up; triggers notify on every change to app
//! events, workflows, subscriptions and connections, and a notification clears the cache.
//! Without the listener (it is reconnecting) nothing is cached, so an answer is never
//! older than the last notification received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::catalog::connections;
use crate::catalog::workflows::{self, CompiledWorkflow};
use crate::core::connection::Connection;
use crate::core::payload_check::{Mode, PayloadCheck};
use crate::core::provider::Provider;
use crate::observe::errors::report;
use crate::store::db::{self, StoreError};
use crate::store::vault::Keyring;

/// Cached answers kept at most; past this the cache starts over.
const CACHE_CAPACITY: usize = 100_000;

/// One workflow to run for an event.
#[derive(Debug, Clone)]
pub struct Target {
    pub subscription_id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    pub provider: Provider,
    /// `Err` when the stored workflow no longer compiles: its runs fail with that reason.
    pub workflow: Result<Arc<CompiledWorkflow>, String>,
    /// `Err` when the connection's secrets cannot be opened (a missing key).
    pub connection: Result<Arc<Connection>, String>,
}

/// The app event a name resolved to.
#[derive(Debug, Clone)]
pub struct MatchedEvent {
    pub id: Uuid,
    /// Its current name; the event may have been published under an alias.
    pub name: String,
    pub payload_check: PayloadCheck,
}

#[derive(Debug, Clone)]
pub enum Resolution {
    /// No app event has this name or alias.
    UnknownEvent,
    /// The app event exists; this user has none of its workflows on.
    NoSubscription,
    Targets {
        app_event: Arc<MatchedEvent>,
        targets: Arc<[Target]>,
    },
}

impl Resolution {
    pub fn targets(&self) -> &[Target] {
        match self {
            Resolution::Targets { targets, .. } => targets,
            _ => &[],
        }
    }

    /// The app event, when the user has some of its workflows on.
    pub fn app_event(&self) -> Option<&MatchedEvent> {
        match self {
            Resolution::Targets { app_event, .. } => Some(app_event),
            _ => None,
        }
    }
}

pub struct Resolver {
    pool: Pool,
    keyring: Arc<Keyring>,
    cache: Mutex<HashMap<(String, String), Resolution>>,
    /// Compiled workflows by (id, updated_at), shared by every user's answer.
    compiled: Mutex<HashMap<Uuid, (OffsetDateTime, Arc<CompiledWorkflow>)>>,
    generation: AtomicU64,
    listening: AtomicBool,
}

/// The example payload is read only when the payload check is on: with the default (off),
/// the query costs what it did before checks existed.
const RESOLVE: &str = "select e.id, s.id, w.id, w.name, w.provider, w.action, w.options, w.mapping, \
     w.updated_at, c.id, c.user_id, c.provider, c.base_url, c.settings, c.access_token, \
     c.refresh_token, c.token_url, c.client_id, c.client_secret, c.status, c.status_reason, \
     e.name, e.payload_check, case when e.payload_check = 'off' then null else e.schema end, \
     w.steps, w.condition \
     from app_event_names n \
     join app_events e on e.id = n.app_event_id \
     left join workflows w on w.app_event_id = e.id \
     left join subscriptions s on s.workflow_id = w.id and s.user_id = $1 \
     left join connections c on c.id = s.connection_id and c.user_id = $1 \
     where n.name = $2 \
     order by w.created_at";

/// Where the connection's columns start in `RESOLVE`.
const CONNECTION_OFFSET: usize = 9;
/// Where the app event's name, payload check mode and (when checked) example are.
const APP_EVENT_OFFSET: usize = 21;
/// Where a workflow's steps (null for one step) and condition are.
const STEPS_OFFSET: usize = 24;

impl Resolver {
    pub fn new(pool: Pool, keyring: Arc<Keyring>) -> Resolver {
        Resolver {
            pool,
            keyring,
            cache: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    pub async fn resolve(&self, user_id: &str, name: &str) -> Result<Resolution, StoreError> {
        let key = (user_id.to_owned(), name.to_owned());
        if let Some(hit) = lock(&self.cache).get(&key) {
            return Ok(hit.clone());
        }
        let generation = self.generation.load(Ordering::Acquire);
        // Boxed: a miss is rare, and its query's state would otherwise be part of every
        // message's task.
        let resolution = Box::pin(self.query(user_id, name)).await?;
        // Cache only if no notification arrived while the query ran: its answer could
        // predate the change.
        if self.listening.load(Ordering::Acquire)
            && self.generation.load(Ordering::Acquire) == generation
        {
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(key, resolution.clone());
        }
        Ok(resolution)
    }

    /// Incremented by every invalidation: a change notification, or the listener reconnecting.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether answers are being cached (the change listener is up).
    pub fn is_caching(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        lock(&self.cache).clear();
    }

    async fn query(&self, user_id: &str, name: &str) -> Result<Resolution, StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(RESOLVE).await?;
        let rows = client.query(&statement, &[&user_id, &name]).await?;
        if rows.is_empty() {
            return Ok(Resolution::UnknownEvent);
        }
        let mut targets = Vec::new();
        for row in &rows {
            let Some(subscription_id) = row.try_get::<_, Option<Uuid>>(1)? else {
                continue;
            };
            targets.push(self.target(row, subscription_id)?);
        }
        if targets.is_empty() {
            return Ok(Resolution::NoSubscription);
        }
        Ok(Resolution::Targets {
            app_event: Arc::new(matched_event(&rows[0])?),
            targets: targets.into(),
        })
    }

    fn target(
        &self,
        row: &tokio_postgres::Row,
        subscription_id: Uuid,
    ) -> Result<Target, StoreError> {
        let workflow_id: Uuid = row.try_get(2)?;
        let workflow_name: String = row.try_get(3)?;
        let provider: String = row.try_get(4)?;
        let provider: Provider = provider.parse().map_err(StoreError::Invalid)?;
        let updated_at: OffsetDateTime = row.try_get(8)?;
        let workflow = self.compiled_workflow(row, workflow_id, updated_at, provider);
        let connection = match row.try_get::<_, Option<Uuid>>(CONNECTION_OFFSET)? {
            None => Err("the subscription's connection is gone".to_owned()),
            Some(_) => match connections::from_row(row, CONNECTION_OFFSET, &self.keyring) {
                Ok(connection) => Ok(Arc::new(connection)),
                Err(StoreError::Vault(err)) => Err(format!("connection secrets: {err}")),
                Err(err) => return Err(err),
            },
        };
        Ok(Target {
            subscription_id,
            workflow_id,
            workflow_name,
            provider,
            workflow,
            connection,
        })
    }

    fn compiled_workflow(
        &self,
        row: &tokio_postgres::Row,
        id: Uuid,
        updated_at: OffsetDateTime,
        provider: Provider,
    ) -> Result<Arc<CompiledWorkflow>, String> {
        if let Some((version, compiled)) = lock(&self.compiled).get(&id)
            && *version == updated_at
        {
            return Ok(compiled.clone());
        }
        let column = |index| row.try_get(index).map_err(|e| e.to_string());
        let steps = workflows::stored_steps(
            &row.try_get::<_, String>(5).map_err(|e| e.to_string())?,
            &column(6)?,
            &column(7)?,
            row.try_get(STEPS_OFFSET).map_err(|e| e.to_string())?,
        )?;
        let condition: Option<String> = row.try_get(STEPS_OFFSET + 1).map_err(|e| e.to_string())?;
        let compiled = Arc::new(CompiledWorkflow::compile(
            id,
            row.try_get(3).map_err(|e| e.to_string())?,
            provider,
            condition.as_deref(),
            &steps,
        )?);
        lock(&self.compiled).insert(id, (updated_at, compiled.clone()));
        Ok(compiled)
    }

    /// Keeps a LISTEN connection up until `shutdown`, clearing the cache on every
    /// notification and whenever the connection is lost or re-established. `transport` is
    /// built once, by the caller: a reconnect reads nothing from disk (TLS roots).
    pub async fn listen(
        self: Arc<Self>,
        config: tokio_postgres::Config,
        transport: db::Transport,
        shutdown: CancellationToken,
    ) {
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.listen_once(&config, &transport, &shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(error = %report(&err), "configuration listener lost; resolving without cache");
                }
            }
            self.listening.store(false, Ordering::Release);
            self.invalidate();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(
        &self,
        config: &tokio_postgres::Config,
        transport: &db::Transport,
        shutdown: &CancellationToken,
    ) -> Result<(), db::DbError> {
        match transport {
            db::Transport::Plain => {
                let (client, connection) =
                    config.connect(NoTls).await.map_err(db::DbError::Connect)?;
                self.follow(client, connection, shutdown).await
            }
            db::Transport::Tls(tls) => {
                let (client, connection) = config
                    .connect(tls.clone())
                    .await
                    .map_err(db::DbError::Connect)?;
                self.follow(client, connection, shutdown).await
            }
        }
    }

    /// LISTENs on `client` and clears the cache on each notification, until shutdown or
    /// until the connection fails.
    async fn follow<S, T>(
        &self,
        client: tokio_postgres::Client,
        mut connection: tokio_postgres::Connection<S, T>,
        shutdown: &CancellationToken,
    ) -> Result<(), db::DbError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen = client.batch_execute("listen appevents_config");
        tokio::pin!(listen);
        // The connection must be polled for the LISTEN to complete.
        loop {
            tokio::select! {
                done = &mut listen => { done?; break; }
                message = messages.next() => match message {
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(db::DbError::Connect(err)),
                    None => return Err(db::DbError::Url("listener closed".into())),
                },
            }
        }
        // Anything may have changed while no listener was up.
        self.invalidate();
        self.listening.store(true, Ordering::Release);
        tracing::debug!("listening for configuration changes");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(_))) => self.invalidate(),
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(db::DbError::Connect(err)),
                    None => return Err(db::DbError::Url("listener closed".into())),
                },
            }
        }
    }
}

/// The app event's columns, the same on every row.
fn matched_event(row: &tokio_postgres::Row) -> Result<MatchedEvent, StoreError> {
    let mode: String = row.try_get(APP_EVENT_OFFSET + 1)?;
    let mode: Mode = mode.parse().map_err(StoreError::Invalid)?;
    let example: Option<serde_json::Value> = row.try_get(APP_EVENT_OFFSET + 2)?;
    Ok(MatchedEvent {
        id: row.try_get(0)?,
        name: row.try_get(APP_EVENT_OFFSET)?,
        payload_check: PayloadCheck::new(mode, example.as_ref()),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
