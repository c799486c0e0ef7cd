//! What every integration test starts from: its own database (random name, migrated), its
//! own exchange and queues, a worker running in-process on them, and helpers to publish,
//! wait and look. Real RabbitMQ and Postgres; fakes (wiremock, the stand-in) only for the
//! CRMs.

#![allow(dead_code)]

pub mod browser;
pub mod console;
pub mod portal;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appevents::catalog::connections::NewConnection;
use appevents::catalog::workflows::{NewWorkflow, Workflow};
use appevents::catalog::{
    app_events as app_event, connections as connection, subscriptions as subscription,
    workflows as workflow,
};
use appevents::config::Settings;
use appevents::core::provider::Provider;
use appevents::interfaces::worker;
use appevents::pipeline::context::Context;
use appevents::pipeline::runs::{Run, RunFilter, RunStatus};
use appevents::store::db;
use appevents::store::vault::Keyring;
use appevents::transport::broker::{self, Recovery};
use appevents::transport::publish::{EventPublisher, NewEvent};
use appevents::transport::topology::Topology;
use deadpool_postgres::Pool;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A fixed key for tests: base64 of 32 bytes.
pub const TEST_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktdGVzdCE=";

pub fn database_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings for one test: unique names everywhere, schedules shrunk to milliseconds.
pub fn test_settings(tag: &str) -> Settings {
    let mut settings = Settings::defaults().expect("default settings");
    let mut db_config = db::pg_config(&database_base_url()).expect("database url");
    db_config.dbname(format!("appevents_test_{tag}"));
    settings.database.url = SecretString::from(pg_url(&db_config));
    settings.database.pool_size = 8;
    settings.amqp.url = SecretString::from(amqp_url());
    settings.amqp.exchange = format!("test.{tag}.events");
    settings.amqp.queue = format!("test.{tag}.work");
    settings.amqp.dead_letter_queue = format!("test.{tag}.dead");
    settings.amqp.prefetch = 32;
    settings.worker.concurrency = 16;
    settings.worker.ops_listen = "127.0.0.1:0".into();
    settings.worker.claim_lease = Duration::from_secs(5);
    settings.worker.shutdown_grace = Duration::from_secs(10);
    settings.retry.in_process_tries = 3;
    settings.retry.min_delay = Duration::from_millis(10);
    settings.retry.max_delay = Duration::from_millis(50);
    settings.retry.max_in_process_wait = Duration::from_secs(2);
    settings.retry.schedule = vec![Duration::from_millis(200), Duration::from_millis(400)];
    settings.retry.rate_limited_min_delay = Duration::from_millis(400);
    // Tests of other behaviours send bursts to fakes that report no limit: HubSpot's
    // configured default would pace them. The rate-limit tests set the limits they test.
    settings.rate_limits.hubspot = "none".into();
    settings.http.timeout = Duration::from_secs(3);
    settings.http.allow = vec!["127.0.0.1".into()];
    settings.server.listen = "127.0.0.1:0".into();
    settings.server.api_keys = vec![
        SecretString::from("test-key-1"),
        SecretString::from("test-key-2"),
    ];
    settings.secrets.active_key = "test".into();
    settings.secrets.keys = BTreeMap::from([("test".to_owned(), SecretString::from(TEST_KEY))]);
    settings
}

/// A libpq-style URL for a config (user, host, port, dbname).
pub fn pg_url(config: &tokio_postgres::Config) -> String {
    let user = config.get_user().unwrap_or("postgres");
    let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) => (host.clone(), *port),
        _ => ("127.0.0.1".to_owned(), 5432),
    };
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{user}{password}@{host}:{port}/{}",
        config.get_dbname().unwrap_or("postgres")
    )
}

pub struct TestApp {
    pub tag: String,
    pub settings: Settings,
    pub pool: Pool,
    pub keyring: Arc<Keyring>,
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    worker: Option<WorkerHandle>,
}

