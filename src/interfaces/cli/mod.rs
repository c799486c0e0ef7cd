//! The command line: one binary, a subcommand per job. Bad arguments get a one-line message
//! and exit status 2; failures get a one-line message and exit status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

mod demo;

use crate::catalog::app_events::{self as app_event, AppEventChanges};
use crate::catalog::connections::{self as connection, NewConnection};
use crate::catalog::subscriptions as subscription;
use crate::catalog::workflows::{self as workflow, NewWorkflow, WorkflowChanges};
use crate::config::{LogFormat, LogSettings, Settings, Sources};
use crate::core::connection::ConnectionStatus;
use crate::core::payload_check::Mode;
use crate::core::provider::Provider;
use crate::integrations::Integrations;
use crate::interfaces::worker;
use crate::observe::logs as telemetry;
use crate::pipeline::dry_run as workflow_test;
use crate::pipeline::runs::{self as run, RunFilter, RunStatus};
use crate::store::{db, vault};
use crate::transport::publish::{EventPublisher, NewEvent};
use crate::transport::topology::Topology;
use crate::transport::{broker, dead_letter};

#[derive(Debug, Parser)]
#[command(
    name = "appevents",
    version,
    about = "App Events from RabbitMQ become records in each user's Salesforce and HubSpot"
)]
pub struct Cli {
    /// Configuration file layered over the defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Consume events and run their workflows until SIGTERM or Ctrl-C.
    Worker,
    /// Serve HTTP ingest (POST /v1/events) and the management API until SIGTERM or Ctrl-C.
    Serve,
    /// Run the whole story against a local stand-in CRM and print what happened.
    Demo(DemoArgs),
    /// Define app events: a name and an example payload.
    #[command(name = "app-event", subcommand)]
    AppEvent(AppEventCommand),
    /// A user's credentials for a provider account.
    #[command(subcommand)]
    Connection(ConnectionCommand),
    /// Workflows: an app event triggers one integration step with a field mapping.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Switch a workflow on for a user, bound to one of the user's connections.
    #[command(subcommand)]
    Subscription(SubscriptionCommand),
    /// Publish one event and wait for the broker's confirm. Prints the event id.
    Publish(PublishArgs),
    /// Run history.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Inspect, replay and purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Keys that encrypt connection secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// What is dead-lettered, with a summary by reason.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Show at most this many letters (the summary counts them all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move matching letters back to the work queue with a fresh attempt budget, for the
    /// workflows that failed. Each move is confirmed by the broker before the letter is removed.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Only show what would move.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete matching letters. Refuses without --yes.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Filters shared by the dlq commands; all given must match.
#[derive(Debug, Args)]
struct DlqFilter {
    /// Event name.
    #[arg(long)]
    event: Option<String>,
    #[arg(long)]
    event_id: Option<String>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    workflow: Option<Uuid>,
    /// Substring of the reason, case-insensitive.
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at least this long ago, e.g. 30m.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Dead-lettered at most this long ago, e.g. 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    newer_than: Option<std::time::Duration>,
}

impl DlqFilter {
    fn to_filter(&self) -> dead_letter::Filter {
        dead_letter::Filter {
            event_id: self.event_id.clone(),
            event_name: self.event.clone(),
            user_id: self.user.clone(),
            workflow_id: self.workflow,
            reason: self.reason.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
        }
    }
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Use this running stand-in CRM instead of starting one in this process.
    #[arg(long, value_name = "URL")]
    standin: Option<String>,
    /// Rely on workers already running instead of starting one in this process.
    #[arg(long)]
    no_worker: bool,
}

#[derive(Debug, Subcommand)]
enum AppEventCommand {
    /// Define an app event.
    Create {
        #[arg(long)]
        name: String,
        /// Example payload: JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        schema: String,
        /// Check live events' payloads against the example: off, warn (log and count) or
        /// reject (dead-letter).
        #[arg(long, value_name = "off|warn|reject", default_value = "off")]
        payload_check: Mode,
        #[arg(long)]
        json: bool,
    },
    /// App events with their aliases and payload check.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Rename (workflows stay attached, the old name stays an alias), replace the example
    /// payload, set the payload check, remove aliases.
    Update {
        /// Current name or id.
        event: String,
        /// New name; events published under the current one keep matching (an alias).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "JSON|@FILE")]
        schema: Option<String>,
        #[arg(long, value_name = "off|warn|reject")]
        payload_check: Option<Mode>,
        /// Stop matching events published under this old name; repeatable.
        #[arg(long = "remove-alias", value_name = "ALIAS")]
        remove_aliases: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete an app event no workflow uses.
    Delete { event: String },
}

#[derive(Debug, Subcommand)]
enum ConnectionCommand {
    /// Store a user's credentials for a provider account. Prints the id.
    Create(ConnectionArgs),
    /// Connections without their secrets, with their status (active / needs_reauth).
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replace a connection's URL and credentials (the user reconnected the account); it
    /// becomes active again. Its subscriptions stay bound to it.
    Update {
        id: Uuid,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Delete a connection and the subscriptions bound to it.
    Delete { id: Uuid },
    /// Re-encrypt every stored secret under the active key (after adding a new key).
    RotateKey,
}

#[derive(Debug, Args)]
struct ConnectionArgs {
    #[arg(long)]
    user: String,
    #[arg(long)]
    provider: Provider,
    /// API base: the Salesforce instance URL, https://api.hubapi.com, or an HTTP endpoint.
    #[arg(long)]
    base_url: String,
    #[arg(long)]
    access_token: Option<String>,
    #[arg(long, requires = "token_url")]
    refresh_token: Option<String>,
    /// OAuth token endpoint used to refresh the access token.
    #[arg(long, requires = "refresh_token")]
    token_url: Option<String>,
    #[arg(long)]
    client_id: Option<String>,
    #[arg(long)]
    client_secret: Option<String>,
    /// Salesforce REST API version for this connection, e.g. v62.0.
    #[arg(long)]
    api_version: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum WorkflowCommand {
    /// Create a workflow. Prints the id.
    Create(WorkflowArgs),
    List {
        /// Only the workflows of this app event (name or id).
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        json: bool,
    },
    Update {
        id: Uuid,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long, value_name = "JSON|@FILE")]
        mapping: Option<String>,
        #[command(flatten)]
        options: StepOptions,
        #[arg(long)]
        json: bool,
    },
    /// Delete a workflow with its subscriptions and run history.
    Delete { id: Uuid },
    /// Dry run: print the request the worker would send for an event made from the app
    /// event's example payload, secrets masked. Sends nothing unless --send.
    Test(WorkflowTestArgs),
}

#[derive(Debug, Args)]
struct WorkflowTestArgs {
    /// The workflow's id.
    workflow: Uuid,
    /// The event's user; their subscription's connection is used (a placeholder if they
    /// have none).
    #[arg(long, conflicts_with = "connection")]
    user: Option<String>,
    /// Use this connection (the event's user is its user).
    #[arg(long, value_name = "CONNECTION_ID")]
    connection: Option<Uuid>,
    /// The payload instead of the app event's example: a JSON object, or @FILE.
    #[arg(long, value_name = "JSON|@FILE")]
    payload: Option<String>,
    /// Really send it, once, through the worker's step (needs a real connection); prints
    /// the response status and provider id, or the classified failure.
    #[arg(long)]
    send: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct WorkflowArgs {
    #[arg(long)]
    name: String,
    /// The app event that triggers it (name or id).
    #[arg(long)]
    event: String,
    #[arg(long)]
    provider: Provider,
    /// salesforce: create | upsert; hubspot: create-contact | upsert-contact; http: request.
    #[arg(long)]
    action: String,
    /// Field mapping template: JSON, or @FILE.
    #[arg(long, value_name = "JSON|@FILE")]
    mapping: String,
    #[command(flatten)]
    options: StepOptions,
    #[arg(long)]
    json: bool,
}

/// The step's options, as flags or as one JSON object.
#[derive(Debug, Args, Default)]
struct StepOptions {
    /// All options as a JSON object (or @FILE); the flags below override its keys.
    #[arg(long, value_name = "JSON|@FILE")]
    options: Option<String>,
    /// Salesforce: the sObject (default Contact).
    #[arg(long)]
    sobject: Option<String>,
    /// Salesforce upsert: the external id field.
    #[arg(long)]
    external_id_field: Option<String>,
    /// HubSpot upsert: the property that identifies a contact (default email).
    #[arg(long)]
    id_property: Option<String>,
    /// HTTP: method (default POST).
    #[arg(long)]
    method: Option<String>,
    /// HTTP: URL template, absolute or relative to the connection's base URL.
    #[arg(long)]
    url: Option<String>,
    /// HTTP: a header as NAME:VALUE (value may reference the event); repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum SubscriptionCommand {
    /// Switch a workflow on for a user (again: rebinds the connection).
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        workflow: Uuid,
        #[arg(long)]
        connection: Uuid,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        workflow: Option<Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// Switch a workflow off for a user.
    Delete {
        #[arg(long)]
        user: String,
        #[arg(long)]
        workflow: Uuid,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    #[arg(long, required_unless_present = "file")]
    user: Option<String>,
    /// The payload: a JSON object, or @FILE.
    #[arg(long, value_name = "JSON|@FILE", required_unless_present = "file")]
    payload: Option<String>,
    /// The event id (the idempotency key); a UUIDv7 when omitted.
    #[arg(long)]
    id: Option<String>,
    /// RFC 3339 timestamp of when it happened.
    #[arg(long)]
    occurred_at: Option<String>,
    /// Publish every line of this file (newline-delimited JSON events, `-` for stdin), each
    /// confirmed; reconnects and carries on if the broker goes away. Prints each id.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "user", "payload", "id", "occurred_at"])]
    file: Option<String>,
    /// With --file: send each line as it is, without checking it against the contract
    /// (to see what the worker does with a bad message).
    #[arg(long, requires = "file")]
    unchecked: bool,
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// Runs, newest first.
    List(RunsListArgs),
    /// One run in full.
    Show { id: Uuid },
    /// Re-run one dead run: replays its dead letter (that workflow only, a fresh attempt budget).
    Retry { id: Uuid },
}

#[derive(Debug, Args)]
struct RunsListArgs {
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    workflow: Option<Uuid>,
    /// running | succeeded | retrying | dead
    #[arg(long, value_parser = RunStatus::parse)]
    status: Option<RunStatus>,
    #[arg(long)]
    event_id: Option<String>,
    /// Only runs created at or after this RFC 3339 time, or this long ago (e.g. 1h).
    #[arg(long, value_parser = parse_time)]
    since: Option<time::OffsetDateTime>,
    /// Only runs created before this RFC 3339 time, or this long ago.
    #[arg(long, value_parser = parse_time)]
    until: Option<time::OffsetDateTime>,
    #[arg(long, default_value_t = 100)]
    limit: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Print a new random key for secrets.keys.
    GenerateKey,
}

/// Parses an RFC 3339 time or a duration ago ("90s", "2h", "7d").
pub fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(at);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    Ok(time::OffsetDateTime::now_utc() - ago)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&format!("{err:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Help and version print as clap renders them; any other parse error becomes one line.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = err.print();
        return if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("error: {message} (see --help)");
    ExitCode::from(2)
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let settings =
        Settings::load(&Sources::from_env(cli.config.clone())).context("configuration")?;
    match cli.command {
        Command::Worker => {
            telemetry::init(&settings.log);
            worker::run(settings, shutdown_signal(), None).await
        }
        Command::Serve => {
            telemetry::init(&settings.log);
            crate::interfaces::http::run(settings, shutdown_signal(), None).await
        }
        Command::Demo(args) => {
            telemetry::init(&quiet_logs(&settings));
            demo::run(settings, args.standin, !args.no_worker).await
        }
        command => {
            telemetry::init(&quiet_logs(&settings));
            manage(command, settings).await
        }
    }
}

/// One-shot commands log only warnings, as text, so their output stays readable.
fn quiet_logs(settings: &Settings) -> LogSettings {
    LogSettings {
        format: LogFormat::Pretty,
        filter: if settings.log.filter == "info" {
            "warn".to_owned()
        } else {
            settings.log.filter.clone()
        },
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

async fn manage(command: Command, settings: Settings) -> anyhow::Result<()> {
    if let Command::Secrets(SecretsCommand::GenerateKey) = command {
        println!("{}", vault::generate_key()?);
        return Ok(());
    }
    if let Command::Migrate = command {
        let url = settings.database_url();
        if db::ensure_database(&settings.database).await? {
            println!(
                "created database {}",
                db::pg_config(url)?.get_dbname().unwrap_or("?")
            );
        }
        let applied = db::migrate(&settings.database).await?;
        if applied.is_empty() {
            println!("schema is up to date");
        }
        for name in applied {
            println!("applied {name}");
        }
        return Ok(());
    }
    if let Command::Publish(args) = command {
        return publish(&settings, args).await;
    }
    if let Command::Dlq(command) = command {
        return dlq(&settings, command).await;
    }
    if let Command::Runs(RunsCommand::Retry { id }) = command {
        return retry_run(&settings, id).await;
    }
    if let Command::Workflow(WorkflowCommand::Test(args)) = command {
        return test_workflow(&settings, args).await;
    }
    let pool = db::pool(&settings.database)?;
    match command {
        Command::AppEvent(command) => app_events(&pool, command).await,
        Command::Connection(command) => connections(&pool, &settings, command).await,
        Command::Workflow(command) => workflows(&pool, command).await,
        Command::Subscription(command) => subscriptions(&pool, command).await,
        Command::Runs(command) => runs(&pool, command).await,
        _ => bail!("unhandled command"),
    }
}

async fn publish(settings: &Settings, args: PublishArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.file {
        return publish_file(settings, file, args.unchecked).await;
    }
    let (Some(name), Some(user), Some(payload)) = (args.name, args.user, args.payload) else {
        bail!("--name, --user and --payload are required");
    };
    let payload = json_arg(&payload, "--payload")?;
    let publisher = EventPublisher::connect(settings, broker::Recovery::None)
        .await
        .context("cannot reach the broker")?;
    let result = publisher
        .publish(&NewEvent {
            id: args.id,
            name,
            user_id: user,
            payload,
            occurred_at: args.occurred_at,
        })
        .await;
    publisher.close().await;
    println!("{}", result?);
    Ok(())
}

/// One event per line, `{"name", "user_id", "payload", "id"?, "occurred_at"?}`.
#[derive(serde::Deserialize)]
struct EventLine {
    name: String,
    user_id: String,
    payload: Value,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    occurred_at: Option<String>,
}

async fn publish_file(settings: &Settings, file: &str, unchecked: bool) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(file)
                .await
                .with_context(|| format!("cannot read {file}"))?,
        )
    };
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut publisher: Option<EventPublisher> = None;
    let (mut published, mut refused, mut number) = (0usize, 0usize, 0usize);
    while let Some(line) = lines.next_line().await? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let event = if unchecked {
            None
        } else {
            match serde_json::from_str::<EventLine>(&line) {
                Ok(event) => Some(NewEvent {
                    id: event.id,
                    name: event.name,
                    user_id: event.user_id,
                    payload: event.payload,
                    occurred_at: event.occurred_at,
                }),
                Err(err) => {
                    eprintln!("line {number}: not an event: {err}");
                    refused += 1;
                    continue;
                }
            }
        };
        let mut outage = std::time::Duration::ZERO;
        loop {
            let current = match &publisher {
                Some(current) => current,
                None => match EventPublisher::connect(settings, broker::Recovery::None).await {
                    Ok(connected) => publisher.insert(connected),
                    Err(err) => {
                        outage = wait_for_broker(outage, &err.to_string()).await?;
                        continue;
                    }
                },
            };
            let sent = match &event {
                Some(event) => current.publish(event).await.map(Some),
                None => current
                    .publish_unchecked("unchecked", line.as_bytes())
                    .await
                    .map(|()| None)
                    .map_err(crate::transport::publish::PublishFailure::from),
            };
            match sent {
                Ok(id) => {
                    if let Some(id) = id {
                        println!("{id}");
                    }
                    published += 1;
                    break;
                }
                Err(crate::transport::publish::PublishFailure::Invalid(err)) => {
                    eprintln!("line {number}: invalid event: {err}");
                    refused += 1;
                    break;
                }
                Err(crate::transport::publish::PublishFailure::Broker(err)) => {
                    publisher = None;
                    outage = wait_for_broker(outage, &err.to_string()).await?;
                }
            }
        }
    }
    if let Some(publisher) = publisher {
        publisher.close().await;
    }
    eprintln!("published {published} event(s), refused {refused}");
    if refused > 0 {
        bail!("{refused} line(s) were not published");
    }
    Ok(())
}

/// Backs off while the broker is unreachable; gives up after two minutes without it.
async fn wait_for_broker(
    outage: std::time::Duration,
    error: &str,
) -> anyhow::Result<std::time::Duration> {
    let limit = std::time::Duration::from_secs(120);
    if outage >= limit {
        bail!("the broker has been unreachable for {limit:?}: {error}");
    }
    if outage.is_zero() {
        eprintln!("broker unavailable ({error}); retrying");
    }
    let pause = std::time::Duration::from_millis(500);
    tokio::time::sleep(pause).await;
    Ok(outage + pause)
}

/// A JSON argument given inline or as @FILE.
pub fn json_arg(text: &str, flag: &str) -> anyhow::Result<Value> {
    let source = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("{flag}: cannot read {path}"))?
        }
        None => text.to_owned(),
    };
    serde_json::from_str(&source).with_context(|| format!("{flag} is not valid JSON"))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

