//! `appevents publish`: one event, or a file of them, each confirmed by the broker.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde_json::Value;

use super::output::json_arg;
use crate::catalog::app_events;
use crate::config::Settings;
use crate::store::db;
use crate::transport::broker::{self, Recovery};
use crate::transport::publish::{EventPublisher, NewEvent, PublishFailure};

#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// The event's name (the routing key): an app event's name or alias.
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    /// The product's end user the event is about.
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

pub(super) async fn run(settings: &Settings, args: PublishArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.file {
        return publish_file(settings, file, args.unchecked).await;
    }
    let (Some(name), Some(user), Some(payload)) = (args.name, args.user, args.payload) else {
        bail!("--name, --user and --payload are required");
    };
    let payload = json_arg(&payload, "--payload")?;
    let publisher = EventPublisher::connect(settings, Recovery::None)
        .await
        .map_err(|err| anyhow!(broker::connect_failure(settings.amqp_url(), &err)))?;
    let event_name = name.clone();
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
    warn_if_unknown(settings, &event_name).await;
    Ok(())
}

/// An event no app event answers to is accepted and counted as unmatched, by contract; a
/// person publishing by hand most likely mistyped it, so say so (on stderr, exit status 0).
/// Says nothing when the catalog cannot be read: publishing does not depend on it.
async fn warn_if_unknown(settings: &Settings, name: &str) {
    let Ok(pool) = db::pool(&settings.database) else {
        return;
    };
    if let Ok(false) = app_events::is_known_name(&pool, name).await {
        eprintln!(
            "warning: no app event is named {name:?} (names are case-sensitive): the event was \
             published and will be counted as unmatched"
        );
    }
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
        let mut outage = Duration::ZERO;
        loop {
            let current = match &publisher {
                Some(current) => current,
                None => match EventPublisher::connect(settings, Recovery::None).await {
                    Ok(connected) => publisher.insert(connected),
                    Err(err) => {
                        let why = broker::connect_failure(settings.amqp_url(), &err);
                        outage = wait_for_broker(outage, &why).await?;
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
                    .map_err(PublishFailure::from),
            };
            match sent {
                Ok(id) => {
                    if let Some(id) = id {
                        println!("{id}");
                    }
                    published += 1;
                    break;
                }
                Err(PublishFailure::Invalid(err)) => {
                    eprintln!("line {number}: invalid event: {err}");
                    refused += 1;
                    break;
                }
                Err(PublishFailure::Broker(err)) => {
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
async fn wait_for_broker(outage: Duration, error: &str) -> anyhow::Result<Duration> {
    let limit = Duration::from_secs(120);
    if outage >= limit {
        bail!("the broker has been unreachable for {limit:?}: {error}");
    }
    if outage.is_zero() {
        eprintln!("broker unavailable ({error}); retrying");
    }
    let pause = Duration::from_millis(500);
    tokio::time::sleep(pause).await;
    Ok(outage + pause)
}