pub struct WorkerHandle {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub context: Arc<Context>,
    pub ops_addr: std::net::SocketAddr,
}

impl TestApp {
    /// A migrated database and declared topology, no worker yet.
    pub async fn new() -> TestApp {
        Self::with_settings(|_| {}).await
    }

    pub async fn with_settings(adjust: impl FnOnce(&mut Settings)) -> TestApp {
        // What the binary's main does at process start; the worker's HTTP clients need it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut settings = test_settings(&tag);
        adjust(&mut settings);
        db::ensure_database(&settings.database)
            .await
            .expect("create test database");
        db::migrate(&settings.database).await.expect("migrate");
        let pool = db::pool(&settings.database).expect("pool");
        let keyring = Arc::new(Keyring::from_settings(&settings.secrets).expect("keyring"));
        let amqp = broker::connect(
            settings.amqp_url(),
            &settings.amqp.tls_ca_file,
            "appevents tests",
            Recovery::None,
        )
        .await
        .expect("broker");
        worker_topology(&settings)
            .declare(&amqp)
            .await
            .expect("topology");
        let channel = amqp.create_channel().await.expect("channel");
        TestApp {
            tag,
            settings,
            pool,
            keyring,
            amqp,
            channel,
            worker: None,
        }
    }

    pub async fn start_worker(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(worker::run(
            self.settings.clone(),
            async move {
                let _ = stopped.await;
            },
            Some(started_tx),
        ));
        let running = started_rx.await.expect("worker started");
        // The consumer is registered once the worker reports itself connected.
        let connected = eventually(Duration::from_secs(10), || async {
            running.context.metrics.consumer_connected.get() == 1
        })
        .await;
        assert!(connected, "worker never connected to the broker");
        self.worker = Some(WorkerHandle {
            stop,
            task,
            context: running.context,
            ops_addr: running.ops_addr,
        });
    }

    /// Stops the in-process worker as SIGTERM would and waits for it to exit.
    pub async fn stop_worker(&mut self) {
        if let Some(handle) = self.worker.take() {
            let _ = handle.stop.send(());
            let result = tokio::time::timeout(Duration::from_secs(30), handle.task)
                .await
                .expect("worker stops within 30s")
                .expect("worker task");
            result.expect("worker exits cleanly");
        }
    }