async fn app_events(
    pool: &deadpool_postgres::Pool,
    command: AppEventCommand,
) -> anyhow::Result<()> {
    match command {
        AppEventCommand::Create {
            name,
            schema,
            payload_check,
            json,
        } => {
            let schema = json_arg(&schema, "--schema")?;
            let created = app_event::create(pool, &name, &schema, payload_check).await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        AppEventCommand::List { json } => {
            let events = app_event::list(pool).await?;
            if json {
                return print_json(&events);
            }
            let rows = events
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        e.name.clone(),
                        e.aliases.join(", "),
                        e.payload_check.to_string(),
                        e.schema.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &["ID", "NAME", "ALIASES", "PAYLOAD CHECK", "EXAMPLE PAYLOAD"],
                &rows,
            );
        }
        AppEventCommand::Update {
            event,
            name,
            schema,
            payload_check,
            remove_aliases,
            json,
        } => {
            let changes = AppEventChanges {
                schema: schema.map(|s| json_arg(&s, "--schema")).transpose()?,
                name,
                payload_check,
                remove_aliases,
            };
            if changes.is_empty() {
                bail!(
                    "nothing to update: give --name, --schema, --payload-check or --remove-alias"
                );
            }
            let updated = app_event::update(pool, &event, &changes).await?;
            if json {
                return print_json(&updated);
            }
            println!("{}", updated.id);
        }
        AppEventCommand::Delete { event } => {
            app_event::delete(pool, &event).await?;
            println!("deleted");
        }
    }
    Ok(())
}

