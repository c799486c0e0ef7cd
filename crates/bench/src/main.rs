//! The benchmark: the worker's throughput and latency beside the broker's own ceiling,
//! measured in the same run on the local RabbitMQ and Postgres.
//!
//! ```text
//! cargo run --release --bin bench                          # 100,000 events per phase
//! cargo run --release --bin bench -- --backlog 1000000     # and peak RSS over a 1M backlog
//! ```
//!
//! Phases, each on its own queue names in a fresh database:
//! 1. ceiling: N persistent events published with confirms, then consumed by a bare lapin
//!    consumer that acknowledges each and does nothing else;
//! 2. the worker (the real binary, a separate process) draining the same N events with 0, 1
//!    and 2 workflows per event, each workflow an HTTP call to a stand-in CRM answering 201
//!    (a separate process) and a recorded run;
//! 3. end-to-end latency, publish → run recorded, at a fixed open-loop rate: every event's
//!    latency is measured from the moment it was *scheduled* to be sent, so a slow moment
//!    delays the measurements after it instead of hiding them (no coordinated omission);
//! 4. with `--backlog`, the worker's peak RSS while draining that many queued events.
//!
//! `--history N` measures the run store instead: see the `history` module; `--console N` the
//! operator console's pages: see the `console` module.
//!
//! Printed: events/s and the ratio to the ceiling, latency percentiles, the worker's peak RSS
//! and CPU time per event.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use appevents::catalog::connections::{self, NewConnection};
use appevents::catalog::workflow_files;
use appevents::catalog::workflows::{self, NewWorkflow};
use appevents::catalog::{app_events, subscriptions};
use appevents::config::Settings;
use appevents::core::payload_check::Mode;
use appevents::core::provider::Provider;
use appevents::store::db;
use appevents::store::vault::Keyring;
use appevents::transport::broker::{self, Recovery};
use appevents::transport::headers;
use appevents::transport::publisher::event_properties;
use appevents::transport::topology::Topology;
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::process::{Child, Command};

mod batching;
mod console;
mod fleet;
mod history;

const EVENT: &str = "Contact Created";
const BENCH_KEY: &str = "YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtYmVuY2ghISE=";

#[derive(Parser, Clone)]
#[command(about = "Benchmark the worker beside the broker's own ceiling")]
struct Args {
    /// Events per throughput phase.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Open-loop rate of the latency phase, events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of the latency phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Also drain a backlog of this many events and report the worker's peak RSS.
    #[arg(long, default_value_t = 0)]
    backlog: usize,
    /// Instead of the phases above: fill the run store with this many runs over 30 days and
    /// measure it beside the empty store (claim, record, drain, listings, dropping a day).
    #[arg(long, default_value_t = 0)]
    history: i64,
    /// Instead: time every operator console page on the empty store, then with this many
    /// runs in the history (filled as --history fills it).
    #[arg(long, default_value_t = 0)]
    console: i64,
    /// Instead of the phases above: four workers against one HubSpot account that the
    /// stand-in limits to this many calls per interval (`200/5s`), draining six intervals'
    /// worth of events; prints the share of 429s and the throughput against the limit.
    #[arg(long)]
    fleet_limit: Option<appevents::config::rate_limit::RateLimit>,
    /// Instead of the phases above: one user's `--events` events with one HubSpot
    /// upsert-contact workflow, drained with batching on and off by turns, `--repeat`
    /// rounds, beside the broker's ceiling; prints events/s, the ratio to the ceiling and
    /// HubSpot calls per event.
    #[arg(long)]
    batching: bool,
    /// Run the workers of the phases above with batching off (`batching.enabled = false`):
    /// one record per call, as before batching; for an A/B of that path against an older
    /// build.
    #[arg(long)]
    no_batching: bool,
    /// The database to create, use and drop (default `appevents_bench_` and a random tag,
    /// which `ops/clean-test-leftovers.sh` drops if a run is interrupted).
    #[arg(long)]
    database_name: Option<String>,
    /// Runs of each throughput phase; the median is reported with the range.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Body size of each event, bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// The worker binary to measure (default: `appevents` next to this program); to compare
    /// two builds in the same conditions.
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

struct Bench {
    args: Args,
    tag: String,
    settings: Settings,
    pool: deadpool_postgres::Pool,
    keyring: Keyring,
    amqp: lapin::Connection,
    bin_dir: PathBuf,
    standin_url: String,
    standin: Child,
}

/// One throughput measurement.
struct Drain {
    events_per_sec: f64,
    cpu_per_event: Duration,
    peak_rss_kib: u64,
    /// Transactions the bench database committed or rolled back during the drain, per event:
    /// the worker's statements are each a transaction of its own, so this is its statements
    /// per event (and a few of the worker's start and the bench's own reads).
    transactions_per_event: f64,
    /// The database server's CPU during the drain, per event: every Postgres process's,
    /// background ones too. `None` when the server is not on this machine.
    database_cpu_per_event: Option<Duration>,
}

/// The three-step find-or-create workflow of the examples, measured as documented.
const FIND_OR_CREATE: &str =
    include_str!("../../../examples/workflows/salesforce-find-or-create.yaml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.history > 0 {
        // The empty store is a second database beside the full one, measured by turns with it.
        let mut empty_args = args.clone();
        empty_args.database_name = args.database_name.as_ref().map(|n| format!("{n}_empty"));
        let full = Bench::setup(args).await?;
        let empty = match Bench::setup(empty_args).await {
            Ok(empty) => empty,
            Err(e) => {
                full.teardown().await;
                return Err(e);
            }
        };
        let result = full.history(&empty, full.args.history).await;
        empty.teardown().await;
        full.teardown().await;
        return result;
    }
    if let Some(limit) = args.fleet_limit {
        let bench = Bench::setup(args).await?;
        let events = usize::try_from(limit.calls)? * 6;
        let result = bench.fleet(limit.calls, limit.per, events).await;
        bench.teardown().await;
        return result;
    }
    let bench = Bench::setup(args).await?;
    let result = if bench.args.batching {
        bench.batching().await
    } else if bench.args.console > 0 {
        bench.console(bench.args.console).await
    } else {
        bench.run().await
    };
    bench.teardown().await;
    result
}