    pub fn worker(&self) -> &WorkerHandle {
        self.worker.as_ref().expect("worker running")
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker().ops_addr)
    }

    /// The worker's metrics, as Prometheus text.
    pub async fn metrics(&self) -> String {
        http_client()
            .get(self.ops_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn publisher(&self) -> EventPublisher {
        EventPublisher::connect(&self.settings, Recovery::None)
            .await
            .expect("publisher")
    }

    /// Publishes a valid event through the same code path as `appevents publish`.
    pub async fn publish(
        &self,
        name: &str,
        user: &str,
        payload: Value,
        id: Option<&str>,
    ) -> String {
        let publisher = self.publisher().await;
        let id = publisher
            .publish(&NewEvent {
                id: id.map(str::to_owned),
                name: name.to_owned(),
                user_id: user.to_owned(),
                payload,
                occurred_at: None,
            })
            .await
            .expect("publish");
        publisher.close().await;
        id
    }

    /// Publishes raw bytes to the exchange, as a careless producer might.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.settings.amqp.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish");
        drop(confirm);
    }

    /// Takes every message in the dead-letter queue (acknowledging it).
    pub async fn take_dead_letters(&self) -> Vec<DeadLetterMessage> {
        self.take_all(&self.settings.amqp.dead_letter_queue).await
    }

    /// Takes dead letters until there are `n` or `within` passes.
    pub async fn dead_letters_until(&self, n: usize, within: Duration) -> Vec<DeadLetterMessage> {
        let deadline = Instant::now() + within;
        let mut letters = self.take_dead_letters().await;
        while letters.len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
            letters.extend(self.take_dead_letters().await);
        }
        letters
    }

    pub async fn take_all(&self, queue: &str) -> Vec<DeadLetterMessage> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            message
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            out.push(DeadLetterMessage {
                body: message.delivery.data.clone(),
                headers: message
                    .delivery
                    .properties
                    .headers()
                    .clone()
                    .unwrap_or_default(),
            });
        }
        out
    }

    /// Messages waiting in a queue: ready ones only. A message a worker holds without
    /// having acknowledged it is not counted; to prove every message was acknowledged, use
    /// [`TestApp::unacknowledged_after_stop`].
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let declared = self
            .channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        declared.message_count()
    }

    /// Messages of `queue` no worker acknowledged. The worker is stopped first (closing its
    /// channel, which hands back what it held unacknowledged), so they are counted too.
    pub async fn unacknowledged_after_stop(&mut self, queue: &str) -> u32 {
        self.stop_worker().await;
        self.queue_depth(queue).await
    }

    pub async fn runs(&self, event_id: &str) -> Vec<Run> {
        appevents::pipeline::runs::list(
            &self.pool,
            &RunFilter {
                event_id: Some(event_id.to_owned()),
                before: None,
                limit: 1000,
                ..RunFilter::default()
            },
        )
        .await
        .expect("runs")
    }

    pub async fn all_runs(&self) -> Vec<Run> {
        appevents::pipeline::runs::list(
            &self.pool,
            &RunFilter {
                before: None,
                limit: 100_000,
                ..RunFilter::default()
            },
        )
        .await
        .expect("runs")
    }

    /// Waits until `n` runs of the event are in `status`; returns them all.
    pub async fn wait_for_runs(&self, event_id: &str, n: usize, status: RunStatus) -> Vec<Run> {
        let done = eventually(Duration::from_secs(20), || async {
            self.runs(event_id)
                .await
                .iter()
                .filter(|r| r.status == status)
                .count()
                >= n
        })
        .await;
        let runs = self.runs(event_id).await;
        assert!(
            done,
            "expected {n} {status:?} runs of {event_id}, have {runs:#?}"
        );
        runs
    }

    /// An app event with a default example payload.
    pub async fn app_event(&self, name: &str) {
        app_event::create(
            &self.pool,
            name,
            &serde_json::json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}),
            appevents::core::payload_check::Mode::Off,
        )
        .await
        .expect("app event");
    }

    pub async fn workflow(
        &self,
        name: &str,
        event: &str,
        provider: Provider,
        action: &str,
        options: Value,
        mapping: Value,
    ) -> Workflow {
        workflow::create(
            &self.pool,
            &NewWorkflow {
                name: name.to_owned(),
                event: event.to_owned(),
                provider,
                action: action.to_owned(),
                options,
                mapping,
                when: None,
                steps: Vec::new(),
            },
        )
        .await
        .expect("workflow")
    }

    pub async fn connection(
        &self,
        user: &str,
        provider: Provider,
        base_url: &str,
        token: &str,
    ) -> Uuid {
        self.connection_with(NewConnection {
            user_id: user.to_owned(),
            provider,
            base_url: base_url.to_owned(),
            settings: serde_json::json!({}),
            access_token: Some(SecretString::from(token.to_owned())),
            refresh_token: None,
            token_url: None,
            client_id: None,
            client_secret: None,
        })
        .await
    }

    pub async fn connection_with(&self, new: NewConnection) -> Uuid {
        connection::create(&self.pool, &self.keyring, &new)
            .await
            .expect("connection")
    }

    pub async fn subscribe(&self, user: &str, workflow: Uuid, connection: Uuid) {
        subscription::create(&self.pool, user, workflow, connection)
            .await
            .expect("subscription");
    }

    /// Stops the worker, drops the database and deletes the queues and exchange.
    pub async fn cleanup(mut self) {
        self.stop_worker().await;
        let topology = worker_topology(&self.settings);
        let mut queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];
        queues.push(topology.held_queue.clone());
        queues.extend(topology.retry_queues.iter().map(|(_, q)| q.clone()));
        for queue in queues {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .channel
            .exchange_delete(
                topology.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.amqp.close(200, "test done".into()).await;
        self.pool.close();
        drop_database(&self.settings).await;
    }
}