async fn connections(
    pool: &deadpool_postgres::Pool,
    settings: &Settings,
    command: ConnectionCommand,
) -> anyhow::Result<()> {
    match command {
        ConnectionCommand::Create(args) => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let json = args.json;
            let id = connection::create(pool, &keyring, &args.into_new()).await?;
            if json {
                return print_json(&json!({"id": id}));
            }
            println!("{id}");
        }
        ConnectionCommand::Update {
            id,
            connection: args,
        } => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            connection::replace(pool, &keyring, id, &args.into_new()).await?;
            println!("{id}");
        }
        ConnectionCommand::List { user, json } => {
            let list = connection::list(pool, user.as_deref()).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|c| {
                    let status = match &c.status_reason {
                        Some(reason) => format!("{} ({reason})", status_name(c.status)),
                        None => status_name(c.status).to_owned(),
                    };
                    vec![
                        c.id.to_string(),
                        c.user_id.clone(),
                        c.provider.to_string(),
                        c.base_url.clone(),
                        if c.has_refresh_token { "yes" } else { "no" }.to_owned(),
                        status,
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &[
                    "ID",
                    "USER",
                    "PROVIDER",
                    "BASE URL",
                    "REFRESHABLE",
                    "STATUS",
                ],
                &rows,
            );
        }
        ConnectionCommand::Delete { id } => {
            connection::delete(pool, id, None).await?;
            println!("deleted");
        }
        ConnectionCommand::RotateKey => {
            let keyring = vault::Keyring::from_settings(&settings.secrets)?;
            let changed = connection::rotate_key(pool, &keyring).await?;
            println!(
                "re-encrypted {changed} connection(s) under key {}",
                keyring.active_key_id()
            );
        }
    }
    Ok(())
}