impl Bench {
    async fn setup(args: Args) -> anyhow::Result<Bench> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let mut settings = Settings::defaults()?;
        let mut url = db::pg_config(&args.database_url)?;
        let name = args
            .database_name
            .clone()
            .unwrap_or_else(|| format!("appevents_bench_{tag}"));
        url.dbname(&name);
        settings.database.url = SecretString::from(libpq_url(&url));
        settings.amqp.url = SecretString::from(args.amqp_url.clone());
        settings.amqp.exchange = format!("bench.{tag}.events");
        settings.amqp.queue = format!("bench.{tag}.work");
        settings.amqp.dead_letter_queue = format!("bench.{tag}.dead");
        settings.secrets.active_key = "bench".into();
        settings.secrets.keys = [("bench".to_owned(), SecretString::from(BENCH_KEY))].into();
        db::ensure_database(&settings.database).await?;
        db::migrate(&settings.database).await?;
        let pool = db::pool(&settings.database)?;
        let keyring = Keyring::from_settings(&settings.secrets)?;
        let amqp = broker::connect(&args.amqp_url, "", "appevents bench", Recovery::None).await?;
        topology(&settings).declare(&amqp).await?;
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf();
        let port = free_port()?;
        let standin = Command::new(bin_dir.join("appevents-standin"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--forget"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start appevents-standin (build it: cargo build --release)")?;
        let standin_url = format!("http://127.0.0.1:{port}");
        wait_for(Duration::from_secs(10), || async {
            reqwest::get(format!("{standin_url}/_standin/requests"))
                .await
                .is_ok()
        })
        .await
        .context("stand-in CRM did not start")?;
        Ok(Bench {
            args,
            tag,
            settings,
            pool,
            keyring,
            amqp,
            bin_dir,
            standin_url,
            standin,
        })
    }