/// A connection to the shared test broker, and a channel on it, for a test's own checks.
pub async fn broker_channel() -> (lapin::Connection, lapin::Channel) {
    let connection = broker::connect(&amqp_url(), "", "appevents tests", Recovery::None)
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

pub fn worker_topology(settings: &Settings) -> Topology {
    Topology::new(&settings.amqp, &settings.retry.schedule)
}

pub async fn drop_database(settings: &Settings) {
    let config = db::pg_config(settings.database_url()).expect("url");
    let name = config.get_dbname().unwrap_or_default().to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    if let Ok((client, connection)) = admin.connect(tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client
            .batch_execute(&format!("drop database if exists \"{name}\" with (force)"))
            .await;
    }
}

pub struct DeadLetterMessage {
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

impl DeadLetterMessage {
    pub fn header(&self, key: &str) -> Option<String> {
        match self.headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            AMQPValue::LongLongInt(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// Polls `condition` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The real binary, configured for this test through the environment as an operator would.
pub fn appevents_command(settings: &Settings, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_appevents"));
    command.args(args);
    for (key, value) in settings_env(settings) {
        command.env(key, value);
    }
    command.kill_on_drop(true);
    command
}

/// The environment that reproduces `settings` for the binary.
pub fn settings_env(settings: &Settings) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let schedule: Vec<String> = settings.retry.schedule.iter().map(|d| ms(*d)).collect();
    let env = vec![
        ("APPEVENTS_ENVIRONMENT", "test".to_owned()),
        ("DATABASE_URL", settings.database_url().to_owned()),
        ("AMQP_URL", settings.amqp_url().to_owned()),
        ("APPEVENTS__AMQP__EXCHANGE", settings.amqp.exchange.clone()),
        ("APPEVENTS__AMQP__QUEUE", settings.amqp.queue.clone()),
        (
            "APPEVENTS__AMQP__DEAD_LETTER_QUEUE",
            settings.amqp.dead_letter_queue.clone(),
        ),
        (
            "APPEVENTS__AMQP__PREFETCH",
            settings.amqp.prefetch.to_string(),
        ),
        (
            "APPEVENTS__WORKER__CONCURRENCY",
            settings.worker.concurrency.to_string(),
        ),
        (
            "APPEVENTS__WORKER__OPS_LISTEN",
            settings.worker.ops_listen.clone(),
        ),
        (
            "APPEVENTS__WORKER__CLAIM_LEASE",
            ms(settings.worker.claim_lease),
        ),
        (
            "APPEVENTS__WORKER__SHUTDOWN_GRACE",
            ms(settings.worker.shutdown_grace),
        ),
        (
            "APPEVENTS__WORKER__MAX_DELIVERIES",
            settings.worker.max_deliveries.to_string(),
        ),
        ("APPEVENTS__RETRY__SCHEDULE", schedule.join(",")),
        ("APPEVENTS__RETRY__MIN_DELAY", ms(settings.retry.min_delay)),
        ("APPEVENTS__RETRY__MAX_DELAY", ms(settings.retry.max_delay)),
        (
            "APPEVENTS__RETRY__RATE_LIMITED_MIN_DELAY",
            ms(settings.retry.rate_limited_min_delay),
        ),
        ("APPEVENTS__HTTP__TIMEOUT", ms(settings.http.timeout)),
        (
            "APPEVENTS__RATE_LIMITS__HUBSPOT",
            settings.rate_limits.hubspot.clone(),
        ),
        ("APPEVENTS__HTTP__ALLOW", settings.http.allow.join(",")),
        (
            "APPEVENTS__SECRETS__ACTIVE_KEY",
            settings.secrets.active_key.clone(),
        ),
        ("APPEVENTS__LOG__FORMAT", "json".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for (id, key) in &settings.secrets.keys {
        env.push((
            format!("APPEVENTS__SECRETS__KEYS__{}", id.to_uppercase()),
            key.expose_secret().to_owned(),
        ));
    }
    env
}

/// Sends a signal to a child process.
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("child is running");
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A TCP relay in front of Postgres or RabbitMQ that a test can cut (drop every connection
/// and refuse new ones) and restore: an outage of one dependency for one test only.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let target = target.to_owned();
        let (accept_up, accept_connections) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_up.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections
                    .lock()
                    .expect("lock")
                    .push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            up,
            connections,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The readiness endpoint's status and body.
pub async fn readiness(app: &TestApp) -> (u16, String) {
    let response = http_client()
        .get(app.ops_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The event most tests publish.
pub const CONTACT_CREATED: &str = "Contact Created";

impl TestApp {
    /// `Contact Created` with one HubSpot create-contact workflow, switched on for user "u"
    /// against `crm`. Returns the workflow id.
    pub async fn hubspot_workflow(&self, crm: &str) -> Uuid {
        self.app_event(CONTACT_CREATED).await;
        let workflow = self
            .workflow(
                "hs",
                CONTACT_CREATED,
                Provider::Hubspot,
                "create-contact",
                serde_json::json!({}),
                serde_json::json!({"email": "{{payload.email}}", "firstname": "{{payload.first_name}}"}),
            )
            .await;
        let conn = self.connection("u", Provider::Hubspot, crm, "token").await;
        self.subscribe("u", workflow.id, conn).await;
        workflow.id
    }
}

/// Scripts a fake CRM: `calls` requests matching `method` and `route` get `response`, and
/// exactly that many are expected. With `limited`, later requests fall through to the next
/// mock mounted.
pub async fn answer(
    crm: &wiremock::MockServer,
    http_method: &str,
    route: impl wiremock::Match + 'static,
    response: wiremock::ResponseTemplate,
    calls: u64,
    limited: bool,
) {
    let mock = wiremock::Mock::given(wiremock::matchers::method(http_method))
        .and(route)
        .respond_with(response);
    let mock = if limited {
        mock.up_to_n_times(calls)
    } else {
        mock
    };
    mock.expect(calls).mount(crm).await;
}

impl TestApp {
    /// Puts a dead letter in the queue as the worker writes one: the event's body and the
    /// headers naming the event, user and workflow.
    pub async fn seed_dead_letter(
        &self,
        publisher: &appevents::transport::publisher::Publisher,
        event_id: &str,
        user: &str,
        workflow: Uuid,
        payload: Value,
    ) {
        let failure = appevents::core::failure::Failure::new(
            appevents::core::failure::FailureKind::Transient,
            "scripted outage",
        );
        let reason = appevents::transport::dead_letter::Reason {
            code: appevents::transport::dead_letter::ReasonCode::Exhausted,
            text: format!("retries exhausted: {}", failure.summary()),
        };
        let letter = SeededLetter {
            event_id,
            user,
            workflow,
            payload,
            reason,
            provider_calls: 9,
            failure: Some(&failure),
        };
        self.seed_letter(publisher, letter).await;
    }

    /// Puts a dead letter of `Contact Created` in the queue, with the reason given.
    pub async fn seed_letter(
        &self,
        publisher: &appevents::transport::publisher::Publisher,
        seeded: SeededLetter<'_>,
    ) {
        let body = serde_json::to_vec(&serde_json::json!({
            "id": seeded.event_id, "name": CONTACT_CREATED, "user_id": seeded.user,
            "payload": seeded.payload
        }))
        .expect("body");
        let event = appevents::core::event::parse(
            &body,
            &appevents::core::event::MessageMeta::default(),
            appevents::core::event::Limits {
                max_bytes: 1 << 22,
                max_depth: 32,
            },
        )
        .expect("valid event");
        let letter = appevents::transport::dead_letter::DeadLetter {
            reason: seeded.reason,
            event: Some(&event),
            workflow_id: Some(seeded.workflow),
            provider_calls: Some(seeded.provider_calls),
            failure: seeded.failure,
        };
        let properties = appevents::transport::dead_letter::properties(
            &appevents::transport::publisher::event_properties(seeded.event_id),
            &letter,
        );
        publisher
            .publish("", &self.settings.amqp.dead_letter_queue, &body, properties)
            .await
            .expect("seed dead letter");
    }

    /// The event ids of the dead letters, in queue order, without removing them.
    pub async fn dead_letter_ids(&self) -> Vec<String> {
        let channel = self.amqp.create_channel().await.expect("channel");
        let mut ids = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.settings.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic.get")
        {
            let headers = message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            let letter = DeadLetterMessage {
                body: message.delivery.data.clone(),
                headers,
            };
            ids.push(letter.header("x-appevents-event-id").unwrap_or_default());
        }
        // Closing the channel hands every message back, in place.
        channel.close(200, "peeked".into()).await.expect("close");
        ids
    }
}

/// A dead letter a test puts in the queue.
pub struct SeededLetter<'a> {
    pub event_id: &'a str,
    pub user: &'a str,
    pub workflow: Uuid,
    pub payload: Value,
    pub reason: appevents::transport::dead_letter::Reason,
    pub provider_calls: u32,
    pub failure: Option<&'a appevents::core::failure::Failure>,
}

/// A running `appevents serve`, in this process.
pub struct ServerHandle {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    pub async fn start(settings: &Settings) -> ServerHandle {
        let (stop, stopped) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(appevents::interfaces::http::run(
            settings.clone(),
            async move {
                let _ = stopped.await;
            },
            Some(started_tx),
        ));
        let addr = started_rx.await.expect("server started");
        ServerHandle {
            url: format!("http://{addr}"),
            stop: Some(stop),
            task,
        }
    }

    /// A request with the first test key.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        http_client()
            .post(format!("{}{path}", self.url))
            .bearer_auth("test-key-1")
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        http_client()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth("test-key-1")
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A TLS-terminating stand-in in front of a plain TCP service (the local RabbitMQ), with a
/// fresh certificate for `localhost` whose PEM is written to `ca_file` for clients to trust.
pub struct TlsProxy {
    pub addr: std::net::SocketAddr,
    pub ca_file: std::path::PathBuf,
    /// TLS handshakes completed: proof that a client really came through here.
    pub handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsProxy {
    pub async fn start(target: &str) -> TlsProxy {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let ca_file =
            std::env::temp_dir().join(format!("appevents-test-ca-{}.pem", Uuid::new_v4()));
        std::fs::write(&ca_file, cert.pem()).expect("write the CA file");
        let key =
            tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der())
                .expect("key");
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS proxy");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = handshakes.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, target, counted) =
                    (acceptor.clone(), target.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                    }
                });
            }
        });
        TlsProxy {
            addr,
            ca_file,
            handshakes,
        }
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// The `email` field of every record the stand-in CRM holds, in creation order.
pub fn record_emails(crm: &appevents_standin::Running) -> Vec<String> {
    crm.standin
        .records()
        .iter()
        .filter_map(|r| {
            r.fields
                .get("email")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

/// A stand-in CRM that answers every call with `status`, until its faults are cleared.
pub async fn failing_crm(status: u16) -> appevents_standin::Running {
    let crm = appevents_standin::spawn("127.0.0.1:0")
        .await
        .expect("stand-in");
    crm.standin.set_faults(appevents_standin::Faults {
        fail_rate: 1.0,
        fail_status: status,
        ..appevents_standin::Faults::default()
    });
    crm
}