impl ConnectionArgs {
    fn into_new(self) -> NewConnection {
        let mut connection_settings = serde_json::Map::new();
        if let Some(version) = &self.api_version {
            connection_settings.insert("api_version".into(), json!(version));
        }
        NewConnection {
            user_id: self.user,
            provider: self.provider,
            base_url: self.base_url,
            settings: Value::Object(connection_settings),
            access_token: self.access_token.map(SecretString::from),
            refresh_token: self.refresh_token.map(SecretString::from),
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret: self.client_secret.map(SecretString::from),
        }
    }
}

fn status_name(status: ConnectionStatus) -> &'static str {
    match status {
        ConnectionStatus::Active => "active",
        ConnectionStatus::NeedsReauth => "needs_reauth",
    }
}

impl StepOptions {
    /// The options object: `--options` with the flags laid over it. `None` when nothing given.
    fn to_value(&self) -> anyhow::Result<Option<Value>> {
        let mut options = match &self.options {
            Some(text) => match json_arg(text, "--options")? {
                Value::Object(map) => map,
                _ => bail!("--options must be a JSON object"),
            },
            None => serde_json::Map::new(),
        };
        let flags = [
            ("sobject", &self.sobject),
            ("external_id_field", &self.external_id_field),
            ("id_property", &self.id_property),
            ("method", &self.method),
            ("url", &self.url),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                options.insert(key.to_owned(), json!(value));
            }
        }
        if !self.headers.is_empty() {
            let mut headers = serde_json::Map::new();
            for header in &self.headers {
                let (name, value) = header
                    .split_once(':')
                    .with_context(|| format!("--header {header:?} is not NAME:VALUE"))?;
                headers.insert(name.trim().to_owned(), json!(value.trim()));
            }
            options.insert("headers".to_owned(), Value::Object(headers));
        }
        let given = self.options.is_some() || !options.is_empty();
        Ok(given.then_some(Value::Object(options)))
    }
}