    async fn run(&self) -> anyhow::Result<()> {
        let n = self.args.events;
        println!(
            "appevents benchmark: {n} events of {} bytes per phase",
            self.args.body_bytes
        );
        println!("machine: {}", machine());
        println!();
        self.app_event().await?;
        let salesforce = self
            .workflow(
                "bench salesforce",
                Provider::Salesforce,
                "create",
                json!({"LastName": "{{payload.last_name}}", "Email": "{{payload.email}}"}),
            )
            .await?;
        let hubspot = self
            .workflow(
                "bench hubspot",
                Provider::Hubspot,
                "create-contact",
                json!({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}),
            )
            .await?;
        let find_or_create = self.find_or_create().await?;
        self.user("bench-0", &[]).await?;
        self.user("bench-1", &[salesforce]).await?;
        self.user("bench-2", &[salesforce, hubspot]).await?;
        self.user("bench-3", &[find_or_create]).await?;

        // Each throughput phase runs `repeat` times, alternating, and the median is reported
        // with the range: on a shared machine single runs vary by a third.
        let mut publish_rates = Vec::new();
        let mut ceilings = Vec::new();
        // Users bench-0, -1 and -2 have that many one-step workflows; bench-3 the three-step
        // find-or-create.
        let mut drains: Vec<Vec<Drain>> = (0..4).map(|_| Vec::new()).collect();
        for round in 0..self.args.repeat {
            let (publish_rate, ceiling) = self.ceiling().await?;
            publish_rates.push(publish_rate);
            ceilings.push(ceiling);
            for (workflows, runs) in drains.iter_mut().enumerate() {
                runs.push(self.drain(&format!("bench-{workflows}"), n).await?);
            }
            eprintln!("round {} of {} done", round + 1, self.args.repeat);
        }
        let ceiling = median(&ceilings);
        println!("{:<58} {:>10}  {:>12}", "", "median", "ratio");
        println!(
            "{:<58} {:>10}  {:>12}  {}",
            "broker: publish with confirms",
            rate(median(&publish_rates)),
            "",
            spread(&publish_rates)
        );
        println!(
            "{:<58} {:>10}  {:>12}  {}",
            "ceiling: bare lapin consumer, ack each",
            rate(ceiling),
            "1.00",
            spread(&ceilings)
        );
        let mut medians = Vec::new();
        for (workflows, runs) in drains.iter_mut().enumerate() {
            runs.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
            let rates: Vec<f64> = runs.iter().map(|d| d.events_per_sec).collect();
            let label = phase_label(workflows);
            let middle = median(&rates);
            println!(
                "{label:<58} {:>10}  {:>12.2}  {}",
                rate(middle),
                middle / ceiling,
                spread(&rates)
            );
            medians.push(runs.swap_remove(runs.len() / 2));
        }
        let drains = medians;
        println!();
        let broker_latency = self.broker_latency().await?;
        let latency = self.latency().await?;
        println!(
            "latency at {}/s for {:?} after a 2 s warm-up, 1 workflow ({} events), milliseconds:",
            self.args.rate,
            self.args.duration,
            latency.total.len()
        );
        for (label, h) in [
            ("baseline: publish -> bare consumer", &broker_latency),
            ("publish -> run recorded", &latency.total),
            ("  publish -> run claimed", &latency.to_claim),
            ("  claimed -> recorded", &latency.claim_to_record),
        ] {
            println!(
                "  {label:<36} p50 {:>7.1}  p99 {:>7.1}  p99.9 {:>7.1}  max {:>7.1}",
                millis(h, 0.5),
                millis(h, 0.99),
                millis(h, 0.999),
                h.max() as f64 / 1000.0
            );
        }
        println!();
        for (phase, drain) in drains.iter().enumerate() {
            println!(
                "{}: CPU {:.1} µs per event, {:.2} database transactions per event, peak RSS {:.1} MiB",
                phase_label(phase),
                drain.cpu_per_event.as_secs_f64() * 1e6,
                drain.transactions_per_event,
                drain.peak_rss_kib as f64 / 1024.0
            );
        }
        if self.args.backlog > 0 {
            let backlog = self.drain("bench-1", self.args.backlog).await?;
            println!(
                "backlog of {} events, 1 workflow: {} ({:.2} of ceiling), peak RSS {:.1} MiB, CPU {:.1} µs per event",
                self.args.backlog,
                rate(backlog.events_per_sec),
                backlog.events_per_sec / ceiling,
                backlog.peak_rss_kib as f64 / 1024.0,
                backlog.cpu_per_event.as_secs_f64() * 1e6
            );
        }
        Ok(())
    }

