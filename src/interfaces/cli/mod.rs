//! The command line: one binary, a subcommand per job, a file per command group that owns
//! its arguments and its handler. Bad arguments get a one-line message and exit status 2;
//! failures get a one-line message and exit status 1.

mod app_event;
mod connection;
mod demo;
mod dlq;
mod history;
mod migrate;
mod output;
mod publish;
pub(crate) mod runs;
mod secrets;
mod subscription;
mod users;
mod workflow;
mod workflow_files;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use self::app_event::AppEventCommand;
use self::connection::ConnectionCommand;
use self::demo::DemoArgs;
use self::dlq::DlqCommand;
use self::history::HistoryCommand;
use self::publish::PublishArgs;
use self::runs::RunsCommand;
use self::secrets::SecretsCommand;
use self::subscription::SubscriptionCommand;
use self::users::UsersCommand;
use self::workflow::WorkflowCommand;
use crate::config::{LogFormat, LogSettings, Settings, Sources};
use crate::interfaces::{http, worker};
use crate::observe::{errors, logs};
use crate::store::vault::VaultError;

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
    /// Retention of the run history (the deduplication window).
    #[command(subcommand)]
    History(HistoryCommand),
    /// Inspect, replay and purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Keys that encrypt connection secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// The product's end users: user tokens for the Connect Portal.
    #[command(subcommand)]
    Users(UsersCommand),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // One TLS crypto provider for the whole process (outbound HTTP, amqps://, Postgres
    // TLS), installed before anything uses it.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            eprintln!("error: {}", errors::report_any(&err));
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

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let settings =
        Settings::load(&Sources::from_env(cli.config.clone())).context("configuration")?;
    if cli.command.is_service() {
        logs::init(&settings.log);
    } else {
        logs::init(&quiet_logs(&settings));
    }
    let read_from = settings.read_from.join(", ");
    let result = match cli.command {
        Command::Migrate => migrate::run(&settings).await,
        Command::Worker => worker::run(settings, shutdown_signal(), None).await,
        Command::Serve => http::run(settings, shutdown_signal(), None).await,
        Command::Demo(args) => demo::run(settings, args).await,
        Command::AppEvent(command) => app_event::run(&settings, command).await,
        Command::Connection(command) => connection::run(&settings, command).await,
        Command::Workflow(command) => workflow::run(&settings, command).await,
        Command::Subscription(command) => subscription::run(&settings, command).await,
        Command::Publish(args) => publish::run(&settings, args).await,
        Command::Runs(command) => runs::run(&settings, command).await,
        Command::History(command) => history::run(&settings, command).await,
        Command::Dlq(command) => dlq::run(&settings, command).await,
        Command::Secrets(command) => secrets::run(command),
        Command::Users(command) => users::run(&settings, command),
    };
    // A missing or unusable key depends on which files were read: say which.
    result.map_err(|err| {
        if err
            .chain()
            .any(|e| e.downcast_ref::<VaultError>().is_some())
        {
            anyhow::anyhow!(
                "{}; configuration read: {read_from}",
                errors::report_any(&err)
            )
        } else {
            err
        }
    })
}

impl Command {
    /// Long-running processes log as configured (JSON by default); one-shot commands quietly.
    fn is_service(&self) -> bool {
        matches!(self, Command::Worker | Command::Serve)
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