async fn workflows(pool: &deadpool_postgres::Pool, command: WorkflowCommand) -> anyhow::Result<()> {
    match command {
        WorkflowCommand::Create(args) => {
            let new = NewWorkflow {
                name: args.name,
                event: args.event,
                provider: args.provider,
                action: args.action,
                options: args.options.to_value()?.unwrap_or_else(|| json!({})),
                mapping: json_arg(&args.mapping, "--mapping")?,
            };
            let created = workflow::create(pool, &new).await?;
            if args.json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        WorkflowCommand::List { event, json } => {
            let list = workflow::list(pool, event.as_deref()).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|w| {
                    vec![
                        w.id.to_string(),
                        w.name.clone(),
                        w.event.clone(),
                        w.provider.to_string(),
                        w.action.clone(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(&["ID", "NAME", "EVENT", "PROVIDER", "ACTION"], &rows);
        }
        WorkflowCommand::Update {
            id,
            name,
            event,
            action,
            mapping,
            options,
            json,
        } => {
            let changes = WorkflowChanges {
                name,
                event,
                action,
                options: options.to_value()?,
                mapping: mapping.map(|m| json_arg(&m, "--mapping")).transpose()?,
            };
            if changes.is_empty() {
                bail!("nothing to update: give --name, --event, --action, an option or --mapping");
            }
            let updated = workflow::update(pool, id, &changes).await?;
            if json {
                return print_json(&updated);
            }
            println!("{}", updated.id);
        }
        WorkflowCommand::Delete { id } => {
            workflow::delete(pool, id).await?;
            println!("deleted");
        }
        WorkflowCommand::Test(_) => bail!("workflow test needs the settings"),
    }
    Ok(())
}

/// `workflow test`: the dry run, and with `--send` one real call.
async fn test_workflow(settings: &Settings, args: WorkflowTestArgs) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let keyring = vault::Keyring::from_settings(&settings.secrets)?;
    let integrations = Integrations::new(&settings.http, &settings.salesforce)?;
    let spec = workflow_test::Spec {
        workflow: args.workflow,
        user: args.user,
        connection: args.connection,
        payload: args
            .payload
            .map(|p| json_arg(&p, "--payload"))
            .transpose()?,
    };
    let test = workflow_test::prepare(&pool, &keyring, &integrations, &spec).await?;
    if args.send && !test.has_connection() {
        bail!(
            "--send needs a real connection: give --user with a subscription to this workflow, or --connection"
        );
    }
    let sent = if args.send {
        Some(test.send(&integrations).await)
    } else {
        None
    };
    if args.json {
        let mut report = test.to_json();
        report["sent"] = json!(sent.is_some());
        match &sent {
            Some(Ok(output)) => {
                report["response"] =
                    json!({"status": output.status, "provider_id": output.provider_id});
            }
            Some(Err(failure)) => report["failure"] = json!(failure),
            None => {}
        }
        print_json(&report)?;
    } else {
        println!("{}", test.to_text());
        println!();
        match &sent {
            None => println!("dry run: nothing was sent (--send sends it)"),
            Some(Ok(output)) => println!(
                "sent: status {}, provider id {}",
                output.status,
                output.provider_id.as_deref().unwrap_or("(none)")
            ),
            Some(Err(failure)) => println!("sent: failed: {}", failure.summary()),
        }
    }
    if let Some(Err(failure)) = sent {
        bail!("the step failed: {}", failure.summary());
    }
    Ok(())
}

async fn subscriptions(
    pool: &deadpool_postgres::Pool,
    command: SubscriptionCommand,
) -> anyhow::Result<()> {
    match command {
        SubscriptionCommand::Create {
            user,
            workflow,
            connection,
            json,
        } => {
            let created = subscription::create(pool, &user, workflow, connection).await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        SubscriptionCommand::List {
            user,
            workflow,
            json,
        } => {
            let list = subscription::list(pool, user.as_deref(), workflow).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.user_id.clone(),
                        s.workflow_id.to_string(),
                        s.workflow.clone(),
                        s.event.clone(),
                        s.connection_id.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(&["USER", "WORKFLOW", "NAME", "EVENT", "CONNECTION"], &rows);
        }
        SubscriptionCommand::Delete { user, workflow } => {
            subscription::delete(pool, &user, workflow).await?;
            println!("deleted");
        }
    }
    Ok(())
}

async fn runs(pool: &deadpool_postgres::Pool, command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List(args) => {
            if args.limit < 1 {
                bail!("--limit must be at least 1");
            }
            let filter = RunFilter {
                user_id: args.user,
                workflow_id: args.workflow,
                status: args.status,
                event_id: args.event_id,
                since: args.since,
                until: args.until,
                limit: args.limit,
            };
            let list = run::list(pool, &filter).await?;
            if args.json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.created_at
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        r.user_id.clone(),
                        r.workflow.clone(),
                        r.event_id.clone(),
                        r.status.as_str().to_owned(),
                        r.attempts.to_string(),
                        r.provider_id.clone().unwrap_or_default(),
                        r.last_error
                            .as_ref()
                            .and_then(|e| {
                                serde_json::from_value::<crate::core::failure::Failure>(e.clone())
                                    .ok()
                            })
                            .map(|f| f.summary())
                            .unwrap_or_default(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                &[
                    "RUN",
                    "CREATED",
                    "USER",
                    "WORKFLOW",
                    "EVENT",
                    "STATUS",
                    "ATTEMPTS",
                    "PROVIDER ID",
                    "LAST ERROR",
                ],
                &rows,
            );
        }
        RunsCommand::Show { id } => print_json(&run::get(pool, id).await?)?,
        RunsCommand::Retry { .. } => bail!("runs retry needs the broker"),
    }
    Ok(())
}

/// A one-shot connection to the broker (no recovery: a command fails rather than waits) and
/// the topology the workers use.
async fn broker_session(
    settings: &Settings,
    name: &str,
) -> anyhow::Result<(lapin::Connection, Topology)> {
    let connection = broker::connect(
        settings.amqp_url(),
        &settings.amqp.tls_ca_file,
        name,
        broker::Recovery::None,
    )
    .await
    .context("cannot reach the broker")?;
    let topology = Topology::new(&settings.amqp, &settings.retry.schedule);
    Ok((connection, topology))
}

/// Replays the dead letter of one dead run.
async fn retry_run(settings: &Settings, id: Uuid) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let found = run::get(&pool, id).await?;
    if found.status != RunStatus::Dead {
        bail!(
            "run {id} is {}, not dead: nothing to retry",
            found.status.as_str()
        );
    }
    let filter = dead_letter::Filter {
        event_id: Some(found.event_id.clone()),
        user_id: Some(found.user_id.clone()),
        workflow_id: Some(found.workflow_id),
        ..dead_letter::Filter::default()
    };
    let (connection, topology) = broker_session(settings, "appevents runs retry").await?;
    let report = dead_letter::walk(
        &connection,
        &topology,
        &filter,
        dead_letter::Action::Replay,
        |_| {},
    )
    .await;
    let _ = connection.close(200, "done".into()).await;
    let report = report?;
    if report.moved == 0 {
        bail!(
            "run {id} has no dead letter to replay (purged?); publish event {} again to run it",
            found.event_id
        );
    }
    println!(
        "replayed run {id} (event {}, workflow {})",
        found.event_id, found.workflow
    );
    Ok(())
}

async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let (connection, topology) = broker_session(settings, "appevents dlq").await?;
    let result = dlq_walk(&connection, &topology, command).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn dlq_walk(
    connection: &lapin::Connection,
    topology: &Topology,
    command: DlqCommand,
) -> anyhow::Result<()> {
    use dead_letter::Action;
    let (filter, action, json, limit) = match &command {
        DlqCommand::List {
            filter,
            json,
            limit,
        } => (filter, Action::List, *json, *limit),
        DlqCommand::Replay {
            filter,
            dry_run,
            json,
        } => (
            filter,
            if *dry_run {
                Action::List
            } else {
                Action::Replay
            },
            *json,
            usize::MAX,
        ),
        DlqCommand::Purge { filter, yes, json } => (
            filter,
            if *yes { Action::Purge } else { Action::List },
            *json,
            usize::MAX,
        ),
    };
    let mut letters = Vec::new();
    let report = dead_letter::walk(
        connection,
        topology,
        &filter.to_filter(),
        action,
        |letter| {
            if letters.len() < limit {
                letters.push(letter.clone());
            }
        },
    )
    .await?;
    if json {
        print_json(&json!({"report": report, "letters": letters}))?;
    } else {
        print_letters(&letters);
        print_report(&command, &report);
    }
    if let DlqCommand::Purge { yes: false, .. } = command
        && report.matched > 0
    {
        bail!(
            "refusing to purge {} dead letter(s) without --yes",
            report.matched
        );
    }
    Ok(())
}

fn print_letters(letters: &[dead_letter::Letter]) {
    if letters.is_empty() {
        return;
    }
    let rows = letters
        .iter()
        .map(|l| {
            vec![
                l.position.to_string(),
                l.dead_lettered_at
                    .and_then(|at| {
                        at.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default(),
                l.event_name.clone().unwrap_or_default(),
                l.user_id.clone().unwrap_or_default(),
                l.workflow_id.clone().unwrap_or_default(),
                l.attempts.map(|a| a.to_string()).unwrap_or_default(),
                l.reason.clone(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "#",
            "DEAD-LETTERED",
            "EVENT",
            "USER",
            "WORKFLOW",
            "ATTEMPTS",
            "REASON",
        ],
        &rows,
    );
    println!();
}

fn print_report(command: &DlqCommand, report: &dead_letter::Report) {
    let by_reason: Vec<String> = report
        .by_reason
        .iter()
        .map(|(reason, count)| format!("{reason}: {count}"))
        .collect();
    let summary = if by_reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_reason.join(", "))
    };
    let line = match command {
        DlqCommand::List { .. } => format!("{} dead letter(s) match{summary}", report.matched),
        DlqCommand::Replay { dry_run: true, .. } => {
            format!("would replay {} dead letter(s){summary}", report.matched)
        }
        DlqCommand::Replay { .. } => format!("replayed {} dead letter(s){summary}", report.moved),
        DlqCommand::Purge { yes: true, .. } => {
            format!("purged {} dead letter(s){summary}", report.purged)
        }
        DlqCommand::Purge { .. } => format!("{} dead letter(s) match{summary}", report.matched),
    };
    println!(
        "{line}; {} scanned, the others left in place",
        report.scanned
    );
}