    /// examples/workflows/salesforce-find-or-create.yaml, read as `workflow apply` reads it.
    async fn find_or_create(&self) -> anyhow::Result<uuid::Uuid> {
        let file = workflow_files::parse(
            "salesforce-find-or-create.yaml",
            FIND_OR_CREATE,
            workflow_files::Format::Yaml,
        )
        .map_err(anyhow::Error::msg)?
        .file;
        let created = workflows::create(
            &self.pool,
            &NewWorkflow {
                name: "bench find or create".into(),
                event: EVENT.into(),
                provider: file.provider,
                action: String::new(),
                options: json!({}),
                mapping: json!({}),
                when: file.condition,
                steps: file.steps,
            },
        )
        .await?;
        Ok(created.id)
    }

    /// The app event every phase publishes, without a payload check.
    pub(crate) async fn app_event(&self) -> anyhow::Result<()> {
        app_events::create(
            &self.pool,
            EVENT,
            &json!({"email": "ada@example.com"}),
            Mode::Off,
        )
        .await?;
        Ok(())
    }

    async fn workflow(
        &self,
        name: &str,
        provider: Provider,
        action: &str,
        mapping: serde_json::Value,
    ) -> anyhow::Result<uuid::Uuid> {
        let created = workflows::create(
            &self.pool,
            &NewWorkflow {
                name: name.into(),
                event: EVENT.into(),
                provider,
                action: action.into(),
                options: json!({}),
                mapping,
                when: None,
                steps: Vec::new(),
            },
        )
        .await?;
        Ok(created.id)
    }

    async fn user(&self, user: &str, workflows: &[uuid::Uuid]) -> anyhow::Result<()> {
        for (index, workflow_id) in workflows.iter().enumerate() {
            let provider = if index == 0 {
                Provider::Salesforce
            } else {
                Provider::Hubspot
            };
            let connection = connections::create(
                &self.pool,
                &self.keyring,
                &NewConnection {
                    user_id: user.into(),
                    provider,
                    base_url: self.standin_url.clone(),
                    settings: json!({}),
                    access_token: Some(SecretString::from("bench-token")),
                    refresh_token: None,
                    token_url: None,
                    client_id: None,
                    client_secret: None,
                },
            )
            .await?;
            subscriptions::create(&self.pool, user, *workflow_id, connection).await?;
        }
        Ok(())
    }

    fn body(&self, id: &str, user: &str, n: usize) -> Vec<u8> {
        let mut event = json!({
            "id": id,
            "name": EVENT,
            "user_id": user,
            "payload": {"email": format!("{id}@bench.test"), "first_name": "Ada", "last_name": format!("L{n}"), "notes": ""},
        });
        let size = serde_json::to_vec(&event).map(|b| b.len()).unwrap_or(0);
        let pad = self.args.body_bytes.saturating_sub(size);
        event["payload"]["notes"] = json!("x".repeat(pad));
        serde_json::to_vec(&event).unwrap_or_default()
    }

    /// Publishes to `exchange`/`routing_key` with confirms, many in flight. Returns events/s.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: impl Iterator<Item = (String, Vec<u8>)>,
    ) -> anyhow::Result<f64> {
        let channel = self.amqp.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut pending = VecDeque::new();
        let started = Instant::now();
        let mut count = 0usize;
        for (id, body) in bodies {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &body,
                    event_properties(&id),
                )
                .await?;
            pending.push_back(confirm);
            count += 1;
            if pending.len() >= 2000
                && let Some(oldest) = pending.pop_front()
                && !oldest.await?.is_ack()
            {
                bail!("the broker refused a message");
            }
        }
        for confirm in pending {
            if !confirm.await?.is_ack() {
                bail!("the broker refused a message");
            }
        }
        let _ = channel.close(200, "published".into()).await;
        Ok(count as f64 / started.elapsed().as_secs_f64())
    }

    /// A channel on a fresh durable quorum queue named `queue`, like the work queue.
    async fn quorum_queue(&self, queue: &str) -> anyhow::Result<lapin::Channel> {
        let channel = self.amqp.create_channel().await?;
        let mut args = FieldTable::default();
        headers::set_str(&mut args, "x-queue-type", "quorum");
        channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        Ok(channel)
    }

    /// A consumer that does nothing but receive, with the worker's prefetch.
    async fn bare_consumer(
        &self,
        channel: &lapin::Channel,
        queue: &str,
        tag: &str,
    ) -> anyhow::Result<lapin::Consumer> {
        channel
            .basic_qos(self.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        Ok(channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// The broker's ceiling: a bare consumer on a quorum queue like the work queue.
    async fn ceiling(&self) -> anyhow::Result<(f64, f64)> {
        let queue = format!("bench.{}.ceiling", self.tag);
        let channel = self.quorum_queue(&queue).await?;
        let n = self.args.events;
        let bodies = (0..n).map(|i| {
            let id = format!("ceiling-{i}");
            let body = self.body(&id, "bench-0", i);
            (id, body)
        });
        let publish_rate = self.publish("", &queue, bodies).await?;
        let mut consumer = self
            .bare_consumer(&channel, &queue, "bench-ceiling")
            .await?;
        // Acknowledgements go out as fast as deliveries come in, without waiting for each
        // one in turn: what the broker can hand to one consumer, nothing else.
        let mut acks = futures::stream::FuturesUnordered::new();
        let mut started = None;
        let mut count = 0usize;
        while count < n {
            tokio::select! {
                Some(ack) = acks.next(), if !acks.is_empty() => { ack?; }
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else { break };
                    let delivery = delivery?;
                    started.get_or_insert_with(Instant::now);
                    acks.push(async move { delivery.ack(BasicAckOptions::default()).await });
                    count += 1;
                }
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
        delete_queue(&self.amqp, channel, &queue).await?;
        Ok((publish_rate, n as f64 / elapsed.as_secs_f64()))
    }

    /// The broker's own latency at the same open-loop rate: publish to a quorum queue, a
    /// bare consumer receives and acknowledges. What the worker's latency stands beside.
    async fn broker_latency(&self) -> anyhow::Result<Histogram<u64>> {
        let queue = format!("bench.{}.latency", self.tag);
        let channel = self.quorum_queue(&queue).await?;
        let mut consumer = self
            .bare_consumer(&channel, &queue, "bench-latency")
            .await?;
        let warmup = (f64::from(self.args.rate) * 2.0) as usize;
        let total = (f64::from(self.args.rate) * self.args.duration.as_secs_f64()) as usize;
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.args.rate));
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let receiver = tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut seen = 0;
            while seen < warmup + total {
                let Some(delivery) = consumer.next().await else {
                    break;
                };
                let delivery = delivery?;
                let arrived = tokio::time::Instant::now();
                delivery.ack(BasicAckOptions::default()).await?;
                seen += 1;
                let index: usize = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse().ok())
                    .unwrap_or(0);
                if index >= warmup {
                    let scheduled = start + interval * u32::try_from(index).unwrap_or(u32::MAX);
                    let micros = arrived
                        .saturating_duration_since(scheduled)
                        .as_micros()
                        .max(1);
                    histogram.record(u64::try_from(micros).unwrap_or(u64::MAX))?;
                }
            }
            Ok::<_, anyhow::Error>(histogram)
        });
        let publisher = self.amqp.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut pending = VecDeque::new();
        for i in 0..warmup + total {
            tokio::time::sleep_until(start + interval * u32::try_from(i).unwrap_or(u32::MAX)).await;
            let body = self.body(&format!("bl-{i}"), "bench-0", i);
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    event_properties(&i.to_string()),
                )
                .await?;
            pending.push_back(confirm);
            while pending.len() > 1000 {
                if let Some(oldest) = pending.pop_front() {
                    oldest.await?;
                }
            }
        }
        for confirm in pending {
            confirm.await?;
        }
        let histogram = tokio::time::timeout(Duration::from_secs(60), receiver).await???;
        delete_queue(&self.amqp, channel, &queue).await?;
        Ok(histogram)
    }

    /// Queues `n` events for `user`, then starts the worker and times it draining them.
    async fn drain(&self, user: &str, n: usize) -> anyhow::Result<Drain> {
        self.drain_with(user, n, !self.args.no_batching).await
    }

    async fn drain_with(&self, user: &str, n: usize, batching: bool) -> anyhow::Result<Drain> {
        let phase = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
        let bodies = (0..n).map(|i| {
            let id = format!("{user}-{phase}-{i}");
            let body = self.body(&id, user, i);
            (id, body)
        });
        self.publish(&self.settings.amqp.exchange, EVENT, bodies)
            .await?;
        let transactions_before = self.transactions().await?;
        let database_cpu_before = self.database_cpu().await;
        let mut worker = self.start_worker_with(batching).await?;
        let result = self.time_drain(&worker, n).await;
        stop(&mut worker.child).await;
        let mut drain = result?;
        // Backends report their counts at most once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let transactions = self
            .transactions()
            .await?
            .saturating_sub(transactions_before);
        drain.transactions_per_event = transactions as f64 / n.max(1) as f64;
        // The worker's backends exited during the pause above, their time added to the
        // server's.
        drain.database_cpu_per_event =
            database_cpu_before
                .zip(self.database_cpu().await)
                .map(|(before, after)| {
                    after.saturating_sub(before) / u32::try_from(n.max(1)).unwrap_or(u32::MAX)
                });
        Ok(drain)
    }

    /// CPU the database server has used so far, when it runs on this machine: its
    /// postmaster's, with the exited backends it has reaped, and each live child's. `None`
    /// when the backend's process id names no Postgres process here (a server elsewhere, or
    /// in a container with its own process ids).
    async fn database_cpu(&self) -> Option<Duration> {
        let client = self.pool.get().await.ok()?;
        let backend: i32 = client
            .query_one("select pg_backend_pid()", &[])
            .await
            .ok()?
            .try_get(0)
            .ok()?;
        let backend = u32::try_from(backend).ok()?;
        let postmaster = proc_stat(backend)?.parent;
        if !is_postgres(backend) || !is_postgres(postmaster) {
            return None;
        }
        // A backend reaped between reading the postmaster and reading its children would be
        // in neither: read again until the postmaster's reaped total holds still.
        for _ in 0..5 {
            let reaped = proc_stat(postmaster)?.with_children;
            let mut live = Duration::ZERO;
            for entry in std::fs::read_dir("/proc").ok()?.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                if let Some(child) = proc_stat(pid).filter(|s| s.parent == postmaster) {
                    live += child.own;
                }
            }
            if proc_stat(postmaster)?.with_children == reaped {
                return Some(reaped + live);
            }
        }
        None
    }

    /// Transactions committed and rolled back in the bench database so far.
    async fn transactions(&self) -> anyhow::Result<i64> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "select (xact_commit + xact_rollback)::int8 from pg_stat_database \
                 where datname = current_database()",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn time_drain(&self, worker: &Worker, n: usize) -> anyhow::Result<Drain> {
        let client = reqwest::Client::new();
        let metrics_url = format!("http://{}/metrics", worker.ops);
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut first: Option<(Instant, u64, Duration)> = None;
        loop {
            let done = events_done(&client, &metrics_url).await.unwrap_or(0);
            let now = Instant::now();
            if first.is_none() && done > 0 {
                first = Some((now, done, cpu_time(worker.pid)?));
            }
            if done as usize >= n {
                let (start, done_at_start, cpu_at_start) =
                    first.unwrap_or((now, 0, Duration::ZERO));
                let elapsed = now.duration_since(start).max(Duration::from_millis(1));
                let cpu = cpu_time(worker.pid)?.saturating_sub(cpu_at_start);
                let counted = (done - done_at_start).max(1);
                return Ok(Drain {
                    events_per_sec: counted as f64 / elapsed.as_secs_f64(),
                    cpu_per_event: cpu / u32::try_from(counted).unwrap_or(u32::MAX),
                    peak_rss_kib: peak_rss_kib(worker.pid)?,
                    transactions_per_event: 0.0,
                    database_cpu_per_event: None,
                });
            }
            if now > deadline {
                bail!("the worker did not drain {n} events within an hour ({done} done)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open-loop publishing at a fixed rate; latency from each event's scheduled send time
    /// to its run's recorded finish.
    async fn latency(&self) -> anyhow::Result<Latency> {
        let mut worker = self.start_worker().await?;
        let channel = self.amqp.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Two seconds at the same rate first, not measured: connections, prepared statements
        // and caches warm up as they would in a worker that has been running.
        let warmup = (f64::from(self.args.rate) * 2.0) as usize;
        let total = (f64::from(self.args.rate) * self.args.duration.as_secs_f64()) as usize;
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.args.rate));
        let start_instant = tokio::time::Instant::now() + Duration::from_millis(100);
        let start_wall = SystemTime::now()
            + Duration::from_millis(100)
            + interval * u32::try_from(warmup).unwrap_or(0);
        let mut pending = VecDeque::new();
        for i in 0..warmup + total {
            tokio::time::sleep_until(
                start_instant + interval * u32::try_from(i).unwrap_or(u32::MAX),
            )
            .await;
            let id = match i.checked_sub(warmup) {
                Some(measured) => format!("lat-{}-{measured}", self.tag),
                None => format!("warm-{}-{i}", self.tag),
            };
            let body = self.body(&id, "bench-1", i);
            let confirm = channel
                .basic_publish(
                    self.settings.amqp.exchange.as_str().into(),
                    EVENT.into(),
                    BasicPublishOptions::default(),
                    &body,
                    event_properties(&id),
                )
                .await?;
            pending.push_back(confirm);
            while pending.len() > 1000 {
                if let Some(oldest) = pending.pop_front() {
                    oldest.await?;
                }
            }
        }
        for confirm in pending {
            confirm.await?;
        }
        let client = self.pool.get().await?;
        let pattern = format!("lat-{}-%", self.tag);
        let all_done = wait_for(Duration::from_secs(120), || async {
            client
                .query_one(
                    "select count(*) from runs where event_id like $1 and status = 'succeeded'",
                    &[&pattern],
                )
                .await
                .map(|row| row.get::<_, i64>(0) as usize >= total)
                .unwrap_or(false)
        })
        .await;
        stop(&mut worker.child).await;
        all_done.context("latency phase: not every event was processed")?;
        let rows = client
            .query(
                "select event_id, extract(epoch from created_at)::float8, extract(epoch from finished_at)::float8 \
                 from runs where event_id like $1",
                &[&pattern],
            )
            .await?;
        let start_secs = start_wall.duration_since(UNIX_EPOCH)?.as_secs_f64();
        let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        let mut latency = Latency {
            total: histogram()?,
            to_claim: histogram()?,
            claim_to_record: histogram()?,
        };
        let micros = |seconds: f64| (seconds * 1e6).max(1.0) as u64;
        for row in rows {
            let id: String = row.get(0);
            let claimed: f64 = row.get(1);
            let finished: f64 = row.get(2);
            let index: f64 = id
                .rsplit('-')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0.0);
            let scheduled = start_secs + index * interval.as_secs_f64();
            latency.total.record(micros(finished - scheduled))?;
            latency.to_claim.record(micros(claimed - scheduled))?;
            latency.claim_to_record.record(micros(finished - claimed))?;
        }
        Ok(latency)
    }

    async fn start_worker(&self) -> anyhow::Result<Worker> {
        self.start_worker_with(!self.args.no_batching).await
    }

    /// Starts the worker binary, with `batching.enabled` as given.
    async fn start_worker_with(&self, batching: bool) -> anyhow::Result<Worker> {
        let port = free_port()?;
        let ops = format!("127.0.0.1:{port}");
        let s = &self.settings;
        let binary = self
            .args
            .worker_bin
            .clone()
            .unwrap_or_else(|| self.bin_dir.join("appevents"));
        let child = Command::new(binary)
            .arg("worker")
            .env("APPEVENTS_ENVIRONMENT", "bench")
            .env("DATABASE_URL", s.database_url())
            .env("AMQP_URL", s.amqp_url())
            .env("APPEVENTS__AMQP__EXCHANGE", &s.amqp.exchange)
            .env("APPEVENTS__AMQP__QUEUE", &s.amqp.queue)
            .env(
                "APPEVENTS__AMQP__DEAD_LETTER_QUEUE",
                &s.amqp.dead_letter_queue,
            )
            .env("APPEVENTS__WORKER__OPS_LISTEN", &ops)
            .env("APPEVENTS__BATCHING__ENABLED", batching.to_string())
            // The worker's own pruning pass must not run inside a measurement (`--history`
            // times its own drop of a day).
            .env("APPEVENTS__HISTORY__RETENTION", "400d")
            .env("APPEVENTS__SECRETS__ACTIVE_KEY", "bench")
            .env("APPEVENTS__SECRETS__KEYS__BENCH", BENCH_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start the worker (build it: cargo build --release)")?;
        let pid = child.id().context("worker pid")?;
        let client = reqwest::Client::new();
        let metrics_url = format!("http://{ops}/metrics");
        wait_for(Duration::from_secs(30), || async {
            let Ok(response) = client.get(&metrics_url).send().await else {
                return false;
            };
            response
                .text()
                .await
                .is_ok_and(|text| text.contains("appevents_consumer_connected 1"))
        })
        .await
        .context("the worker did not connect")?;
        Ok(Worker { child, pid, ops })
    }

    fn database_name(&self) -> String {
        db::pg_config(self.settings.database_url())
            .ok()
            .and_then(|config| config.get_dbname().map(str::to_owned))
            .unwrap_or_default()
    }

    async fn teardown(mut self) {
        let _ = self.standin.kill().await;
        let channel = self.amqp.create_channel().await;
        if let Ok(channel) = channel {
            let topology = topology(&self.settings);
            let mut queues = vec![
                topology.queue.clone(),
                topology.dead_letter_queue.clone(),
                topology.held_queue.clone(),
            ];
            queues.extend(topology.retry_queues.iter().map(|(_, q)| q.clone()));
            for queue in queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    topology.exchange.as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
        }
        self.pool.close();
        if let Ok(config) = db::pg_config(&self.args.database_url)
            && let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let _ = client
                .batch_execute(&format!(
                    "drop database if exists \"{}\" with (force)",
                    self.database_name().replace('"', "\"\"")
                ))
                .await;
        }
        let _ = self.settings.database.url.expose_secret();
    }
}

/// End-to-end latency, and its two halves: publish → run claimed (broker, consume,
/// resolve, claim) and claimed → outcome recorded (the CRM call, the record).
struct Latency {
    total: Histogram<u64>,
    to_claim: Histogram<u64>,
    claim_to_record: Histogram<u64>,
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

struct Worker {
    child: Child,
    pid: u32,
    ops: String,
}

/// Closes the consuming channel first: RabbitMQ 3.10 closes the whole connection when a
/// quorum queue is deleted under an active consumer that is then cancelled.
async fn delete_queue(
    amqp: &lapin::Connection,
    consuming: lapin::Channel,
    queue: &str,
) -> anyhow::Result<()> {
    consuming.close(200, "phase done".into()).await?;
    let channel = amqp.create_channel().await?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    channel.close(200, "deleted".into()).await?;
    Ok(())
}

fn topology(settings: &Settings) -> Topology {
    Topology::new(&settings.amqp, &settings.retry.schedule)
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Events the worker has settled, from its metrics.
async fn events_done(client: &reqwest::Client, url: &str) -> Option<u64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with("appevents_events_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// User plus system CPU time of a process.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    proc_stat(pid)
        .map(|stat| stat.own)
        .with_context(|| format!("/proc/{pid}/stat"))
}

/// What `/proc/PID/stat` says of a process's CPU and parent.
struct ProcStat {
    parent: u32,
    /// utime and stime.
    own: Duration,
    /// `own` with the children it has waited for (cutime and cstime).
    with_children: Duration,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, from the 3rd: the parent is the 4th,
    // utime, stime, cutime and cstime the 14th to 17th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    // Linux reports in USER_HZ, 100 on every mainstream architecture.
    let ticks = |t: u64| Duration::from_millis(t * 10);
    let own = field(14)? + field(15)?;
    Some(ProcStat {
        parent: u32::try_from(field(4)?).ok()?,
        own: ticks(own),
        with_children: ticks(own + field(16)? + field(17)?),
    })
}

fn is_postgres(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .context("VmHWM")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// "(runs: 18,001 .. 20,222/s)" when repeated.
fn spread(values: &[f64]) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!(
        "(range {:.0} .. {:.0}/s over {} runs)",
        min,
        max,
        values.len()
    )
}

/// What the throughput phase of that index drains.
fn phase_label(phase: usize) -> String {
    match phase {
        0 => "worker, 0 workflows (resolved, unmatched, acked)".to_owned(),
        1 => "worker, 1 workflow (HTTP 201 + run recorded)".to_owned(),
        2 => "worker, 2 workflows per event".to_owned(),
        _ => "worker, 3-step find-or-create (query, then create)".to_owned(),
    }
}

fn rate(per_sec: f64) -> String {
    format!("{:.0}/s", per_sec)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn libpq_url(config: &tokio_postgres::Config) -> String {
    let user = config.get_user().unwrap_or("postgres");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{user}{password}@{host}:{port}/{}",
        config.get_dbname().unwrap_or("postgres")
    )
}

async fn wait_for<F, Fut>(within: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("condition not met within {within:?}")
}
